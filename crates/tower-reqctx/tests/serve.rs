//! `serve` and `WatchedListener` over real sockets on 127.0.0.1. Every wait is for an event;
//! a timeout only bounds a failure.
#![cfg(feature = "axum")]

use std::future::{IntoFuture, pending};
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tower_reqctx::reqctx::Cause;
use tower_reqctx::{ConnectionContext, WatchedListener, serve};

use reqctx_test_support::{BOUND, read_to_end, read_until, send, spawn_server};

/// What the handlers report.
#[derive(Clone)]
struct Probe {
    started: mpsc::UnboundedSender<()>,
    causes: mpsc::UnboundedSender<Option<Cause>>,
    dropped: mpsc::UnboundedSender<()>,
}

struct Reports {
    started: mpsc::UnboundedReceiver<()>,
    causes: mpsc::UnboundedReceiver<Option<Cause>>,
    dropped: mpsc::UnboundedReceiver<()>,
}

/// Reports that a handler's future was dropped.
struct DropGuard(mpsc::UnboundedSender<()>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl Reports {
    async fn started(&mut self) {
        timeout(BOUND, self.started.recv())
            .await
            .expect("the handler did not start within the bound")
            .unwrap();
    }

    async fn cause(&mut self) -> Option<Cause> {
        timeout(BOUND, self.causes.recv())
            .await
            .expect("the connection context was not cancelled within the bound")
            .unwrap()
    }

    /// Whether a handler's future has been dropped, now.
    fn dropped(&mut self) -> bool {
        self.dropped.try_recv().is_ok()
    }
}

/// The connection: `serve`'s current one, or `WatchedListener`'s in the request.
fn connection(req: &Request) -> ConnectionContext {
    ConnectionContext::current()
        .or_else(|| {
            req.extensions()
                .get::<ConnectInfo<ConnectionContext>>()
                .map(|info| info.0.clone())
        })
        .expect("no ConnectionContext for the request")
}

/// Reports the connection context's cause from a task of its own, so the report survives
/// hyper dropping the handler.
fn report_cause(conn: &ConnectionContext, probe: &Probe) {
    let ctx = conn.context().clone();
    let causes = probe.causes.clone();
    tokio::spawn(async move {
        ctx.cancelled().await;
        let _ = causes.send(ctx.cause());
    });
}

/// Holds the request (its body unread), waits for the connection context, returns.
async fn wait(State(probe): State<Probe>, req: Request) -> &'static str {
    let conn = connection(&req);
    report_cause(&conn, &probe);
    let _ = probe.started.send(());
    conn.context().cancelled().await;
    drop(req);
    "cancelled"
}

/// Ignores its context, forever.
async fn stuck(State(probe): State<Probe>, req: Request) -> &'static str {
    let conn = connection(&req);
    report_cause(&conn, &probe);
    let _guard = DropGuard(probe.dropped.clone());
    let _ = probe.started.send(());
    pending::<()>().await;
    "unreachable"
}

async fn peer(ConnectInfo(addr): ConnectInfo<SocketAddr>) -> String {
    addr.to_string()
}

fn app() -> (Router, Reports) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (causes_tx, causes) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let probe = Probe {
        started: started_tx,
        causes: causes_tx,
        dropped: dropped_tx,
    };
    let router = Router::new()
        .route("/wait", get(wait).post(wait))
        .route("/stuck", get(stuck))
        .route("/hello", get(|| async { "hello" }))
        .route("/peer", get(peer))
        .route("/upload", post(wait))
        .with_state(probe);
    let reports = Reports {
        started,
        causes,
        dropped,
    };
    (router, reports)
}

/// A server under `serve` with graceful shutdown: its address, the shutdown trigger and the
/// server's task.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(router: Router, drain: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .drain_timeout(drain);
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.into_future());
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn shutdown(&mut self) {
        self.stop.take().unwrap().send(()).unwrap();
    }

    /// Waits for `serve` to resolve, for at most `bound`.
    async fn stopped(self, bound: Duration) {
        timeout(bound, self.task)
            .await
            .expect("serve did not return within the bound")
            .unwrap()
            .unwrap();
    }
}

