//! The semantics of `reqctx::Context`, one test (or a few) per rule.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use reqctx::{Cause, Context, DeadlineOrigin};
use tokio::time::Instant;

/// A minimal executor with no tokio runtime in sight: polling anything that needs a timer
/// or a reactor under it panics, which is what the "no timer" tests rely on.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        thread::park();
    }
}

fn code_deadline() -> Cause {
    Cause::DeadlineExceeded {
        origin: DeadlineOrigin::Code,
    }
}

#[derive(Debug)]
struct Reason(&'static str);
impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for Reason {}

// --- the tree -------------------------------------------------------------------------

#[test]
fn child_takes_parents_cause_and_never_cancels_parent() {
    let (parent, cancel_parent) = Context::background().with_cancel();
    let (child, cancel_child) = parent.with_cancel();
    let (grandchild, _keep) = child.with_value(1u8).with_cancel();
    let (sibling, _keep2) = parent.with_cancel();

    assert!(cancel_child.cancel());
    assert_eq!(child.cause(), Some(Cause::Cancelled));
    assert_eq!(grandchild.cause(), Some(Cause::Cancelled));
    assert!(!parent.is_cancelled());
    assert!(!sibling.is_cancelled());

    assert!(cancel_parent.cancel_with(Cause::Shutdown));
    assert_eq!(sibling.cause(), Some(Cause::Shutdown));
    // The child's first cause stays.
    assert_eq!(child.cause(), Some(Cause::Cancelled));
}

#[test]
fn parent_cancel_reaches_token_waiters_of_descendants() {
    let (parent, cancel) = Context::background().with_cancel();
    let (child, _c) = parent.with_cancel();
    let grandchild = child.with_value("x");
    let token = grandchild.token();
    assert!(!token.is_cancelled());
    cancel.cancel_with(Cause::ClientDisconnected);
    assert!(token.is_cancelled());
    assert_eq!(grandchild.cause(), Some(Cause::ClientDisconnected));
}

#[test]
fn cancelling_the_handed_out_token_does_not_cancel_the_context() {
    let (ctx, _cancel) = Context::background().with_cancel();
    let token = ctx.token();
    token.cancel();
    assert!(!ctx.is_cancelled());
    assert!(!ctx.token().is_cancelled());
}

#[test]
fn child_of_cancelled_parent_is_born_cancelled() {
    let (parent, cancel) = Context::background().with_cancel();
    cancel.cancel_with(Cause::Shutdown);
    let (child, cancel_child) = parent.with_cancel();
    assert_eq!(child.cause(), Some(Cause::Shutdown));
    assert!(!cancel_child.cancel(), "the inherited cause was first");
    assert!(child.token().is_cancelled());
}

#[test]
fn canceller_cancels_on_drop_and_disarm_opts_out() {
    let (a, cancel_a) = Context::background().with_cancel();
    drop(cancel_a);
    assert_eq!(a.cause(), Some(Cause::Cancelled));

    let (b, cancel_b) = Context::background().with_cancel();
    cancel_b.disarm();
    assert!(!b.is_cancelled());
}

#[test]
fn cancel_is_idempotent_and_first_cause_wins() {
    let (ctx, cancel) = Context::background().with_cancel();
    assert!(cancel.cancel_with(Cause::Completed));
    assert!(!cancel.cancel_with(Cause::Shutdown));
    assert!(!cancel.cancel());
    assert_eq!(ctx.cause(), Some(Cause::Completed));
}

#[test]
fn custom_cause_reaches_children() {
    let (parent, cancel) = Context::background().with_cancel();
    let (child, _c) = parent.with_cancel();
    let cause = Cause::custom(Reason("quota"));
    cancel.cancel_with(cause.clone());
    assert_eq!(child.cause(), Some(cause));
    assert_eq!(child.cause().unwrap().to_string(), "quota");
}

#[test]
fn concurrent_cancels_record_exactly_one_cause() {
    for _round in 0..200 {
        let (parent, cancel_parent) = Context::background().with_cancel();
        let (child, cancel_child) = parent.with_cancel();
        let cancel_child = Arc::new(cancel_child);
        let cancel_parent = Arc::new(cancel_parent);
        let causes: Vec<Cause> = (0..4)
            .map(|i| Cause::custom(Reason(["a", "b", "c", "d"][i])))
            .collect();
        let barrier = Arc::new(Barrier::new(5));
        let wins = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for (i, cause) in causes.iter().cloned().enumerate() {
            let (cc, cp, b, w, ch) = (
                cancel_child.clone(),
                cancel_parent.clone(),
                barrier.clone(),
                wins.clone(),
                child.clone(),
            );
            threads.push(thread::spawn(move || {
                b.wait();
                // Two threads cancel the child, one the parent, one reads.
                match i {
                    0 | 1 => {
                        if cc.cancel_with(cause) {
                            w.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    2 => {
                        cp.cancel_with(cause);
                    }
                    _ => {
                        let _ = ch.cause();
                    }
                }
            }));
        }
        barrier.wait();
        let seen = child.cause();
        for t in threads {
            t.join().unwrap();
        }
        let fin = child.cause().expect("cancelled");
        if let Some(seen) = seen {
            assert_eq!(seen, fin, "a cause once returned never changes");
        }
        let child_won = wins.load(Ordering::SeqCst);
        assert!(child_won <= 1);
        if child_won == 1 {
            assert!(fin == causes[0] || fin == causes[1]);
        } else {
            assert_eq!(
                fin, causes[2],
                "no child cancel won, so the parent's cause did"
            );
        }
        for _ in 0..3 {
            assert_eq!(child.cause().as_ref(), Some(&fin));
        }
    }
}

// --- deadlines --------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn deadline_fires_with_its_origin() {
    let (ctx, _c) = Context::background().with_timeout(Duration::from_millis(100));
    let start = Instant::now();
    ctx.cancelled().await;
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(ctx.cause(), Some(code_deadline()));
}

#[tokio::test(start_paused = true)]
async fn child_deadline_is_earlier_of_own_and_parents() {
    let (parent, _c) = Context::background().with_timeout(Duration::from_millis(100));
    let (later, _c2) = parent.with_timeout(Duration::from_secs(10));
    let (earlier, _c3) = parent.with_timeout(Duration::from_millis(10));
    assert_eq!(later.deadline(), parent.deadline());
    assert!(earlier.deadline() < parent.deadline());
    assert_eq!(
        later.remaining(),
        Some(Duration::from_millis(100)),
        "paused clock: exactly the parent's budget"
    );

    earlier.cancelled().await;
    assert!(!parent.is_cancelled());
    later.cancelled().await;
    assert_eq!(parent.cause(), Some(code_deadline()));
    assert_eq!(later.cause(), Some(code_deadline()));
}

#[tokio::test(start_paused = true)]
async fn parents_deadline_origin_reaches_the_child() {
    let (parent, driver) = Context::background().with_driven_deadline(Some((
        Instant::now() + Duration::from_millis(50),
        DeadlineOrigin::Query,
    )));
    let (child, _c) = parent.with_timeout(Duration::from_secs(5));
    tokio::time::advance(Duration::from_millis(60)).await;
    assert_eq!(
        child.cause(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Query
        })
    );
    drop(driver);
}

#[test]
fn past_deadline_gives_a_cancelled_context_without_a_runtime() {
    let (ctx, _c) = Context::background().with_deadline(Instant::now() - Duration::from_secs(1));
    assert!(ctx.is_cancelled());
    assert_eq!(ctx.cause(), Some(code_deadline()));
    assert_eq!(ctx.remaining(), Some(Duration::ZERO));
    // Already cancelled: waiting needs no timer and no runtime.
    block_on(ctx.cancelled());
    assert!(block_on(ctx.run(async { 1 })).is_err());
    assert!(ctx.token().is_cancelled());
}

#[test]
fn huge_timeouts_never_panic() {
    for d in [
        Duration::MAX,
        Duration::from_secs(u64::MAX),
        Duration::new(u64::MAX, 999_999_999),
    ] {
        let (ctx, _c) = Context::background().with_timeout(d);
        assert_eq!(ctx.deadline(), None, "no practical deadline");
        assert!(!ctx.is_cancelled());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        // Representable but absurd: 100 years. Waiting on it must not panic either.
        let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(100 * 365 * 86_400));
        assert!(ctx.deadline().is_some());
        let r = tokio::time::timeout(Duration::from_secs(1), ctx.cancelled()).await;
        assert!(r.is_err());
        let _token = ctx.token(); // arms a 100-year timer task
        assert!(!ctx.is_cancelled());
    });
}

