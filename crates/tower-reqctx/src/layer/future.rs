//! The response future: the owner's first home, and the layer's own answers (a bad
//! timeout, the deadline, a misconfigured stack).

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use reqctx::{Cancelled, Cause, DeadlineOrigin, timer_instant};
use tokio::time::{Instant, Sleep, sleep_until};

use super::body::ContextBody;
use super::lifecycle::Owner;
use crate::wire::grpc;
use crate::wire::header::{EXCEEDED, X_REQCTX_DEADLINE};

/// How the layer answers when the handler has not by the deadline (small: it rides in
/// every response future).
#[derive(Clone, Copy, Debug)]
pub(crate) enum OnTimeout {
    Status(StatusCode),
    Grpc(grpc::Wire),
}

impl From<OnTimeout> for Answer {
    fn from(on_timeout: OnTimeout) -> Answer {
        match on_timeout {
            OnTimeout::Status(status) => Answer::Timeout(status),
            OnTimeout::Grpc(wire) => {
                Answer::Grpc(wire, grpc::DEADLINE_EXCEEDED, "deadline exceeded")
            }
        }
    }
}

/// What the layer answers by itself.
#[derive(Clone, Debug)]
pub(crate) enum Answer {
    /// An HTTP status with a one-line plain-text body.
    Text(StatusCode, String),
    /// The handler did not answer by the deadline: this status, and the body a
    /// [`Cancelled`] for the cause answers with, so one cause reads the same whoever
    /// answers.
    Timeout(StatusCode),
    /// A gRPC trailers-only answer: HTTP 200 with `grpc-status` and `grpc-message`.
    Grpc(grpc::Wire, u8, &'static str),
}

impl Answer {
    pub(crate) fn bad_request(grpc: Option<grpc::Wire>, message: String) -> Answer {
        match grpc {
            Some(wire) => Answer::Grpc(wire, grpc::INVALID_ARGUMENT, "invalid grpc-timeout"),
            None => Answer::Text(StatusCode::BAD_REQUEST, message),
        }
    }

    /// The layers are stacked in a way that cannot work: a `500` that says how to fix it.
    pub(crate) fn misconfigured(message: &'static str) -> Answer {
        tracing::error!(target: "tower_reqctx", "{message}");
        Answer::Text(StatusCode::INTERNAL_SERVER_ERROR, message.to_owned())
    }

    /// The status the answer goes out with.
    #[cfg(feature = "live")]
    fn status(&self) -> u16 {
        match self {
            Answer::Text(status, _) | Answer::Timeout(status) => status.as_u16(),
            Answer::Grpc(..) => 200,
        }
    }

