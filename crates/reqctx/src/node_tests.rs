//! The waiters' registry, the links down the tree, and who times a waiter's deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::future::{WaitForCancel, sleeps_armed};
use crate::{Cause, Context, DeadlineOrigin};

/// A waker that counts its wakes.
#[derive(Default)]
struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Count {
    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (count.clone(), Waker::from(count))
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn poll(wait: &mut WaitForCancel, waker: &Waker) -> Poll<()> {
    Pin::new(wait).poll(&mut TaskContext::from_waker(waker))
}

fn registered(ctx: &Context) -> usize {
    ctx.node().expect("a cancellable context").registered()
}

#[test]
fn many_waiters_on_one_node_are_all_woken() {
    let (ctx, cancel) = Context::background().with_cancel();
    let mut waiters: Vec<_> = (0..50).map(|_| (ctx.cancelled(), Count::waker())).collect();
    for (wait, (_, waker)) in &mut waiters {
        assert!(poll(wait, waker).is_pending());
    }
    assert_eq!(registered(&ctx), 50);
    cancel.cancel_with(Cause::Shutdown);
    for (wait, (count, waker)) in &mut waiters {
        assert_eq!(
            count.get(),
            1,
            "every waiter is woken once by the cancel itself"
        );
        assert!(poll(wait, waker).is_ready());
    }
    assert_eq!(registered(&ctx), 0, "the registry is drained by the cause");
    assert_eq!(ctx.cause(), Some(Cause::Shutdown));
}

#[test]
fn a_waiter_dropped_before_the_cancel_leaves_nothing_behind() {
    let (parent, _cancel_parent) = Context::background().with_cancel();
    let (child, cancel_child) = parent.with_cancel();
    let (count, waker) = Count::waker();
    let mut waits: Vec<_> = (0..3).map(|_| child.cancelled()).collect();
    for wait in &mut waits {
        assert!(poll(wait, &waker).is_pending());
    }
    assert_eq!(registered(&child), 3);
    assert_eq!(
        registered(&parent),
        1,
        "the child is linked into its parent, once"
    );
    // Re-polling with the same waker registers nothing more.
    assert!(poll(&mut waits[0], &waker).is_pending());
    assert_eq!(registered(&child), 3);
    waits.truncate(1);
    assert_eq!(registered(&child), 1);
    drop(waits);
    assert_eq!(registered(&child), 0);
    // The child's link goes with the child's last handle.
    cancel_child.disarm();
    drop(child);
    assert_eq!(registered(&parent), 0);
    assert_eq!(count.get(), 0);
}

#[test]
fn a_waiter_moved_to_another_task_is_woken_there() {
    let (ctx, cancel) = Context::background().with_cancel();
    let mut wait = ctx.cancelled();
    let (first, first_waker) = Count::waker();
    let (second, second_waker) = Count::waker();
    assert!(poll(&mut wait, &first_waker).is_pending());
    assert!(poll(&mut wait, &second_waker).is_pending());
    assert_eq!(registered(&ctx), 1);
    cancel.cancel();
    assert_eq!((first.get(), second.get()), (0, 1));
}

#[test]
fn an_ancestors_cancel_reaches_waiters_three_levels_down() {
    let (root, cancel_root) = Context::background().with_cancel();
    let (a, _ca) = root.with_cancel();
    let (b, _cb) = a.with_timeout(Duration::from_secs(3600));
    let (c, _cc) = b.with_cancel();
    let (sibling, _cs) = a.with_cancel();
    let (count_c, waker_c) = Count::waker();
    let (count_a, waker_a) = Count::waker();
    let (count_s, waker_s) = Count::waker();
    let mut wait_c = c.cancelled();
    let mut wait_a = a.cancelled();
    let mut wait_s = sibling.cancelled();
    // `b` has a deadline: its waiter arms a `Sleep`, which needs a runtime with time.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    assert!(poll(&mut wait_c, &waker_c).is_pending());
    assert!(poll(&mut wait_a, &waker_a).is_pending());
    assert!(poll(&mut wait_s, &waker_s).is_pending());
    // a holds its own waker and two links (b, sibling); root holds a's link.
    assert_eq!(registered(&a), 3);
    assert_eq!(registered(&root), 1);
    cancel_root.cancel_with(Cause::Shutdown);
    // Woken by the cancel itself, before anything resolves from below.
    assert_eq!((count_a.get(), count_c.get(), count_s.get()), (1, 1, 1));
    assert!(poll(&mut wait_c, &waker_c).is_ready());
    assert!(poll(&mut wait_a, &waker_a).is_ready());
    assert!(poll(&mut wait_s, &waker_s).is_ready());
    assert_eq!(c.cause(), Some(Cause::Shutdown));
    assert_eq!(b.cause(), Some(Cause::Shutdown));
}

#[test]
fn a_deep_chain_with_waiters_is_cancelled_in_constant_stack() {
    // 256 KiB of stack: a cascade that recursed once per link would overflow.
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let (root, cancel_root) = Context::background().with_cancel();
            let mut ctx = root;
            let mut middle = None;
            for i in 0..100_000 {
                let (child, cancel) = ctx.with_cancel();
                cancel.disarm();
                if i == 50_000 {
                    middle = Some(child.clone());
                }
                ctx = child;
            }
            let middle = middle.unwrap();
            let (count_leaf, waker_leaf) = Count::waker();
            let (count_mid, waker_mid) = Count::waker();
            let mut wait_leaf = ctx.cancelled();
            let mut wait_mid = middle.cancelled();
            assert!(poll(&mut wait_leaf, &waker_leaf).is_pending());
            assert!(poll(&mut wait_mid, &waker_mid).is_pending());
            cancel_root.cancel_with(Cause::Shutdown);
            assert_eq!((count_leaf.get(), count_mid.get()), (1, 1));
            assert!(poll(&mut wait_leaf, &waker_leaf).is_ready());
            assert_eq!(ctx.cause(), Some(Cause::Shutdown));
            drop((wait_leaf, wait_mid, middle, ctx));
        })
        .unwrap()
        .join()
        .expect("the cascade fits in a small stack");
}

