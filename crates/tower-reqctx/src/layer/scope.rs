//! What the owning layer leaves in the request's extensions, and the accessors that read
//! it: the one way code that is not an axum handler reaches the request's context.

use std::time::Duration;

use http::Request;
use reqctx::{Context, DeadlineHandle, DeadlineOrigin};
use tokio::time::Instant;

/// What the outer layer leaves in the request's extensions, for the extractor and for
/// inner layers.
#[derive(Clone, Debug)]
pub(crate) struct RequestScope {
    ctx: Context,
    handle: DeadlineHandle,
    start: Option<Instant>, // when the request arrived, read only if a timeout needs it
    client: Option<(Instant, DeadlineOrigin)>, // the client's own deadline, if it set one
}

impl RequestScope {
    pub(crate) fn new(
        ctx: Context,
        handle: DeadlineHandle,
        start: Option<Instant>,
        client: Option<(Instant, DeadlineOrigin)>,
    ) -> RequestScope {
        RequestScope {
            ctx,
            handle,
            start,
            client,
        }
    }

    /// A route's timeout (`None`: no timeout) replaces the server's; the client's still
    /// applies.
    pub(crate) fn set_server_timeout(&mut self, timeout: Option<Duration>) {
        let server = timeout.and_then(|d| {
            let start = *self.start.get_or_insert_with(Instant::now);
            start.checked_add(d).map(|at| (at, DeadlineOrigin::Layer))
        });
        self.handle.set_deadline(earliest(server, self.client));
    }
}

pub(crate) fn earliest(
    a: Option<(Instant, DeadlineOrigin)>,
    b: Option<(Instant, DeadlineOrigin)>,
) -> Option<(Instant, DeadlineOrigin)> {
    match (a, b) {
        // On a tie the client's wins: it is the more specific reason.
        (Some(a), Some(b)) => Some(if b.0 <= a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The context a [`ContextLayer`](crate::ContextLayer) gave this request, from the
/// request's extensions, for code that is not an axum handler: a tonic service
/// (`request.extensions()` of a `tonic::Request`), plain hyper, other middleware.
///
/// ```
/// use tower_reqctx::request_context;
///
/// fn handle(req: &http::Request<()>) -> &'static str {
///     match request_context(req.extensions()) {
///         Some(ctx) if ctx.is_cancelled() => "too late",
///         Some(_) => "working",
///         None => "no ContextLayer in front of this service",
///     }
/// }
/// assert_eq!(handle(&http::Request::new(())), "no ContextLayer in front of this service");
/// ```
pub fn request_context(extensions: &http::Extensions) -> Option<&Context> {
    extensions.get::<RequestScope>().map(|s| &s.ctx)
}

/// Adds `value` to the context of this request, as Go's
/// `r.WithContext(context.WithValue(r.Context(), k, v))`: middleware between the
/// [`ContextLayer`](crate::ContextLayer) and the handler uses it to hand request-scoped
/// data (an authenticated user, a request id) to everything the handler calls. The
/// handler's `ReqCtx` carries it; cancellation is unchanged. Returns
/// `false` (and drops `value`) if no `ContextLayer` ran.
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use axum::{Router, extract::Request, middleware::{self, Next}, response::Response, routing::get};
/// use tower_reqctx::{ContextLayer, ReqCtx};
///
/// #[derive(Clone, Debug)]
/// struct User(String);
///
/// async fn authenticate(mut req: Request, next: Next) -> Response {
///     tower_reqctx::set_request_value(&mut req, User("alice".into()));
///     next.run(req).await
/// }
///
/// async fn handler(ctx: ReqCtx) -> String {
///     ctx.value::<User>().map_or("anonymous".into(), |u| u.0.clone())
/// }
///
/// let app: Router = Router::new()
///     .route("/", get(handler))
///     .layer(middleware::from_fn(authenticate))
///     .layer(ContextLayer::new());
/// # let _ = app;
/// # }
/// ```
pub fn set_request_value<B, T: Send + Sync + 'static>(req: &mut Request<B>, value: T) -> bool {
    match req.extensions_mut().get_mut::<RequestScope>() {
        Some(scope) => {
            scope.ctx = scope.ctx.with_value(value);
            true
        }
        None => false,
    }
}

/// How many request contexts made by a [`ContextLayer`](crate::ContextLayer) are alive in
/// this process: requests in flight, plus any whose context a task still holds. Zero once
/// everything is done and nothing leaked. A relaxed counter: two atomic additions per
/// request.
pub fn live_request_contexts() -> usize {
    Context::live_driven_contexts()
}

impl RequestScope {
    /// The request's context.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn context(&self) -> &Context {
        &self.ctx
    }
}
