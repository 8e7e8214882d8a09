//! The response future of `ContextClient`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use reqctx::{Cancelled, Context, WaitForCancel};

use super::error::{ClientError, cancelled, exceeded_downstream};
use super::propagation::ExceededCheck;

pin_project! {
    /// The response future of [`ContextClient`](super::ContextClient).
    ///
    /// # Cancellation safety
    ///
    /// Dropping it drops the inner client's future, which is how the request is aborted.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // No context attached: the inner future, untouched.
        Passthrough {
            #[pin]
            inner: F,
        },
        // The request is in flight, raced against the context.
        Bound {
            #[pin]
            inner: F,
            #[pin]
            cancelled: WaitForCancel,
            ctx: Context,
            check: ExceededCheck,
        },
        // Not sent: no more than the margin was left. Waits for the context's own cause.
        Spent {
            #[pin]
            cancelled: WaitForCancel,
            ctx: Context,
        },
        // Not sent: the context was cancelled.
        Failed {
            error: Option<Cancelled>, // taken by the one poll
        },
        // Returned its output; the inner future is dropped.
        Done,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn passthrough(inner: F) -> ResponseFuture<F> {
        ResponseFuture {
            state: State::Passthrough { inner },
        }
    }

    pub(crate) fn bound(inner: F, ctx: Context, check: ExceededCheck) -> ResponseFuture<F> {
        ResponseFuture {
            state: State::Bound {
                inner,
                cancelled: ctx.cancelled(),
                ctx,
                check,
            },
        }
    }

    pub(crate) fn spent(ctx: Context) -> ResponseFuture<F> {
        ResponseFuture {
            state: State::Spent {
                cancelled: ctx.cancelled(),
                ctx,
            },
        }
    }

    pub(crate) fn failed(error: Cancelled) -> ResponseFuture<F> {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Passthrough { .. } => "Passthrough",
            State::Bound { .. } => "Bound",
            State::Spent { .. } => "Spent",
            State::Failed { .. } => "Failed",
            State::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<RB>, ClientError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        let output = match state.as_mut().project() {
            StateProj::Passthrough { inner } => ready!(inner.poll(cx)).map_err(ClientError::Inner),
            StateProj::Bound {
                inner,
                cancelled: wait,
                ctx,
                check,
            } => {
                // Cancellation first, as `Context::run`: a response ready in the poll in
                // which the cancellation is first seen loses.
                if wait.poll(cx).is_ready() {
                    Err(ClientError::Cancelled(cancelled(ctx)))
                } else {
                    match ready!(inner.poll(cx)) {
                        Ok(res) if check.matches(res.status(), res.headers()) => {
                            Err(ClientError::Cancelled(exceeded_downstream(ctx)))
                        }
                        Ok(res) => Ok(res),
                        Err(e) => Err(ClientError::Inner(e)),
                    }
                }
            }
            StateProj::Spent {
                cancelled: wait,
                ctx,
            } => {
                ready!(wait.poll(cx));
                Err(ClientError::Cancelled(cancelled(ctx)))
            }
            StateProj::Failed { error } => Err(ClientError::Cancelled(
                error
                    .take()
                    .expect("ResponseFuture polled after completion"),
            )),
            StateProj::Done => panic!("ResponseFuture polled after completion"),
        };
        // Drops the inner future now (on cancellation: aborts the request), not whenever
        // the caller drops this one.
        state.set(State::Done);
        Poll::Ready(output)
    }
}
