//! The disconnect-detection cases, shared by the probe (`src/bin/probe.rs`) and the
//! benchmark (`benches/src/bin/bench/detect.rs`): an app whose handlers report when their
//! context ends, and one trial per case that closes (or resets) the client and measures
//! from the close to that report.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use reqctx::Cause;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tower_reqctx::{ContextLayer, ReqCtx};

use crate::{Server, connect, endless, h2_client, reset};

/// When a started handler's context ended, and with what cause.
pub type Seen = mpsc::UnboundedReceiver<(Instant, Cause)>;
/// Each started handler hands over its [`Seen`] receiver through this.
pub type Started = mpsc::UnboundedSender<Seen>;

/// How long a trial waits for a handler to start.
pub const WAIT: Duration = Duration::from_secs(1);

/// The app the cases run against: `/wait`, `/upload` (body unread), `/stream` (a slow
/// event stream) and `/firehose` (as fast as the socket takes it), under `ContextLayer`.
pub fn app(started: Started) -> Router {
    fn watch(ctx: &ReqCtx, started: &Started) {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = started.send(rx); // the trial gave up on this request
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

/// The transport cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// GET, client closes (FIN).
    GetFin,
    /// GET, client resets (RST).
    GetRst,
    /// POST, body unread, FIN.
    PostUnreadFin,
    /// POST, body unread, RST.
    PostUnreadRst,
    /// Two pipelined GETs, close during the first.
    Pipelined,
    /// Streaming response, client closes.
    StreamClose,
    /// Streaming response, client stopped reading, then closes.
    StalledReaderClose,
    /// HTTP/2 RST_STREAM, connection kept.
    H2StreamReset,
    /// HTTP/2 connection closed.
    H2ConnClose,
}

/// Every case, with how reports name it.
pub const CASES: [(Case, &str); 9] = [
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

/// Every server, with how reports name it.
pub const SERVERS: [(Server, &str); 3] = [
    (Server::Serve, "`tower_reqctx::serve`"),
    (Server::AxumWatched, "`axum::serve` + `WatchedListener`"),
    (Server::AxumPlain, "plain `axum::serve`"),
];

/// One trial of `case` against [`app`] at `addr`: the time from the client's close to the
/// handler's context ending, and its cause; `None` if no handler started within [`WAIT`]
/// or the context did not end within `patience`.
pub async fn trial(
    case: Case,
    addr: SocketAddr,
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
                    // Lets the server's writes stall: what is measured is a close after that.
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
