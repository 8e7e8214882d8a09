//! The owner of a request's context, from the moment the outer layer made it to its
//! final cause.
//!
//! One [`Owner`] exists per request. It is made by the outer
//! [`ContextLayer`](crate::ContextLayer)'s service, lives in the response future while the
//! handler runs, moves into the response body when the handler answers, and is either
//! ended there or handed to the connection (an upgrade). Every event of the request's
//! life is one method of the owner, and every method records its cause through
//! [`Owner::end`]: the first cause recorded wins, in one place, and is never replaced.
//!
//! # The lifecycle
//!
//! ```text
//!                answer (a body to stream)              body's end
//!   Running ─────────────────────────────► Streaming ──────────────────► Ended(cause)
//!      │  answer (nothing to stream)                                        ▲
//!      ├────────────────────────────────────────────────────────────────────┤
//!      │  upgrade (101, CONNECT 2xx; with a connection)    tunnel ends      │
//!      └─────────────────────────────────────► Held ────────────────────────┘
//! ```
//!
//! | event | in state | cause recorded |
//! |---|---|---|
//! | the deadline passes (the layer's timer, or any waiter's) | any | `DeadlineExceeded { origin }` |
//! | the connection's context or the server's root is cancelled | any | the parent's cause (`ClientDisconnected`, `Shutdown`, ...) |
//! | the inner service returns `Err` | Running | [`ServiceFailed`] (the error passes through unchanged) |
//! | a panic unwinds through the layer's future or body | Running, Streaming | [`HandlerPanicked`] |
//! | the response carries a [`Cancelled`] (a handler's `?`) | Running | that `Cancelled`'s cause |
//! | the response carries [`PanicResponse`]'s mark (`CatchPanicLayer` inside) | Running | [`HandlerPanicked`] |
//! | the response has no body to send (HEAD, 1xx, 204, 304, an empty body, a `Content-Length: 0` whatever its body) | Running | `Completed` |
//! | the body reached its end: `None`, `is_end_stream()`, all of its `Content-Length` (or exact size) yielded, or its trailers yielded | Streaming | `Completed` |
//! | the context is cancelled while a body answered before the cancellation streams | Streaming | (already recorded) the body ends with an error, or a gRPC status: HTTP/2 trailers, or grpc-web's trailer frame in the body |
//! | a body answered after the cancellation (in the grace) streams | Streaming | (already recorded) never cut by that cancellation; cut at the end of the grace when the cancellation was the deadline |
//! | the body yields an error | Streaming | [`ResponseBodyFailed`] |
//! | the response future, or the body once polled, is dropped before its end | Running, Streaming | `ClientDisconnected` ([`HandlerPanicked`] while unwinding) |
//! | the body is dropped before anything polled it (middleware outside replaced the response) | Streaming | [`ResponseDiscarded`] |
//! | the upgraded connection ends (the server dropped its IO) | Held | `Completed` |
//! | an HTTP/2 tunnel's stream ends (its task, under `serve`, is over) | Held | `Completed` |
//!
//! Every timer the owner arms (the deadline, the grace) goes through `reqctx`'s one guard
//! against the end of the clock, so no budget, however large, can overflow it.
//!
//! **Races:** the cause recorded first wins and every reader sees it. A deadline counts from
//! the instant it passed, even if it is noticed later (the clock is compared whenever a
//! cause is read), so a deadline that passed before a body's end wins over `Completed`. A
//! body that reached its end is `Completed` even if the client closes a moment later.
//!
//! Where the deadline is timed: the context itself wakes every waiter at its deadline,
//! whoever polls what; the owner's timer (in the response future) only decides when the
//! layer answers `504` in the handler's place.
//!
//! A client that stops reading a streamed response: every waiter still wakes at the
//! deadline (or shutdown), since the context times itself. The body fails the next time
//! hyper polls it. Over HTTP/1 under `serve` or `WatchedListener`, hyper polls nothing of
//! ours while the socket is full, so the owner closes the connection (one request at a
//! time is on it); it arms that close once the body streams, that is once it is pending
//! or has yielded a frame that is not its last (a body that is never pending included).
//! Over HTTP/2 the stream stays open: hyper waits for flow-control window without polling
//! the body and gives no handle to reset one stream from outside, and closing the
//! connection would end every other stream on it; the stream ends when the client reads
//! (the body then fails), resets it, or the connection ends.
//!
//! # The handoff, the context's birth, and its waiters
//!
//! The owner hands the request's context to the code under the layer without touching the
//! request: while the layer calls its inner service, and every time the response future
//! polls it, the owner's [`Scope`] is the thread's current one (see [`scope`](super::scope));
//! `ReqCtx`, `request_context()`, `set_request_value()` and `RouteTimeout` reach it there,
//! and it is back in the owner before the poll returns (on unwind too). Code that runs
//! elsewhere (a spawned task, a body as it streams, a middleware that spawns the inner
//! call) finds no current request and says so; it never sees another request's context.
//!
//! The context is born lazily ([`DeadlineDriver`]): until something asks for it, the owner
//! holds the parent (the connection's context, or the layer's root), the deadline and the
//! first cause inline, and reads the parent's cause and the clock when asked, exactly as
//! the context's node would; the first request for the context makes the node with what
//! was recorded, so nobody can tell the difference but the allocator. A request whose
//! handler never asks for its context costs no allocation and no lock for it.
//!
//! Waiters (`ctx.cancelled()`, `ctx.run`, `ctx.spawn`) register on the node; the owner's
//! timer is the one that times the deadline while the response future lives, and the cause
//! it records wakes them. When the owner leaves the response future (the body streams, or
//! an upgrade holds it) and waiters remain, the context's own timer takes over.
//!
//! # The seam with the connection
//!
//! An upgraded request outlives its response. Over HTTP/1 the tunnel is the whole
//! connection: the owner hands itself to its connection ([`ConnectionContext::hold`]) as
//! an opaque item, which the connection drops when it ends; the drop records `Completed`
//! unless the client's close (the connection's context) came first. Over HTTP/2 a tunnel
//! (extended CONNECT: a WebSocket; CONNECT) is one stream of a connection that goes on,
//! so the connection never holds it: under `serve`, the owner parks itself for the task
//! hyper spawns for that stream's tunnel ([`tunnel`](crate::connection::tunnel)), and the
//! task's end (the tunnel's stream closed, by either side) records `Completed`; the
//! connection's end, if it comes first, `ClientDisconnected`. hyper does not say why a
//! tunnel's stream ended, so a client's `RST_STREAM` on one tunnel also reads `Completed`.
//! Under `axum::serve` (with `WatchedListener` or plain) no task of ours holds an HTTP/2
//! tunnel, and under plain `axum::serve` no connection an HTTP/1 one: such an upgrade
//! ends the context at the 101 (or 2xx) with `Completed`.

