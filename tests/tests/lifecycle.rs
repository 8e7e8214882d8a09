//! Deadlines, completion, bad input, shutdown and panics over real sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use axum::routing::get;
use reqctx::{Cause, DeadlineOrigin};
use reqctx_tests::{Running, Server, cause_of, endless, http_get, http1, probe, read_to_end, send};
use tokio::io::AsyncReadExt;
use tower_reqctx::{ContextLayer, HandlerPanicked, ReqCtx, RouteTimeout};

const DRAIN: Duration = Duration::from_millis(100);

#[tokio::test]
async fn query_timeout_answers_504_at_the_deadline() {
    let (tx, mut probe) = probe();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                ctx.run(std::future::pending::<()>())
                    .await
                    .map(|()| "never")
            }),
        )
        .layer(ContextLayer::new().timeout(Duration::from_secs(10)));
    let srv = Running::start(Server::Serve, app, DRAIN).await;
    let start = Instant::now();
    let (status, body) = http_get(srv.addr, "/?timeout=50ms").await;
    let took = start.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(took >= Duration::from_millis(50), "{took:?}");
    // At the query's deadline, not the layer's 10 s: the origin says which timer fired,
    // where an upper bound on `took` would measure the machine.
    let ctx = probe.started().await;
    assert_eq!(
        ctx.cause(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Query
        })
    );
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn route_timeout_against_query_both_orders_and_no_timeout() {
    let (tx, mut probe) = probe();
    let (t1, t2) = (tx.clone(), tx);
    let app = Router::new()
        .route(
            "/report",
            get(move |ctx: ReqCtx| async move {
                t1.send(ctx.0.clone()).unwrap();
                ctx.run(std::future::pending::<()>())
                    .await
                    .map(|()| "never")
            })
            .layer(RouteTimeout::new(Duration::from_millis(150))),
        )
        .route(
            "/events",
            get(move |ctx: ReqCtx| async move {
                t2.send(ctx.0.clone()).unwrap();
                format!("{:?}", ctx.deadline().is_some())
            })
            .layer(RouteTimeout::none()),
        )
        .layer(ContextLayer::new().timeout(Duration::from_millis(40)));
    let srv = Running::start(Server::Serve, app, DRAIN).await;

    let origin = |ctx: &reqctx::Context| ctx.cause().and_then(|c| c.deadline_origin());
    // The route's 150 ms replaces the server's 40 ms; a 60 ms query is earlier still.
    let (status, _) = http_get(srv.addr, "/report?timeout=60ms").await;
    assert_eq!(status, 504);
    assert_eq!(origin(&probe.started().await), Some(DeadlineOrigin::Query));
    // A 1 s query cannot lengthen the route's 150 ms.
    let start = Instant::now();
    let (status, _) = http_get(srv.addr, "/report?timeout=1s").await;
    assert_eq!(status, 504);
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert_eq!(origin(&probe.started().await), Some(DeadlineOrigin::Layer));
    // no_timeout removes the server's.
    let (status, body) = http_get(srv.addr, "/events").await;
    assert_eq!((status, body.as_str()), (200, "false"));
    assert_eq!(probe.started().await.cause(), Some(Cause::Completed));
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_timeouts_get_400_and_the_handler_never_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || async move {
                r.fetch_add(1, Ordering::SeqCst);
                "ran"
            }),
        )
        .layer(ContextLayer::new());
    let srv = Running::start(Server::Serve, app, DRAIN).await;
    let digits = "9".repeat(10_000);
    for q in [
        "banana",
        "-5s",
        "0",
        "1.5",
        "%ZZ",
        "%FF%FEs",
        digits.as_str(),
    ] {
        let (status, body) = http_get(srv.addr, &format!("/?timeout={q}")).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert!(
            body.starts_with("invalid `timeout` query parameter"),
            "{body}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Huge but well-formed: no deadline in practice, served normally.
    let (status, _) = http_get(srv.addr, "/?timeout=99999999999999999h").await;
    assert_eq!(status, 200);
    // Non-UTF-8 bytes in the raw request line.
    let mut s = send(
        srv.addr,
        b"GET /?timeout=\xff\xfe HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    let status = reqctx_tests::parse_response(read_to_end(&mut s).await.as_bytes()).0;
    assert_eq!(status, 400);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn normal_request_completes_and_stops_spawned_work() {
    let (tx, mut probe) = probe();
    let (task_tx, mut task_rx) = tokio::sync::mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                task_tx
                    .send(ctx.spawn(std::future::pending::<()>()))
                    .unwrap();
                "hello"
            }),
        )
        .layer(ContextLayer::new().timeout(Duration::from_secs(30)));
    let srv = Running::start(Server::Serve, app, DRAIN).await;
    assert_eq!(http_get(srv.addr, "/").await, (200, "hello".to_owned()));
    let ctx = probe.started().await;
    assert_eq!(cause_of(&ctx).await, Cause::Completed);
    let task = task_rx.recv().await.unwrap();
    assert_eq!(task.await.unwrap().unwrap_err().cause(), &Cause::Completed);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn full_head_and_304_end_completed() {
    let (tx, mut probe) = probe();
    let (t1, t2) = (tx.clone(), tx);
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                t1.send(ctx.0.clone()).unwrap();
                "a full body"
            }),
        )
        .route(
            "/cached",
            get(move |ctx: ReqCtx| async move {
                t2.send(ctx.0.clone()).unwrap();
                StatusCode::NOT_MODIFIED
            }),
        )
        .layer(ContextLayer::new());
    for server in [Server::Serve, Server::AxumPlain] {
        let srv = Running::start(server, app.clone(), DRAIN).await;
        for (req, status) in [
            (
                "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                200,
            ),
            (
                "HEAD / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                200,
            ),
            (
                "GET /cached HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                304,
            ),
        ] {
            assert_eq!(http1(srv.addr, req).await.0, status);
            let ctx = probe.started().await;
            assert_eq!(cause_of(&ctx).await, Cause::Completed, "{server:?} {req:?}");
        }
        srv.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn missing_layer_is_a_named_500() {
    let app = Router::new().route("/", get(|_ctx: ReqCtx| async { "unreachable" }));
    let srv = Running::start(Server::Serve, app, DRAIN).await;
    let (status, body) = http_get(srv.addr, "/").await;
    assert_eq!(status, 500);
    assert!(body.contains("tower_reqctx::ContextLayer::new()"), "{body}");
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panicking_handler_is_not_a_client_disconnect() {
    let (tx, mut probe) = probe();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                tokio::task::yield_now().await;
                if ctx.value::<u8>().is_none() {
                    panic!("a handler bug (expected by this test)");
                }
                "unreachable"
            }),
        )
        .layer(ContextLayer::new());
    let srv = Running::start(Server::Serve, app, DRAIN).await;
    let s = send(srv.addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let ctx = probe.started().await;
    let cause = cause_of(&ctx).await;
    assert!(
        cause.downcast_ref::<HandlerPanicked>().is_some(),
        "{cause:?}"
    );
    drop(s);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_ends_an_infinite_stream_and_serve_returns() {
    let (tx, mut probe) = probe();
    let (t1, t2) = (tx.clone(), tx);
    let app = Router::new()
        .route(
            "/events",
            get(move |ctx: ReqCtx| async move {
                t1.send(ctx.0.clone()).unwrap();
                Body::from_stream(endless(b"data: tick\n\n", Duration::from_millis(10)))
            }),
        )
        .route(
            "/slow",
            get(move |ctx: ReqCtx| async move {
                t2.send(ctx.0.clone()).unwrap();
                ctx.run(std::future::pending::<()>())
                    .await
                    .map(|()| "never")
            }),
        )
        .layer(ContextLayer::new());
    let srv = Running::start(Server::Serve, app, DRAIN).await;
    let mut sse = send(srv.addr, b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let stream_ctx = probe.started().await;
    let mut slow = send(srv.addr, b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let slow_ctx = probe.started().await;
    let mut buf = [0u8; 256];
    assert!(sse.read(&mut buf).await.unwrap() > 0, "the stream flows");

    let start = Instant::now();
    srv.shutdown().await.unwrap();
    assert!(
        start.elapsed() >= DRAIN,
        "in-flight requests had the drain period"
    );
    assert_eq!(stream_ctx.cause(), Some(Cause::Shutdown));
    assert_eq!(slow_ctx.cause(), Some(Cause::Shutdown));
    // The stream ended truncated, not cleanly: no terminating chunk.
    let mut rest = Vec::new();
    let _ = sse.read_to_end(&mut rest).await; // may end in a reset: what was read is checked
    assert!(!String::from_utf8_lossy(&rest).contains("0\r\n\r\n"));
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer).await; // likewise: the status below is the check
    assert_eq!(
        reqctx_tests::parse_response(&answer).0,
        503,
        "Cancelled(Shutdown) answers 503"
    );
}

#[tokio::test]
async fn a_valid_request_id_is_a_context_value() {
    use tower_reqctx::RequestId;
    let app = Router::new()
        .route(
            "/",
            get(|ctx: ReqCtx| async move {
                format!(
                    "{:?}",
                    ctx.value::<RequestId>().map(|id| id.as_str().to_owned())
                )
            }),
        )
        .layer(ContextLayer::new().request_id(http::HeaderName::from_static("x-request-id")));
    let srv = Running::start(Server::Serve, app, DRAIN).await;
    let with_id = |id: &str| {
        format!("GET / HTTP/1.1\r\nHost: t\r\nx-request-id: {id}\r\nConnection: close\r\n\r\n")
    };
    let (status, body) = http1(srv.addr, &with_id("abc-123")).await;
    assert_eq!(status, 200);
    assert_eq!(body, "Some(\"abc-123\")");
    // What the layer does not trust in logs is not put in the context.
    let (_, body) = http1(srv.addr, &with_id("two words")).await;
    assert_eq!(body, "None", "a space");
    let (_, body) = http1(srv.addr, &with_id(&"x".repeat(RequestId::MAX_LEN + 1))).await;
    assert_eq!(body, "None", "too long");
    let (_, body) = http1(srv.addr, &with_id(&"x".repeat(RequestId::MAX_LEN))).await;
    assert_eq!(body, format!("Some({:?})", "x".repeat(RequestId::MAX_LEN)));
    // The layer makes no ids of its own.
    let (_, body) = http_get(srv.addr, "/").await;
    assert_eq!(body, "None");
    srv.shutdown().await.unwrap();
}