#[tokio::test(start_paused = true)]
async fn passed_deadline_is_seen_without_any_timer() {
    let (ctx, cancel) = Context::background().with_timeout(Duration::from_millis(10));
    tokio::time::advance(Duration::from_millis(11)).await;
    // Nothing waited: no timer ran. The clock comparison still sees it.
    assert!(ctx.is_cancelled());
    assert_eq!(ctx.cause(), Some(code_deadline()));
    assert!(!cancel.cancel_with(Cause::Shutdown));
    assert_eq!(ctx.cause(), Some(code_deadline()), "never changes");
}

#[tokio::test(start_paused = true)]
async fn an_unobserved_deadline_before_the_parents_cancel_wins() {
    let (parent, cancel_parent) = Context::background().with_cancel();
    let (child, _c) = parent.with_timeout(Duration::from_millis(10));
    tokio::time::advance(Duration::from_millis(20)).await;
    cancel_parent.cancel_with(Cause::ClientDisconnected);
    // The child's deadline passed at 10 ms, the parent was cancelled at 20 ms.
    assert_eq!(child.cause(), Some(code_deadline()));
    assert_eq!(parent.cause(), Some(Cause::ClientDisconnected));
}

#[tokio::test(start_paused = true)]
async fn a_parents_cancel_before_the_childs_deadline_wins() {
    let (parent, cancel_parent) = Context::background().with_cancel();
    let (child, _c) = parent.with_timeout(Duration::from_millis(30));
    tokio::time::advance(Duration::from_millis(10)).await;
    cancel_parent.cancel_with(Cause::ClientDisconnected);
    tokio::time::advance(Duration::from_millis(40)).await;
    assert_eq!(child.cause(), Some(Cause::ClientDisconnected));
}

