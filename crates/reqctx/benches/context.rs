//! `reqctx::Context` against raw tokio-util tokens for the same work.
//!
//! `cargo bench -p reqctx`

use std::future::Future;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use reqctx::{Cause, Context};
use tokio_util::sync::CancellationToken;

fn fresh_tree(c: &mut Criterion) {
    let mut g = c.benchmark_group("new child, cancel, drop");
    g.bench_function("raw token: new + child_token", |b| {
        b.iter(|| {
            let parent = CancellationToken::new();
            let child = parent.child_token();
            child.cancel();
            black_box(&child);
        })
    });
    g.bench_function("reqctx: background().with_cancel()", |b| {
        b.iter(|| {
            let (ctx, cancel) = Context::background().with_cancel();
            cancel.cancel();
            black_box(&ctx);
        })
    });
    g.finish();
}

fn child_of_long_lived(c: &mut Criterion) {
    let mut g = c.benchmark_group("child of a long-lived parent, cancel, drop");
    let root = CancellationToken::new();
    g.bench_function("raw token: child_token", |b| {
        b.iter(|| {
            let child = root.child_token();
            child.cancel();
            black_box(&child);
        })
    });
    let (parent, _keep) = Context::background().with_cancel();
    g.bench_function("reqctx: with_cancel (nobody waits)", |b| {
        b.iter(|| {
            let (ctx, cancel) = parent.with_cancel();
            cancel.cancel_with(Cause::Completed);
            black_box(&ctx);
        })
    });
    // A waiter: create the wait future, poll it once (registers), cancel, poll to the end.
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    g.bench_function("raw token: child_token + a waiter", |b| {
        b.iter(|| {
            let child = root.child_token();
            let mut wait = std::pin::pin!(child.cancelled());
            assert!(wait.as_mut().poll(&mut cx).is_pending());
            child.cancel();
            assert!(wait.as_mut().poll(&mut cx).is_ready());
        })
    });
    g.bench_function("raw token: child_token + an owned waiter", |b| {
        b.iter(|| {
            let child = root.child_token();
            let mut wait = std::pin::pin!(child.clone().cancelled_owned());
            assert!(wait.as_mut().poll(&mut cx).is_pending());
            child.cancel();
            assert!(wait.as_mut().poll(&mut cx).is_ready());
        })
    });
    g.bench_function("reqctx: with_cancel + a waiter", |b| {
        b.iter(|| {
            let (ctx, cancel) = parent.with_cancel();
            let mut wait = std::pin::pin!(ctx.cancelled());
            assert!(wait.as_mut().poll(&mut cx).is_pending());
            cancel.cancel_with(Cause::Completed);
            assert!(wait.as_mut().poll(&mut cx).is_ready());
        })
    });
    let (timed_parent, _keep2) = Context::background().with_cancel();
    g.bench_function("reqctx: driven 30 s deadline (the layer's case)", |b| {
        b.iter(|| {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let (ctx, driver) =
                timed_parent.with_driven_deadline(Some((deadline, reqctx::DeadlineOrigin::Layer)));
            driver.cancel_with(Cause::Completed);
            black_box(&ctx);
        })
    });
    g.finish();
}

/// Waiting on a context with a deadline: the waiter is created, polled once (it registers
/// and whatever times the deadline is armed), the context is cancelled before the
/// deadline, and the runtime is given one turn so that anything spawned can finish. Each
/// iteration runs inside `block_on` on a current-thread runtime; the first row is that
/// frame alone, to subtract.
fn deadline_waiters(c: &mut Criterion) {
    let mut g = c.benchmark_group("a waiter on a deadline, cancelled before it");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let waker = std::task::Waker::noop();
    let (parent, _keep) = Context::background().with_cancel();
    g.bench_function("runtime frame only: block_on + yield", |b| {
        b.iter(|| rt.block_on(tokio::task::yield_now()))
    });
    g.bench_function("raw token + tokio::time::sleep, polled once", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut cx = std::task::Context::from_waker(waker);
                let token = CancellationToken::new();
                let mut wait = std::pin::pin!(token.clone().cancelled_owned());
                let mut sleep = std::pin::pin!(tokio::time::sleep(Duration::from_secs(30)));
                assert!(wait.as_mut().poll(&mut cx).is_pending());
                assert!(sleep.as_mut().poll(&mut cx).is_pending());
                token.cancel();
                assert!(wait.as_mut().poll(&mut cx).is_ready());
                tokio::task::yield_now().await;
            })
        })
    });
    g.bench_function("reqctx: with_timeout(30 s) + a waiter", |b| {
        b.iter(|| {
            one_waiter(
                &rt,
                waker,
                || parent.with_timeout(Duration::from_secs(30)),
                |cancel| cancel.cancel_with(Cause::Completed),
            )
        })
    });
    g.bench_function(
        "reqctx: driven 30 s deadline + a waiter (a handler waits)",
        |b| {
            b.iter(|| {
                one_waiter(
                    &rt,
                    waker,
                    || {
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                        parent.with_driven_deadline(Some((deadline, reqctx::DeadlineOrigin::Layer)))
                    },
                    |driver| driver.cancel_with(Cause::Completed),
                )
            })
        },
    );
    g.bench_function(
        "reqctx: with_timeout(30 s) + a waiter, 10 waits on one context",
        |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut cx = std::task::Context::from_waker(waker);
                    let (ctx, cancel) = parent.with_timeout(Duration::from_secs(30));
                    for _ in 0..10 {
                        let mut wait = std::pin::pin!(ctx.cancelled());
                        assert!(wait.as_mut().poll(&mut cx).is_pending());
                    }
                    cancel.cancel_with(Cause::Completed);
                    tokio::task::yield_now().await;
                })
            })
        },
    );
    g.finish();
}

/// One iteration of `deadline_waiters`: `start` makes the context with its deadline and
/// its canceller, a waiter is polled once, `end` cancels, and the waiter is ready.
fn one_waiter<C>(
    rt: &tokio::runtime::Runtime,
    waker: &std::task::Waker,
    start: impl FnOnce() -> (Context, C),
    end: impl FnOnce(C) -> bool,
) {
    rt.block_on(async {
        let mut cx = std::task::Context::from_waker(waker);
        let (ctx, canceller) = start();
        let mut wait = std::pin::pin!(ctx.cancelled());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(end(canceller), "the first cause");
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        tokio::task::yield_now().await;
    })
}

fn reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("reads");
    let token = CancellationToken::new();
    g.bench_function("raw token: is_cancelled", |b| {
        b.iter(|| black_box(token.is_cancelled()))
    });
    let (root, _k) = Context::background().with_cancel();
    let (conn, _k2) = root.with_cancel();
    let (req, _k3) = conn.with_cancel();
    g.bench_function("reqctx: is_cancelled, depth 3", |b| {
        b.iter(|| black_box(req.is_cancelled()))
    });
    let req = req.with_value(1u32).with_value("id");
    g.bench_function("reqctx: value lookup, 2nd of 2", |b| {
        b.iter(|| black_box(req.value::<u32>()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = fresh_tree, child_of_long_lived, deadline_waiters, reads
}
criterion_main!(benches);
