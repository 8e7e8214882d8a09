//! Cancel latency over real sockets: an axum handler under `tower_reqctx::serve` runs
//! `SELECT pg_sleep(10)` through a pooled `ContextClient`; the client hangs up; we time
//! from the close to `pg_stat_activity` showing the backend idle. 50 runs, median and p99.
//!
//! `cargo run --release -p reqctx-postgres --all-features --example cancel_latency`
//! (uses `DATABASE_URL`, or starts a throwaway cluster as the tests do).

use reqctx_pg_test_support as support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use reqctx_postgres::Options;
use reqctx_postgres::pool::{Manager, Pool};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tower_reqctx::{ContextLayer, ReqCtx};

const RUNS: usize = 50;

#[derive(Clone)]
struct App {
    pool: Pool,
    seen: mpsc::UnboundedSender<i32>,
}

async fn sleep(ReqCtx(ctx): ReqCtx, State(app): State<App>) -> &'static str {
    let Ok(mut db) = app.pool.get().await else {
        return "no connection";
    };
    let _ = app.seen.send(db.backend_pid());
    match db.query(&ctx, "SELECT pg_sleep(10)", &[]).await {
        Ok(_) => "slept",
        Err(_) => "stopped",
    }
}

#[tokio::main]
async fn main() {
    let Some(db) = support::db() else {
        println!("no PostgreSQL server: nothing measured");
        return;
    };
    let monitor = db.monitor().await;
    let pool = Pool::builder(Manager::new(db.config(), Options::default()).unwrap())
        .max_size(4)
        .build()
        .unwrap();
    let (seen, mut pids) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/sleep", get(sleep))
        .layer(ContextLayer::new())
        .with_state(App { pool, seen });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { tower_reqctx::serve(listener, app).await });

    let mut latencies = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /sleep HTTP/1.1\r\nHost: bench\r\n\r\n")
            .await
            .unwrap();
        let pid = pids.recv().await.unwrap();
        support::wait_active(&monitor, pid).await;
        let closed = Instant::now();
        drop(stream);
        // Poll back to back: each probe is one round trip on the monitor connection.
        loop {
            if support::state_of(&monitor, pid).await.as_deref() != Some("active") {
                break;
            }
            assert!(
                closed.elapsed() < Duration::from_secs(5),
                "backend {pid} never stopped"
            );
        }
        latencies.push(closed.elapsed());
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    println!(
        "cancel latency, client close -> backend idle, {RUNS} runs: median {:.2} ms, p99 {:.2} ms, min {:.2} ms, max {:.2} ms",
        ms(latencies[RUNS / 2]),
        ms(p99),
        ms(latencies[0]),
        ms(latencies[RUNS - 1])
    );
    let slowest: Vec<String> = latencies
        .iter()
        .rev()
        .take(5)
        .map(|d| format!("{:.2}", ms(*d)))
        .collect();
    println!("slowest five (ms): {}", slowest.join(", "));
}