use std::cell::Cell;
use std::time::Duration;

use http::header::HeaderValue;
use http::{Response, StatusCode};
use http_body::Body;
use reqctx::{Cancelled, Canceller, Cause, Context, DeadlineDriver, DeadlineOrigin};

use super::scope::Scope;

use crate::cause::{HandlerPanicked, ResponseDiscarded, ServiceFailed, label};
use crate::connection::{ConnectionAbort, ConnectionContext, tunnel};
use crate::wire::grpc;

/// The owner of one request's context: see the [module docs](self).
pub(crate) struct Owner {
    // The request's context (made on demand) and what a route's layer needs: here except
    // while the inner service is called or polled, when it is the thread's current scope
    // (see `scope`), and this slot holds whatever was current before.
    scope: Option<Scope>,
    kind: RequestKind,
    // HTTP/1 under `serve` or `WatchedListener`: one request at a time on the connection,
    // so a stalled response may close it.
    abort: Option<ConnectionAbort>,
    reported: Cell<bool>, // the cause went to tracing and metrics (once, by the first `end`)
    // The reported cause, for a live view: its index and a deadline's origin (no custom
    // cause: that one is read again at the end).
    #[cfg(feature = "live")]
    live_cause: Cell<(u8, u8)>,
    // The request's row in the layer's live view, if it has one.
    #[cfg(feature = "live")]
    live: Option<crate::live::Ticket>,
    unpolled: bool, // in a body that nothing has polled yet: its drop is a discarded response
    // An HTTP/1 upgrade request's connection: on an upgrade the owner is held there.
    upgrade: Option<ConnectionContext>,
    tunnel: bool, // an HTTP/2 request that may open a tunnel: the tunnel's task holds it
    // The span current when the owner was made (the request's span, under a tracing layer
    // outside ours), so that a cause recorded outside it still lands in it: see `report`.
    // Boxed (a `Span` is 40 bytes) and `None` when no subscriber was ever installed.
    span: Option<Box<tracing::Span>>,
}

