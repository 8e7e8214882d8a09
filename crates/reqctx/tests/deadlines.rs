//! How a deadline reaches waiters, whoever polls what; and that the tasks behind it end
//! with their context.
//!
//! A driven deadline (middleware's) used to be timed only by its owner, which hyper stops
//! polling when a client does not read: here the owner (the `DeadlineDriver`) is never
//! polled and never calls `expire`, and every kind of waiter must still wake.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqctx::{Cause, Context, DeadlineOrigin};
use tokio::sync::oneshot;
use tokio::time::Instant;

fn layer_deadline() -> Cause {
    Cause::DeadlineExceeded {
        origin: DeadlineOrigin::Layer,
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Lets the (current-thread) runtime run what is ready until `alive_tasks() == want`,
/// without moving the clock; returns the count it ended with.
async fn tasks_settle_to(want: usize) -> usize {
    for _ in 0..1_000 {
        if alive_tasks() == want {
            break;
        }
        tokio::task::yield_now().await;
    }
    alive_tasks()
}

/// Awaits `fut`, failing (not hanging) if it takes more than a day of paused time.
async fn within_a_day<F: std::future::IntoFuture>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(86_400), fut)
        .await
        .expect("never woke")
}

/// When a parked `cancelled()` waiter woke, and with which cause.
fn park_waiter(ctx: &Context) -> oneshot::Receiver<(Duration, Option<Cause>)> {
    let (tx, rx) = oneshot::channel();
    let ctx = ctx.clone();
    let start = Instant::now();
    tokio::spawn(async move {
        ctx.cancelled().await;
        let _ = tx.send((start.elapsed(), ctx.cause()));
    });
    rx
}