#[tokio::test(start_paused = true)]
async fn token_is_cancelled_at_the_deadline() {
    let (parent, _c) = Context::background().with_timeout(Duration::from_millis(40));
    let child = parent.with_value(3u16);
    let token = child.token();
    let start = Instant::now();
    token.cancelled().await;
    assert_eq!(start.elapsed(), Duration::from_millis(40));
    assert_eq!(child.cause(), Some(code_deadline()));
}

#[test]
fn deadline_waiters_need_a_runtime_but_clock_checks_do_not() {
    let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(60));
    assert!(!ctx.is_cancelled());
    assert!(ctx.remaining().unwrap() <= Duration::from_secs(60));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.token()));
    assert!(
        r.is_err(),
        "token() on a deadline outside a runtime must say it needs one"
    );
}

#[test]
fn no_deadline_no_timer_works_outside_a_runtime() {
    let (ctx, cancel) = Context::background().with_cancel();
    let ctx2 = ctx.clone();
    let waiter = thread::spawn(move || {
        block_on(ctx2.cancelled());
        ctx2.cause()
    });
    let token = ctx.token();
    // Work that never finishes, raced against cancellation, on plain threads.
    let runner = {
        let ctx = ctx.clone();
        thread::spawn(move || block_on(ctx.run(std::future::pending::<()>())))
    };
    cancel.cancel_with(Cause::Completed);
    assert_eq!(waiter.join().unwrap(), Some(Cause::Completed));
    assert_eq!(
        runner.join().unwrap().unwrap_err().cause(),
        &Cause::Completed
    );
    assert!(token.is_cancelled());
}