#[test]
fn a_deep_chain_with_waiters_is_dropped_in_constant_stack() {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let (root, cancel_root) = Context::background().with_cancel();
            let mut ctx = root.clone();
            for _ in 0..100_000 {
                let (child, cancel) = ctx.with_cancel();
                cancel.disarm();
                ctx = child;
            }
            let (_, waker) = Count::waker();
            let mut wait = ctx.cancelled();
            assert!(poll(&mut wait, &waker).is_pending());
            assert_eq!(registered(&root), 1);
            drop((wait, ctx));
            assert_eq!(registered(&root), 0, "the chain's links went with it");
            cancel_root.disarm();
        })
        .unwrap()
        .join()
        .expect("the drop fits in a small stack");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_owner_that_times_its_deadline_wakes_waiters_that_armed_no_sleep() {
    let deadline = Instant::now() + Duration::from_secs(1);
    let (ctx, driver) =
        Context::background().with_driven_deadline(Some((deadline, DeadlineOrigin::Layer)));
    driver.owner_times(true);
    let (child, _cancel_child) = ctx.with_cancel();
    let before = sleeps_armed();
    let (count, waker) = Count::waker();
    let mut wait = ctx.cancelled();
    let mut wait_child = child.cancelled();
    assert!(poll(&mut wait, &waker).is_pending());
    assert!(poll(&mut wait_child, &waker).is_pending());
    assert_eq!(
        sleeps_armed(),
        before,
        "the owner times the deadline: no Sleep"
    );
    // Nothing else times it: an owner that never calls `expire` leaves them waiting.
    tokio::time::sleep_until(deadline + Duration::from_secs(5)).await;
    assert_eq!(count.get(), 0);
    assert!(poll(&mut wait, &waker).is_pending());
    // The owner's timer fired: it records the cause, which wakes both.
    let layer = Cause::DeadlineExceeded {
        origin: DeadlineOrigin::Layer,
    };
    assert_eq!(driver.expire(), Some(layer.clone()));
    assert_eq!(count.get(), 2);
    assert!(poll(&mut wait, &waker).is_ready());
    assert!(poll(&mut wait_child, &waker).is_ready());
    assert_eq!(child.cause(), Some(layer));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_waiter_arms_its_own_sleep_without_an_owner_that_times() {
    let deadline = Instant::now() + Duration::from_secs(1);
    let (ctx, _driver) =
        Context::background().with_driven_deadline(Some((deadline, DeadlineOrigin::Layer)));
    let before = sleeps_armed();
    let waiter = tokio::spawn({
        let ctx = ctx.clone();
        async move {
            ctx.cancelled().await;
            Instant::now()
        }
    });
    assert_eq!(waiter.await.unwrap(), deadline);
    assert_eq!(sleeps_armed(), before + 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_fixed_deadline_under_an_owner_timed_one_is_still_timed_by_the_waiter() {
    let start = Instant::now();
    let (ctx, driver) = Context::background().with_driven_deadline(Some((
        start + Duration::from_secs(10),
        DeadlineOrigin::Layer,
    )));
    driver.owner_times(true);
    let (child, _cancel) = ctx.with_timeout(Duration::from_secs(1));
    let before = sleeps_armed();
    let waiter = tokio::spawn(async move {
        child.cancelled().await;
        (Instant::now(), child.cause())
    });
    let (at, cause) = waiter.await.unwrap();
    assert_eq!(at, start + Duration::from_secs(1));
    assert_eq!(
        cause,
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Code
        })
    );
    assert_eq!(sleeps_armed(), before + 1);
}

/// Spawns a task that waits on `ctx` and returns when it woke (or, failing the test, gives
/// up 60 s of paused time later), and yields until it is registered on `ctx`'s node.
async fn spawn_waiter(ctx: &Context) -> tokio::task::JoinHandle<Instant> {
    let before = registered(ctx);
    let waiter = tokio::spawn({
        let ctx = ctx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), ctx.cancelled())
                .await
                .expect("the waiter is woken");
            Instant::now()
        }
    });
    while registered(ctx) == before {
        tokio::task::yield_now().await;
    }
    waiter
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_owner_that_stops_timing_hands_its_waiters_to_the_node_timer() {
    let deadline = Instant::now() + Duration::from_secs(1);
    let (ctx, driver) =
        Context::background().with_driven_deadline(Some((deadline, DeadlineOrigin::Layer)));
    driver.owner_times(true);
    let before = sleeps_armed();
    let waiter = spawn_waiter(&ctx).await;
    assert_eq!(sleeps_armed(), before);
    // The response went on to the body: nobody calls `expire` from here on.
    driver.owner_times(false);
    assert_eq!(waiter.await.unwrap(), deadline, "woken at the deadline");
    assert_eq!(
        ctx.cause(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Layer
        })
    );
    assert_eq!(
        sleeps_armed(),
        before,
        "by the node's timer, not a Sleep of theirs"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_deadline_moved_earlier_while_owner_timed_is_timed() {
    let start = Instant::now();
    let (ctx, driver) = Context::background().with_driven_deadline(Some((
        start + Duration::from_secs(10),
        DeadlineOrigin::Layer,
    )));
    driver.owner_times(true);
    let (grandchild, _cancel) = ctx.with_cancel();
    let waiter = spawn_waiter(&grandchild).await;
    // A route's layer refines it; the owner, asleep until its old timer, does not know.
    let earlier = start + Duration::from_secs(1);
    driver
        .handle()
        .set_deadline(Some((earlier, DeadlineOrigin::Layer)));
    assert_eq!(waiter.await.unwrap(), earlier);
    assert!(grandchild.is_cancelled());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_owner_that_stops_timing_with_nobody_waiting_spawns_nothing() {
    let deadline = Instant::now() + Duration::from_secs(1);
    let (ctx, driver) =
        Context::background().with_driven_deadline(Some((deadline, DeadlineOrigin::Layer)));
    driver.owner_times(true);
    let waiter = spawn_waiter(&ctx).await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert_eq!(registered(&ctx), 0);
    driver.owner_times(false);
    let node = ctx.node().unwrap();
    assert!(!matches!(node.lock().timer, super::TimerSlot::Running(_)));
}

#[test]
fn waiters_racing_an_ancestors_cancel_on_other_threads_are_all_woken() {
    // Registration, linking and the cascade race a cancel from another thread: a waiter
    // that misses the cause would hang past the generous bound.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..300 {
            let (root, cancel_root) = Context::background().with_cancel();
            let (mid, _cm) = root.with_cancel();
            let (leaf, _cl) = mid.with_cancel();
            let waiters: Vec<_> = (0..4)
                .map(|i| {
                    let ctx = if i % 2 == 0 {
                        leaf.clone()
                    } else {
                        mid.clone()
                    };
                    tokio::spawn(async move { ctx.cancelled().await })
                })
                .collect();
            let canceller = tokio::spawn(async move {
                tokio::task::yield_now().await;
                cancel_root.cancel_with(Cause::Shutdown);
            });
            for w in waiters {
                tokio::time::timeout(Duration::from_secs(10), w)
                    .await
                    .expect("every waiter is woken")
                    .unwrap();
            }
            canceller.await.unwrap();
            assert_eq!(leaf.cause(), Some(Cause::Shutdown));
        }
    });
}
