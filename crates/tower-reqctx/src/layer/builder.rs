//! `ContextLayer`: the builder of the request's owner.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use reqctx::Context;
use tower_layer::Layer;

use super::config::Config;
use super::service::ContextService;
use crate::wire::ClampPolicy;
use crate::wire::header::DeadlineHeader;

/// Gives every request a [`Context`](reqctx::Context), cancelled with a cause when the
/// client goes away, the deadline passes, the response ends, or the server shuts down.
///
/// Put one on the whole app: it creates each request's context, owns its timer and answers
/// for it. A route that needs another timeout, longer or shorter, takes a
/// [`RouteTimeout`](crate::RouteTimeout), which has no other settings. One `ContextLayer`
/// per request: a second one inside the first answers `500` and says so (a route's settings
/// are `RouteTimeout`'s to change).
///
/// The deadline is the earliest of the effective server timeout (the route's
/// [`RouteTimeout`](crate::RouteTimeout), else this layer's [`timeout`], else none), the
/// client's `?timeout=` in Go duration syntax (`300ms`, `1.5s`, `2h45m`), and the
/// [deadline headers](ContextLayer::deadline_header) it reads. A client can shorten the
/// server's deadline, never lengthen it.
///
/// [`timeout`]: ContextLayer::timeout
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use tower_reqctx::{ContextLayer, ReqCtx, RouteTimeout};
///
/// async fn search(ctx: ReqCtx) -> Result<String, tower_reqctx::reqctx::Cancelled> {
///     let hits = ctx.run(async { 3 }).await?;
///     Ok(format!("{hits} hits"))
/// }
///
/// let app: Router = Router::new()
///     .route("/search", get(search))
///     // A slow report gets 30 s, whatever the server default is.
///     .route(
///         "/report",
///         get(search).layer(RouteTimeout::new(Duration::from_secs(30))),
///     )
///     // Server default 10 s; clients may ask for less with ?timeout=, at most 60 s.
///     .layer(
///         ContextLayer::new()
///             .timeout(Duration::from_secs(10))
///             .max_timeout(Duration::from_secs(60)),
///     );
/// # let _ = app;
/// ```
#[derive(Clone, Debug)]
pub struct ContextLayer {
    config: Arc<Config>,
}

impl Default for ContextLayer {
    fn default() -> ContextLayer {
        ContextLayer::new()
    }
}