/// What of the request decides the shape of its response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Other,
    /// hyper sends no body and never polls it.
    Head,
    /// A 2xx opens a tunnel (HTTP/1 CONNECT, HTTP/2 extended CONNECT).
    Connect,
}

impl Owner {
    pub(crate) fn new(scope: Scope, kind: RequestKind) -> Owner {
        Owner {
            scope: Some(scope),
            kind,
            abort: None,
            reported: Cell::new(false),
            #[cfg(feature = "live")]
            live_cause: Cell::new((0, 0)),
            #[cfg(feature = "live")]
            live: None,
            unpolled: false,
            upgrade: None,
            tunnel: false,
            span: request_span(),
        }
    }

    /// An HTTP/1 request on a watched connection: a deadline that passes while hyper is
    /// stalled closes the connection (see [`Owner::streaming`]).
    pub(crate) fn closes_on_stall(&mut self, abort: ConnectionAbort) {
        self.abort = Some(abort);
    }

    /// On an HTTP/1 upgrade, hand the owner to `conn` instead of ending the context.
    pub(crate) fn upgrades_on(&mut self, conn: ConnectionContext) {
        self.upgrade = Some(conn);
    }

    /// On an HTTP/2 tunnel's `2xx`, hand the owner to the tunnel's task (under `serve`),
    /// instead of ending the context.
    pub(crate) fn tunnels_on_its_stream(&mut self) {
        self.tunnel = true;
    }

    /// The body was polled: from now on its drop before its end is the client's doing.
    #[inline]
    pub(crate) fn polled(&mut self) {
        self.unpolled = false;
    }

    pub(crate) fn driver(&self) -> &DeadlineDriver {
        match &self.scope {
            Some(scope) => &scope.driver,
            None => unreachable!("the owner's scope is away only while its inner service runs"),
        }
    }

    /// The slot `scope::enter` swaps with the thread's current scope.
    pub(crate) fn scope_slot(&mut self) -> &mut Option<Scope> {
        &mut self.scope
    }

    /// The body streams (it is pending, or yielded a frame that is not its last): on an
    /// HTTP/1 connection of `serve` or `WatchedListener`, make sure a deadline (or
    /// shutdown) that passes while hyper is stalled on a client that does not read closes
    /// the connection, since hyper polls nothing of ours until the client reads. One
    /// `on_cancel` task per streaming response.
    pub(crate) fn streaming(&mut self) {
        // None under HTTP/2 (closing the connection would end every stream on it) and
        // under plain axum::serve (no connection to close).
        let Some(abort) = self.abort.take() else {
            return;
        };
        abort.arm();
        // Dropping the handle does not stop the callback.
        let _ = self.driver().context().on_cancel(move |cause| {
            if matches!(cause, Cause::DeadlineExceeded { .. } | Cause::Shutdown) {
                abort.abort();
            }
        });
    }

