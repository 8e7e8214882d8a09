//! Disconnect-detection latency: from the client's close (or reset) to the handler's
//! context being cancelled, median and max of N trials per case and server.
//!
//! `cargo run --release -p reqctx-tests --bin probe [-- [chain] TRIALS]`

use std::time::{Duration, Instant};

use reqctx::Cause;
use reqctx_tests::detect::{CASES, SERVERS, app, trial};
use reqctx_tests::{Running, send};
use tokio::sync::mpsc;

/// How long a trial waits for the handler's context to end.
const PATIENCE: Duration = Duration::from_secs(2);

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// A → B → C: from the client's close at A to C's context being cancelled.
async fn chain_latency(trials: usize) {
    let mut chain = reqctx_tests::chain::chain().await;
    let mut lat = Vec::new();
    for _ in 0..trials {
        let s = send(chain.a, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let [pa, pb, pc] = &mut chain.probes;
        let (_a, _b, c) = (pa.started().await, pb.started().await, pc.started().await);
        let closed = Instant::now();
        drop(s);
        c.cancelled().await;
        lat.push(closed.elapsed());
        assert_eq!(c.cause(), Some(Cause::ClientDisconnected));
    }
    lat.sort();
    println!(
        "A -> B -> C: client closes at A, C cancelled: median {} ms, max {} ms over {trials} trials",
        ms(lat[lat.len() / 2]),
        ms(lat[lat.len() - 1])
    );
    chain.shutdown().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let chain = args.next_if(|a| a == "chain").is_some();
    let trials: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    if chain {
        chain_latency(trials).await;
        return;
    }
    println!("| case | server | detected | median ms | max ms | cause |");
    println!("|---|---|---:|---:|---:|---|");
    for (server, server_name) in SERVERS {
        let (tx, mut started) = mpsc::unbounded_channel();
        let srv = Running::start(server, app(tx), Duration::from_millis(50)).await;
        for (case, case_name) in CASES {
            let mut lat = Vec::new();
            let mut causes = std::collections::BTreeSet::new();
            for _ in 0..trials {
                if let Some((d, cause)) = trial(case, srv.addr, &mut started, PATIENCE).await {
                    lat.push(d);
                    causes.insert(format!("{cause:?}"));
                }
                while started.try_recv().is_ok() {} // a pipelined second request, if it ran
            }
            lat.sort();
            let (median, max) = match lat.len() {
                0 => ("–".to_owned(), "–".to_owned()),
                n => (ms(lat[n / 2]), ms(lat[n - 1])),
            };
            let causes: Vec<_> = causes.into_iter().collect();
            println!(
                "| {case_name} | {server_name} | {}/{trials} | {median} | {max} | {} |",
                lat.len(),
                causes.join(", ")
            );
        }
        srv.abort();
    }
}
