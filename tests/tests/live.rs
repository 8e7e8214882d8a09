//! `live_request_contexts` counts what is alive and falls back to zero: the leak check the
//! soak relies on. Alone in its file (its own process): the counter is global.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use reqctx_tests::{Running, Server, http_get, probe, send};
use tower_reqctx::{ContextLayer, ReqCtx, live_request_contexts};

/// Polls until the count is `n` (drops have no signal to wait on), failing after 5 s.
async fn settles_at(n: usize) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
    while live_request_contexts() != n {
        assert!(
            tokio::time::Instant::now() < give_up,
            "live request contexts: {} (want {n})",
            live_request_contexts()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn counts_in_flight_and_kept_contexts_and_returns_to_zero() {
    let (tx, mut probe) = probe();
    let (t1, t2) = (tx.clone(), tx);
    let app = Router::new()
        .route("/", get(|| async { "hi" }))
        .route(
            "/wait",
            get(move |ctx: ReqCtx| async move {
                t1.send(ctx.0.clone()).unwrap();
                ctx.cancelled().await;
                "gone"
            }),
        )
        .route(
            "/keep",
            get(move |ctx: ReqCtx| async move {
                t2.send(ctx.0.clone()).unwrap(); // the test holds a clone after the response
                "kept"
            }),
        )
        .layer(ContextLayer::new());
    let srv = Running::start(Server::Serve, app, Duration::from_millis(100)).await;
    settles_at(0).await;

    for _ in 0..20 {
        assert_eq!(http_get(srv.addr, "/").await.0, 200);
    }
    settles_at(0).await;

    // Three requests waiting in their handlers.
    let mut conns = Vec::new();
    let mut held = Vec::new();
    for _ in 0..3 {
        let s = send(srv.addr, b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n").await;
        held.push(probe.started().await);
        conns.push(s);
    }
    drop(held);
    settles_at(3).await;
    drop(conns); // the clients leave
    settles_at(0).await;

    // A context a task keeps stays counted until it is dropped.
    assert_eq!(http_get(srv.addr, "/keep").await.0, 200);
    let kept = probe.started().await;
    settles_at(1).await;
    drop(kept);
    settles_at(0).await;
    srv.shutdown().await.unwrap();
}
