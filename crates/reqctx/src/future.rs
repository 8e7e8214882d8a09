//! Hand-written futures: waiting for cancellation, and racing work against it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::cause::{Cancelled, Cause};
use crate::node::{CancelNode, LazyNow, wheel_instant};

/// The future returned by [`Context::cancelled`](crate::Context::cancelled).
///
/// It owns what it needs (no borrow of the context), so it can be stored in a struct or
/// moved into a task. On its first poll it registers its waker on the context's node (a
/// cancellation, its own or an ancestor's, wakes it), and times the earliest deadline of
/// the chain, fixed or driven, that nobody else times, with a `Sleep` of its own, so the
/// deadline reaches it whoever else is polled; when a driven deadline moves later or goes
/// away, it sleeps again until the new one. A driven deadline timed by its owner (the
/// middleware that drives it) needs no `Sleep`. Dropping it removes the registration.
#[must_use = "futures do nothing unless polled"]
pub struct WaitForCancel {
    node: Option<Arc<CancelNode>>, // None: a context that is never cancelled
    key: Option<usize>,            // the registration, from the first poll
    sleep: Option<Pin<Box<Sleep>>>, // the earliest deadline timed by nobody else
}

impl Drop for WaitForCancel {
    fn drop(&mut self) {
        if let (Some(node), Some(key)) = (&self.node, self.key) {
            node.deregister(key);
        }
    }
}

impl WaitForCancel {
    pub(crate) fn new(node: Option<Arc<CancelNode>>) -> WaitForCancel {
        WaitForCancel {
            node,
            key: None,
            sleep: None,
        }
    }

    fn started(&self) -> bool {
        self.key.is_some()
    }

    /// Whether the context is cancelled now, without registering or timing anything.
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
            .field("timed", &self.sleep.is_some())
            .finish()
    }
}

#[cfg(test)]
thread_local! {
    /// `Sleep`s armed by waiters on this thread, for tests of who times what.
    static SLEEPS_ARMED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many `Sleep`s waiters armed on this thread so far.
#[cfg(test)]
pub(crate) fn sleeps_armed() -> usize {
    SLEEPS_ARMED.with(std::cell::Cell::get)
}

impl Future for WaitForCancel {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(node) = this.node.as_ref() else {
            return Poll::Pending;
        };
        match this.key {
            Some(key) => {
                // Gone from the registry: drained by a cause, which may have woken the
                // waker of an earlier poll rather than this one.
                if node.is_done() || !node.update(key, cx.waker()) {
                    return Poll::Ready(());
                }
            }
            None => {
                // Register first, then look: a cause recorded in between wakes us or is
                // seen by `resolve` (invariant 2 in `node.rs`).
                let Some(key) = node.register(cx.waker()) else {
                    return Poll::Ready(());
                };
                this.key = Some(key);
                node.link_up();
                if node.resolve(&mut LazyNow::new()).is_some() {
                    return Poll::Ready(());
                }
                if let Some(deadline) = node.waiter_deadline() {
                    #[cfg(test)]
                    SLEEPS_ARMED.with(|n| n.set(n.get() + 1));
                    this.sleep = Some(Box::pin(sleep_until(wheel_instant(deadline))));
                }
            }
        }
        while let Some(sleep) = this.sleep.as_mut() {
            let slept_until = sleep.deadline();
            ready!(sleep.as_mut().poll(cx));
            // Records DeadlineExceeded on the node whose deadline passed, which wakes the
            // waiters of every node below it.
            if node.resolve(&mut LazyNow::new()).is_some() {
                return Poll::Ready(());
            }
            // A driven deadline moved later or went away: sleep until the chain's
            // earliest one now, if any (a move earlier is timed by the node, invariant 5
            // in `node.rs`).
            match node.waiter_deadline().map(wheel_instant) {
                None => this.sleep = None,
                Some(deadline) => {
                    // Not passed by the clock although the sleep ended (tokio's timer
                    // never fires early; stay correct anyway): look again a millisecond
                    // later rather than spin.
                    let next = if deadline <= slept_until {
                        match Instant::now().checked_add(Duration::from_millis(1)) {
                            Some(later) => wheel_instant(later),
                            None => return Poll::Pending, // the end of time: never passes
                        }
                    } else {
                        deadline
                    };
                    sleep.as_mut().reset(next);
                }
            }
        }
        Poll::Pending
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
        // this costs no registration and no timer.
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
