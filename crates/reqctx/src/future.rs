//! Hand-written futures: waiting for cancellation, and racing work against it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::cause::{Cancelled, Cause};
use crate::node::{CancelNode, LazyNow};

pin_project! {
    /// The future returned by [`Context::cancelled`](crate::Context::cancelled).
    ///
    /// It owns what it needs (no borrow of the context), so it can be stored in a struct
    /// or moved into a task. It times nothing itself: on its first poll it makes sure each
    /// deadline of the context's chain has its timer (one per deadline, shared by every
    /// waiter) and then waits on the context's token, which those timers cancel.
    #[must_use = "futures do nothing unless polled"]
    pub struct WaitForCancel {
        node: Option<Arc<CancelNode>>, // None: a context that is never cancelled
        #[pin]
        wait: Option<WaitForCancellationFutureOwned>, // set on the first poll
    }
}

impl WaitForCancel {
    pub(crate) fn new(node: Option<Arc<CancelNode>>) -> WaitForCancel {
        WaitForCancel { node, wait: None }
    }

    fn started(&self) -> bool {
        self.wait.is_some()
    }

    /// Whether the context is cancelled now, without creating a token or a timer.
    fn check(&self) -> bool {
        self.node
            .as_ref()
            .is_some_and(|n| n.resolve(&mut LazyNow::new()).is_some())
    }

    fn cause(&self) -> Cause {
        self.node
            .as_ref()
            .and_then(|n| n.resolve(&mut LazyNow::new()))
            .map_or(Cause::Cancelled, |(cause, _)| cause)
    }
}

impl fmt::Debug for WaitForCancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitForCancel")
            .field("started", &self.started())
            .finish()
    }
}

impl Future for WaitForCancel {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(node) = this.node.as_ref() else {
            return Poll::Pending;
        };
        if this.wait.is_none() {
            if node.resolve(&mut LazyNow::new()).is_some() {
                return Poll::Ready(());
            }
            // Every deadline of the chain now has a timer that cancels its node's token
            // when it passes, and so ours: the token is all there is to wait on.
            node.arm_timers();
            this.wait.set(Some(node.token().cancelled_owned()));
        }
        match this.wait.as_pin_mut() {
            Some(wait) => wait.poll(cx),
            None => Poll::Pending,
        }
    }
}

pin_project! {
    /// The future returned by [`Context::run`](crate::Context::run).
    #[must_use = "futures do nothing unless polled"]
    pub struct Run<F> {
        #[pin]
        work: F,
        #[pin]
        wait: WaitForCancel,
    }
}

impl<F> Run<F> {
    pub(crate) fn new(work: F, wait: WaitForCancel) -> Run<F> {
        Run { work, wait }
    }
}

impl<F> fmt::Debug for Run<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run").field("wait", &self.wait).finish()
    }
}

impl<F: Future> Future for Run<F> {
    type Output = Result<F::Output, Cancelled>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // Cancellation is looked at before the work on every poll: once the context is
        // cancelled, the work is not polled again. Until the work first returns Pending,
        // this costs no token and no timer.
        let started = this.wait.started();
        let cancelled = if started {
            this.wait.as_mut().poll(cx).is_ready()
        } else {
            this.wait.check()
        };
        if cancelled {
            return Poll::Ready(Err(Cancelled::new(this.wait.cause())));
        }
        if let Poll::Ready(out) = this.work.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if !started && this.wait.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Cancelled::new(this.wait.cause())));
        }
        Poll::Pending
    }
}

/// Which of two futures finished first.
pub(crate) enum Which<A, B> {
    Left(A),
    Right(B),
}

pin_project! {
    /// Polls `a`, then `b`; resolves with the first that is ready.
    pub(crate) struct First<A, B> {
        #[pin]
        a: A,
        #[pin]
        b: B,
    }
}

pub(crate) fn first<A: Future, B: Future>(a: A, b: B) -> First<A, B> {
    First { a, b }
}

impl<A: Future, B: Future> Future for First<A, B> {
    type Output = Which<A::Output, B::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(a) = this.a.poll(cx) {
            return Poll::Ready(Which::Left(a));
        }
        this.b.poll(cx).map(Which::Right)
    }
}
