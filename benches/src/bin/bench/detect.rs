//! Disconnect-detection latency, from the client's close (or reset) to a task waiting on
//! the handler's context waking up; the cases of `tests/src/bin/probe.rs`, with more trials
//! and percentiles. In process, over loopback.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use reqctx_benches::stats::percentile;
use reqctx_tests::{Running, Server, connect, endless, h2_client, reset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tower_reqctx::reqctx::Cause;
use tower_reqctx::{ContextLayer, ReqCtx};

/// Each started handler hands over a receiver of (when it saw the cancellation, cause).
type Seen = mpsc::UnboundedReceiver<(Instant, Cause)>;
type Started = mpsc::UnboundedSender<Seen>;

/// How long a trial waits for a handler to start.
const WAIT: Duration = Duration::from_secs(1);

fn app(started: Started) -> Router {
    fn watch(ctx: &ReqCtx, started: &Started) {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = started.send(rx);
        let c = ctx.0.clone();
        tokio::spawn(async move {
            c.cancelled().await;
            let _ = tx.send((Instant::now(), c.cause().unwrap_or(Cause::Cancelled)));
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

/// The transport cases, with how the report names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Case {
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

pub(crate) const CASES: [(Case, &str); 9] = [
    (Case::GetFin, "GET, client closes (FIN)"),
    (Case::GetRst, "GET, client resets (RST)"),
    (Case::PostUnreadFin, "POST, body unread, FIN"),
    (Case::PostUnreadRst, "POST, body unread, RST"),
    (
        Case::Pipelined,
        "two pipelined GETs, close during the first",
    ),
    (Case::StreamClose, "streaming response, client closes"),
    (
        Case::StalledReaderClose,
        "streaming response, client stopped reading, then closes",
    ),
    (Case::H2StreamReset, "HTTP/2 RST_STREAM, connection kept"),
    (Case::H2ConnClose, "HTTP/2 connection closed"),
];

/// The servers, with how the report names them.
pub(crate) const SERVERS: [(Server, &str); 3] = [
    (Server::Serve, "`tower_reqctx::serve`"),
    (Server::AxumWatched, "`axum::serve` + `WatchedListener`"),
    (Server::AxumPlain, "plain `axum::serve`"),
];

/// One trial: the latency and cause, or `None` if the context did not end within [`WAIT`].
async fn trial(
    case: Case,
    addr: std::net::SocketAddr,
    started: &mut mpsc::UnboundedReceiver<Seen>,
    patience: Duration,
) -> Option<(Duration, Cause)> {
    let (closed_at, mut done) = match case {
        Case::H2StreamReset | Case::H2ConnClose => {
            let (mut send, conn) = h2_client(addr).await;
            let req = http::Request::get(format!("http://{addr}/wait"))
                .body(())
                .ok()?;
            let (_resp, mut stream) = send.send_request(req, true).ok()?;
            let done = next(started).await?;
            let at = Instant::now();
            if case == Case::H2StreamReset {
                stream.send_reset(h2::Reason::CANCEL);
            } else {
                conn.abort();
            }
            // Keeps the connection open in the stream-reset case until measured.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                drop(send);
            });
            (at, done)
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
                    // Lets the server's writes stall.
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
    let (seen_at, cause) = tokio::time::timeout(patience, done.recv())
        .await
        .ok()
        .flatten()?;
    Some((seen_at.saturating_duration_since(closed_at), cause))
}

async fn next(started: &mut mpsc::UnboundedReceiver<Seen>) -> Option<Seen> {
    tokio::time::timeout(WAIT, started.recv())
        .await
        .ok()
        .flatten()
}

/// One row of the detection table.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) server: String,
    pub(crate) case: String,
    pub(crate) detected: usize,
    pub(crate) trials: usize,
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    pub(crate) max_us: Option<f64>,
    pub(crate) causes: String,
}

/// The subcommand: every case under every server, one tab-separated row each on stdout.
/// A trial waits `patience` for the context to end; a case seen in none of its first
/// `give_up_after` trials is not tried further.
pub(crate) fn main(trials: usize, patience: Duration, give_up_after: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        for (server, server_name) in SERVERS {
            let (tx, mut started) = mpsc::unbounded_channel();
            let srv = Running::start(server, app(tx), Duration::from_millis(50)).await;
            for (case, case_name) in CASES {
                let mut lat = Vec::new();
                let mut causes = BTreeSet::new();
                let mut tried = 0;
                for _ in 0..trials {
                    tried += 1;
                    if let Some((d, cause)) = trial(case, srv.addr, &mut started, patience).await {
                        lat.push(d.as_secs_f64() * 1e6);
                        causes.insert(format!("{cause:?}"));
                    }
                    while started.try_recv().is_ok() {} // a pipelined second request, if it ran
                    if lat.is_empty() && tried >= give_up_after {
                        break;
                    }
                }
                lat.sort_by(f64::total_cmp);
                let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
                println!(
                    "row\t{server_name}\t{case_name}\t{}\t{tried}\t{}\t{}\t{}\t{}",
                    lat.len(),
                    show(percentile(&lat, 50.0)),
                    show(percentile(&lat, 99.0)),
                    show(lat.last().copied()),
                    causes.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            srv.abort();
        }
    });
    Ok(())
}

/// Reads the subcommand's rows.
pub(crate) fn parse(out: &str) -> Vec<Row> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 9 || f[0] != "row" {
                return None;
            }
            let num = |s: &str| s.parse::<f64>().ok();
            Some(Row {
                server: f[1].to_owned(),
                case: f[2].to_owned(),
                detected: f[3].parse().ok()?,
                trials: f[4].parse().ok()?,
                p50_us: num(f[5]),
                p99_us: num(f[6]),
                max_us: num(f[7]),
                causes: f[8].to_owned(),
            })
        })
        .collect()
}
