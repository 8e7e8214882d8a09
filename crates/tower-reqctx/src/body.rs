//! `ContextBody`: the response body that ends the request's context.

use std::cell::Cell;
use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use reqctx::{Cancelled, Cause, DeadlineDriver, WaitForCancel};

use crate::conn::ConnectionContext;
use tokio::time::{Sleep, sleep_until};

/// The error type of [`ContextBody`].
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Ends a request's context: `Completed` when the response is over, `ClientDisconnected`
/// when it is dropped before (hyper drops the response future or body when the client is
/// gone), a [`HandlerPanicked`] cause when dropped while a handler unwinds.
pub(crate) struct Guard {
    driver: DeadlineDriver,
    head: bool,           // a HEAD request: hyper sends no body and never polls it
    reported: Cell<bool>, // the cause went to tracing (once, by the first `end`)
    // The handler answered before the context was cancelled: a cancellation now cuts the
    // body short, while an answer written after a cancellation (its own 504) is complete.
    live_at_response: bool,
    // An upgrade request's connection: on a 101 the guard is parked there.
    upgrade: Option<ConnectionContext>,
}

impl Guard {
    pub(crate) fn new(driver: DeadlineDriver, head: bool) -> Guard {
        Guard {
            driver,
            head,
            reported: Cell::new(false),
            live_at_response: false,
            upgrade: None,
        }
    }

    /// Parks the guard on `conn` instead of ending it at a `101 Switching Protocols`.
    pub(crate) fn upgrades_on(&mut self, conn: ConnectionContext) {
        self.upgrade = Some(conn);
    }

    pub(crate) fn driver(&self) -> &DeadlineDriver {
        &self.driver
    }

    /// Ends the context with `cause` unless it has one, and reports the cause it ends with.
    pub(crate) fn end(&self, cause: Cause) {
        let recorded = self.driver.cancel_with(cause.clone());
        if self.reported.get() {
            return;
        }
        // Only when another cause came first does reporting need to look it up.
        let cause = if recorded {
            cause
        } else {
            match self.driver.expire() {
                Some(actual) => actual,
                None => return,
            }
        };
        self.report(cause);
    }

    /// Sends the cause to tracing, the first time only.
    fn report(&self, cause: Cause) {
        if self.reported.replace(true) {
            return;
        }
        crate::metrics::cause(cause.kind());
        if !tracing::dispatcher::has_been_set() {
            return; // no subscriber was ever installed: nothing would see the rest
        }
        // Fills `cause` on the request's span, if it declares one (see the crate docs):
        // the span is current while a tracing layer outside ours polls us.
        tracing::Span::current().record("cause", cause.kind());
        match cause {
            Cause::Completed => {
                tracing::trace!(target: "tower_reqctx", "request context completed");
            }
            cause => {
                tracing::debug!(target: "tower_reqctx", cause = %cause, kind = cause.kind(), "request context cancelled");
            }
        }
    }

    /// The body reached its end: records `Completed`, or returns the cause that came first.
    fn complete(&self) -> Option<Cause> {
        if self.driver.cancel_with(Cause::Completed) {
            self.report(Cause::Completed);
            return None;
        }
        let cause = self.driver.expire()?;
        self.report(cause.clone());
        (self.live_at_response && cause != Cause::Completed).then_some(cause)
    }

    /// The handler answered: the context lives on in the body, unless there is none to send.
    pub(crate) fn into_response<B: Body>(mut self, res: Response<B>) -> Response<ContextBody<B>> {
        let status = res.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(conn) = self.upgrade.take() {
                // The context lives as long as the upgraded connection, with no deadline:
                // the request's timeouts do not cut a WebSocket short.
                self.driver.set_deadline(None);
                conn.hold(Box::new(Parked(self)));
                return res.map(ContextBody::plain);
            }
        }
        self.upgrade = None; // no cycle through the connection's slot
        let bodyless = self.head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || res.body().is_end_stream();
        if bodyless {
            // hyper will not poll this body: the response is over once sent.
            self.end(Cause::Completed);
            return res.map(ContextBody::plain);
        }
        self.live_at_response = !self.driver.is_cancelled();
        res.map(|body| ContextBody {
            kind: Kind::Owned {
                body,
                guard: Some(self),
                timer: None,
                wait: None,
            },
        })
    }
}

/// A guard held by an upgraded connection: the tunnel ended when the connection drops it.
struct Parked(Guard);

impl Drop for Parked {
    fn drop(&mut self) {
        // A client that closed first was recorded as ClientDisconnected through the
        // connection's context.
        self.0.end(Cause::Completed);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.reported.get() {
            return; // the context already ended (and was reported): nothing to record
        }
        let cause = if std::thread::panicking() {
            Cause::custom(HandlerPanicked)
        } else {
            Cause::ClientDisconnected
        };
        self.end(cause);
    }
}

