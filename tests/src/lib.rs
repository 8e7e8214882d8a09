//! Support for the integration tests: servers on 127.0.0.1, a raw HTTP/1.1 client, an
//! HTTP/2 client, and a probe that hands each handler's context to the test.

pub mod chain;
pub mod detect;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use reqctx::{Cause, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower_reqctx::{ConnectionContext, WatchedListener};

/// How long a test waits for something that should happen at once before it fails.
pub const BOUND: Duration = Duration::from_secs(5);

/// Receives the context of every request a probed handler starts.
#[derive(Debug)]
pub struct Probe {
    rx: mpsc::UnboundedReceiver<Context>,
}

/// The sending half, cloned into handlers.
pub type ProbeTx = mpsc::UnboundedSender<Context>;

/// A probe and the sender for handlers.
pub fn probe() -> (ProbeTx, Probe) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Probe { rx })
}

impl Probe {
    /// The next handler's context, once that handler has started.
    pub async fn started(&mut self) -> Context {
        tokio::time::timeout(BOUND, self.rx.recv())
            .await
            .expect("a handler should have started")
            .expect("probe closed")
    }

    /// Whether a handler started (without waiting).
    pub fn any_started(&mut self) -> bool {
        self.rx.try_recv().is_ok()
    }
}

/// The cause `ctx` ends with, failing the test if it does not end within [`BOUND`].
pub async fn cause_of(ctx: &Context) -> Cause {
    tokio::time::timeout(BOUND, ctx.cancelled())
        .await
        .expect("the context should have been cancelled");
    ctx.cause().expect("cancelled means a cause")
}

/// Which server a test runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `tower_reqctx::serve`.
    Serve,
    /// `axum::serve` over `WatchedListener`.
    AxumWatched,
    /// Plain `axum::serve`: hyper's own detection and the layer's guards only.
    AxumPlain,
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Starts `app` on 127.0.0.1 under `server`; `drain` applies to `serve` only.
    pub async fn start(server: Server, app: Router, drain: Duration) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let signal = async move {
            let _ = rx.await;
        };
        let task = match server {
            Server::Serve => tokio::spawn(
                tower_reqctx::serve(listener, app)
                    .drain_timeout(drain)
                    .with_graceful_shutdown(signal)
                    .into_future(),
            ),
            Server::AxumWatched => tokio::spawn(async move {
                axum::serve(
                    WatchedListener::new(listener),
                    app.into_make_service_with_connect_info::<ConnectionContext>(),
                )
                .with_graceful_shutdown(signal)
                .await
            }),
            Server::AxumPlain => tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(signal)
                    .await
            }),
        };
        Running {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    /// Stops the server without a graceful shutdown. Plain `axum::serve` waits forever
    /// for handlers whose client left unseen (an unread body): this is the way out.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Sends the shutdown signal and waits for the server to return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(BOUND, &mut self.task)
            .await
            .expect("the server should return after shutdown")
            .expect("server task")
    }
}

use std::future::IntoFuture;

/// A raw connection, for requests written by hand.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends `request` on a new connection with `Connection: close` semantics and reads the
/// whole answer: (status, body).
pub async fn http1(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = connect(addr).await;
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut raw))
        .await
        .expect("the server should answer")
        .unwrap();
    parse_response(&raw)
}

/// `GET path` with `Connection: close`.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http1(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// (status, body) of a raw HTTP/1.1 response; chunked bodies are returned as sent.
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Closes `s` with an RST instead of a FIN.
pub fn reset(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

/// An HTTP/2 (prior knowledge) client connection and the task driving it.
pub async fn h2_client(
    addr: SocketAddr,
) -> (h2::client::SendRequest<bytes::Bytes>, JoinHandle<()>) {
    let tcp = connect(addr).await;
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

/// An endless body: `chunk` every `every`.
pub fn endless(
    chunk: &'static [u8],
    every: Duration,
) -> impl futures_core::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    struct Ticks(tokio::time::Interval, &'static [u8]);
    impl futures_core::Stream for Ticks {
        type Item = Result<bytes::Bytes, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            let chunk = self.1;
            self.0
                .poll_tick(cx)
                .map(|_| Some(Ok(bytes::Bytes::from_static(chunk))))
        }
    }
    Ticks(tokio::time::interval(every), chunk)
}

/// The test certificate (for `localhost`) and its key, from `tower-reqctx`'s tests.
pub const TEST_CERT: &[u8] = include_bytes!("../../crates/tower-reqctx/tests/data/cert.pem");
/// The key of [`TEST_CERT`].
pub const TEST_KEY: &[u8] = include_bytes!("../../crates/tower-reqctx/tests/data/key.pem");