/// The longest `serve` may take to return after the signal when a handler ignores its
/// context: the drain, then `serve`'s final period, then [`BOUND`] of slack. The final
/// period is private to `serve.rs` (one second): restated here as a failure bound only,
/// so no test passes or fails on its exact length.
fn stop_bound(drain: Duration) -> Duration {
    const FINAL_PERIOD: Duration = Duration::from_secs(1);
    drain + FINAL_PERIOD + BOUND
}

/// A POST that announces 100,000 body bytes and sends 1,000.
const PARTIAL_UPLOAD: &[u8] =
    b"POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 100000\r\n\r\n";

async fn partial_upload(addr: SocketAddr) -> TcpStream {
    let mut stream = send(addr, PARTIAL_UPLOAD).await;
    stream.write_all(&[b'x'; 1000]).await.unwrap();
    stream
}

#[tokio::test]
async fn get_then_close_is_client_disconnected() {
    let (router, mut reports) = app();
    let server = Server::start(router, Duration::from_secs(10)).await;

    let client = send(server.addr, b"GET /wait HTTP/1.1\r\nhost: test\r\n\r\n").await;
    reports.started().await;
    drop(client);
    assert_eq!(reports.cause().await, Some(Cause::ClientDisconnected));
}

/// The case hyper misses: the handler holds the body unread, so hyper does not read the
/// socket and never sees the FIN.
#[tokio::test]
async fn unread_partial_body_then_close_is_client_disconnected() {
    let (router, mut reports) = app();
    let server = Server::start(router, Duration::from_secs(10)).await;

    let client = partial_upload(server.addr).await;
    reports.started().await;
    drop(client);
    assert_eq!(reports.cause().await, Some(Cause::ClientDisconnected));
}

#[tokio::test]
async fn shutdown_cancels_in_flight_requests_after_the_drain() {
    let (router, mut reports) = app();
    let drain = Duration::from_millis(100);
    let mut server = Server::start(router, drain).await;

    let mut client = send(server.addr, b"GET /wait HTTP/1.1\r\nhost: test\r\n\r\n").await;
    reports.started().await;
    server.shutdown();
    assert_eq!(reports.cause().await, Some(Cause::Shutdown));
    // The handler returned on `Shutdown`; its response closes the connection.
    let response = read_to_end(&mut client).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("connection: close\r\n"), "{response}");
    assert!(response.ends_with("cancelled"), "{response}");
    server.stopped(BOUND).await;
}

#[tokio::test]
async fn shutdown_drops_a_handler_that_ignores_its_context() {
    let (router, mut reports) = app();
    let drain = Duration::from_millis(100);
    let mut server = Server::start(router, drain).await;

    let mut client = send(server.addr, b"GET /stuck HTTP/1.1\r\nhost: test\r\n\r\n").await;
    reports.started().await;
    server.shutdown();
    server.stopped(stop_bound(drain)).await;
    assert_eq!(reports.cause().await, Some(Cause::Shutdown));
    assert!(reports.dropped());
    // The connection was dropped without a response.
    assert_eq!(read_to_end(&mut client).await, "");
}

/// HTTP/2 streams run in tasks hyper spawns; dropping their connection ends them.
#[tokio::test]
async fn shutdown_drops_a_stuck_http2_stream() {
    let (router, mut reports) = app();
    let drain = Duration::from_millis(100);
    let mut server = Server::start(router, drain).await;

    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(h2_conn);
    let request = http::Request::get(format!("http://{}/stuck", server.addr))
        .body(Body::empty())
        .unwrap();
    let response = tokio::spawn(h2.send_request(request));
    reports.started().await;
    server.shutdown();
    server.stopped(stop_bound(drain)).await;
    assert_eq!(reports.cause().await, Some(Cause::Shutdown));
    timeout(BOUND, reports.dropped.recv())
        .await
        .expect("the stream's handler was not dropped")
        .unwrap();
    let response = timeout(BOUND, response).await.unwrap().unwrap();
    assert!(response.is_err(), "{response:?}");
}

