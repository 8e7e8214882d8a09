//! Support for the integration tests: servers on 127.0.0.1, a raw HTTP/1.1 client (shared
//! with the crates' own tests), an HTTP/2 client, and a probe that hands each handler's
//! context to the test.

pub mod chain;
pub mod chromium;
pub mod detect;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use reqctx::{Cause, Context};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower_reqctx::{ConnectionContext, WatchedListener};

// The workspace's raw HTTP/1.1 test client.
pub use reqctx_test_support::{
    BOUND, connect, http_get, http1, parse_response, read_to_end, read_until, reset, send,
    tcp_state,
};

/// Whether the tool `program` is there (`program version_arg` succeeds). If it is not: a
/// SKIPPED line on stderr and `false`, unless the environment variable `required` is `1`
/// (CI sets it for every tool it installs), which makes that a failure.
pub fn tool_on_path(program: &str, version_arg: &str, required: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg(version_arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var(required).as_deref() == Ok("1") {
            panic!("{required}=1 but no `{program}` on the PATH");
        }
        eprintln!(
            "\n!!! SKIPPED: no `{program}` on the PATH (apt-get install {program}; \
             {required}=1 makes this a failure) !!!\n"
        );
    }
    found
}

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

/// An echoing WebSocket on an `any("/ws")` route (an HTTP/2 WebSocket is an extended
/// CONNECT, HTTP/1's a GET) under a `ContextLayer` with a 50 ms timeout, which the tunnel
/// must outlive; each handler's context goes to `tx`.
pub fn ws_echo_app(tx: ProbeTx) -> Router {
    use axum::extract::ws::WebSocketUpgrade;
    use tower_reqctx::{ContextLayer, ReqCtx};
    Router::new()
        .route(
            "/ws",
            axum::routing::any(move |ctx: ReqCtx, ws: WebSocketUpgrade| async move {
                tx.send(ctx.0.clone()).unwrap();
                ws.on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if socket.send(msg).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        )
        .layer(ContextLayer::new().timeout(Duration::from_millis(50)))
}
