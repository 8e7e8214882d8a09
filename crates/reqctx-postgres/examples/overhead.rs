//! What the helper costs when nothing is cancelled: 10,000 `SELECT 1` on one connection,
//! through the plain client and through `ContextClient`, alternated, median of rounds.
//!
//! `cargo run --release -p reqctx-postgres --all-features --example overhead`
//! (uses `DATABASE_URL`, or starts a throwaway cluster as the tests do).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use reqctx::Context;
use reqctx_postgres::{ContextClient, Options};

const N: usize = 10_000;
const ROUNDS: usize = 15;

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
    let mut times: [Vec<Duration>; 3] = Default::default();
    for round in 0..ROUNDS {
        for k in 0..3 {
            let way = (round + k) % 3;
            let t = Instant::now();
            for _ in 0..N {
                match way {
                    0 => drop(conn.client().query(&stmt, &[]).await.unwrap()),
                    1 => drop(conn.query(&plain_ctx, &stmt, &[]).await.unwrap()),
                    _ => drop(conn.query(&deadline_ctx, &stmt, &[]).await.unwrap()),
                }
            }
            times[way].push(t.elapsed());
            // Back to the session's default, so the plain rounds run as they would without us.
            conn.query(&Context::background(), &stmt, &[])
                .await
                .unwrap();
        }
    }
    let [raw, helper, timed] = times;
    let (raw, helper, timed) = (median(raw), median(helper), median(timed));
    let per = |d: Duration| d.as_secs_f64() * 1e6 / N as f64;
    let pct = |d: Duration| (d.as_secs_f64() / raw.as_secs_f64() - 1.0) * 100.0;
    println!("{N} x SELECT 1 (prepared), one connection, median of {ROUNDS} rounds:");
    println!(
        "  tokio-postgres Client::query       {:>8.1} ms  {:>6.1} µs/stmt",
        raw.as_secs_f64() * 1e3,
        per(raw)
    );
    println!(
        "  ContextClient::query, no deadline  {:>8.1} ms  {:>6.1} µs/stmt  {:+.1}%",
        helper.as_secs_f64() * 1e3,
        per(helper),
        pct(helper)
    );
    println!(
        "  ContextClient::query, 1 h deadline {:>8.1} ms  {:>6.1} µs/stmt  {:+.1}%",
        timed.as_secs_f64() * 1e3,
        per(timed),
        pct(timed)
    );
}
