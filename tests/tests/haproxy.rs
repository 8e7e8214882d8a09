//! A real HAProxy (Debian's `haproxy`) in front of `tower_reqctx::serve`, configured as
//! docs/guide.md's recipe gives it: HTTP/2 from the client (`proto h2` on the `bind`
//! line) and to the app (`proto h2` on the `server` line, `serve`'s cleartext HTTP/2 by
//! prior knowledge). A client that resets its stream is seen by the handler as
//! `ClientDisconnected`, and the connection through HAProxy serves the next stream.
//!
//! Without `haproxy` on the `PATH` the test says that it skipped, unless
//! `REQCTX_HAPROXY_REQUIRED=1` (CI), which makes that a failure.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::post;
use reqctx::Cause;
use reqctx_tests::{BOUND, Running, Server, cause_of, h2_client, probe};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tower_reqctx::{ContextLayer, ReqCtx};

/// The guide's recipe, with this run's ports.
fn config(front: u16, app: u16) -> String {
    format!(
        "defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend front_h2
    bind 127.0.0.1:{front} proto h2
    default_backend app_h2

backend app_h2
    server app 127.0.0.1:{app} proto h2
"
    )
}

/// HAProxy running `config` in the foreground; killed when dropped.
struct Haproxy {
    _child: Child,
    _config: TempFile,
}

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts HAProxy, or says why it cannot (no `haproxy` on the `PATH`).
fn start(config: &str) -> Option<Haproxy> {
    if !reqctx_tests::tool_on_path("haproxy", "-v", "REQCTX_HAPROXY_REQUIRED") {
        return None;
    }
    let path = std::env::temp_dir().join(format!(
        "reqctx-haproxy-{}-{:?}.cfg",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, config).unwrap();
    let config = TempFile(path);
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&config.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start haproxy");
    Some(Haproxy {
        _child: child,
        _config: config,
    })
}

/// A port nothing listens on now (bound, then released for HAProxy to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `addr` accepts connections.
async fn listening(addr: SocketAddr) {
    tokio::time::timeout(BOUND, async {
        while TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("HAProxy did not start listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_h2_forwards_a_stream_reset_as_client_disconnected() {
    let (tx, mut started) = probe();
    let app = Router::new()
        .route(
            "/upload",
            post(move |ctx: ReqCtx, _body: Body| async move {
                tx.send(ctx.0.clone()).unwrap();
                ctx.cancelled().await;
                "never read it"
            }),
        )
        .layer(ContextLayer::new());
    let server = Running::start(Server::Serve, app, Duration::from_millis(50)).await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let Some(_haproxy) = start(&config(front.port(), server.addr.port())) else {
        return;
    };
    listening(front).await;

    let (mut send, _conn) = h2_client(front).await;
    for round in 0..3 {
        send = send.ready().await.unwrap();
        let req = http::Request::post(format!("http://{front}/upload"))
            .body(())
            .unwrap();
        let (_response, mut stream) = send.send_request(req, false).unwrap();
        // A complete request: HAProxy could pass it on over HTTP/1.1 and keep that
        // connection (an unfinished one would force it to close the connection).
        stream
            .send_data(Bytes::from_static(b"a whole upload"), true)
            .unwrap();
        let ctx = started.started().await;
        assert!(
            !ctx.is_cancelled(),
            "round {round}: cancelled before the reset"
        );
        stream.send_reset(h2::Reason::CANCEL);
        assert_eq!(
            cause_of(&ctx).await,
            Cause::ClientDisconnected,
            "round {round}"
        );
    }
    server.abort();
}
