//! What the helper costs when nothing is cancelled: 10,000 `SELECT 1` on one connection,
//! through the plain client and through `ContextClient`, alternated, median of rounds.
//!
//! `cargo run --release -p reqctx-postgres --all-features --example overhead`
//! (uses `DATABASE_URL`, or starts a throwaway cluster as the tests do).

use reqctx_pg_test_support as support;

use std::time::{Duration, Instant};

use reqctx::Context;
use reqctx_postgres::{ContextClient, Options};

const N: usize = 10_000;
const ROUNDS: usize = 15;

/// CPU time this thread has run (Linux: `/proc/thread-self/schedstat`, nanoseconds), which
/// the load of other processes disturbs less than the wall clock. The runtime is
/// single-threaded, so the connection's task runs on this thread too.
fn cpu() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace()
        .next()?
        .parse()
        .ok()
        .map(Duration::from_nanos)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(db) = support::db() else {
        println!("no PostgreSQL server: nothing measured");
        return;
    };
    let mut conn = ContextClient::connect(&db.config(), Options::default())
        .await
        .unwrap();
    let stmt = conn.client().prepare("SELECT 1").await.unwrap();
    // A request's context without a deadline, and one with a generous deadline.
    let (plain_ctx, _c1) = Context::background().with_cancel();
    let (deadline_ctx, _c2) = Context::background().with_timeout(Duration::from_secs(3600));

    // Three ways, their order rotated each round so drift in the machine's load spreads evenly.
    // `--only N` runs one way alone (0 plain, 1 helper, 2 helper with a deadline, 3
    // `ctx.run` around the plain client), for
    // `perf stat`.
    let only: Option<usize> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .and_then(|n| n.parse().ok());
    let mut times: [Vec<Duration>; 4] = Default::default();
    let mut cpus: [Vec<Duration>; 4] = Default::default();
    for round in 0..ROUNDS {
        for k in 0..4 {
            let way = (round + k) % 4;
            if only.is_some_and(|o| o != way) {
                continue;
            }
            let (t, c) = (Instant::now(), cpu());
            for _ in 0..N {
                match way {
                    0 => drop(conn.client().query(&stmt, &[]).await.unwrap()),
                    1 => drop(conn.query(&plain_ctx, &stmt, &[]).await.unwrap()),
                    2 => drop(conn.query(&deadline_ctx, &stmt, &[]).await.unwrap()),
                    // Future-level cancellation only, for comparison: what reqctx alone costs.
                    _ => drop(
                        plain_ctx
                            .run(conn.client().query(&stmt, &[]))
                            .await
                            .unwrap()
                            .unwrap(),
                    ),
                }
            }
            times[way].push(t.elapsed());
            if let (Some(before), Some(after)) = (c, cpu()) {
                cpus[way].push(after.saturating_sub(before));
            }
            // Back to the session's default, so the plain rounds run as they would without us.
            conn.query(&Context::background(), &stmt, &[])
                .await
                .unwrap();
        }
    }
    if only.is_some() {
        return;
    }
    let [raw, helper, timed, run] = times;
    let cpu_us: Vec<f64> = cpus
        .into_iter()
        .map(|v| {
            if v.is_empty() {
                f64::NAN
            } else {
                median(v).as_secs_f64() * 1e6 / N as f64
            }
        })
        .collect();
    let (raw, helper, timed, run) = (median(raw), median(helper), median(timed), median(run));
    let per = |d: Duration| d.as_secs_f64() * 1e6 / N as f64;
    let pct = |d: Duration| (d.as_secs_f64() / raw.as_secs_f64() - 1.0) * 100.0;
    println!(
        "{N} x SELECT 1 (prepared), one connection, median of {ROUNDS} rounds (wall; client CPU per statement):"
    );
    let rows = [
        ("tokio-postgres Client::query", raw, cpu_us[0]),
        ("ContextClient::query, no deadline", helper, cpu_us[1]),
        ("ContextClient::query, 1 h deadline", timed, cpu_us[2]),
        ("ctx.run(Client::query), no deadline", run, cpu_us[3]),
    ];
    for (name, wall, cpu) in rows {
        println!(
            "  {name:<36} {:>7.1} ms  {:>5.1} µs/stmt  {:>+6.1}%   CPU {cpu:>5.2} µs/stmt  {:>+6.1}%",
            wall.as_secs_f64() * 1e3,
            per(wall),
            pct(wall),
            (cpu / cpu_us[0] - 1.0) * 100.0
        );
    }
}