    /// The response; `cause` is the context's, for a timeout's answer.
    fn into_response<B>(self, cause: Option<Cause>) -> Response<ContextBody<B>> {
        match self {
            Answer::Text(status, message) => ContextBody::message_response(status, message),
            Answer::Timeout(status) => {
                let cause = cause.unwrap_or(Cause::DeadlineExceeded {
                    origin: DeadlineOrigin::Layer,
                });
                let deadline = matches!(cause, Cause::DeadlineExceeded { .. });
                let cancelled = Cancelled::new(cause);
                let text = cancelled.answer_text();
                let mut res = ContextBody::message_response(status, text);
                if deadline {
                    // Tells an upstream reqctx client that the budget ran out here.
                    res.headers_mut().insert(X_REQCTX_DEADLINE, EXCEEDED);
                }
                // The cause, for middleware outside (`is_client_deadline`), as a handler's
                // `Cancelled` answer carries it.
                res.extensions_mut().insert(cancelled);
                res
            }
            Answer::Grpc(wire, code, message) => {
                let (code, message) = cause
                    .as_ref()
                    .and_then(grpc::status)
                    .unwrap_or((code, message));
                ContextBody::grpc_response(wire, code, message)
            }
        }
    }
}

pin_project! {
    /// The response future of [`ContextService`](crate::ContextService).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        // The layer answers without calling the handler (a bad timeout, or the deadline).
        Early {
            answer: Option<(Answer, Option<Cause>)>,
        },
        // A route's layer: the owner is further out.
        Passthrough {
            #[pin]
            inner: F,
        },
        // The outer layer: the request's owner, while the handler runs.
        Owner {
            #[pin]
            inner: F,
            owner: Option<Owner>,
            // Armed only once the handler is pending and a deadline applies; boxed so that
            // the future stays small to move (tokio's Sleep is large).
            timer: Option<Pin<Box<Sleep>>>,
            expired: bool, // the deadline fired; the timer now counts the grace
            grace: Duration,
            on_timeout: OnTimeout,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn early(answer: Answer) -> ResponseFuture<F> {
        ResponseFuture {
            kind: Kind::Early {
                answer: Some((answer, None)),
            },
        }
    }

    pub(crate) fn passthrough(inner: F) -> ResponseFuture<F> {
        ResponseFuture {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn owner(
        inner: F,
        owner: Owner,
        grace: Duration,
        on_timeout: OnTimeout,
    ) -> ResponseFuture<F> {
        ResponseFuture {
            kind: Kind::Owner {
                inner,
                owner: Some(owner),
                timer: None,
                expired: false,
                grace,
                on_timeout,
            },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<ContextBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        let timed_out = match kind.as_mut().project() {
            KindProj::Early { answer } => {
                let Some((answer, cause)) = answer.take() else {
                    panic!("ResponseFuture polled after completion");
                };
                return Poll::Ready(Ok(answer.into_response(cause)));
            }
            KindProj::Passthrough { inner } => {
                return inner
                    .poll(cx)
                    .map(|r| r.map(|res| res.map(ContextBody::plain)));
            }
            KindProj::Owner {
                mut inner,
                owner,
                timer,
                expired,
                grace,
                on_timeout,
            } => 'owner: {
                // Our timer fired: record the deadline before the handler's poll, so that
                // its waiters (which time nothing themselves while we time the deadline:
                // `owner_times`) see the cause in this poll and its own code handles it,
                // before a `504` of ours drops it.
                if !*expired && timer.as_ref().is_some_and(|t| t.is_elapsed()) {
                    if let Some(o) = owner.as_ref() {
                        o.expire();
                    }
                }
                // A panic that unwinds through here is the handler's, whatever catches it
                // further out (tower-http's CatchPanicLayer drops us only after catching).
                // The inner service finds its request through the thread's current scope
                // while we poll it (see `scope`).
                let poll_inner = AssertUnwindSafe(|| inner.as_mut().poll(cx));
                let caught = match owner.as_mut() {
                    Some(o) => {
                        #[cfg(feature = "live")]
                        o.live_before_call();
                        let caught =
                            super::scope::enter(o.scope_slot(), || catch_unwind(poll_inner));
                        #[cfg(feature = "live")]
                        o.live_route_moved();
                        caught
                    }
                    None => catch_unwind(poll_inner),
                };
                let polled = match caught {
                    Ok(polled) => polled,
                    Err(panic) => {
                        if let Some(o) = owner.as_ref() {
                            o.panicked();
                        }
                        resume_unwind(panic)
                    }
                };
                if let Poll::Ready(result) = polled {
                    // Without a grace, the layer answers at the deadline: a response that
                    // arrives once our timer has fired (the handler saw the deadline at the
                    // same instant, its own wait fired in the same pass of the timer wheel)
                    // loses, so the status never depends on which of two wakeups ran first.
                    // `is_elapsed` reads the timer's state: no clock, no lock.
                    if result.is_ok()
                        && !*expired
                        && grace.is_zero()
                        && timer.as_ref().is_some_and(|t| t.is_elapsed())
                    {
                        if let Some(o) = owner.as_ref() {
                            o.expire();
                        }
                        break 'owner Some(Answer::from(*on_timeout));
                    }
                    let Some(o) = owner.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    // No timer of ours from now on: the context's own takes over for
                    // whatever still waits (a streaming body's watch, a spawned task).
                    o.driver().owner_times(false);
                    return Poll::Ready(match result {
                        Ok(res) => Ok(ContextBody::answered(o, res, *grace)),
                        Err(e) => {
                            o.failed();
                            Err(e)
                        }
                    });
                }
                let Some(o) = owner.as_ref() else {
                    return Poll::Pending;
                };
                if !*expired {
                    // The deadline may have been moved by an inner layer since the last poll.
                    // Every instant goes through the one guard against the clock's end.
                    match o.driver().deadline() {
                        None => *timer = None,
                        Some((at, _)) => {
                            let at = timer_instant(at);
                            match timer {
                                Some(t) if t.deadline() == at => {}
                                Some(t) => t.as_mut().reset(at),
                                None => *timer = Some(Box::pin(sleep_until(at))),
                            }
                        }
                    }
                }
                let fired = timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if !fired {
                    None
                } else {
                    o.expire();
                    if *expired || grace.is_zero() {
                        Some(Answer::from(*on_timeout))
                    } else {
                        // Cancelled now; the handler may still answer during the grace. A
                        // grace too long to represent means the handler always may.
                        *expired = true;
                        match (timer.as_mut(), Instant::now().checked_add(*grace)) {
                            (Some(t), Some(end)) => {
                                t.as_mut().reset(timer_instant(end));
                                // Registers the new instant with the waker.
                                t.as_mut()
                                    .poll(cx)
                                    .is_ready()
                                    .then(|| Answer::from(*on_timeout))
                            }
                            (_, None) => {
                                *timer = None;
                                None
                            }
                            (None, Some(_)) => Some(Answer::from(*on_timeout)),
                        }
                    }
                }
            }
        };
        match timed_out {
            Some(answer) => {
                let cause = match kind.as_mut().project() {
                    KindProj::Owner { owner, .. } => {
                        #[cfg(feature = "live")]
                        if let Some(o) = owner.as_mut() {
                            o.live_status(answer.status());
                        }
                        owner.as_ref().and_then(Owner::cause)
                    }
                    _ => None,
                };
                // Drops the handler's future; the context's cause is already recorded.
                kind.set(Kind::Early { answer: None });
                Poll::Ready(Ok(answer.into_response(cause)))
            }
            None => Poll::Pending,
        }
    }
}