#[tokio::test]
async fn http2_prior_knowledge_and_idle_keep_alive_closed_at_shutdown() {
    let (router, _reports) = app();
    // A long drain: serve must return without waiting for it, since nothing is in flight.
    let mut server = Server::start(router, Duration::from_secs(60)).await;

    // HTTP/2 with prior knowledge.
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let request = http::Request::get(format!("http://{}/hello", server.addr))
        .body(Body::empty())
        .unwrap();
    let response = timeout(BOUND, h2.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = axum::body::to_bytes(Body::new(response.into_body()), 1024)
        .await
        .unwrap();
    assert_eq!(&body[..], b"hello");

    // An HTTP/1.1 keep-alive connection, idle after one response.
    let mut h1 = send(server.addr, b"GET /hello HTTP/1.1\r\nhost: test\r\n\r\n").await;
    let response = read_until(&mut h1, "hello").await;
    assert!(!response.contains("connection: close"), "{response}");
    let mut buf = [0; 1024];

    server.shutdown();
    // Both connections close: the HTTP/1 one at once, the HTTP/2 one after GOAWAY.
    assert_eq!(timeout(BOUND, h1.read(&mut buf)).await.unwrap().unwrap(), 0);
    timeout(BOUND, h2_conn).await.unwrap().unwrap().unwrap();
    server.stopped(BOUND).await;
}

#[tokio::test]
async fn connect_info_socket_addr_only_when_asked_for() {
    for asked in [false, true] {
        let (router, _reports) = app();
        let (addr, server) =
            spawn_server(|l| serve(l, router).connect_info(asked).into_future()).await;

        let mut client = send(
            addr,
            b"GET /peer HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n",
        )
        .await;
        let local = client.local_addr().unwrap();
        let response = read_to_end(&mut client).await;
        if asked {
            assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
            assert!(response.ends_with(&local.to_string()), "{response}");
        } else {
            // axum's extractor refuses a request without it, as under plain axum::serve.
            assert!(response.starts_with("HTTP/1.1 500"), "{response}");
        }
        server.abort();
    }
}

#[tokio::test]
async fn axum_serve_with_watched_listener_sees_client_disconnected() {
    let (router, mut reports) = app();
    let (addr, _server) = spawn_server(|l| {
        let app = router.into_make_service_with_connect_info::<ConnectionContext>();
        axum::serve(WatchedListener::new(l), app).into_future()
    })
    .await;

    let client = partial_upload(addr).await;
    reports.started().await;
    drop(client);
    assert_eq!(reports.cause().await, Some(Cause::ClientDisconnected));
}

/// What a connection's context told the work tied to it: the cause `on_cancel` saw and how
/// the task `spawn`ed on it ended.
struct Tied {
    on_cancel: oneshot::Receiver<Cause>,
    spawned: JoinHandle<Result<(), tower_reqctx::reqctx::Cancelled>>,
}

impl Tied {
    async fn ended(self) -> Cause {
        let cause = timeout(BOUND, self.on_cancel)
            .await
            .expect("on_cancel did not run: the connection context never ended")
            .unwrap();
        let spawned = timeout(BOUND, self.spawned)
            .await
            .expect("the spawned task did not end")
            .unwrap();
        assert!(spawned.is_err(), "{spawned:?}");
        cause
    }
}

/// An app whose `/tie` handler ties work to its connection's context and answers at once.
fn tie_app() -> (Router, mpsc::UnboundedReceiver<Tied>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new().route(
        "/tie",
        get(move |req: Request| {
            let tx = tx.clone();
            async move {
                let ctx = connection(&req).context().clone();
                let (cause_tx, on_cancel) = oneshot::channel();
                let handle = ctx.on_cancel(move |cause| {
                    let _ = cause_tx.send(cause.clone());
                });
                std::mem::forget(handle); // keep it registered past the handler
                let spawned = ctx.spawn(pending::<()>());
                let _ = tx.send(Tied { on_cancel, spawned });
                "tied"
            }
        }),
    );
    (router, rx)
}

async fn tied(rx: &mut mpsc::UnboundedReceiver<Tied>) -> Tied {
    timeout(BOUND, rx.recv())
        .await
        .expect("the handler did not run")
        .unwrap()
}

/// The server closes the connection after a `connection: close` response: its context ends
/// with `ServerClosed`, and the work tied to it ends.
#[tokio::test]
async fn server_close_ends_the_connection_context_with_server_closed() {
    let (router, mut rx) = tie_app();
    let server = Server::start(router, Duration::from_secs(10)).await;

    let mut client = send(
        server.addr,
        b"GET /tie HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n",
    )
    .await;
    let tied = tied(&mut rx).await;
    let response = read_to_end(&mut client).await;
    assert!(response.ends_with("tied"), "{response}");
    let cause = tied.ended().await;
    assert!(
        cause.downcast_ref::<tower_reqctx::ServerClosed>().is_some(),
        "{cause:?}"
    );
}

/// The client closes an idle keep-alive connection: `ClientDisconnected`.
#[tokio::test]
async fn client_close_ends_the_connection_context_with_client_disconnected() {
    let (router, mut rx) = tie_app();
    let server = Server::start(router, Duration::from_secs(10)).await;

    let mut client = send(server.addr, b"GET /tie HTTP/1.1\r\nhost: test\r\n\r\n").await;
    let tied = tied(&mut rx).await;
    read_until(&mut client, "tied").await;
    drop(client);
    assert_eq!(tied.ended().await, Cause::ClientDisconnected);
}

/// An idle keep-alive connection closed by a graceful shutdown: `Shutdown`.
#[tokio::test]
async fn graceful_shutdown_ends_an_idle_connection_context_with_shutdown() {
    let (router, mut rx) = tie_app();
    let mut server = Server::start(router, Duration::from_secs(60)).await;

    let mut client = send(server.addr, b"GET /tie HTTP/1.1\r\nhost: test\r\n\r\n").await;
    let tied = tied(&mut rx).await;
    read_until(&mut client, "tied").await;
    server.shutdown();
    assert_eq!(tied.ended().await, Cause::Shutdown);
    server.stopped(BOUND).await;
}

/// An app whose `/fast` handler gives the client's FIN 100 ms to reach the watcher (unless
/// its context ends first), answers, and reports its request context's cause.
fn fast_app() -> (Router, mpsc::UnboundedReceiver<Option<Cause>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new()
        .route(
            "/fast",
            get(move |ctx: tower_reqctx::ReqCtx| {
                let tx = tx.clone();
                async move {
                    let ctx = ctx.0;
                    let waiter = ctx.clone();
                    tokio::spawn(async move {
                        waiter.cancelled().await;
                        let _ = tx.send(waiter.cause());
                    });
                    // Only bounds the wait for a cancellation that must not come.
                    let _ = timeout(Duration::from_millis(100), ctx.cancelled()).await;
                    "hello"
                }
            }),
        )
        .layer(tower_reqctx::ContextLayer::new());
    (router, rx)
}

/// Under `half_close(true)`, a client that shuts down its sending side after its request
/// gets its whole response, and the request reads `Completed`, not `ClientDisconnected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_gets_its_response_and_completes() {
    let (router, mut causes) = fast_app();
    let (addr, _server) = spawn_server(|l| serve(l, router).half_close(true).into_future()).await;

    for round in 0..5 {
        let mut client = send(addr, b"GET /fast HTTP/1.1\r\nhost: test\r\n\r\n").await;
        client.shutdown().await.unwrap(); // FIN: no more requests
        let response = read_to_end(&mut client).await;
        assert!(
            response.starts_with("HTTP/1.1 200 OK\r\n"),
            "round {round}: {response}"
        );
        assert!(response.ends_with("hello"), "round {round}: {response}");
        let cause = timeout(BOUND, causes.recv()).await.unwrap().unwrap();
        assert_eq!(cause, Some(Cause::Completed), "round {round}");
    }
}