/// The cause of a request whose handler (or response body) panicked: it is not the
/// client's doing. Check for it with [`Cause::downcast_ref`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerPanicked;

impl fmt::Display for HandlerPanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the handler panicked")
    }
}

impl StdError for HandlerPanicked {}

/// The error of a response body cut short by its context: the client sees a truncated
/// response, never a clean end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseBodyFailed;

impl fmt::Display for ResponseBodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the response body failed")
    }
}

impl StdError for ResponseBodyFailed {}

pin_project! {
    /// The response body of [`ContextService`](crate::ContextService).
    ///
    /// It ends the request's context with [`Cause::Completed`] when the body reaches its end
    /// (or reports [`is_end_stream`](Body::is_end_stream)), and with
    /// [`Cause::ClientDisconnected`] when dropped before. When the context is cancelled
    /// while the body is streaming (deadline, shutdown, client gone), the body ends with
    /// an error, so the client sees a truncated response.
    pub struct ContextBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Plain {
            #[pin]
            body: B,
        },
        Owned {
            // Before `body`, so it is dropped first: a body's own Drop (a stream logging
            // why it stopped) can read the cause.
            guard: Option<Guard>, // taken when the context ends
            #[pin]
            body: B,
            // The driven deadline and the other causes, armed once the body is pending (a
            // streaming body); boxed so that the body stays small to move.
            timer: Option<Pin<Box<Sleep>>>,
            wait: Option<Pin<Box<WaitForCancel>>>,
        },
        Message {
            data: Option<Bytes>,
        },
    }
}

impl<B> ContextBody<B> {
    pub(crate) fn plain(body: B) -> ContextBody<B> {
        ContextBody {
            kind: Kind::Plain { body },
        }
    }

    pub(crate) fn message_response(
        status: StatusCode,
        message: String,
    ) -> Response<ContextBody<B>> {
        let mut res = Response::new(ContextBody {
            kind: Kind::Message {
                data: Some(Bytes::from(message)),
            },
        });
        *res.status_mut() = status;
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    }
}

impl<B> ContextBody<B> {
    /// A gRPC trailers-only answer: HTTP 200 carrying `grpc-status` and `grpc-message` in
    /// its headers and no body. `message` must be printable ASCII without `%` (it goes out
    /// unescaped).
    pub(crate) fn grpc_response(code: u8, message: &'static str) -> Response<ContextBody<B>> {
        let mut res = Response::new(ContextBody {
            kind: Kind::Message { data: None },
        });
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        res
    }
}

impl<B> fmt::Debug for ContextBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Plain { .. } => "plain",
            Kind::Owned { .. } => "owned",
            Kind::Message { .. } => "message",
        };
        f.debug_struct("ContextBody").field("kind", &kind).finish()
    }
}

impl<B> Body for ContextBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Plain { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Message { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(B::Data::from(d)))))
            }
            KindProj::Owned {
                body,
                guard,
                timer,
                wait,
            } => {
                let Some(g) = guard.as_ref() else {
                    return body.poll_frame(cx).map_err(Into::into);
                };
                let polled = body.poll_frame(cx);
                match polled {
                    Poll::Ready(None) => {
                        let cause = g.complete();
                        *guard = None;
                        // A stream that stopped because its context was cancelled did not
                        // complete: the client must see a truncated response, not an end.
                        return match cause {
                            None => Poll::Ready(None),
                            Some(cause) => Poll::Ready(Some(Err(Box::new(Cancelled::new(cause))))),
                        };
                    }
                    Poll::Ready(Some(Err(e))) => {
                        g.end(Cause::custom(ResponseBodyFailed));
                        *guard = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Poll::Pending => {}
                }
                // The body waits: the deadline (ours to time) and any other cause end it.
                if timer.is_none() {
                    if let Some((at, _)) = g.driver().deadline() {
                        *timer = Some(Box::pin(sleep_until(at)));
                    }
                }
                if let Some(t) = timer {
                    if t.as_mut().poll(cx).is_ready() {
                        g.expire();
                    }
                }
                let wait = wait.get_or_insert_with(|| Box::pin(g.driver().context().cancelled()));
                let cancelled = wait.as_mut().poll(cx).is_ready();
                if !cancelled && !g.driver().is_cancelled() {
                    return Poll::Pending;
                }
                let cause = g.driver().context().cause().unwrap_or(Cause::Cancelled);
                *guard = None;
                Poll::Ready(Some(Err(Box::new(Cancelled::new(cause)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { body } => body.is_end_stream(),
            Kind::Owned { body, guard, .. } => {
                let end = body.is_end_stream();
                if end {
                    // hyper may drop the body without polling it again.
                    if let Some(g) = guard {
                        g.end(Cause::Completed);
                    }
                }
                end
            }
            Kind::Message { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { body } | Kind::Owned { body, .. } => body.size_hint(),
            Kind::Message { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
