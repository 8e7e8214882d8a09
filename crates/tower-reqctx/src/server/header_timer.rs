//! hyper's HTTP/1 header-read timer, with one tokio timer per connection instead of one
//! per request.
//!
//! hyper (1.x, `proto::h1::conn`) asks its [`Timer`] for a new `sleep_until(now +
//! timeout)` each time it starts reading a request head (at a connection's first bytes
//! and after every response), polls it only while the head is incomplete, and drops it
//! as soon as a head is parsed. With hyper-util's `TokioTimer` that is a boxed tokio
//! `Sleep` per request, registered in tokio's wheel when hyper polls it (the next head
//! is almost never there yet after a response) and removed again when the head arrives.
//!
//! Here a connection owns one [`Clock`]: the deadline of the head being read and one
//! tokio `Sleep`, created at the connection's first header read and kept. hyper's sleeps
//! are zero-sized ([`HeaderSleep`]: boxing them allocates nothing) and find their
//! connection's clock in a thread-local, set while the connection's task polls it
//! ([`Clocked`]): hyper creates, polls and drops them only inside that poll. A new head's
//! deadline only moves the clock's deadline; the tokio `Sleep` stays armed at the
//! deadline it had, and when that passes while a later head is still being read, it is
//! moved to that head's deadline. So a head is refused at its own deadline, never
//! before, and tokio's wheel sees a connection once per timeout period at most instead
//! of twice per request.
//!
//! What this cannot remove is hyper's own share: with a header-read timeout set, hyper
//! goes once more round its poll loop after every response, to start the next head's
//! timer (a read attempt, a parse of nothing, a flush of nothing: about 760 instructions
//! per request, measured in `benches/run`'s HTTP/1.1 hello world).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use pin_project_lite::pin_project;

use crate::connection::{ConnectionContext, serving};
use reqctx::timer_instant;

/// The [`Timer`] `serve` gives hyper for HTTP/1: sleeps on the polling connection's
/// [`Clock`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HeaderTimer;

impl Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        let now = self.now();
        // hyper's HTTP/1 server does not call this; past the end of time, about thirty
        // years on.
        let far = Duration::from_secs(86_400 * 365 * 30);
        let deadline = now.checked_add(duration).or_else(|| now.checked_add(far));
        self.sleep_until(deadline.unwrap_or(now))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        with_clock(|clock| {
            if let Some(clock) = clock {
                clock.deadline = Some(deadline.into());
            }
        });
        // Zero-sized: no allocation.
        Box::pin(HeaderSleep)
    }

    fn reset(&self, _sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        // Every `HeaderSleep` of a connection is its clock.
        with_clock(|clock| {
            if let Some(clock) = clock {
                clock.deadline = Some(new_deadline.into());
            }
        });
    }

    fn now(&self) -> Instant {
        // tokio's clock, which tests can pause.
        tokio::time::Instant::now().into_std()
    }
}

/// One of hyper's header-read sleeps: its connection's [`Clock`], found through the
/// thread-local that [`Clocked`] sets while it polls the connection.
struct HeaderSleep;

impl Future for HeaderSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        with_clock(|clock| match clock {
            Some(clock) => clock.poll(cx),
            // Polled outside its connection's poll: hyper does not do that. Refuse the
            // head (hyper closes the connection) rather than keep a slow client forever.
            None => {
                tracing::warn!("a header-read timer polled outside its connection's poll");
                Poll::Ready(())
            }
        })
    }
}

impl Sleep for HeaderSleep {}

/// A connection's header-read clock.
#[derive(Default)]
pub(crate) struct Clock {
    /// The deadline of the head being read: the latest `sleep_until`.
    deadline: Option<tokio::time::Instant>,
    /// Made at the first poll, then kept; armed at a deadline no later than `deadline`.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The waker `sleep` holds, if it is armed and was polled since.
    waker: Option<Waker>,
}

impl Clock {
    fn poll(&mut self, cx: &mut TaskContext<'_>) -> Poll<()> {
        let Some(deadline) = self.deadline else {
            // hyper sets a deadline before it polls.
            return Poll::Pending;
        };
        if let Some(sleep) = &self.sleep {
            // Armed no later than this head's deadline and still pending, with this task's
            // waker (tokio keeps it until the timer fires): nothing to do.
            if !sleep.is_elapsed()
                && sleep.deadline() <= deadline
                && self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
            {
                return Poll::Pending;
            }
        }
        let deadline = timer_instant(deadline);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            let armed = sleep.deadline();
            if armed > deadline {
                // Only a shorter timeout set while the connection ran comes here.
                sleep.as_mut().reset(deadline);
                continue;
            }
            if sleep.as_mut().poll(cx).is_pending() {
                if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    self.waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            // tokio's timer never fires before its deadline.
            if armed == deadline {
                return Poll::Ready(());
            }
            // An earlier head's deadline passed: this head has until its own.
            sleep.as_mut().reset(deadline);
        }
    }
}

