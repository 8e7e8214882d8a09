//! A WebSocket upgrade: the request's context does not end at the 101; it lives until the
//! upgraded connection closes (`ClientDisconnected`) or the handler's task drops it
//! (`Completed`), and the watcher keeps watching. Real client: tokio-tungstenite.

use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use reqctx::Cause;
use reqctx_tests::{BOUND, Running, Server, cause_of, connect, probe};
use tokio_tungstenite::tungstenite::Message as ClientMessage;
use tower_reqctx::{ContextLayer, ReqCtx};

/// `/echo` echoes until the client leaves; `/once` answers one message, then its task ends.
fn app(tx: reqctx_tests::ProbeTx) -> Router {
    let t2 = tx.clone();
    Router::new()
        .route(
            "/echo",
            get(move |ctx: ReqCtx, ws: WebSocketUpgrade| async move {
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
        .route(
            "/once",
            get(move |ctx: ReqCtx, ws: WebSocketUpgrade| async move {
                t2.send(ctx.0.clone()).unwrap();
                ws.on_upgrade(|mut socket| async move {
                    if let Some(Ok(msg)) = socket.recv().await {
                        let _ = socket.send(msg).await;
                    }
                    // The task ends here and drops the socket.
                })
            }),
        )
        // A short server timeout: it must not cut the WebSocket short.
        .layer(ContextLayer::new().timeout(Duration::from_millis(50)))
}

async fn ws_client(
    addr: std::net::SocketAddr,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let tcp = connect(addr).await;
    let (ws, res) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), tcp)
        .await
        .unwrap();
    assert_eq!(res.status(), 101);
    ws
}

#[tokio::test]
async fn the_context_outlives_the_101_and_ends_when_the_client_leaves() {
    for server in [Server::Serve, Server::AxumWatched] {
        let (tx, mut probe) = probe();
        let srv = Running::start(server, app(tx), Duration::from_millis(100)).await;
        let mut ws = ws_client(srv.addr, "/echo").await;
        let ctx = probe.started().await;
        // Well past the 101 and past the 50 ms server timeout: still alive.
        for i in 0..3 {
            ws.send(ClientMessage::text(format!("ping {i}")))
                .await
                .unwrap();
            let echo = tokio::time::timeout(BOUND, ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(echo.into_text().unwrap().as_str(), format!("ping {i}"));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(
            ctx.cause(),
            None,
            "{server:?}: alive while the WebSocket is"
        );
        drop(ws); // TCP close, no WebSocket close frame
        assert_eq!(
            cause_of(&ctx).await,
            Cause::ClientDisconnected,
            "{server:?}"
        );
        srv.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn the_context_completes_when_the_handlers_task_ends() {
    let (tx, mut probe) = probe();
    let srv = Running::start(Server::Serve, app(tx), Duration::from_millis(100)).await;
    let mut ws = ws_client(srv.addr, "/once").await;
    let ctx = probe.started().await;
    assert_eq!(ctx.cause(), None);
    ws.send(ClientMessage::text("hello")).await.unwrap();
    let echo = tokio::time::timeout(BOUND, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo, ClientMessage::text("hello"));
    assert_eq!(cause_of(&ctx).await, Cause::Completed);
    drop(ws);
    srv.shutdown().await.unwrap();
}