impl ContextLayer {
    /// No server timeout, `?timeout=` read from the query, timeouts answered with 504 and
    /// no grace, request contexts under the connection's (or under
    /// [`background`](reqctx::Context::background) when there is none).
    pub fn new() -> ContextLayer {
        ContextLayer {
            config: Arc::new(Config::default()),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> ContextLayer {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The server-side timeout of the requests through this layer, counted from the
    /// moment the layer received the request. A route's [`RouteTimeout`](crate::RouteTimeout)
    /// replaces it for that route. Not capped by [`max_timeout`](Self::max_timeout). None by
    /// default.
    pub fn timeout(self, timeout: Duration) -> ContextLayer {
        self.with(|c| c.timeout = Some(timeout))
    }

    /// The largest timeout a client may ask for. Above it, [`clamp_policy`](Self::clamp_policy)
    /// decides. Server timeouts are not capped.
    pub fn max_timeout(self, max: Duration) -> ContextLayer {
        self.with(|c| c.max_timeout = Some(max))
    }

    /// What to do with a client's timeout above [`max_timeout`](Self::max_timeout):
    /// [`ClampPolicy::Clamp`] (the default) or [`ClampPolicy::Reject`].
    pub fn clamp_policy(self, policy: ClampPolicy) -> ContextLayer {
        self.with(|c| c.policy = policy)
    }

    /// The query parameter a client sets its timeout with (`"timeout"` by default), in Go
    /// duration syntax (`300ms`, `1.5s`, `2m`). Given more than once
    /// (`?timeout=300ms&timeout=1ms`), the first one counts and the rest are ignored; a
    /// value that does not parse is a `400` naming the parameter.
    pub fn query_param(self, name: &'static str) -> ContextLayer {
        self.with(|c| c.query_param = Some(name))
    }

    /// Ignore the query: clients cannot set a timeout that way.
    pub fn no_query_param(self) -> ContextLayer {
        self.with(|c| c.query_param = None)
    }

    /// The status the layer answers with when the handler has not answered by the deadline
    /// (plus the [`grace`](Self::grace)). Default `504 Gateway Timeout`.
    pub fn timeout_status(self, status: StatusCode) -> ContextLayer {
        self.with(|c| c.timeout_status = status)
    }

    /// How long after the deadline the handler may still answer for itself (its context is
    /// cancelled at the deadline). After that the layer drops the handler's future and
    /// answers with the [`timeout_status`](Self::timeout_status). Default zero.
    ///
    /// Which answer wins: with no grace, the layer's. A handler that waits on its context
    /// wakes at the same instant as the layer's timer, so a response that arrives once the
    /// deadline has passed is dropped and the layer answers, whichever woke first. With a
    /// grace, the handler's response wins until the grace runs out.
    pub fn grace(self, grace: Duration) -> ContextLayer {
        self.with(|c| c.grace = grace)
    }

    /// Reads the caller's remaining budget from a deadline header (off by default): a
    /// relative duration such as `grpc-timeout: 250m` sent by an upstream service through
    /// [`propagate`](crate::propagate). The same rules as `?timeout=` apply: it can only
    /// shorten the server's deadline, it is capped by [`max_timeout`](Self::max_timeout)
    /// (clamped or rejected), and a malformed value gets `400 Bad Request` naming the
    /// header. A budget of zero is valid: the request arrives already out of time, and its
    /// context is born cancelled with `DeadlineExceeded { origin: Header }`. When both the
    /// query and the header set a timeout, the earlier wins.
    ///
    /// Each call adds a header: behind a service mesh, read Envoy's route timeout and the
    /// gRPC budget together, and the earliest of all (every value of every header) wins.
    /// A value that does not decode is a `400` naming its header, even if another header
    /// holds a valid budget.
    ///
    /// ```
    /// use tower_reqctx::ContextLayer;
    /// use tower_reqctx::header::{DeadlineHeader, ENVOY_EXPECTED_RQ_TIMEOUT_MS};
    ///
    /// let layer = ContextLayer::new()
    ///     .deadline_header(DeadlineHeader::grpc())
    ///     .deadline_header(DeadlineHeader::millis(ENVOY_EXPECTED_RQ_TIMEOUT_MS));
    /// # let _ = layer;
    /// ```
    ///
    /// Enable it only where the callers are trusted to send it: any client can send
    /// headers.
    pub fn deadline_header(self, header: DeadlineHeader) -> ContextLayer {
        self.with(|c| {
            let mut headers = c.deadline_headers.to_vec();
            if !headers.contains(&header) {
                headers.push(header);
            }
            c.deadline_headers = headers.into();
        })
    }

    /// Puts a [`RequestId`](crate::RequestId) in every request's context, from the header
    /// `name` (`x-request-id` is the usual one), when it holds an id the layer trusts in logs:
    /// 1 to 128 bytes of visible ASCII. Off by default.
    ///
    /// The layer makes no ids of its own. Put tower-http's `SetRequestIdLayer` outside the
    /// layer, with `MakeRequestUuid`, for an id on every request that is unique across
    /// replicas and says nothing of the request volume; a proxy in front may set it too.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_reqctx::ContextLayer;
    ///
    /// let layer = ContextLayer::new().request_id(HeaderName::from_static("x-request-id"));
    /// # let _ = layer;
    /// ```
    pub fn request_id(self, name: HeaderName) -> ContextLayer {
        self.with(|c| c.request_id = Some(name))
    }

    /// Records every request in `view`, a live page of the requests in flight and of how
    /// the last ones ended: see [`live`](crate::live). Without it (the default) nothing
    /// is recorded.
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tower_reqctx::{ContextLayer, live::LiveView};
    ///
    /// let view = LiveView::new();
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "hello" }))
    ///     .nest("/debug/requests", view.router())
    ///     .layer(ContextLayer::new().live_view(&view));
    /// # let _ = app;
    /// ```
    #[cfg(feature = "live")]
    pub fn live_view(self, view: &crate::live::LiveView) -> ContextLayer {
        self.with(|c| c.live = Some(view.registry().clone()))
    }

    /// The parent of every request context when the request carries no
    /// [`ConnectionContext`](crate::ConnectionContext). Cancel it with
    /// [`Cause::Shutdown`](reqctx::Cause::Shutdown) at shutdown. With
    /// [`serve`](crate::serve), give the root to `serve` instead.
    pub fn root(self, root: Context) -> ContextLayer {
        self.with(|c| c.root = Some(root))
    }
}

impl<S> Layer<S> for ContextLayer {
    type Service = ContextService<S>;

    fn layer(&self, inner: S) -> ContextService<S> {
        ContextService::new(inner, self.config.clone())
    }
}
