//! Shutdown fan-out, in process, no sockets, on a current-thread runtime: N request
//! contexts, children of one connection context under a root, each awaited by its own
//! task; the time from cancelling the root until every waiter has woken. The same with
//! raw tokio-util child tokens, the floor.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower_reqctx::reqctx::{Cause, Context};

/// Counts tasks through two gates and wakes the waiter at each gate's last one.
#[derive(Default)]
struct Gates {
    started: AtomicUsize,
    woken: AtomicUsize,
    all_started: Notify,
    all_woken: Notify,
}

impl Gates {
    fn pass(count: &AtomicUsize, n: usize, notify: &Notify) {
        if count.fetch_add(1, Ordering::AcqRel) + 1 == n {
            notify.notify_one();
        }
    }
}

/// (time from cancel to every waiter woken, time the cancel call itself took).
async fn reqctx_once(n: usize) -> (Duration, Duration) {
    let (root, cancel_root) = Context::background().with_cancel();
    let (conn, _cancel_conn) = root.with_cancel();
    let gates = Arc::new(Gates::default());
    let mut drivers = Vec::with_capacity(n);
    for _ in 0..n {
        // As the layer makes a request's context: a driven deadline, here none.
        let (ctx, driver) = conn.with_driven_deadline(None);
        drivers.push(driver);
        let gates = gates.clone();
        tokio::spawn(async move {
            let wait = ctx.cancelled();
            Gates::pass(&gates.started, n, &gates.all_started);
            wait.await;
            Gates::pass(&gates.woken, n, &gates.all_woken);
        });
    }
    wait_started(&gates, n).await;
    let t0 = Instant::now();
    cancel_root.cancel_with(Cause::Shutdown);
    let returned = t0.elapsed();
    gates.all_woken.notified().await;
    let all = t0.elapsed();
    drop(drivers);
    (all, returned)
}

async fn tokens_once(n: usize) -> (Duration, Duration) {
    let root = CancellationToken::new();
    let gates = Arc::new(Gates::default());
    for _ in 0..n {
        let child = root.child_token();
        let gates = gates.clone();
        tokio::spawn(async move {
            let wait = child.cancelled();
            Gates::pass(&gates.started, n, &gates.all_started);
            wait.await;
            Gates::pass(&gates.woken, n, &gates.all_woken);
        });
    }
    wait_started(&gates, n).await;
    let t0 = Instant::now();
    root.cancel();
    let returned = t0.elapsed();
    gates.all_woken.notified().await;
    (t0.elapsed(), returned)
}

/// The futures are created before `started` counts, but first polled after: wait until
/// every task has been polled once (it then waits on its context).
async fn wait_started(gates: &Gates, n: usize) {
    if gates.started.load(Ordering::Acquire) < n {
        gates.all_started.notified().await;
    }
    // The last task passed the gate during its first poll; let that poll finish.
    tokio::task::yield_now().await;
}

/// The subcommand: `reps` runs of each, one tab-separated line per run.
pub(crate) fn main(n: usize, reps: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        for _ in 0..reps {
            let (all, call) = reqctx_once(n).await;
            println!(
                "fanout\treqctx\t{n}\t{}\t{}",
                all.as_micros(),
                call.as_micros()
            );
            let (all, call) = tokens_once(n).await;
            println!(
                "fanout\ttokio-util\t{n}\t{}\t{}",
                all.as_micros(),
                call.as_micros()
            );
        }
    });
    Ok(())
}

/// One fan-out run.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub(crate) kind: String, // "reqctx" or "tokio-util"
    pub(crate) n: usize,
    pub(crate) all_us: f64,  // from the cancel until every waiter woke
    pub(crate) call_us: f64, // the cancel call itself
}

/// The subcommand's runs.
pub(crate) fn parse(out: &str) -> Vec<Run> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 5 || f[0] != "fanout" {
                return None;
            }
            Some(Run {
                kind: f[1].to_owned(),
                n: f[2].parse().ok()?,
                all_us: f[3].parse().ok()?,
                call_us: f[4].parse().ok()?,
            })
        })
        .collect()
}
