//! The handoff: how the extractor, a route's layer and middleware find the request's
//! context, without an entry in the request's extensions.
//!
//! While the owning layer calls its inner service, and every time it polls the response
//! future that call returned, it makes the request's [`Scope`] the thread's *current* one
//! (as `tracing` enters a span for each poll), and puts it back in the owner after, on
//! unwind too. Everything the inner service runs in that call or those polls (axum's
//! extractors, `from_fn` middleware, a route's [`RouteTimeout`](crate::RouteTimeout), a
//! tonic method) reaches it through [`request_context`] and [`set_request_value`].
//! Outside them (a task the handler spawns, a response body being streamed, a middleware
//! that moves the inner call into `tokio::spawn` or a `tower::buffer::Buffer` worker)
//! there is no current request: the accessors say so (`None`, `false`, the clear `500`
//! of [`ReqCtx`](crate::ReqCtx) and of `RouteTimeout`), and never hand out another
//! request's context. Capture the context in the handler and move it into what it spawns.
//!
//! A request's context is made only when something asks for it (see
//! [`DeadlineDriver`]): a request that nobody asks costs no allocation for it.

use std::cell::RefCell;
use std::time::Duration;

use reqctx::{Context, DeadlineDriver, DeadlineOrigin};
use tokio::time::Instant;

use crate::current;

/// What the owner hands to the code its inner service runs: the request's context (made
/// on demand) and what a route's timeout needs to move its deadline.
pub(crate) struct Scope {
    pub(crate) driver: DeadlineDriver,
    start: Option<Instant>, // when the request arrived, read only if a timeout needs it
    client: Option<(Instant, DeadlineOrigin)>, // the client's own deadline, if it set one
}

thread_local! {
    /// The scope of the request whose layer is calling or polling its inner service on
    /// this thread, if any.
    static CURRENT: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

impl Scope {
    pub(crate) fn new(
        driver: DeadlineDriver,
        start: Option<Instant>,
        client: Option<(Instant, DeadlineOrigin)>,
    ) -> Scope {
        Scope {
            driver,
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
        self.driver.set_deadline(earliest(server, self.client));
        #[cfg(feature = "live")]
        ROUTE_MOVED.set(true);
    }
}

#[cfg(feature = "live")]
thread_local! {
    /// A route's timeout moved the current request's deadline: the owner's live view shows
    /// the new one. A flag of the thread rather than a field of the scope, which stays
    /// within the 128 bytes the compiler moves without calling `memcpy`; only an owner with
    /// a live view clears and reads it, around its call or poll.
    static ROUTE_MOVED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a route's timeout moved the current request's deadline since the last call.
#[cfg(feature = "live")]
#[inline]
pub(crate) fn take_route_moved() -> bool {
    ROUTE_MOVED.replace(false)
}

/// Runs `f` with `slot`'s scope as the thread's current one, and puts it back in `slot`
/// after, also when `f` unwinds.
#[inline]
pub(crate) fn enter<R>(slot: &mut Option<Scope>, f: impl FnOnce() -> R) -> R {
    current::enter(&CURRENT, slot, f)
}

/// `f` on the current request's scope, if the thread is inside a layer's call or poll.
fn with_current<R>(f: impl FnOnce(&mut Scope) -> R) -> Option<R> {
    current::with(&CURRENT, f)
}

/// Whether a layer is calling or polling its inner service for a request on this thread.
pub(crate) fn is_current() -> bool {
    current::is_set(&CURRENT)
}

/// For a route's layer: moves the current request's deadline. `false` if there is no
/// current request.
pub(crate) fn set_route_timeout(timeout: Option<Duration>) -> bool {
    with_current(|scope| scope.set_server_timeout(timeout)).is_some()
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

/// The context a [`ContextLayer`](crate::ContextLayer) gave the request being served, for
/// code that is not an axum handler: a tonic method, plain hyper, other middleware under
/// the layer. `None` outside a request, or where the layer cannot reach (see below).
///
/// It is the request whose `ContextLayer` is calling or polling its inner service on this
/// thread right now: call it in the handler's own code (before or after an `.await`, it
/// is polled by the layer), not in a task the handler spawns, nor in a response body as it
/// streams: capture the context first and move it there. A middleware that moves the
/// inner call elsewhere (`tokio::spawn`, `tower::buffer::Buffer`) hides the request from
/// everything under it: this returns `None` there and `ReqCtx` answers its `500`.
///
/// ```
/// use tower_reqctx::request_context;
///
/// fn handle() -> &'static str {
///     match request_context() {
///         Some(ctx) if ctx.is_cancelled() => "too late",
///         Some(_) => "working",
///         None => "no ContextLayer is serving a request here",
///     }
/// }
/// assert_eq!(handle(), "no ContextLayer is serving a request here");
/// ```
pub fn request_context() -> Option<Context> {
    with_current(|scope| scope.driver.context())
}

/// Adds `value` to the context of the request being served, as Go's
/// `r.WithContext(context.WithValue(r.Context(), k, v))`: middleware between the
/// [`ContextLayer`](crate::ContextLayer) and the handler uses it to hand request-scoped
/// data (an authenticated user, a request id) to everything the handler calls. Contexts
/// handed out from now on (the handler's `ReqCtx`) carry it; cancellation is unchanged.
/// Returns `false` (and drops `value`) where [`request_context`] would return `None`.
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use axum::{Router, extract::Request, middleware::{self, Next}, response::Response, routing::get};
/// use tower_reqctx::{ContextLayer, ReqCtx};
///
/// #[derive(Clone, Debug)]
/// struct User(String);
///
/// async fn authenticate(req: Request, next: Next) -> Response {
///     tower_reqctx::set_request_value(User("alice".into()));
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
pub fn set_request_value<T: Send + Sync + 'static>(value: T) -> bool {
    with_current(|scope| scope.driver.with_value(value)).is_some()
}

/// How many request contexts made by a [`ContextLayer`](crate::ContextLayer) are alive in
/// this process: requests in flight, plus any whose context a task still holds. Zero once
/// everything is done and nothing leaked. A relaxed counter: two atomic additions per
/// request.
pub fn live_request_contexts() -> usize {
    Context::live_driven_contexts()
}