/// Under `half_close(true)`, a client that closed fully (not only its sending side) is seen
/// at the server's next write: the client's kernel answers it with a reset.
#[tokio::test]
async fn half_close_full_close_is_seen_at_the_next_write() {
    let (tx, mut causes) = mpsc::unbounded_channel();
    let (chunks_tx, chunks_rx) = mpsc::unbounded_channel::<Result<&'static str, std::io::Error>>();
    let chunks_rx = std::sync::Arc::new(std::sync::Mutex::new(Some(chunks_rx)));
    let router = Router::new()
        .route(
            "/stream",
            get(move |ctx: tower_reqctx::ReqCtx| {
                let tx = tx.clone();
                let rx = chunks_rx.lock().unwrap().take().unwrap();
                async move {
                    let ctx = ctx.0;
                    tokio::spawn(async move {
                        ctx.cancelled().await;
                        let _ = tx.send(ctx.cause());
                    });
                    let stream = futures_stream(rx);
                    Body::from_stream(stream)
                }
            }),
        )
        .layer(tower_reqctx::ContextLayer::new());
    let (addr, _server) = spawn_server(|l| serve(l, router).half_close(true).into_future()).await;

    let mut client = send(addr, b"GET /stream HTTP/1.1\r\nhost: test\r\n\r\n").await;
    chunks_tx.send(Ok("first")).unwrap();
    read_until(&mut client, "first").await;
    drop(client); // a full close: FIN, which half-close does not take for a disconnect
    // Writes until the reset comes back; the watcher or the failed write reports it.
    let cause = timeout(BOUND, async {
        loop {
            let _ = chunks_tx.send(Ok("more"));
            tokio::select! {
                cause = causes.recv() => break cause.unwrap(),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
    .await
    .expect("the full close was never seen");
    assert_eq!(cause, Some(Cause::ClientDisconnected));
}

/// Under `half_close(true)`, a client that closed fully while its handler ran, and an
/// answer written in one write: on the wire the close was a FIN, the same as a half-close,
/// so the request runs on and its context ends `Completed` (the body's end is recorded
/// when hyper takes its last bytes, before it writes them). The client's kernel answers
/// that write with a reset, and the connection's context ends `ClientDisconnected`.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_full_close_then_one_write_answer_completes() {
    type Causes = mpsc::UnboundedSender<(&'static str, Option<Cause>)>;
    fn report(ctx: tower_reqctx::reqctx::Context, which: &'static str, tx: &Causes) {
        let tx = tx.clone();
        tokio::spawn(async move {
            ctx.cancelled().await;
            let _ = tx.send((which, ctx.cause()));
        });
    }
    let (tx, mut causes) = mpsc::unbounded_channel();
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let go_rx = std::sync::Arc::new(std::sync::Mutex::new(Some(go_rx)));
    let router = Router::new()
        .route(
            "/once",
            get(move |ctx: tower_reqctx::ReqCtx, req: Request| {
                let (tx, started_tx) = (tx.clone(), started_tx.clone());
                let go = go_rx.lock().unwrap().take().unwrap();
                async move {
                    report(ctx.0.clone(), "request", &tx);
                    report(connection(&req).context().clone(), "connection", &tx);
                    let _ = started_tx.send(());
                    let _ = go.await;
                    "hello" // one write: a fixed-length body, sent with the head
                }
            }),
        )
        .layer(tower_reqctx::ContextLayer::new());
    let (addr, _server) = spawn_server(|l| serve(l, router).half_close(true).into_future()).await;

    let client = send(addr, b"GET /once HTTP/1.1\r\nhost: test\r\n\r\n").await;
    let client_port = client.local_addr().unwrap().port();
    timeout(BOUND, started.recv()).await.unwrap().unwrap();
    drop(client); // a full close: a FIN, as a half-close would send
    // The server's kernel has the FIN (its socket is in CLOSE_WAIT) before the answer.
    timeout(BOUND, async {
        while reqctx_test_support::tcp_state(addr.port(), client_port) != Some(0x08) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the client's FIN never reached the server's socket");
    // Under half-close a FIN is the end of the client's requests, not a disconnect.
    assert!(causes.try_recv().is_err(), "a context ended on the FIN");
    go_tx.send(()).unwrap();

    let mut seen = std::collections::HashMap::new();
    while seen.len() < 2 {
        let (which, cause) = timeout(BOUND, causes.recv())
            .await
            .expect("both contexts should end")
            .unwrap();
        seen.insert(which, cause);
    }
    assert_eq!(seen["request"], Some(Cause::Completed));
    assert_eq!(seen["connection"], Some(Cause::ClientDisconnected));
}

/// A stream of the receiver's items.
fn futures_stream<T>(
    rx: mpsc::UnboundedReceiver<T>,
) -> impl futures_core::Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
{
    struct S<T>(mpsc::UnboundedReceiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

/// An app whose `/up` handler upgrades the connection (`101`) and hands the upgraded IO to
/// the test, which decides when to drop it.
fn upgrade_app() -> (Router, mpsc::UnboundedReceiver<hyper::upgrade::Upgraded>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new().route(
        "/up",
        get(move |mut req: Request| {
            let tx = tx.clone();
            async move {
                let on_upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(upgraded) = on_upgrade.await {
                        let _ = tx.send(upgraded);
                    }
                });
                http::Response::builder()
                    .status(http::StatusCode::SWITCHING_PROTOCOLS)
                    .header("connection", "upgrade")
                    .header("upgrade", "test")
                    .body(Body::empty())
                    .unwrap()
            }
        }),
    );
    (router, rx)
}

/// Opens an upgraded connection and returns the client's side and the server's upgraded IO.
async fn upgraded(
    addr: SocketAddr,
    rx: &mut mpsc::UnboundedReceiver<hyper::upgrade::Upgraded>,
) -> (TcpStream, hyper::upgrade::Upgraded) {
    let mut client = send(
        addr,
        b"GET /up HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: test\r\n\r\n",
    )
    .await;
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = timeout(BOUND, client.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(n, 0);
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    let upgraded = timeout(BOUND, rx.recv()).await.unwrap().unwrap();
    (client, upgraded)
}

/// `serve` returns only after an upgraded connection ends, though its connection task ended
/// at the `101`.
#[tokio::test]
async fn graceful_shutdown_waits_for_upgraded_connections() {
    let (router, mut rx) = upgrade_app();
    let mut server = Server::start(router, Duration::from_secs(60)).await;
    let (_client, upgraded) = upgraded(server.addr, &mut rx).await;

    server.shutdown();
    // Not a bound on anything that must happen: a window for a wrong early return.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !server.task.is_finished(),
        "serve returned while an upgraded connection was open"
    );
    drop(upgraded);
    server.stopped(BOUND).await;
}

/// ...but not past the drain period and the final second: the upgraded IO belongs to its
/// handler's task, which `serve` cannot drop.
#[tokio::test]
async fn hard_stop_does_not_wait_for_upgraded_connections() {
    let (router, mut rx) = upgrade_app();
    let drain = Duration::from_millis(100);
    let mut server = Server::start(router, drain).await;
    let (_client, _upgraded) = upgraded(server.addr, &mut rx).await;

    server.shutdown();
    server.stopped(stop_bound(drain)).await;
}

/// At the connection limit, accepting waits: a second client is served once the first
/// connection ends, and nothing is refused meanwhile.
#[tokio::test]
async fn max_connections_makes_accept_wait() {
    let (router, _reports) = app();
    let (addr, _server) = spawn_server(|l| serve(l, router).max_connections(1).into_future()).await;

    let mut first = send(addr, b"GET /hello HTTP/1.1\r\nhost: test\r\n\r\n").await;
    read_until(&mut first, "hello").await;
    let mut buf = [0; 1024];
    // Connected (the kernel's backlog takes it), but not served while `first` is open.
    let mut second = send(
        addr,
        b"GET /hello HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n",
    )
    .await;
    // Not a bound on anything that must happen: a window for a wrong answer.
    let early = timeout(Duration::from_millis(200), second.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond the limit: {early:?}");
    drop(first);
    let response = read_to_end(&mut second).await;
    assert!(response.ends_with("hello"), "{response}");
}

#[cfg(unix)]
/// A listener that yields one connection, then fails with `EMFILE` (too many open files)
/// a few times, recording when each `accept` was called.
#[cfg(unix)]
struct Exhausted {
    calls: std::sync::Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
    conn: Option<tokio::net::UnixStream>,
    failures: usize,
}

#[cfg(unix)]
impl tower_reqctx::Listener for Exhausted {
    type Io = tokio::net::UnixStream;
    type Addr = ();

    async fn accept(&mut self) -> std::io::Result<(Self::Io, Option<SocketAddr>)> {
        self.calls.lock().unwrap().push(tokio::time::Instant::now());
        if let Some(conn) = self.conn.take() {
            return Ok((conn, None));
        }
        if self.failures == 0 {
            pending::<()>().await;
        }
        self.failures -= 1;
        Err(std::io::Error::from_raw_os_error(24))
    }

    fn local_addr(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts `error` events.
struct CountErrors(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl tracing_core::Subscriber for CountErrors {
    fn enabled(&self, _: &tracing_core::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing_core::span::Attributes<'_>) -> tracing_core::span::Id {
        tracing_core::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing_core::span::Id, _: &tracing_core::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing_core::span::Id, _: &tracing_core::span::Id) {}
    fn event(&self, event: &tracing_core::Event<'_>) {
        if *event.metadata().level() == tracing_core::Level::ERROR {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing_core::span::Id) {}
    fn exit(&self, _: &tracing_core::span::Id) {}
}

/// After an accept error that is not about one connection (fds ran out), accepting pauses
/// 5 ms, then 10, 20, 40...: a connection ending during a pause does not cut it short
/// (the server's `select!` drops the accept future then). Only the first error of the run
/// is logged at `error`.
#[cfg(unix)]
#[tokio::test(start_paused = true)]
async fn accept_errors_pause_for_real_and_log_one_error() {
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dispatch = tracing_core::Dispatch::new(CountErrors(errors.clone()));
    let _default = tracing_core::dispatcher::set_default(&dispatch);

    let (server_side, client_side) = tokio::net::UnixStream::pair().unwrap();
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = Exhausted {
        calls: calls.clone(),
        conn: Some(server_side),
        failures: 6,
    };
    let (router, _reports) = app();
    let server = tokio::spawn(serve(listener, router).into_future());
    // The connection ends in the middle of the third pause (5 + 10 + 20 ms from the first
    // error), waking the server's `select!`.
    tokio::time::sleep(Duration::from_millis(25)).await;
    drop(client_side);
    tokio::time::sleep(Duration::from_secs(5)).await;

    let calls = calls.lock().unwrap().clone();
    // One success, six errors, then the call that waits.
    assert_eq!(calls.len(), 8, "{calls:?}");
    let gaps: Vec<Duration> = calls[1..].windows(2).map(|w| w[1] - w[0]).collect();
    let expected = [5, 10, 20, 40, 80, 160].map(Duration::from_millis);
    for (gap, expected) in gaps.iter().zip(expected) {
        assert!(
            *gap >= expected,
            "gaps {gaps:?}, expected at least {expected:?}"
        );
    }
    assert_eq!(errors.load(std::sync::atomic::Ordering::Relaxed), 1);
    server.abort();
}

/// A client that connects and says nothing is dropped at the header-read timeout: hyper-util
/// waits for a connection's first bytes without one, and hyper's starts only after them.
/// One that has spoken is not.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_header_read_timeout() {
    let (router, _reports) = app();
    let (addr, _server) = spawn_server(|l| {
        serve(l, router)
            .header_read_timeout(Duration::from_millis(300))
            .into_future()
    })
    .await;

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut busy = send(addr, b"GET /hello HTTP/1.1\r\nhost: test\r\n\r\n").await;
    read_until(&mut busy, "hello").await;
    let mut buf = [0; 1024];
    let n = timeout(BOUND, silent.read(&mut buf))
        .await
        .expect("the silent connection was kept")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// A header-read timeout too long for the clock is a long timeout, not a panic in every
/// connection's task.
#[tokio::test]
async fn an_endless_header_read_timeout_does_not_overflow() {
    let (router, _reports) = app();
    let (addr, _server) = spawn_server(|l| {
        serve(l, router)
            .header_read_timeout(Duration::MAX)
            .into_future()
    })
    .await;
    let request = b"GET /hello HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n";
    let response = read_to_end(&mut send(addr, request).await).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
    assert!(response.ends_with("hello"), "{response:?}");
}

/// Reads `s` until the server closes it (an end of file or a reset), failing after
/// [`BOUND`]. What was read.
async fn read_until_closed(s: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0; 4096];
    timeout(BOUND, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server kept the connection open");
    String::from_utf8_lossy(&seen).into_owned()
}

/// A slowloris client, which sends part of a request head and then nothing more, is closed
/// at the header-read timeout, not before (and gets no response).
#[tokio::test]
async fn a_partial_request_head_is_closed_at_the_header_read_timeout() {
    const LIMIT: Duration = Duration::from_millis(300);
    let (router, _reports) = app();
    let (addr, _server) =
        spawn_server(|l| serve(l, router).header_read_timeout(LIMIT).into_future()).await;

    let mut slow = TcpStream::connect(addr).await.unwrap();
    let sent = tokio::time::Instant::now();
    slow.write_all(b"GET /hello HTTP/1.1\r\nhost: te")
        .await
        .unwrap();
    let answer = read_until_closed(&mut slow).await;
    let closed = sent.elapsed();
    assert!(closed >= LIMIT, "closed after {closed:?}, before {LIMIT:?}");
    assert_eq!(answer, "", "a response to a partial head");
}

/// Each request head on a keep-alive connection has the whole header-read timeout from the
/// end of the response before it. Here the first response ends after the first head's own
/// deadline would have been halfway through, so a timer still counting from the first
/// head would close the connection early.
#[tokio::test]
async fn each_head_on_a_keep_alive_connection_gets_the_whole_header_read_timeout() {
    const LIMIT: Duration = Duration::from_millis(400);
    const WORK: Duration = Duration::from_millis(250);
    let router = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(WORK).await;
            "slow"
        }),
    );
    let (addr, _server) =
        spawn_server(|l| serve(l, router).header_read_timeout(LIMIT).into_future()).await;

    let mut client = send(addr, b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n").await;
    let first = read_until(&mut client, "slow").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first:?}");
    let answered = tokio::time::Instant::now();
    client
        .write_all(b"GET /slow HTTP/1.1\r\nhost: te")
        .await
        .unwrap();
    let answer = read_until_closed(&mut client).await;
    let closed = answered.elapsed();
    assert!(
        closed >= LIMIT,
        "closed {closed:?} after the first response, before {LIMIT:?}"
    );
    assert_eq!(answer, "", "a response to a partial head");
}
