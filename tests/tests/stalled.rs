//! A deadline reaches parked work while the client does not read: hyper stops polling
//! the response body (its write buffer or the HTTP/2 window is full), so nothing of the
//! layer's runs, yet every waiter on the request's context (a `cancelled()` future, a
//! `ctx.spawn` task, a `token()`, an `on_cancel` callback) must wake at the deadline.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use futures_util::stream::repeat_with;
use reqctx::{Cause, DeadlineOrigin};
use reqctx_tests::{BOUND, Running, Server, connect, endless, send};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tower_reqctx::{ContextLayer, ReqCtx};

/// What each waiter saw, sent when it woke.
type Woke = mpsc::UnboundedSender<(&'static str, Option<Cause>)>;

/// How the endless response body produces its chunks.
#[derive(Clone, Copy, Debug)]
enum Chunks {
    /// 64 KiB every millisecond: the body is pending between chunks.
    Timed,
    /// 64 KiB whenever polled: the body is never pending, hyper alone stops polling it.
    AlwaysReady,
}

/// A handler that parks four kinds of work on its context, then streams without end (far
/// more than a socket buffer holds).
fn app(woke: Woke, chunks: Chunks) -> Router {
    Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| {
                let woke = woke.clone();
                async move {
                    let (w1, w2, w3, w4) = (woke.clone(), woke.clone(), woke.clone(), woke);
                    let waiter = ctx.0.clone();
                    tokio::spawn(async move {
                        waiter.cancelled().await;
                        let _ = w1.send(("cancelled()", waiter.cause()));
                    });
                    let task = ctx.spawn(std::future::pending::<()>());
                    tokio::spawn(async move {
                        let cause = task.await.unwrap().unwrap_err().into_cause();
                        let _ = w2.send(("spawn", Some(cause)));
                    });
                    let token = ctx.token();
                    let holder = ctx.0.clone();
                    tokio::spawn(async move {
                        token.cancelled().await;
                        let _ = w3.send(("token()", holder.cause()));
                    });
                    ctx.on_cancel(move |cause| {
                        let _ = w4.send(("on_cancel", Some(cause.clone())));
                    });
                    static CHUNK: [u8; 65536] = [b'x'; 65536];
                    match chunks {
                        Chunks::Timed => {
                            Body::from_stream(endless(&CHUNK, Duration::from_millis(1)))
                        }
                        Chunks::AlwaysReady => Body::from_stream(repeat_with(|| {
                            Ok::<_, std::io::Error>(bytes::Bytes::from_static(&CHUNK))
                        })),
                    }
                }
            }),
        )
        .layer(ContextLayer::new().timeout(Duration::from_millis(300)))
}

async fn all_woke(rx: &mut mpsc::UnboundedReceiver<(&'static str, Option<Cause>)>, what: &str) {
    let layer = Some(Cause::DeadlineExceeded {
        origin: DeadlineOrigin::Layer,
    });
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (who, cause) = tokio::time::timeout(BOUND, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: only {seen:?} woke at the deadline"))
            .unwrap();
        assert_eq!(cause, layer, "{what}: {who}");
        seen.push(who);
    }
}

#[tokio::test]
async fn an_http1_client_that_never_reads() {
    let cases = [Server::Serve, Server::AxumPlain]
        .into_iter()
        .flat_map(|server| [(server, Chunks::Timed), (server, Chunks::AlwaysReady)]);
    for (server, chunks) in cases {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let running = Running::start(server, app(tx, chunks), BOUND).await;
        let mut s = send(running.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        // The client keeps the socket open and reads nothing.
        all_woke(&mut rx, &format!("{server:?}, {chunks:?}")).await;
        if server == Server::Serve {
            // serve closes the connection at the deadline: what was buffered, then the end
            // (a clean close or a reset), never more data for ever.
            let mut sink = vec![0u8; 1 << 16];
            let ended = tokio::time::timeout(BOUND, async {
                loop {
                    match s.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(
                ended.is_ok(),
                "serve should close a stalled HTTP/1 connection ({chunks:?})"
            );
        }
        drop(s);
        running.abort();
    }
}

#[tokio::test]
async fn an_http2_stream_with_no_window() {
    for chunks in [Chunks::Timed, Chunks::AlwaysReady] {
        an_http2_stream_with_no_window_of(chunks).await;
    }
}

async fn an_http2_stream_with_no_window_of(chunks: Chunks) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let running = Running::start(Server::Serve, app(tx, chunks), BOUND).await;
    let tcp = connect(running.addr).await;
    let (mut h2, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(format!("http://{}/", running.addr))
        .body(())
        .unwrap();
    let (res, _) = h2.send_request(req, true).unwrap();
    let res = res.await.unwrap();
    assert_eq!(res.status(), 200);
    // The stream's window is zero and the client never releases capacity.
    all_woke(&mut rx, &format!("HTTP/2, {chunks:?}")).await;
    drop((res, h2));
    conn.abort();
    running.abort();
}