thread_local! {
    /// The clock of the connection whose task is polling it on this thread.
    static CLOCK: RefCell<Option<Box<Clock>>> = const { RefCell::new(None) };
}

fn with_clock<R>(f: impl FnOnce(Option<&mut Clock>) -> R) -> R {
    // Taken out (a pointer) for the length of `f`, which so never holds the borrow.
    let mut clock = CLOCK.with(|slot| slot.borrow_mut().take());
    let out = f(clock.as_deref_mut());
    CLOCK.with(|slot| *slot.borrow_mut() = clock);
    out
}

pin_project! {
    /// A connection's future, polled with its [`Clock`] in the thread-local, and with its
    /// connection as the current one ([`ConnectionContext::current`]).
    pub(crate) struct Clocked<F> {
        #[pin]
        inner: F,
        clock: Option<Box<Clock>>,
        conn: Option<ConnectionContext>,
    }
}

impl<F> Clocked<F> {
    pub(crate) fn new(inner: F, conn: ConnectionContext) -> Self {
        Clocked {
            inner,
            clock: Some(Box::default()),
            conn: Some(conn),
        }
    }

    /// The connection's future.
    pub(crate) fn inner(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().inner
    }
}

impl<F: Future> Future for Clocked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let inner = this.inner;
        let clock = this.clock;
        serving(this.conn, || scoped(clock, || inner.poll(cx)))
    }
}

/// Runs `f` with `clock` in the thread-local, and takes it back after, even if `f` unwinds
/// (a handler's panic): a connection polled inside another's poll keeps its own clock.
fn scoped<R>(clock: &mut Option<Box<Clock>>, f: impl FnOnce() -> R) -> R {
    crate::current::enter(&CLOCK, clock, f)
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::time::{Instant, advance};

    use super::*;

    /// One poll of hyper's `sleep` inside its connection's poll.
    async fn poll_in(clock: &mut Option<Box<Clock>>, sleep: &mut Pin<Box<dyn Sleep>>) -> Poll<()> {
        poll_fn(|cx| Poll::Ready(scoped(clock, || sleep.as_mut().poll(cx)))).await
    }

    /// hyper's use: a sleep per head, polled while the head is incomplete, dropped when it
    /// is parsed. A head is refused at its own deadline: not at an earlier head's, whose
    /// tokio timer is still armed, and not later.
    #[tokio::test(start_paused = true)]
    async fn each_head_is_refused_at_its_own_deadline() {
        let timer = HeaderTimer;
        let limit = Duration::from_secs(30);
        let mut clock = Some(Box::<Clock>::default());

        // The first head: incomplete when first polled, then parsed.
        let mut first = scoped(&mut clock, || timer.sleep_until(timer.now() + limit));
        assert!(poll_in(&mut clock, &mut first).await.is_pending());
        drop(first);

        // The next one, 10 s later, is still incomplete after the first one's deadline.
        advance(Duration::from_secs(10)).await;
        let began = Instant::now();
        let mut second = scoped(&mut clock, || timer.sleep_until(timer.now() + limit));
        assert!(poll_in(&mut clock, &mut second).await.is_pending());
        advance(Duration::from_secs(25)).await;
        assert!(poll_in(&mut clock, &mut second).await.is_pending());
        advance(Duration::from_secs(5)).await;
        assert!(poll_in(&mut clock, &mut second).await.is_ready());
        assert_eq!(began.elapsed(), limit);
    }

    /// A deadline at the end of time is a long wait, not an overflow in tokio's timer.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_at_the_end_of_time_does_not_overflow() {
        let timer = HeaderTimer;
        let mut clock = Some(Box::<Clock>::default());
        let mut sleep = scoped(&mut clock, || timer.sleep(Duration::MAX));
        assert!(poll_in(&mut clock, &mut sleep).await.is_pending());
        advance(Duration::from_secs(86_400)).await;
        assert!(poll_in(&mut clock, &mut sleep).await.is_pending());
    }
}
