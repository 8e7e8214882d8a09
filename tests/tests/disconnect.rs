//! A client that goes away, over real sockets: every case hyper sees and every case it
//! misses (MEASUREMENTS.md), under `serve`, `axum::serve` + `WatchedListener`, and (where
//! hyper or the guards can see it) plain `axum::serve`.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use reqctx::{Cause, Context};
use reqctx_tests::{
    Probe, ProbeTx, Running, Server, cause_of, endless, h2_client, probe, reset, send,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tower_reqctx::{ContextLayer, ReqCtx};

/// `/wait` waits for its context; `/upload` does the same without reading its body;
/// `/stream` streams forever; `/firehose` streams as fast as it can.
fn app(tx: ProbeTx) -> Router {
    let (t1, t2, t3, t4) = (tx.clone(), tx.clone(), tx.clone(), tx);
    Router::new()
        .route(
            "/wait",
            get(move |ctx: ReqCtx| async move {
                t1.send(ctx.0.clone()).unwrap();
                ctx.cancelled().await;
                "cancelled"
            }),
        )
        .route(
            "/upload",
            post(move |ctx: ReqCtx, _body: Body| async move {
                t2.send(ctx.0.clone()).unwrap();
                ctx.cancelled().await;
                "never read it"
            }),
        )
        .route(
            "/stream",
            get(move |ctx: ReqCtx| async move {
                t3.send(ctx.0.clone()).unwrap();
                Body::from_stream(endless(b"data: tick\n\n", Duration::from_millis(5)))
            }),
        )
        .route(
            "/firehose",
            get(move |ctx: ReqCtx| async move {
                t4.send(ctx.0.clone()).unwrap();
                Body::from_stream(endless(&[b'x'; 16384], Duration::from_micros(1)))
            }),
        )
        .layer(ContextLayer::new())
}

async fn start(server: Server) -> (Running, Probe) {
    let (tx, probe) = probe();
    (
        Running::start(server, app(tx), Duration::from_millis(100)).await,
        probe,
    )
}

/// A fresh `server`, a connection that has sent `request`, and the context of the handler
/// it started.
async fn started(server: Server, request: &[u8]) -> (Running, TcpStream, Context) {
    let (srv, mut probe) = start(server).await;
    let s = send(srv.addr, request).await;
    let ctx = probe.started().await;
    (srv, s, ctx)
}

/// Once the client has gone: `ctx` ends with `ClientDisconnected`; then `srv` shuts down.
async fn client_left(srv: Running, ctx: &Context, what: impl std::fmt::Debug) {
    assert_eq!(cause_of(ctx).await, Cause::ClientDisconnected, "{what:?}");
    srv.shutdown().await.unwrap();
}

const WATCHED: [Server; 2] = [Server::Serve, Server::AxumWatched];
const ALL: [Server; 3] = [Server::Serve, Server::AxumWatched, Server::AxumPlain];

#[tokio::test]
async fn get_closed_mid_handler() {
    for server in ALL {
        let (srv, s, ctx) = started(server, b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n").await;
        drop(s);
        client_left(srv, &ctx, server).await;
    }
}

#[tokio::test]
async fn get_reset_mid_handler() {
    for server in ALL {
        let (srv, s, ctx) = started(server, b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n").await;
        reset(s);
        client_left(srv, &ctx, server).await;
    }
}

/// hyper misses these: the body is unread, so it does not read the socket.
#[tokio::test]
async fn post_with_unread_body_then_close_or_reset() {
    for server in WATCHED {
        for rst in [false, true] {
            let head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n";
            let request = [&head[..], &[b'a'; 40_000]].concat(); // part of the body
            let (srv, s, ctx) = started(server, &request).await;
            if rst {
                reset(s);
            } else {
                drop(s);
            }
            client_left(srv, &ctx, (server, rst)).await;
        }
    }
}

/// hyper misses this too: the second request sits in its read buffer.
#[tokio::test]
async fn pipelined_request_then_close() {
    for server in WATCHED {
        let (srv, s, ctx) = started(
            server,
            b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\nGET /wait HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .await;
        drop(s);
        client_left(srv, &ctx, server).await;
    }
}

#[tokio::test]
async fn streaming_body_then_close() {
    for server in ALL {
        let (srv, mut s, ctx) = started(server, b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        assert_eq!(ctx.cause(), None, "{server:?}: still streaming");
        drop(s);
        client_left(srv, &ctx, server).await;
    }
}

/// The client stops reading (the server's writes stall), then closes: hyper sees nothing
/// while it is stalled; the watcher sees the close.
#[tokio::test]
async fn client_that_stops_reading_then_closes() {
    for server in WATCHED {
        let (srv, mut s, ctx) = started(server, b"GET /firehose HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let mut buf = vec![0u8; 65536];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        // Stop reading; let the buffers fill. Nothing ends the context meanwhile.
        let stalled = tokio::time::timeout(Duration::from_millis(300), ctx.cancelled()).await;
        assert!(
            stalled.is_err(),
            "{server:?}: not cancelled while merely slow"
        );
        drop(s); // unread data in our receive buffer: the kernel sends an RST
        client_left(srv, &ctx, server).await;
    }
}

#[tokio::test]
async fn http2_stream_reset_keeps_the_connection() {
    for server in ALL {
        let (srv, mut probe) = start(server).await;
        let (mut send, conn) = h2_client(srv.addr).await;
        let req = http::Request::get(format!("http://{}/wait", srv.addr))
            .body(())
            .unwrap();
        let (_response, mut stream) = send.send_request(req, true).unwrap();
        let ctx = probe.started().await;
        stream.send_reset(h2::Reason::CANCEL);
        assert_eq!(
            cause_of(&ctx).await,
            Cause::ClientDisconnected,
            "{server:?}"
        );

        // The connection is still good: a second stream on it gets its own context.
        let mut send = send.ready().await.unwrap();
        let req = http::Request::get(format!("http://{}/wait", srv.addr))
            .body(())
            .unwrap();
        let (_response2, _stream2) = send.send_request(req, true).unwrap();
        let ctx2 = probe.started().await;
        assert_eq!(
            ctx2.cause(),
            None,
            "{server:?}: the reset was one stream's only"
        );
        conn.abort();
        srv.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn http2_connection_close() {
    for server in ALL {
        let (srv, mut probe) = start(server).await;
        let (mut send, conn) = h2_client(srv.addr).await;
        let req = http::Request::get(format!("http://{}/wait", srv.addr))
            .body(())
            .unwrap();
        let (_response, _stream) = send.send_request(req, true).unwrap();
        let ctx = probe.started().await;
        conn.abort(); // drops the connection: the socket closes
        drop(send);
        client_left(srv, &ctx, server).await;
    }
}
