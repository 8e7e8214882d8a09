//! `sse()` over a real socket: a client that leaves while the event stream is idle ends
//! the stream, with `ClientDisconnected`.
#![cfg(feature = "axum")]

use std::convert::Infallible;
use std::future::IntoFuture;
use std::pin::Pin;
use std::task::{Context as Cx, Poll};

use axum::Router;
use axum::response::sse::Event;
use axum::routing::get;
use futures_core::Stream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower_reqctx::reqctx::Cause;
use tower_reqctx::{ContextLayer, ReqCtx, serve};

use reqctx_test_support::{BOUND, read_until, send, spawn_server};

/// One event, then nothing, forever; reports its drop.
struct OneThenIdle {
    sent: bool,
    dropped: mpsc::UnboundedSender<()>,
}

impl Stream for OneThenIdle {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Cx<'_>) -> Poll<Option<Self::Item>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Event::default().data("hello"))))
    }
}

impl Drop for OneThenIdle {
    fn drop(&mut self) {
        let _ = self.dropped.send(());
    }
}

#[tokio::test]
async fn a_client_leaving_ends_the_event_stream() {
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let (cause_tx, mut causes) = mpsc::unbounded_channel();
    let handler = move |ctx: ReqCtx| {
        let stream = OneThenIdle {
            sent: false,
            dropped: dropped_tx.clone(),
        };
        let waiter = ctx.0.clone();
        let cause_tx = cause_tx.clone();
        tokio::spawn(async move {
            waiter.cancelled().await;
            let _ = cause_tx.send(waiter.cause());
        });
        async move { tower_reqctx::sse(&ctx, stream) }
    };
    let app = Router::new()
        .route("/events", get(handler))
        .layer(ContextLayer::new());
    let (addr, server) = spawn_server(|l| serve(l, app).into_future()).await;

    let mut client = send(addr, b"GET /events HTTP/1.1\r\nhost: test\r\n\r\n").await;
    let head = read_until(&mut client, "data: hello").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");

    // The stream is idle: only the watcher can tell that the client left.
    drop(client);
    let cause = timeout(BOUND, causes.recv()).await.unwrap().unwrap();
    assert_eq!(cause, Some(Cause::ClientDisconnected));
    timeout(BOUND, dropped.recv())
        .await
        .expect("the event stream was not dropped within the bound")
        .unwrap();

    server.abort();
}
