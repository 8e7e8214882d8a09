//! `ContextBody`: the response body, the second home of a request's [`Owner`].

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use reqctx::{Cancelled, Canceller, Cause, Context, WaitForCancel};

use super::lifecycle::{Answered, Owner, Streaming};
use crate::cause::ResponseBodyFailed;
use crate::wire::grpc;

/// The error type of [`ContextBody`], as tower's `BoxError`.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

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
            owner: Option<Owner>, // taken when the context ends
            #[pin]
            body: B,
            remaining: Option<u64>, // bytes the response announced and has not yet yielded
            grpc: Option<grpc::Wire>, // a gRPC response: a deadline ends it with a status, not an error
            // The handler answered before the context was cancelled: a cancellation now
            // cuts the body short, while an answer written after a cancellation (its own
            // 504, a 503 in the grace) is whole, bounded only by the grace's end.
            live: bool,
            // What cuts the body once it streams: the request's context, or for an answer
            // made after the cancellation the grace's end (made with the answer, looked at
            // only once the body streams). Boxed so that the body stays small to move.
            wait: Option<Pin<Box<Watch>>>,
            armed: bool, // the body streams: `wait` is looked at before each poll
            ended: bool, // gRPC trailers of our own were yielded: the body is over
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

    /// The handler's response: the owner decides whether the body carries it.
    pub(crate) fn answered(
        owner: Owner,
        res: Response<B>,
        grace: Duration,
    ) -> Response<ContextBody<B>>
    where
        B: Body,
    {
        match owner.answered(res, grace) {
            Answered::Done(res) => res.map(ContextBody::plain),
            Answered::Streams(res, streaming) => {
                let Streaming {
                    owner,
                    length,
                    grpc,
                    live,
                    bound,
                } = streaming;
                let wait = bound.map(|(ctx, canceller)| Watch::new(&ctx, Some(canceller)));
                res.map(|body| ContextBody {
                    kind: Kind::Owned {
                        owner: Some(owner),
                        body,
                        remaining: length,
                        grpc,
                        live,
                        wait,
                        armed: false,
                        ended: false,
                    },
                })
            }
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
    /// its headers and no body (grpc-web reads it there too). `message` must be printable
    /// ASCII without `%` (it goes out unescaped).
    pub(crate) fn grpc_response(
        wire: grpc::Wire,
        code: u8,
        message: &'static str,
    ) -> Response<ContextBody<B>> {
        let mut res = Response::new(ContextBody {
            kind: Kind::Message { data: None },
        });
        let headers = res.headers_mut();
        headers.extend(grpc::trailers(code, message));
        headers.insert(CONTENT_TYPE, wire.content_type());
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
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn StdError + Send + Sync>;

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
                owner,
                mut body,
                remaining,
                grpc,
                live,
                wait,
                armed,
                ended,
            } => {
                let Some(o) = owner.as_mut() else {
                    if *ended {
                        return Poll::Ready(None);
                    }
                    return body.poll_frame(cx).map_err(Into::into);
                };
                o.polled();
                let o = &*o;
                // Once the body has waited, cancellation is looked at before the body: a
                // client that stopped reading while the deadline passed gets an error at
                // the next poll, not more data.
                if let Some(w) = wait.as_mut().filter(|_| *armed) {
                    if w.as_mut().poll(cx).is_ready() {
                        let cause = o.cause().unwrap_or(Cause::Cancelled);
                        *owner = None;
                        return cut_short(cause, *grpc, ended);
                    }
                }
                let polled = match catch_unwind(AssertUnwindSafe(|| body.as_mut().poll_frame(cx))) {
                    Ok(polled) => polled,
                    Err(panic) => {
                        o.panicked();
                        resume_unwind(panic)
                    }
                };
                match polled {
                    Poll::Ready(None) => {
                        let done = owner.take().map_or(Ok(()), Owner::complete);
                        match done {
                            Err(cause) if *live => cut_short(cause, *grpc, ended),
                            _ => Poll::Ready(None),
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        o.end(Cause::custom(ResponseBodyFailed));
                        *owner = None;
                        Poll::Ready(Some(Err(e.into())))
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        // The last byte announced, or the trailers (always last), end it:
                        // hyper may not poll the body again.
                        let last = match (frame.data_ref(), remaining.as_mut()) {
                            (Some(data), Some(left)) => {
                                *left = left.saturating_sub(data.remaining() as u64);
                                *left == 0
                            }
                            (Some(_), None) => false,
                            (None, _) => frame.is_trailers(),
                        };
                        if last {
                            let done = owner.take().map_or(Ok(()), Owner::complete);
                            if let Err(cause) = done {
                                if *live {
                                    return cut_short(cause, *grpc, ended);
                                }
                            }
                        } else if !*armed {
                            // More to come: a body that is never pending streams too, and
                            // hyper alone stops polling it when the client stops reading.
                            // A cause that is already there cuts it at the next poll.
                            let _ = arm(owner, wait, armed, *live, cx);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Pending => {
                        // The body waits: any cause (the deadline included, whoever times
                        // it) ends it.
                        if !*armed {
                            if let Some(cause) = arm(owner, wait, armed, *live, cx) {
                                *owner = None;
                                return cut_short(cause, *grpc, ended);
                            }
                        }
                        Poll::Pending
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { body } => body.is_end_stream(),
            Kind::Owned {
                body, owner, ended, ..
            } => {
                if *ended {
                    return true;
                }
                let end = body.is_end_stream();
                if end {
                    // hyper may drop the body without polling it again.
                    if let Some(o) = owner {
                        o.end(Cause::Completed);
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

/// The body streams (it is pending, or yielded a frame that is not its last): arms what
/// ends it, once. An answer made before the cancellation is cut by its request's context;
/// one made after by its bound (the grace's end), if it has one, never by the
/// cancellation it answers. Returns the cause if what cuts it has ended already.
fn arm(
    owner: &mut Option<Owner>,
    wait: &mut Option<Pin<Box<Watch>>>,
    armed: &mut bool,
    live: bool,
    cx: &mut TaskContext<'_>,
) -> Option<Cause> {
    let o = owner.as_mut()?;
    *armed = true;
    if live {
        o.streaming();
        *wait = Some(Watch::new(&o.driver().context(), None));
    }
    let w = wait.as_mut()?;
    w.as_mut()
        .poll(cx)
        .is_ready()
        .then(|| o.cause().unwrap_or(Cause::Cancelled))
}

pin_project! {
    /// What cuts a streaming body: the end of a context.
    struct Watch {
        #[pin]
        wait: WaitForCancel,
        bound: Option<Canceller>, // the grace's own context: ended (`Cancelled`) with the body
    }
}

impl Watch {
    fn new(ctx: &Context, bound: Option<Canceller>) -> Pin<Box<Watch>> {
        Box::pin(Watch {
            wait: ctx.cancelled(),
            bound,
        })
    }
}

impl Future for Watch {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        self.project().wait.poll(cx)
    }
}

/// How a body whose context ended while it streamed ends: with an error, so the client
/// sees a truncated response, or, for gRPC, with trailers carrying the status of the
/// cause (`DEADLINE_EXCEEDED` for a deadline), which a gRPC client reads as the call's
/// outcome: HTTP trailers, or for grpc-web the trailer frame at the end of the body.
fn cut_short<D: From<Bytes>>(
    cause: Cause,
    grpc: Option<grpc::Wire>,
    ended: &mut bool,
) -> Poll<Option<Result<Frame<D>, BoxError>>> {
    if let (Some(wire), Some((code, message))) = (grpc, grpc::status(&cause)) {
        *ended = true;
        let frame = match wire {
            grpc::Wire::Grpc => Frame::trailers(grpc::trailers(code, message)),
            // HTTP/1 drops trailers: grpc-web carries the status in the body.
            web => Frame::data(D::from(grpc::web_trailer_frame(web, code, message))),
        };
        return Poll::Ready(Some(Ok(frame)));
    }
    Poll::Ready(Some(Err(Box::new(Cancelled::new(cause)))))
}