    /// Whether the context has a cause (recorded, or a deadline that has passed).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.driver().is_cancelled()
    }

    /// The context's cause, if it has one.
    pub(crate) fn cause(&self) -> Option<Cause> {
        self.driver().expire()
    }

    /// Records `cause` unless the context already has one, and reports the cause it ends
    /// with. Returns whether `cause` is the one recorded.
    pub(crate) fn end(&self, cause: Cause) -> bool {
        let recorded = self.driver().cancel_with(cause.clone());
        if !self.reported.get() {
            if recorded {
                self.report(cause);
            } else if let Some(actual) = self.driver().expire() {
                self.report(actual);
            }
        }
        recorded
    }

    /// The deadline passed (the layer's timer fired): `DeadlineExceeded` with the origin of
    /// the deadline that fired, unless the context already had a cause.
    pub(crate) fn expire(&self) {
        let origin = self
            .driver()
            .deadline()
            .map_or(DeadlineOrigin::Layer, |(_, origin)| origin);
        self.end(Cause::DeadlineExceeded { origin });
    }

    /// The body reached its end. `Ok` if the context ends `Completed`; `Err(cause)` if it
    /// had another cause first, recorded while the body was still streaming: the body must
    /// then end with an error, since what the client got is not the whole response.
    pub(crate) fn complete(self) -> Result<(), Cause> {
        if self.end(Cause::Completed) {
            return Ok(());
        }
        match self.driver().expire() {
            None | Some(Cause::Completed) => Ok(()),
            Some(cause) => Err(cause),
        }
    }

    /// Sends the cause to tracing (or `log`) and metrics, the first time only.
    ///
    /// Inside the request's span, whoever records the cause: hyper drops the response
    /// future or body of a client that left outside any span, so the owner enters the span
    /// it kept. With no subscriber ever installed there is no span; the events then go to
    /// the `log` crate's logger through tracing's `log` feature, if one listens at their
    /// level (a few loads and compares when none does).
    fn report(&self, cause: Cause) {
        if self.reported.replace(true) {
            return;
        }
        let kind = label(&cause);
        super::metrics::cause(kind);
        #[cfg(feature = "live")]
        if self.live.is_some() {
            self.live_cause.set(crate::live::code(&cause));
        }
        // Fills `cause` on the request's span, if it declares one (see the crate docs); as
        // `Display`, so that a text log reads `cause=client_disconnected`.
        let kind_field = tracing::field::display(kind);
        let _in_span = match self.span.as_deref() {
            Some(span) => {
                span.record("cause", kind_field);
                Some(span.enter())
            }
            None => {
                if tracing::dispatcher::has_been_set() {
                    tracing::Span::current().record("cause", kind_field);
                }
                None
            }
        };
        match cause {
            Cause::Completed => {
                tracing::trace!(target: "tower_reqctx", "request context completed");
            }
            cause => {
                tracing::debug!(target: "tower_reqctx", cause = %cause, kind = %kind, "request context cancelled");
            }
        }
    }

    /// The inner service answered `Ok(res)`: the response decides what happens next.
    /// `grace` is the layer's: it bounds an answer made after the deadline.
    pub(crate) fn answered<B: Body>(
        mut self,
        mut res: Response<B>,
        grace: Duration,
    ) -> Answered<B> {
        let status = res.status();
        #[cfg(feature = "live")]
        self.live_status(status.as_u16());
        if status.as_u16() == CLIENT_CLOSED_REQUEST {
            // nginx's reason phrase; hyper would send none for a status it does not know.
            res.extensions_mut()
                .insert(hyper::ext::ReasonPhrase::from_static(
                    b"Client Closed Request",
                ));
        }
        // A handler that answered with a cause (`?` on a `Cancelled`), or a caught panic.
        if let Some(cancelled) = res.extensions().get::<Cancelled>() {
            self.end(cancelled.cause().clone());
        } else if res.extensions().get::<PanicMark>().is_some() {
            self.end(Cause::custom(HandlerPanicked));
        }
        let upgrade = status == StatusCode::SWITCHING_PROTOCOLS
            || (self.kind == RequestKind::Connect && status.is_success());
        if upgrade && (self.upgrade.is_some() || self.tunnel) {
            // The context lives as long as the tunnel, with no deadline: the request's
            // timeouts do not cut a WebSocket short.
            if let Some(scope) = self.scope.as_mut() {
                scope.driver.set_deadline(None);
                #[cfg(feature = "live")]
                if let Some(ticket) = &self.live {
                    ticket.set_deadline(None);
                    ticket.set_state(crate::live::State::Upgraded);
                }
            }
            match self.upgrade.take() {
                Some(conn) => conn.hold(Box::new(Held(self))),
                // Refused outside `serve` (no task of the tunnel's to hold it): the
                // context ends here, at the answer, as under plain `axum::serve`.
                None => drop(tunnel::park(Box::new(Held(self)))),
            }
            return Answered::Done(res);
        }
        self.upgrade = None; // no cycle through the connection's slot
        // hyper drops a body whose announced length it has written without polling it
        // again: count the bytes, so that the last one ends the context.
        let length = res.body().size_hint().exact().or_else(|| {
            res.headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(parse_length)
        });
        let bodyless = self.kind == RequestKind::Head
            || status.is_informational()
            || upgrade
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || length == Some(0) // a declared empty body: hyper writes the head only
            || res.body().is_end_stream();
        if bodyless {
            // hyper will not poll this body: the response is over once sent.
            self.end(Cause::Completed);
            return Answered::Done(res);
        }
        let grpc = match length {
            None => grpc::Wire::of(res.headers().get(http::header::CONTENT_TYPE)),
            Some(_) => None,
        };
        let live = !self.is_cancelled();
        let bound = match live {
            true => None,
            false => self.grace_bound(grace),
        };
        self.unpolled = true;
        #[cfg(feature = "live")]
        if let Some(ticket) = &self.live {
            ticket.set_state(crate::live::State::Streaming);
        }
        Answered::Streams(
            res,
            Streaming {
                owner: self,
                length,
                grpc,
                live,
                bound,
            },
        )
    }

    /// An answer made after the cancellation: what bounds its body. Never the cancellation
    /// it answers; the end of the grace when that was the deadline (`None` for a grace
    /// too long to represent). An answer to a client that left or to a shutdown has no
    /// bound of ours: its writes fail, or the server's drain ends it. On a watched HTTP/1
    /// connection, the end of the grace also closes a connection stalled on a client that
    /// does not read, as [`Owner::streaming`] does for the deadline.
    fn grace_bound(&mut self, grace: Duration) -> Option<(Context, Canceller)> {
        let Some(Cause::DeadlineExceeded { .. }) = self.cause() else {
            return None;
        };
        let (deadline, _) = self.driver().deadline()?;
        let end = deadline.checked_add(grace)?;
        let (bound, canceller) = Context::background().with_deadline(end);
        if let Some(abort) = self.abort.take() {
            abort.arm();
            // Runs once: at the end of the grace, or with `Cancelled` when the body ends
            // and drops the canceller.
            let _ = bound.on_cancel(move |cause| {
                if matches!(cause, Cause::DeadlineExceeded { .. }) {
                    abort.abort();
                }
            });
        }
        Some((bound, canceller))
    }

    /// The inner service returned an error: it passes through, the context ends with
    /// [`ServiceFailed`].
    pub(crate) fn failed(self) {
        self.end(Cause::custom(ServiceFailed));
    }

    /// Puts the request in the layer's live view.
    #[cfg(feature = "live")]
    #[inline]
    pub(crate) fn live_in(&mut self, ticket: Option<crate::live::Ticket>) {
        self.live = ticket;
    }

    /// Before a call or poll of the inner service, with a live view: forget any route's
    /// move of another request's deadline.
    #[cfg(feature = "live")]
    #[inline]
    pub(crate) fn live_before_call(&self) {
        if self.live.is_some() {
            super::scope::take_route_moved();
        }
    }

    /// After a call or poll of the inner service: if a route's timeout moved the deadline,
    /// the live view shows the new one, and who set it.
    #[cfg(feature = "live")]
    #[inline]
    pub(crate) fn live_route_moved(&self) {
        let (Some(ticket), Some(scope)) = (&self.live, self.scope.as_ref()) else {
            return;
        };
        if !super::scope::take_route_moved() {
            return;
        }
        use crate::live::Origin;
        ticket.set_deadline(scope.driver.deadline().map(|(at, origin)| {
            let origin = match origin {
                // The server's deadline is now the route's.
                DeadlineOrigin::Layer => Origin::Route,
                origin => Origin::of(origin),
            };
            (at.into_std(), origin)
        }));
    }

    /// The status of the response the request ends with, for its live view.
    #[cfg(feature = "live")]
    pub(crate) fn live_status(&mut self, status: u16) {
        if let Some(ticket) = self.live.as_mut() {
            ticket.set_status(status);
        }
    }

    /// The request is over (the owner is dropped, its cause recorded): its live view
    /// moves it from the requests in flight to the ended ones.
    #[cfg(feature = "live")]
    fn live_end(&mut self) {
        let Some(ticket) = self.live.take() else {
            return;
        };
        let Some(scope) = self.scope.as_ref() else {
            return;
        };
        let (c, origin) = self.live_cause.get();
        // Only a custom cause is read again: the view shows its words.
        let custom = match crate::live::is_common(c) {
            true => None,
            false => scope.driver.expire(),
        };
        ticket.end(usize::from(c), origin, custom);
    }

    /// A panic is unwinding through the layer.
    pub(crate) fn panicked(&self) {
        self.end(Cause::custom(HandlerPanicked));
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Unless the context already ended (and was reported), the drop is its end.
        if !self.reported.get() {
            self.end_on_drop();
        }
        #[cfg(feature = "live")]
        self.live_end();
    }
}