#[test]
fn work_that_never_yields_needs_no_timer() {
    // A deadline, no runtime: if `run` armed a timer, tokio would panic here.
    let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(30));
    assert_eq!(block_on(ctx.run(async { 7 })), Ok(7));
}

// --- driven deadlines (middleware) --------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn driven_deadline_moves_and_expires_when_told() {
    let (ctx, mut driver) = Context::background().with_driven_deadline(Some((
        Instant::now() + Duration::from_millis(10),
        DeadlineOrigin::Layer,
    )));
    let (child, _c) = ctx.with_cancel();
    let later = Instant::now() + Duration::from_millis(100);
    driver.set_deadline(Some((later, DeadlineOrigin::Query)));
    assert_eq!(child.deadline(), Some(later));
    tokio::time::advance(Duration::from_millis(50)).await;
    assert!(!child.is_cancelled(), "the old deadline no longer applies");
    assert_eq!(driver.expire(), None, "not passed yet");
    tokio::time::advance(Duration::from_millis(50)).await;
    assert_eq!(
        driver.expire(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Query
        })
    );
    assert_eq!(child.cause(), driver.expire());
    driver.set_deadline(None);
    assert!(child.is_cancelled(), "a recorded cause is never undone");
}

#[tokio::test(start_paused = true)]
async fn waiters_wake_at_a_driven_deadline_without_the_driver() {
    // Formerly the driver's job alone (see tests/deadlines.rs for every kind of waiter).
    let (ctx, _driver) = Context::background().with_driven_deadline(Some((
        Instant::now() + Duration::from_millis(10),
        DeadlineOrigin::Layer,
    )));
    let start = Instant::now();
    tokio::time::timeout(Duration::from_millis(50), ctx.cancelled())
        .await
        .expect("the driven deadline reaches the waiter");
    assert_eq!(start.elapsed(), Duration::from_millis(10));
    assert_eq!(
        ctx.cause(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Layer
        })
    );
}

// --- values ----------------------------------------------------------------------------------

#[test]
fn values_by_type_inherited_nearest_wins() {
    #[derive(Debug, PartialEq)]
    struct RequestId(&'static str);
    let root = Context::background()
        .with_value(RequestId("outer"))
        .with_value(5u32);
    let (child, _c) = root.with_cancel();
    let inner = child.with_value(RequestId("inner"));
    assert_eq!(inner.value::<RequestId>(), Some(&RequestId("inner")));
    assert_eq!(child.value::<RequestId>(), Some(&RequestId("outer")));
    assert_eq!(inner.value::<u32>(), Some(&5));
    assert_eq!(inner.value::<u64>(), None);
    assert_eq!(Context::background().value::<u32>(), None);
    let dbg = format!("{inner:?}");
    assert!(dbg.contains("RequestId") && dbg.contains("u32"), "{dbg}");
}

#[test]
fn detached_keeps_values_drops_cancel_and_deadline() {
    let (ctx, cancel) = Context::background()
        .with_value("user")
        .with_deadline(Instant::now() + Duration::from_secs(1));
    let d = ctx.detached();
    cancel.cancel();
    assert!(ctx.is_cancelled());
    assert!(!d.is_cancelled());
    assert_eq!(d.deadline(), None);
    assert_eq!(d.value::<&str>(), Some(&"user"));
    let (dc, _c) = d.with_cancel();
    assert!(!dc.is_cancelled());
}

#[test]
fn context_is_send_sync_static_and_small() {
    fn assert_traits<T: Clone + Send + Sync + 'static + std::fmt::Debug>() {}
    assert_traits::<Context>();
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<reqctx::Canceller>();
    assert_eq!(
        std::mem::size_of::<Context>(),
        3 * std::mem::size_of::<usize>()
    );
}

// --- run / spawn / on_cancel -----------------------------------------------------------------

struct SetOnDrop(Arc<AtomicBool>);
impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn spawn_drops_the_work_and_yields_the_cause() {
    let (ctx, cancel) = Context::background().with_cancel();
    let dropped = Arc::new(AtomicBool::new(false));
    let guard = SetOnDrop(dropped.clone());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let handle = ctx.spawn(async move {
        let _guard = guard;
        started_tx.send(()).unwrap();
        std::future::pending::<()>().await;
    });
    started_rx.await.unwrap();
    assert!(!dropped.load(Ordering::SeqCst));
    cancel.cancel_with(Cause::Completed);
    let err = handle.await.unwrap().unwrap_err();
    assert_eq!(err.cause(), &Cause::Completed);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the task's future was dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn spawn_returns_the_output_when_work_finishes_first() {
    let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(1));
    let h = ctx.spawn(async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        "done"
    });
    assert_eq!(h.await.unwrap(), Ok("done"));
}

