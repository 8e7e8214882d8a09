//! Streams bound to a context (feature `stream`): [`Context::bind`] and
//! [`Context::bind_try`].

use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use std::future::Future as _;

use futures_core::{FusedStream, Stream};
use pin_project_lite::pin_project;

use crate::cause::{Cancelled, Cause};
use crate::context::Context;
use crate::future::WaitForCancel;

impl Context {
    /// Binds `stream` to this context: the returned stream yields the items of `stream`
    /// until the context is cancelled, then ends (yields `None`). A stream that ends by
    /// itself ends the bound stream too. To learn why it ended, read
    /// [`cause`](Context::cause) or [`Bound::cause`]; to get the cause as the last item,
    /// use [`bind_try`](Context::bind_try).
    ///
    /// Which wins a race: as in [`run`](Context::run), cancellation is checked before the
    /// stream on every poll, so the stream is never polled once the context is known to be
    /// cancelled, and an item that is ready in the same poll in which the cancellation is
    /// first seen is not yielded (it stays in the stream). Items that are ready without the
    /// stream ever returning `Pending` cost no registration and no timer.
    ///
    /// Once ended, the bound stream keeps `stream` (not polled again) until it is dropped or
    /// taken back with [`into_inner`](Bound::into_inner).
    ///
    /// ```
    /// # use std::{pin::{Pin, pin}, task::{Context as Cx, Poll}, time::Duration};
    /// # use reqctx::{Cause, Context};
    /// # struct Ticks(tokio::time::Interval);
    /// # impl futures_core::Stream for Ticks {
    /// #     type Item = ();
    /// #     fn poll_next(mut self: Pin<&mut Self>, cx: &mut Cx<'_>) -> Poll<Option<()>> {
    /// #         self.0.poll_tick(cx).map(|_| Some(()))
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let (ctx, _cancel) = Context::background().with_timeout(Duration::from_millis(350));
    /// // A tick every 100 ms, forever, bound to a 350 ms context: four ticks (0, 100, 200
    /// // and 300 ms), then the end.
    /// let ticks = Ticks(tokio::time::interval(Duration::from_millis(100)));
    /// let mut ticks = pin!(ctx.bind(ticks));
    /// let mut n = 0;
    /// while std::future::poll_fn(|cx| ticks.as_mut().poll_next(cx)).await.is_some() {
    ///     n += 1;
    /// }
    /// assert_eq!(n, 4);
    /// assert!(matches!(ticks.cause(), Some(Cause::DeadlineExceeded { .. })));
    /// # }
    /// # use futures_core::Stream;
    /// ```
    ///
    /// # Cancellation safety
    ///
    /// Polling the bound stream is as cancel-safe as polling `stream`: a `next()` future
    /// dropped before it yields loses no item.
    pub fn bind<S: Stream>(&self, stream: S) -> Bound<S> {
        Bound {
            stream,
            wait: self.cancelled(),
            ctx: self.clone(),
            state: State::Live { waiting: false },
        }
    }

    /// Binds a stream of `Result`s to this context, as [`bind`](Context::bind) does, but
    /// when the context is cancelled the stream yields `Err(E::from(Cancelled))` with the
    /// cause, as its last item, then ends. A stream that ends by itself first ends with no
    /// error. Which wins a race and cancellation safety are as for
    /// [`bind`](Context::bind).
    pub fn bind_try<S, T, E>(&self, stream: S) -> BoundTry<S>
    where
        S: Stream<Item = Result<T, E>>,
        E: From<Cancelled>,
    {
        BoundTry {
            bound: self.bind(stream),
        }
    }
}

/// Where a bound stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live { waiting: bool }, // waiting: the cancellation future was polled (a token exists)
    Cancelled { yielded: bool }, // ended by the context; yielded: `BoundTry` gave the error
    Done,                   // ended by itself
}

pin_project! {
    /// The stream returned by [`Context::bind`].
    #[must_use = "streams do nothing unless polled"]
    pub struct Bound<S> {
        #[pin]
        stream: S,
        #[pin]
        wait: WaitForCancel,
        ctx: Context,
        state: State,
    }
}

impl<S> Bound<S> {
    /// The context's cause if the stream ended because the context was cancelled; `None`
    /// while it runs or if it ended by itself.
    pub fn cause(&self) -> Option<Cause> {
        match self.state {
            State::Cancelled { .. } => Some(self.ctx.cause().unwrap_or(Cause::Cancelled)),
            _ => None,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The wrapped stream, pinned.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().stream
    }

    /// The wrapped stream, unbound.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl<S: Stream> Stream for Bound<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<S::Item>> {
        let mut this = self.project();
        let State::Live { waiting } = *this.state else {
            return Poll::Ready(None);
        };
        // As `Run`: once the stream has returned Pending, the cancellation future is
        // registered and polled first; before that, a plain check registers nothing.
        let cancelled = if waiting {
            this.wait.as_mut().poll(cx).is_ready()
        } else {
            this.ctx.is_cancelled()
        };
        if cancelled {
            *this.state = State::Cancelled { yielded: false };
            return Poll::Ready(None);
        }
        match this.stream.poll_next(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Ready(None) => {
                *this.state = State::Done;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !waiting {
                    *this.state = State::Live { waiting: true };
                    if this.wait.poll(cx).is_ready() {
                        *this.state = State::Cancelled { yielded: false };
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.state {
            State::Live { .. } => (0, self.stream.size_hint().1),
            _ => (0, Some(0)),
        }
    }
}

impl<S: Stream> FusedStream for Bound<S> {
    fn is_terminated(&self) -> bool {
        !matches!(self.state, State::Live { .. })
    }
}

impl<S> fmt::Debug for Bound<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bound")
            .field("ctx", &self.ctx)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The stream returned by [`Context::bind_try`].
    #[must_use = "streams do nothing unless polled"]
    pub struct BoundTry<S> {
        #[pin]
        bound: Bound<S>,
    }
}

impl<S> BoundTry<S> {
    /// The context's cause if the stream ended because the context was cancelled.
    pub fn cause(&self) -> Option<Cause> {
        self.bound.cause()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        self.bound.get_ref()
    }

    /// The wrapped stream, unbound.
    pub fn into_inner(self) -> S {
        self.bound.into_inner()
    }
}

impl<S, T, E> Stream for BoundTry<S>
where
    S: Stream<Item = Result<T, E>>,
    E: From<Cancelled>,
{
    type Item = Result<T, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let mut bound = self.project().bound;
        match bound.as_mut().poll_next(cx) {
            Poll::Ready(None) if bound.state == (State::Cancelled { yielded: false }) => {
                let bound = bound.project();
                *bound.state = State::Cancelled { yielded: true };
                let cause = bound.ctx.cause().unwrap_or(Cause::Cancelled);
                Poll::Ready(Some(Err(E::from(Cancelled::new(cause)))))
            }
            poll => poll,
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.bound.state {
            State::Live { .. } => (
                0,
                self.bound
                    .stream
                    .size_hint()
                    .1
                    .and_then(|n| n.checked_add(1)),
            ),
            State::Cancelled { yielded: false } => (1, Some(1)),
            _ => (0, Some(0)),
        }
    }
}

impl<S, T, E> FusedStream for BoundTry<S>
where
    S: Stream<Item = Result<T, E>>,
    E: From<Cancelled>,
{
    fn is_terminated(&self) -> bool {
        matches!(
            self.bound.state,
            State::Done | State::Cancelled { yielded: true }
        )
    }
}

impl<S> fmt::Debug for BoundTry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundTry")
            .field("bound", &self.bound)
            .finish()
    }
}