impl Owner {
    fn end_on_drop(&mut self) {
        let cause = if std::thread::panicking() {
            Cause::custom(HandlerPanicked)
        } else if self.unpolled {
            // Middleware outside replaced the response; a client that left was recorded
            // through the connection's context first, where there is one.
            Cause::custom(ResponseDiscarded)
        } else {
            Cause::ClientDisconnected
        };
        self.end(cause);
    }
}

/// The current span, if a subscriber was ever installed and a span is current: the
/// request's span when a tracing layer such as tower-http's `TraceLayer` wraps ours (it
/// enters its span around our `call`). Nothing is read, kept or allocated otherwise.
fn request_span() -> Option<Box<tracing::Span>> {
    if !tracing::dispatcher::has_been_set() {
        return None;
    }
    let span = tracing::Span::current();
    (!span.is_none()).then(|| Box::new(span))
}

/// What the response means for the owner: the context ended (or an upgraded connection
/// holds it), or the body streams and the owner goes with it.
#[allow(clippy::large_enum_variant)] // a return value, matched at once
pub(crate) enum Answered<B> {
    Done(Response<B>),
    Streams(Response<B>, Streaming),
}

/// The owner of a streaming body, and what the body needs to know to end the context.
pub(crate) struct Streaming {
    pub(crate) owner: Owner,
    /// Bytes the response announced (`Content-Length` or an exact size hint).
    pub(crate) length: Option<u64>,
    /// A gRPC response, and its wire: a deadline ends it with a status, not an error.
    pub(crate) grpc: Option<grpc::Wire>,
    /// The handler answered before the context was cancelled.
    pub(crate) live: bool,
    /// For an answer made after the cancellation: the context whose end cuts it (the end
    /// of the grace), and what ends that context when the body is over.
    pub(crate) bound: Option<(Context, Canceller)>,
}