#[tokio::test(start_paused = true)]
async fn spawned_work_stops_at_the_deadline() {
    let (ctx, _c) = Context::background().with_timeout(Duration::from_millis(20));
    let h = ctx.spawn(tokio::time::sleep(Duration::from_secs(10)));
    assert_eq!(h.await.unwrap().unwrap_err().cause(), &code_deadline());
}

#[tokio::test(start_paused = true)]
async fn run_prefers_cancellation_when_both_are_ready() {
    let (ctx, cancel) = Context::background().with_cancel();
    cancel.cancel();
    let polled = Arc::new(AtomicBool::new(false));
    let p = polled.clone();
    let r = ctx
        .run(async move {
            p.store(true, Ordering::SeqCst);
            1
        })
        .await;
    assert_eq!(r.unwrap_err().cause(), &Cause::Cancelled);
    assert!(
        !polled.load(Ordering::SeqCst),
        "work is never polled once cancelled"
    );
}

#[tokio::test]
async fn on_cancel_runs_once_with_the_cause() {
    let (ctx, cancel) = Context::background().with_cancel();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handle = ctx.on_cancel(move |cause| {
        tx.send(cause.clone()).unwrap();
    });
    cancel.cancel_with(Cause::ClientDisconnected);
    assert_eq!(rx.await.unwrap(), Cause::ClientDisconnected);
    assert!(!handle.stop(), "already ran");
}

#[tokio::test]
async fn on_cancel_stop_prevents_it() {
    let (ctx, cancel) = Context::background().with_cancel();
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let handle = ctx.on_cancel(move |_| r.store(true, Ordering::SeqCst));
    assert!(handle.stop());
    assert!(!handle.stop());
    cancel.cancel();
    // A later callback on the same context runs; the stopped one, registered first, did not.
    let (tx, rx) = tokio::sync::oneshot::channel();
    ctx.on_cancel(move |_| tx.send(()).unwrap());
    rx.await.unwrap();
    tokio::task::yield_now().await;
    assert!(!ran.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn on_cancel_sees_the_deadline() {
    let (ctx, _c) = Context::background().with_timeout(Duration::from_millis(30));
    let (tx, rx) = tokio::sync::oneshot::channel();
    ctx.on_cancel(move |cause| tx.send(cause.clone()).unwrap());
    assert_eq!(rx.await.unwrap(), code_deadline());
}

#[tokio::test(start_paused = true)]
async fn cancelled_is_cancel_safe() {
    let (ctx, _c) = Context::background().with_timeout(Duration::from_millis(100));
    // Drop a waiter half way, then wait again: the deadline still arrives on time.
    let first = tokio::time::timeout(Duration::from_millis(40), ctx.cancelled()).await;
    assert!(first.is_err());
    let start = Instant::now();
    ctx.cancelled().await;
    assert_eq!(start.elapsed(), Duration::from_millis(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_all_wake_on_parent_cancel() {
    let (root, cancel) = Context::background().with_cancel();
    let mut handles = Vec::new();
    for _ in 0..1000 {
        let (child, _c) = root.with_cancel();
        handles.push(tokio::spawn(async move {
            child.cancelled().await;
            let _keep = _c;
            child.cause()
        }));
    }
    cancel.cancel_with(Cause::Shutdown);
    for h in handles {
        assert_eq!(h.await.unwrap(), Some(Cause::Shutdown));
    }
}
