//! Disconnect-detection latency: from the client's close (or reset) to the handler's
//! context being cancelled, median and max of N trials per case and server.
//!
//! `cargo run --release -p reqctx-tests --bin probe [-- [chain] TRIALS]`

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use reqctx::Cause;
use reqctx_tests::{Running, Server, connect, endless, h2_client, reset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tower_reqctx::{ContextLayer, ReqCtx};

/// Each started handler hands over a receiver of (when it saw the cancellation, cause).
type Started = mpsc::UnboundedSender<mpsc::UnboundedReceiver<(Instant, Cause)>>;

fn app(started: Started) -> Router {
    // Each handler registers a channel for its cancellation instant, then waits.
    fn watch(ctx: &ReqCtx, started: &Started) {
        let (tx, rx) = mpsc::unbounded_channel();
        started.send(rx).unwrap();
        let c = ctx.0.clone();
        tokio::spawn(async move {
            c.cancelled().await;
            let _ = tx.send((Instant::now(), c.cause().unwrap()));
        });
    }
    let (s1, s2, s3, s4) = (started.clone(), started.clone(), started.clone(), started);
    Router::new()
        .route(
            "/wait",
            get(move |ctx: ReqCtx| async move {
                watch(&ctx, &s1);
                ctx.cancelled().await;
                "x"
            }),
        )
        .route(
            "/upload",
            post(move |ctx: ReqCtx, _b: Body| async move {
                watch(&ctx, &s2);
                ctx.cancelled().await;
                "x"
            }),
        )
        .route(
            "/stream",
            get(move |ctx: ReqCtx| async move {
                watch(&ctx, &s3);
                Body::from_stream(endless(b"data: tick\n\n", Duration::from_millis(5)))
            }),
        )
        .route(
            "/firehose",
            get(move |ctx: ReqCtx| async move {
                watch(&ctx, &s4);
                Body::from_stream(endless(&[b'x'; 16384], Duration::from_micros(1)))
            }),
        )
        .layer(ContextLayer::new())
}

#[derive(Clone, Copy, Debug)]
enum Case {
    GetFin,
    GetRst,
    PostUnreadFin,
    PostUnreadRst,
    Pipelined,
    StreamClose,
    StalledReaderClose,
    H2StreamReset,
    H2ConnClose,
}

const CASES: [Case; 9] = [
    Case::GetFin,
    Case::GetRst,
    Case::PostUnreadFin,
    Case::PostUnreadRst,
    Case::Pipelined,
    Case::StreamClose,
    Case::StalledReaderClose,
    Case::H2StreamReset,
    Case::H2ConnClose,
];

/// One trial: returns the latency, or None if the context was not cancelled within 2 s.
async fn trial(
    case: Case,
    addr: std::net::SocketAddr,
    started: &mut mpsc::UnboundedReceiver<mpsc::UnboundedReceiver<(Instant, Cause)>>,
) -> Option<(Duration, Cause)> {
    let (closed_at, mut done): (Instant, mpsc::UnboundedReceiver<(Instant, Cause)>) = match case {
        Case::H2StreamReset | Case::H2ConnClose => {
            let (mut send, conn) = h2_client(addr).await;
            let req = http::Request::get(format!("http://{addr}/wait"))
                .body(())
                .unwrap();
            let (_resp, mut stream) = send.send_request(req, true).unwrap();
            let done = next(started).await?;
            let at = Instant::now();
            if matches!(case, Case::H2StreamReset) {
                stream.send_reset(h2::Reason::CANCEL);
            } else {
                conn.abort();
            }
            // Keep the connection open for the stream-reset case until measured.
            let out = (at, done);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                drop(send);
            });
            out
        }
        _ => {
            let mut s = connect(addr).await;
            let req: &[u8] = match case {
                Case::GetFin | Case::GetRst => b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n",
                Case::PostUnreadFin | Case::PostUnreadRst => {
                    b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"
                }
                Case::Pipelined => {
                    b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\nGET /wait HTTP/1.1\r\nHost: t\r\n\r\n"
                }
                Case::StreamClose => b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n",
                _ => b"GET /firehose HTTP/1.1\r\nHost: t\r\n\r\n",
            };
            s.write_all(req).await.ok()?;
            if matches!(case, Case::PostUnreadFin | Case::PostUnreadRst) {
                s.write_all(&[b'a'; 40_000]).await.ok()?;
            }
            let done = next(started).await?;
            let mut buf = vec![0u8; 65536];
            match case {
                Case::StreamClose => {
                    let n = s.read(&mut buf).await.ok()?;
                    (n > 0).then_some(())?;
                }
                Case::StalledReaderClose => {
                    let n = s.read(&mut buf).await.ok()?;
                    (n > 0).then_some(())?;
                    // Let the server's writes stall.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => {}
            }
            let at = Instant::now();
            if matches!(case, Case::GetRst | Case::PostUnreadRst) {
                reset(s);
            } else {
                drop(s);
            }
            (at, done)
        }
    };
    let (seen_at, cause) = tokio::time::timeout(Duration::from_secs(2), done.recv())
        .await
        .ok()
        .flatten()?;
    Some((seen_at.saturating_duration_since(closed_at), cause))
}

async fn next(
    started: &mut mpsc::UnboundedReceiver<mpsc::UnboundedReceiver<(Instant, Cause)>>,
) -> Option<mpsc::UnboundedReceiver<(Instant, Cause)>> {
    tokio::time::timeout(Duration::from_secs(2), started.recv())
        .await
        .ok()
        .flatten()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// A → B → C: from the client's close at A to C's context being cancelled.
async fn chain_latency(trials: usize) {
    let mut chain = reqctx_tests::chain::chain().await;
    let mut lat = Vec::new();
    for _ in 0..trials {
        let mut s = connect(chain.a).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
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
    for server in [Server::Serve, Server::AxumWatched, Server::AxumPlain] {
        let (tx, mut started) = mpsc::unbounded_channel();
        let srv = Running::start(server, app(tx), Duration::from_millis(50)).await;
        for case in CASES {
            let mut lat = Vec::new();
            let mut causes = std::collections::BTreeSet::new();
            for _ in 0..trials {
                if let Some((d, cause)) = trial(case, srv.addr, &mut started).await {
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
                "| {case:?} | {server:?} | {}/{trials} | {median} | {max} | {} |",
                lat.len(),
                causes.join(", ")
            );
        }
        srv.abort();
    }
}