/// An owner held by an upgraded connection: the tunnel ended when the connection drops it.
struct Held(Owner);

impl Drop for Held {
    fn drop(&mut self) {
        // A client that closed first was recorded as ClientDisconnected through the
        // connection's context.
        self.0.end(Cause::Completed);
    }
}

/// nginx's "client closed request", the status of a `Cancelled` for a client that left.
const CLIENT_CLOSED_REQUEST: u16 = 499;

fn parse_length(v: &HeaderValue) -> Option<u64> {
    std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()
}

/// The mark [`PanicResponse`] leaves in a response's extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PanicMark;

/// A [`ResponseForPanic`](tower_http::catch_panic::ResponseForPanic) for tower-http's
/// `CatchPanicLayer` placed *inside* the [`ContextLayer`](crate::ContextLayer): it answers
/// as tower-http's default does (`500`, a plain-text body) and marks the response, so
/// that the request's context ends with [`HandlerPanicked`] rather than `Completed`.
/// (With `CatchPanicLayer` outside the layer, the usual order, nothing is needed.)
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_http::catch_panic::CatchPanicLayer;
/// use tower_reqctx::{ContextLayer, PanicResponse};
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "ok" }))
///     .layer(CatchPanicLayer::custom(PanicResponse))
///     .layer(ContextLayer::new());
/// # let _ = app;
/// ```
#[cfg(feature = "catch-panic")]
#[derive(Clone, Copy, Debug, Default)]
pub struct PanicResponse;

#[cfg(feature = "catch-panic")]
impl tower_http::catch_panic::ResponseForPanic for PanicResponse {
    type ResponseBody = http_body_util::Full<bytes::Bytes>;

    fn response_for_panic(
        &mut self,
        _err: Box<dyn std::any::Any + Send + 'static>,
    ) -> Response<Self::ResponseBody> {
        let mut res = Response::new(http_body_util::Full::from("the handler panicked"));
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res.extensions_mut().insert(PanicMark);
        res
    }
}

#[cfg(all(test, target_pointer_width = "64"))]
mod size_tests {
    /// The owner is moved into the response future, then into the body, and its scope
    /// swapped in and out of the thread's current slot on every poll: it stays small.
    #[test]
    fn the_owner_stays_within_its_budget() {
        let owner = std::mem::size_of::<super::Owner>();
        let scope = std::mem::size_of::<super::Scope>();
        let driver = std::mem::size_of::<super::DeadlineDriver>();
        assert!(owner <= 176, "Owner is {owner} bytes");
        // Swapped with the thread's current slot twice per poll: within the 128 bytes the
        // compiler moves inline (above, each move is a `memcpy` call), with every feature.
        assert!(scope <= 128, "Scope is {scope} bytes");
        assert!(driver <= 96, "DeadlineDriver is {driver} bytes");
    }
}
