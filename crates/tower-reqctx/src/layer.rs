//! `ContextLayer`: the builder.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use reqctx::Context;
use tower_layer::Layer;

use crate::propagate::header::DeadlineHeader;
use crate::service::ContextService;

/// Gives every request a [`Context`](reqctx::Context), cancelled with a cause when the
/// client goes away, the deadline passes, the response ends, or the server shuts down.
///
/// Put one on the whole app (the *outer* layer): it creates each request's context, owns
/// its timer and answers for it. A `ContextLayer` on a single route (an *inner* layer, via
/// `MethodRouter::layer` or `Router::route_layer`) finds the outer one's context and only
/// replaces the server timeout for that route, longer or shorter ([`timeout`], [`no_timeout`]);
/// its other settings are ignored.
///
/// The deadline is the earliest of the effective server timeout (the innermost layer's
/// [`timeout`], or none), and the client's `?timeout=` in Go duration syntax (`300ms`,
/// `1.5s`, `2h45m`). A client can shorten the server's deadline, never lengthen it.
///
/// [`timeout`]: ContextLayer::timeout
/// [`no_timeout`]: ContextLayer::no_timeout
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use tower_reqctx::{ContextLayer, ReqCtx};
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
///         get(search).layer(ContextLayer::new().timeout(Duration::from_secs(30))),
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

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) timeout: TimeoutSetting,
    pub(crate) max_timeout: Option<Duration>,
    pub(crate) policy: ClampPolicy,
    pub(crate) query_param: Option<&'static str>,
    pub(crate) timeout_status: StatusCode,
    pub(crate) grace: Duration,
    pub(crate) root: Option<Context>,
    pub(crate) deadline_headers: Arc<[DeadlineHeader]>, // read in order; the earliest wins
    pub(crate) peer_value: bool,
    pub(crate) request_id: Option<http::HeaderName>,
}

/// What a layer says about the server timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimeoutSetting {
    /// Nothing: an outer layer has no timeout, an inner one keeps the outer's.
    Unset,
    /// `.timeout(d)`.
    After(Duration),
    /// `.no_timeout()`.
    Never,
}

/// What to do with a client-requested timeout above [`ContextLayer::max_timeout`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClampPolicy {
    /// Use the maximum instead (the default).
    #[default]
    Clamp,
    /// Answer `400 Bad Request`; the handler never runs.
    Reject,
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
            config: Arc::new(Config {
                timeout: TimeoutSetting::Unset,
                max_timeout: None,
                policy: ClampPolicy::Clamp,
                query_param: Some("timeout"),
                timeout_status: StatusCode::GATEWAY_TIMEOUT,
                grace: Duration::ZERO,
                root: None,
                deadline_headers: Arc::new([]),
                peer_value: false,
                request_id: None,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> ContextLayer {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The server-side timeout of the requests through this layer, counted from the
    /// moment the outer layer received the request. On a route's layer it replaces the
    /// outer layer's timeout for that route. Not capped by [`max_timeout`](Self::max_timeout).
    pub fn timeout(self, timeout: Duration) -> ContextLayer {
        self.with(|c| c.timeout = TimeoutSetting::After(timeout))
    }

    /// No server timeout: on a route's layer, removes the outer layer's (for server-sent
    /// events, long polls). A client's `?timeout=` still applies.
    pub fn no_timeout(self) -> ContextLayer {
        self.with(|c| c.timeout = TimeoutSetting::Never)
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
    pub fn without_query_param(self) -> ContextLayer {
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
    /// use tower_reqctx::propagate::DeadlineHeader;
    /// use tower_reqctx::propagate::header::ENVOY_EXPECTED_RQ_TIMEOUT_MS;
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

    /// Puts the client's address in every request's context as a [`PeerAddr`] value
    /// (from the connection, under [`serve`](crate::serve()) or `WatchedListener`, or
    /// axum's `ConnectInfo<SocketAddr>`), so code far from the handler can log it. Off by
    /// default: a value costs an allocation per request.
    ///
    /// [`PeerAddr`]: crate::PeerAddr
    pub fn peer_addr_value(self) -> ContextLayer {
        self.with(|c| c.peer_value = true)
    }

    /// Puts a [`RequestId`](crate::RequestId) in every request's context: the value of the
    /// `x-request-id` header when the request has one (set by a proxy, or by tower-http's
    /// `SetRequestIdLayer` outside this layer), else a new id unique in this process. Off by
    /// default. [`request_id_header`](Self::request_id_header) reads another header.
    pub fn request_id(self) -> ContextLayer {
        self.with(|c| c.request_id = Some(http::HeaderName::from_static("x-request-id")))
    }

    /// As [`request_id`](Self::request_id), reading `name`.
    pub fn request_id_header(self, name: http::HeaderName) -> ContextLayer {
        self.with(|c| c.request_id = Some(name))
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