#[tokio::test(start_paused = true)]
async fn a_driven_deadline_wakes_every_waiter_while_its_owner_is_not_polled() {
    let (ctx, _driver) = Context::background().with_driven_deadline(Some((
        Instant::now() + Duration::from_millis(300),
        DeadlineOrigin::Layer,
    )));
    let handler = ctx.with_value("request id");
    let (inner, _cancel) = handler.with_cancel(); // a descendant, as a handler makes

    let waiter = park_waiter(&handler);
    let inner_waiter = park_waiter(&inner);
    let spawned = handler.spawn(std::future::pending::<()>());
    let ran = tokio::spawn({
        let ctx = inner.clone();
        async move { ctx.run(std::future::pending::<()>()).await }
    });
    let token = handler.token();
    let (tx, on_cancel) = oneshot::channel();
    handler.on_cancel(move |cause| {
        let _ = tx.send(cause.clone());
    });

    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), token.cancelled())
        .await
        .expect("the token is cancelled at the driven deadline");
    assert_eq!(start.elapsed(), Duration::from_millis(300));

    assert_eq!(
        within_a_day(waiter).await.unwrap(),
        (Duration::from_millis(300), Some(layer_deadline()))
    );
    assert_eq!(
        within_a_day(inner_waiter).await.unwrap(),
        (Duration::from_millis(300), Some(layer_deadline()))
    );
    assert_eq!(
        within_a_day(spawned).await.unwrap().unwrap_err().cause(),
        &layer_deadline()
    );
    assert_eq!(
        within_a_day(ran).await.unwrap().unwrap_err().cause(),
        &layer_deadline()
    );
    assert_eq!(within_a_day(on_cancel).await.unwrap(), layer_deadline());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_follows_a_driven_deadline_moved_earlier() {
    let (ctx, driver) = Context::background().with_driven_deadline(Some((
        Instant::now() + Duration::from_secs(10),
        DeadlineOrigin::Layer,
    )));
    // A child with a later deadline of its own: the driven one must still reach it.
    let (child, _c) = ctx.with_timeout(Duration::from_secs(20));
    let waiter = park_waiter(&child);
    tokio::task::yield_now().await; // the waiter is parked, its timers armed
    // An inner layer shortens the deadline; the waiter must not sleep to the old one.
    driver.handle().set_deadline(Some((
        Instant::now() + Duration::from_millis(100),
        DeadlineOrigin::Query,
    )));
    assert_eq!(
        within_a_day(waiter).await.unwrap(),
        (
            Duration::from_millis(100),
            Some(Cause::DeadlineExceeded {
                origin: DeadlineOrigin::Query
            })
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_armed_for_an_old_deadline_does_not_fire_when_it_moves_later() {
    let (ctx, mut driver) = Context::background().with_driven_deadline(Some((
        Instant::now() + Duration::from_millis(100),
        DeadlineOrigin::Layer,
    )));
    let waiter = park_waiter(&ctx);
    tokio::time::sleep(Duration::from_millis(50)).await;
    driver.set_deadline(Some((
        Instant::now() + Duration::from_millis(450),
        DeadlineOrigin::Header,
    )));
    tokio::time::sleep(Duration::from_millis(100)).await; // past the old deadline
    assert!(!ctx.is_cancelled(), "the old deadline no longer applies");
    assert_eq!(
        within_a_day(waiter).await.unwrap(),
        (
            Duration::from_millis(500),
            Some(Cause::DeadlineExceeded {
                origin: DeadlineOrigin::Header
            })
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_removed_driven_deadline_stops_its_timer_and_a_new_one_rearms_it() {
    let base = alive_tasks();
    let (ctx, mut driver) = Context::background().with_driven_deadline(Some((
        Instant::now() + Duration::from_millis(100),
        DeadlineOrigin::Layer,
    )));
    let waiter = park_waiter(&ctx);
    let token = ctx.token();
    assert_eq!(tasks_settle_to(base + 2).await, base + 2, "waiter + timer");
    // An upgrade: the tunnel outlives the request's deadline.
    driver.set_deadline(None);
    assert_eq!(tasks_settle_to(base + 1).await, base + 1, "the timer ended");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!ctx.is_cancelled());
    assert!(!token.is_cancelled());
    // A deadline set again reaches the waiter that is still parked, and the token.
    driver.set_deadline(Some((
        Instant::now() + Duration::from_millis(100),
        DeadlineOrigin::Layer,
    )));
    let (woke_after, cause) = within_a_day(waiter).await.unwrap();
    assert_eq!(woke_after, Duration::from_millis(10_100));
    assert_eq!(cause, Some(layer_deadline()));
    assert!(token.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn a_driven_context_waited_on_before_it_has_a_deadline_gets_one() {
    let (ctx, mut driver) = Context::background().with_driven_deadline(None);
    let base = alive_tasks();
    let waiter = park_waiter(&ctx);
    assert_eq!(
        tasks_settle_to(base + 1).await,
        base + 1,
        "no deadline, no timer"
    );
    driver.set_deadline(Some((
        Instant::now() + Duration::from_millis(30),
        DeadlineOrigin::Layer,
    )));
    assert_eq!(
        within_a_day(waiter).await.unwrap(),
        (Duration::from_millis(30), Some(layer_deadline()))
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_time_a_deadline_themselves_and_tokens_share_one_timer() {
    let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(5));
    let base = alive_tasks();
    // Nothing is made until someone waits.
    assert!(!ctx.is_cancelled());
    let _ = ctx.check();
    assert_eq!(tasks_settle_to(base).await, base);
    let waiters: Vec<_> = (0..10).map(|_| park_waiter(&ctx)).collect();
    let _token = ctx.token();
    assert_eq!(
        tasks_settle_to(base + 11).await,
        base + 11,
        "10 waiters, 1 timer"
    );
    for w in waiters {
        assert_eq!(within_a_day(w).await.unwrap().0, Duration::from_secs(5));
    }
}

#[tokio::test(start_paused = true)]
async fn run_loses_to_a_deadline_due_in_the_same_poll_fixed_or_driven() {
    let (fixed, _c) = Context::background().with_timeout(Duration::from_millis(10));
    let r = fixed
        .run(tokio::time::sleep(Duration::from_millis(10)))
        .await;
    assert_eq!(
        r.unwrap_err().cause(),
        &Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Code
        }
    );
    let (driven, _driver) = Context::background().with_driven_deadline(Some((
        Instant::now() + Duration::from_millis(10),
        DeadlineOrigin::Layer,
    )));
    let r = driven
        .run(tokio::time::sleep(Duration::from_millis(10)))
        .await;
    assert_eq!(r.unwrap_err().cause(), &layer_deadline());
}

// --- leaks -------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_tokens_timer_ends_with_its_context() {
    let base = alive_tasks();
    let (ctx, cancel) = Context::background().with_timeout(Duration::from_secs(3600));
    cancel.disarm();
    let token = ctx.token();
    assert_eq!(
        tasks_settle_to(base + 1).await,
        base + 1,
        "the deadline's timer"
    );
    drop(ctx);
    assert_eq!(
        tasks_settle_to(base).await,
        base,
        "no timer outlives its context"
    );
    // The documented consequence: a token follows its context while the context lives.
    tokio::time::sleep(Duration::from_secs(7200)).await;
    assert!(!token.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn a_timer_ends_when_its_context_is_cancelled_before_the_deadline() {
    let base = alive_tasks();
    let (ctx, cancel) = Context::background().with_timeout(Duration::from_secs(3600));
    let _token = ctx.token();
    let waiter = park_waiter(&ctx);
    assert_eq!(tasks_settle_to(base + 2).await, base + 2);
    cancel.cancel_with(Cause::Completed);
    assert_eq!(
        within_a_day(waiter).await.unwrap(),
        (Duration::ZERO, Some(Cause::Completed))
    );
    assert_eq!(tasks_settle_to(base).await, base, "the timer ended at once");
    drop(ctx); // the context itself is still alive above: the timer did not wait for it
}

#[tokio::test(start_paused = true)]
async fn on_cancel_does_not_keep_a_context_that_is_never_cancelled() {
    let (root, cancel_root) = Context::background().with_cancel();
    let base = alive_tasks();
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..10_000 {
        let (ctx, cancel) = root.with_cancel();
        cancel.disarm();
        let ran = ran.clone();
        ctx.on_cancel(move |_| {
            ran.fetch_add(1, Ordering::SeqCst);
        });
    }
    assert_eq!(
        tasks_settle_to(base).await,
        base,
        "every on_cancel task ended with its context"
    );
    // They are gone: cancelling what was their parent runs none of them.
    cancel_root.cancel();
    assert_eq!(tasks_settle_to(base).await, base);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn on_cancel_runs_for_a_context_cancelled_and_dropped_before_its_task_ran() {
    // Cancelled by its own canceller, then dropped at once.
    let (ctx, cancel) = Context::background().with_cancel();
    let (tx, rx) = oneshot::channel();
    ctx.on_cancel(move |c| tx.send(c.clone()).unwrap());
    cancel.cancel_with(Cause::Shutdown);
    drop(ctx);
    drop(cancel);
    assert_eq!(within_a_day(rx).await.unwrap(), Cause::Shutdown);

    // Cancelled through its parent, then dropped before anything resolved it.
    let (parent, cancel_parent) = Context::background().with_cancel();
    let (child, cancel_child) = parent.with_cancel();
    cancel_child.disarm();
    let (tx, rx) = oneshot::channel();
    child.on_cancel(move |c| tx.send(c.clone()).unwrap());
    cancel_parent.cancel_with(Cause::ClientDisconnected);
    drop(child);
    assert_eq!(within_a_day(rx).await.unwrap(), Cause::ClientDisconnected);

    // Its deadline passed unobserved, then it was dropped.
    let (ctx, cancel) = Context::background().with_timeout(Duration::from_millis(10));
    cancel.disarm();
    let (tx, rx) = oneshot::channel();
    ctx.on_cancel(move |c| tx.send(c.clone()).unwrap());
    tokio::time::advance(Duration::from_millis(20)).await;
    drop(ctx);
    assert_eq!(
        within_a_day(rx).await.unwrap(),
        Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Code
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_timer_whose_runtime_went_away_is_rearmed_by_the_next_waiter() {
    let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(1));
    // Arm the timer on a runtime that then shuts down.
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let _token = ctx.token();
            });
        });
    });
    let start = Instant::now();
    let token = ctx.token();
    tokio::time::timeout(Duration::from_secs(5), token.cancelled())
        .await
        .expect("a new timer times the deadline");
    assert!(start.elapsed() <= Duration::from_secs(1));
}

// --- configuration ---------------------------------------------------------------------

/// The latest instant this platform represents.
fn end_of_time() -> Instant {
    let now = Instant::now();
    let (mut lo, mut hi) = (0u64, u64::MAX);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if now.checked_add(Duration::from_secs(mid)).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let secs = now + Duration::from_secs(lo);
    let (mut lo, mut hi) = (0u32, 999_999_999u32);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if secs.checked_add(Duration::from_nanos(mid.into())).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    secs + Duration::from_nanos(lo.into())
}

#[tokio::test(start_paused = true)]
async fn deadlines_at_the_end_of_time_can_be_waited_on() {
    let far = end_of_time();
    let (ctx, _c) = Context::background().with_deadline(far);
    assert_eq!(ctx.deadline(), Some(far));
    assert!(ctx.remaining().is_some());
    let r = tokio::time::timeout(Duration::from_secs(1), ctx.cancelled()).await;
    assert!(r.is_err(), "never passes");
    let _token = ctx.token();

    let (driven, mut driver) = Context::background().with_driven_deadline(None);
    let r = tokio::time::timeout(Duration::from_secs(1), driven.cancelled()).await;
    assert!(r.is_err());
    driver.set_deadline(Some((far, DeadlineOrigin::Layer)));
    let r = tokio::time::timeout(Duration::from_secs(1), driven.cancelled()).await;
    assert!(r.is_err());
    assert!(!driven.is_cancelled());
}
