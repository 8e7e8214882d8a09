//! What binding costs when nothing is cancelled: 10,000 `SELECT 1` through a pool of one
//! connection, with sqlx's `&PgPool` and through `ContextPool::bind`, alternated, median
//! of rounds.
//!
//! `cargo run --release -p reqctx-sqlx --example bind_overhead`
//! (uses `DATABASE_URL`, or starts a throwaway cluster as the tests do).

use std::time::{Duration, Instant};

use reqctx::Context;
use reqctx_pg_test_support as support;
use reqctx_sqlx::{ContextPool, Options};
use sqlx::postgres::PgPoolOptions;

const N: usize = 10_000;
const ROUNDS: usize = 7;

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
    let pool = ContextPool::connect_with(
        db.url.parse().unwrap(),
        PgPoolOptions::new().max_connections(1),
        Options::default(),
    )
    .await
    .unwrap();
    let (plain_ctx, _c1) = Context::background().with_cancel();
    let (deadline_ctx, _c2) = Context::background().with_timeout(Duration::from_secs(3600));
    let names = [
        "sqlx `&PgPool`",
        "`pool.bind(&ctx)`, no deadline",
        "`pool.bind(&ctx)`, 1 h deadline",
    ];
    let mut times: [Vec<Duration>; 3] = Default::default();
    for round in 0..ROUNDS {
        for k in 0..3 {
            let way = (round + k) % 3;
            let started = Instant::now();
            for _ in 0..N {
                let q = sqlx::query_scalar::<_, i32>("SELECT 1");
                let one = match way {
                    0 => q.fetch_one(pool.inner()).await,
                    1 => q.fetch_one(pool.bind(&plain_ctx)).await,
                    _ => q.fetch_one(pool.bind(&deadline_ctx)).await,
                }
                .unwrap();
                assert_eq!(one, 1);
            }
            times[way].push(started.elapsed() / N as u32);
        }
    }
    let base = median(times[0].clone());
    println!("| way | wall per statement | vs `&PgPool` |");
    println!("|---|---:|---:|");
    for (way, name) in names.iter().enumerate() {
        let m = median(times[way].clone());
        let pct = (m.as_secs_f64() / base.as_secs_f64() - 1.0) * 100.0;
        println!(
            "| {name} | {:.1} µs | {}{pct:.1}% |",
            m.as_secs_f64() * 1e6,
            if pct >= 0.0 { "+" } else { "" }
        );
    }
}
