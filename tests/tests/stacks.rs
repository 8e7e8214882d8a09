//! The request's cause inside the stacks users really build, over real sockets: static
//! files (tower-http's `ServeDir`), compression, caught panics (both orders), tracing,
//! a fallible tower middleware inside axum's `HandleErrorLayer`, bodies that end with a
//! `Content-Length` or with trailers, a handler that answers with a `Cancelled`, and
//! upgrades. Each case read `ClientDisconnected` (or `Completed` where a cause was due)
//! before the lifecycle had one owner.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::handler::HandlerWithoutStateExt;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use http_body::Frame;
use reqctx::{Cancelled, Cause, DeadlineOrigin};
use reqctx_tests::{
    BOUND, Probe, ProbeTx, Running, Server, cause_of, connect, h2_client, http_get, http1,
    read_to_end, send,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::services::ServeDir;
use tower_http::trace::TraceLayer;
use tower_reqctx::{ContextLayer, HandlerPanicked, PanicResponse, ReqCtx, ServiceFailed};

const SERVERS: [Server; 3] = [Server::Serve, Server::AxumWatched, Server::AxumPlain];

/// A directory with one file of `len` bytes, unique to the test.
fn static_dir(name: &str, len: usize) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("reqctx-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(dir.join("file.txt"), body).unwrap();
    dir
}

/// A middleware that hands the request's context to the test, then calls the rest.
fn probed<S>(router: Router<S>, tx: ProbeTx) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let tx = tx.clone();
            async move {
                if let Some(ctx) = tower_reqctx::request_context() {
                    tx.send(ctx.clone()).unwrap();
                }
                next.run(req).await
            }
        },
    ))
}

#[tokio::test]
async fn a_static_file_is_completed_whole_and_by_range() {
    for server in SERVERS {
        let dir = static_dir("servedir", 200_000);
        let (tx, mut probe) = reqctx_tests::probe();
        let app = probed(Router::new().fallback_service(ServeDir::new(&dir)), tx)
            .layer(ContextLayer::new());
        let running = Running::start(server, app, BOUND).await;

        let (status, body) = http_get(running.addr, "/file.txt").await;
        assert_eq!(status, 200, "{server:?}");
        assert_eq!(body.len(), 200_000, "{server:?}");
        let ctx = probe.started().await;
        assert_eq!(
            cause_of(&ctx).await,
            Cause::Completed,
            "{server:?}: whole file"
        );

        // A keep-alive connection: the body is dropped after its last byte, and the
        // connection stays open, so nothing but the length can say it ended.
        let mut s = send(
            running.addr,
            b"GET /file.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=10-1009\r\n\r\n",
        )
        .await;
        let ctx = probe.started().await;
        assert_eq!(cause_of(&ctx).await, Cause::Completed, "{server:?}: range");
        let mut head = vec![0; 64];
        let n = s.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 206"), "{server:?}");

        // HEAD: no body at all.
        let (status, _) = http1(
            running.addr,
            "HEAD /file.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        let ctx = probe.started().await;
        assert_eq!(cause_of(&ctx).await, Cause::Completed, "{server:?}: HEAD");
        drop(s);
        running.abort();
    }
}

/// Sends `request` to `app` under `server` on a connection left open, and checks that
/// the request's context ends `Completed` even so: the server and the connection, for
/// what the test reads next.
async fn completed_on_a_kept_connection(
    server: Server,
    app: &Router,
    probe: &mut Probe,
    request: &[u8],
) -> (Running, TcpStream) {
    let running = Running::start(server, app.clone(), BOUND).await;
    let s = send(running.addr, request).await;
    let ctx = probe.started().await;
    assert_eq!(cause_of(&ctx).await, Cause::Completed, "{server:?}");
    (running, s)
}

#[tokio::test]
async fn a_stream_with_a_content_length_is_completed_on_a_kept_connection() {
    let (tx, mut probe) = reqctx_tests::probe();
    let stream = || async {
        let chunks = futures_util::stream::iter(
            [&b"hello "[..], b"world"].map(|c| Ok::<_, Infallible>(Bytes::from_static(c))),
        );
        ([("content-length", "11")], Body::from_stream(chunks))
    };
    let app = probed(Router::new().route("/", get(stream)), tx).layer(ContextLayer::new());
    for server in SERVERS {
        // The connection stays open: only the length says the body is over.
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let (running, s) = completed_on_a_kept_connection(server, &app, &mut probe, request).await;
        drop(s);
        running.abort();
    }
}

#[tokio::test]
async fn compression_and_tracing_outside_the_layer() {
    let (tx, mut probe) = reqctx_tests::probe();
    let text = || async { "compress me ".repeat(1000) };
    let app = probed(Router::new().route("/", get(text)), tx)
        .layer(ContextLayer::new())
        .layer(CompressionLayer::new())
        .layer(TraceLayer::new_for_http());
    for server in SERVERS {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n";
        let (running, mut s) =
            completed_on_a_kept_connection(server, &app, &mut probe, request).await;
        let mut head = vec![0; 512];
        let n = s.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
        assert!(head.contains("content-encoding: gzip"), "{head}");
        drop(s);
        running.abort();
    }
}

fn panicking(tx: ProbeTx) -> Router {
    Router::new().route(
        "/",
        get(move |ctx: ReqCtx| async move {
            tx.send(ctx.0.clone()).unwrap();
            tokio::task::yield_now().await;
            if ctx.deadline().is_none() {
                panic!("the handler panics");
            }
            "unreachable"
        }),
    )
}

fn panicked(cause: &Cause) -> bool {
    cause.downcast_ref::<HandlerPanicked>().is_some()
}

#[tokio::test]
async fn a_panic_caught_outside_the_layer_is_handler_panicked() {
    let (tx, mut probe) = reqctx_tests::probe();
    let app = panicking(tx)
        .layer(ContextLayer::new())
        .layer(CatchPanicLayer::new());
    for server in SERVERS {
        let running = Running::start(server, app.clone(), BOUND).await;
        let (status, _) = http_get(running.addr, "/").await;
        assert_eq!(status, 500);
        let cause = cause_of(&probe.started().await).await;
        assert!(panicked(&cause), "{server:?}: {cause:?}");
        running.abort();
    }
}

#[tokio::test]
async fn a_panic_caught_inside_the_layer() {
    // With PanicResponse, the cause says so.
    let (tx, mut probe) = reqctx_tests::probe();
    let app = panicking(tx)
        .layer(CatchPanicLayer::custom(PanicResponse))
        .layer(ContextLayer::new());
    let running = Running::start(Server::Serve, app, BOUND).await;
    let (status, _) = http_get(running.addr, "/").await;
    assert_eq!(status, 500);
    let cause = cause_of(&probe.started().await).await;
    assert!(panicked(&cause), "{cause:?}");
    running.abort();

    // With tower-http's default, it is an ordinary 500 before the layer sees it.
    let (tx, mut probe) = reqctx_tests::probe();
    let app = panicking(tx)
        .layer(CatchPanicLayer::new())
        .layer(ContextLayer::new());
    let running = Running::start(Server::Serve, app, BOUND).await;
    let (status, _) = http_get(running.addr, "/").await;
    assert_eq!(status, 500);
    assert_eq!(cause_of(&probe.started().await).await, Cause::Completed);
    running.abort();
}

#[tokio::test]
async fn an_inner_error_is_service_failed_not_a_disconnect() {
    // tower's Timeout inside the ContextLayer, axum's HandleErrorLayer outside it.
    let (tx, mut probe) = reqctx_tests::probe();
    let slow = Router::new().route(
        "/",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late"
        }),
    );
    let stack = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            StatusCode::REQUEST_TIMEOUT
        }))
        .layer(ContextLayer::new())
        .map_request(move |req: axum::extract::Request| {
            let ctx = tower_reqctx::request_context().unwrap();
            tx.send(ctx.clone()).unwrap();
            req
        })
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(50)));
    let app = Router::new().fallback_service(slow.layer(stack));
    for server in SERVERS {
        let running = Running::start(server, app.clone(), BOUND).await;
        let (status, _) = http_get(running.addr, "/").await;
        assert_eq!(status, 408, "{server:?}");
        let cause = cause_of(&probe.started().await).await;
        assert!(
            cause.downcast_ref::<ServiceFailed>().is_some(),
            "{server:?}: {cause:?}"
        );
        running.abort();
    }

    // LoadShed over a ConcurrencyLimit of one: the second request is shed.
    let (tx, mut probe) = reqctx_tests::probe();
    let (release, wait) = tokio::sync::watch::channel(false);
    // One service, not a Router's handler: a Router converts a handler per request, which
    // would give every request a ConcurrencyLimit of its own.
    let busy = HandlerWithoutStateExt::into_service(move || {
        let mut wait = wait.clone();
        async move {
            let _ = wait.wait_for(|go| *go).await;
            "done"
        }
    });
    let stack = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            StatusCode::SERVICE_UNAVAILABLE
        }))
        .layer(ContextLayer::new())
        .map_request(move |req: axum::extract::Request| {
            let ctx = tower_reqctx::request_context().unwrap();
            tx.send(ctx.clone()).unwrap();
            req
        })
        .load_shed()
        .concurrency_limit(1);
    let app = Router::new().fallback_service(stack.service(busy));
    let running = Running::start(Server::Serve, app, BOUND).await;
    let addr = running.addr;
    let first = tokio::spawn(async move { http_get(addr, "/").await });
    let first_ctx = probe.started().await;
    let (status, _) = http_get(addr, "/").await;
    assert_eq!(status, 503);
    let shed = cause_of(&probe.started().await).await;
    assert!(shed.downcast_ref::<ServiceFailed>().is_some(), "{shed:?}");
    release.send(true).unwrap();
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(cause_of(&first_ctx).await, Cause::Completed);
    running.abort();
}

#[tokio::test]
async fn a_handler_that_answers_with_its_cancelled_ends_with_that_cause() {
    let (tx, mut probe) = reqctx_tests::probe();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                // A downstream call failed for a reason of its own (here: made up).
                Err::<(), _>(Cancelled::new(Cause::DeadlineExceeded {
                    origin: DeadlineOrigin::Code,
                }))
            }),
        )
        .layer(ContextLayer::new());
    let running = Running::start(Server::Serve, app, BOUND).await;
    let (status, body) = http_get(running.addr, "/").await;
    assert_eq!(status, 504);
    assert_eq!(
        body,
        "request cancelled: deadline exceeded (set by application code)"
    );
    assert_eq!(
        cause_of(&probe.started().await).await,
        Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Code
        }
    );
    running.abort();
}

/// A body of one data frame and then trailers: the shape of every gRPC response.
struct WithTrailers(Option<Frame<Bytes>>, Option<Frame<Bytes>>);

impl http_body::Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = self.0.take().or_else(|| self.1.take());
        std::task::Poll::Ready(frame.map(Ok))
    }
}

#[tokio::test]
async fn a_response_that_ends_with_trailers_is_completed_over_http2() {
    let (tx, mut probe) = reqctx_tests::probe();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                Body::new(WithTrailers(
                    Some(Frame::data(Bytes::from_static(b"payload"))),
                    Some(Frame::trailers(trailers)),
                ))
            }),
        )
        .layer(ContextLayer::new());
    for server in [Server::Serve, Server::AxumPlain] {
        let running = Running::start(server, app.clone(), BOUND).await;
        let (mut h2, conn) = h2_client(running.addr).await;
        for _ in 0..20 {
            let req = http::Request::get(format!("http://{}/", running.addr))
                .body(())
                .unwrap();
            let (res, _) = h2.send_request(req, true).unwrap();
            let res = res.await.unwrap();
            let mut body = res.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                body.flow_control().release_capacity(chunk.len()).unwrap();
            }
            let trailers = body.trailers().await.unwrap().unwrap();
            assert_eq!(trailers["grpc-status"], "0");
            let ctx = probe.started().await;
            assert_eq!(cause_of(&ctx).await, Cause::Completed, "{server:?}");
        }
        drop(h2);
        conn.abort();
        running.abort();
    }
}

#[tokio::test]
async fn a_long_grace_does_not_overflow() {
    let (tx, mut probe) = reqctx_tests::probe();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                ctx.cancelled().await;
                (StatusCode::SERVICE_UNAVAILABLE, "answered in the grace")
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_millis(20))
                .grace(Duration::MAX),
        );
    let running = Running::start(Server::Serve, app, BOUND).await;
    let (status, body) = http_get(running.addr, "/").await;
    assert_eq!((status, body.as_str()), (503, "answered in the grace"));
    assert_eq!(
        cause_of(&probe.started().await).await,
        Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Layer
        }
    );
    running.abort();
}

/// A handler that answers after its deadline, in the grace, with a body of several
/// frames (chunked, never pending) gets its whole answer to the client: the cancellation
/// came before the answer, so it does not cut it, nor close the connection under it.
#[tokio::test]
async fn an_answer_streamed_in_the_grace_is_whole() {
    let app = Router::new()
        .route(
            "/",
            get(|ctx: ReqCtx| async move {
                ctx.cancelled().await;
                let frames = ["one,", "two,", "three"].map(|s| Ok::<_, Infallible>(Bytes::from(s)));
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Body::from_stream(futures_util::stream::iter(frames)),
                )
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_millis(20))
                .grace(Duration::from_secs(60)),
        );
    for server in [Server::Serve, Server::AxumPlain] {
        let running = Running::start(server, app.clone(), BOUND).await;
        let (status, body) = http_get(running.addr, "/").await;
        assert_eq!(status, 503, "{server:?}");
        assert_eq!(
            body, "4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n",
            "{server:?}: the answer was cut"
        );
        running.abort();
    }
}

#[tokio::test]
async fn a_client_closed_request_has_a_reason_phrase() {
    let app = Router::new()
        .route(
            "/",
            get(|| async { Cancelled::new(Cause::ClientDisconnected).into_response() }),
        )
        .layer(ContextLayer::new());
    let running = Running::start(Server::Serve, app, BOUND).await;
    let mut s = send(
        running.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let raw = read_to_end(&mut s).await;
    assert!(
        raw.starts_with("HTTP/1.1 499 Client Closed Request\r\n"),
        "{raw}"
    );
    running.abort();
}

#[tokio::test]
async fn an_http2_websocket_keeps_its_context_until_the_tunnel_ends() {
    let (tx, mut probe) = reqctx_tests::probe();
    let running = Running::start(Server::Serve, reqctx_tests::ws_echo_app(tx), BOUND).await;
    let tcp = connect(running.addr).await;
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::connect(format!("http://{}/ws", running.addr))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    h2 = h2.ready().await.unwrap();
    let (res, mut send) = h2.send_request(req, false).unwrap();
    let res = res.await.unwrap();
    assert_eq!(res.status(), 200);
    let ctx = probe.started().await;
    // One WebSocket frame each way: a masked text frame "hi", echoed unmasked.
    send.send_data(
        Bytes::from_static(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]),
        false,
    )
    .unwrap();
    let mut body = res.into_body();
    let echo = tokio::time::timeout(BOUND, body.data())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&echo[..], &[0x81, 2, b'h', b'i']);
    // Past the route's 50 ms timeout and the 200: the tunnel is open, the context too.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        ctx.cause(),
        None,
        "the context outlives the 200 and the timeout"
    );
    // The client goes away: the connection closes.
    drop((send, body, h2));
    conn.abort();
    assert_eq!(cause_of(&ctx).await, Cause::ClientDisconnected);
    running.abort();
}

#[tokio::test]
async fn several_deadline_headers_the_earliest_wins() {
    use tower_reqctx::header::DeadlineHeader;
    use tower_reqctx::header::ENVOY_EXPECTED_RQ_TIMEOUT_MS;

    let (tx, mut probe) = reqctx_tests::probe();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                ctx.cancelled().await;
                "late"
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_secs(30))
                .deadline_header(DeadlineHeader::grpc())
                .deadline_header(DeadlineHeader::millis(ENVOY_EXPECTED_RQ_TIMEOUT_MS)),
        );
    let running = Running::start(Server::Serve, app, BOUND).await;
    // Envoy's route timeout is the earlier of the two.
    let started = std::time::Instant::now();
    let (status, _) = http1(
        running.addr,
        "GET / HTTP/1.1\r\nHost: x\r\ngrpc-timeout: 20S\r\nx-envoy-expected-rq-timeout-ms: 150\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 504);
    assert!(started.elapsed() >= Duration::from_millis(150));
    let ctx = probe.started().await;
    assert_eq!(
        cause_of(&ctx).await,
        Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Header
        }
    );
    // A value that does not decode is refused, naming its header.
    let (status, body) = http1(
        running.addr,
        "GET / HTTP/1.1\r\nHost: x\r\ngrpc-timeout: 1S\r\nx-envoy-expected-rq-timeout-ms: soon\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("`x-envoy-expected-rq-timeout-ms`"), "{body}");
    running.abort();
}

/// A middleware that moves the inner call into `tokio::spawn` hides the request from what
/// it spawns: `ReqCtx` answers its `500` naming that cause, `RouteTimeout` its own `500`,
/// and `request_context()` is `None` there (never another request's context), while a
/// route without that middleware, in the same app, gets its context.
#[tokio::test]
async fn a_middleware_that_spawns_the_inner_call_gets_the_clear_500() {
    use axum::middleware::{Next, from_fn};
    use tower_reqctx::RouteTimeout;

    async fn spawning(req: axum::extract::Request, next: Next) -> axum::response::Response {
        tokio::spawn(next.run(req)).await.unwrap()
    }
    let app = Router::new()
        .route(
            "/spawned",
            get(|_: ReqCtx| async { "reached" }).layer(from_fn(spawning)),
        )
        .route(
            "/spawned-route",
            get(|| async { "reached" })
                .layer(RouteTimeout::new(Duration::from_secs(1)))
                .layer(from_fn(spawning)),
        )
        .route(
            "/spawned-lookup",
            get(|| async { format!("{}", tower_reqctx::request_context().is_none()) })
                .layer(from_fn(spawning)),
        )
        .route(
            "/direct",
            get(|ctx: ReqCtx| async move { format!("{:?}", ctx.cause()) }),
        )
        .layer(ContextLayer::new());
    for server in SERVERS {
        let running = Running::start(server, app.clone(), BOUND).await;
        let (status, body) = http_get(running.addr, "/spawned").await;
        assert_eq!(status, 500, "{server:?}: {body}");
        assert!(body.contains("tokio::spawn"), "{server:?}: {body}");
        let (status, body) = http_get(running.addr, "/spawned-route").await;
        assert_eq!(status, 500, "{server:?}: {body}");
        assert!(
            body.contains("RouteTimeout found no request context"),
            "{body}"
        );
        let (status, body) = http_get(running.addr, "/spawned-lookup").await;
        assert_eq!((status, body.as_str()), (200, "true"), "{server:?}");
        let (status, body) = http_get(running.addr, "/direct").await;
        assert_eq!((status, body.as_str()), (200, "None"), "{server:?}");
        running.abort();
    }
}

/// Many requests interleaved on one thread (HTTP/2 streams of one connection, each
/// awaiting between its steps) each find their own context, never a neighbour's: a
/// middleware adds the request's path as a value after yielding, and the handler, after
/// yielding again, reads it back from its `ReqCtx`, with its own `?timeout=`'s deadline.
#[tokio::test]
async fn interleaved_requests_each_find_their_own_context() {
    use axum::middleware::{Next, from_fn};

    #[derive(Debug)]
    struct Path(String);

    async fn tag(req: axum::extract::Request, next: Next) -> axum::response::Response {
        tokio::task::yield_now().await;
        let path = req.uri().path().to_owned();
        assert!(tower_reqctx::set_request_value(Path(path)));
        next.run(req).await
    }
    let app = Router::new()
        .route(
            "/{n}",
            get(
                |ctx: ReqCtx, axum::extract::Path(n): axum::extract::Path<u64>| async move {
                    for _ in 0..n % 4 {
                        tokio::task::yield_now().await;
                    }
                    let seen = ctx.value::<Path>().map(|p| p.0.clone());
                    let left = ctx.remaining().map(|d| d.as_secs());
                    let again = tower_reqctx::request_context().and_then(|c| c.remaining());
                    format!("{seen:?} {left:?} {}", again.map(|d| d.as_secs()) == left)
                },
            ),
        )
        .layer(from_fn(tag))
        .layer(ContextLayer::new());
    for server in [Server::Serve, Server::AxumPlain] {
        let running = Running::start(server, app.clone(), BOUND).await;
        let (send, conn) = h2_client(running.addr).await;
        let mut calls = Vec::new();
        for n in 1..=60u64 {
            let mut send = send.clone().ready().await.unwrap();
            // Each budget is its own, 10 s apart, so the seconds left name the request.
            let req = http::Request::get(format!(
                "http://{}/{n}?timeout={}s",
                running.addr,
                100 + 10 * n
            ))
            .body(())
            .unwrap();
            let (response, _) = send.send_request(req, true).unwrap();
            calls.push((n, response));
        }
        for (n, response) in calls {
            let response = response.await.unwrap();
            assert_eq!(response.status(), 200, "{server:?} /{n}");
            let mut body = response.into_body();
            let mut text = Vec::new();
            while let Some(chunk) = body.data().await {
                text.extend_from_slice(&chunk.unwrap());
            }
            let text = String::from_utf8(text).unwrap();
            assert!(
                text.starts_with(&format!("Some(\"/{n}\") Some(")) && text.ends_with(") true"),
                "{server:?} /{n}: {text}"
            );
            // The seconds left are this request's budget's, less what it waited (under
            // 10 s), never a neighbour's (10 s away).
            let left: u64 = text
                .split("Some(")
                .nth(2)
                .and_then(|t| t.split(')').next())
                .and_then(|t| t.parse().ok())
                .unwrap();
            assert!(
                (90 + 10 * n..100 + 10 * n).contains(&left),
                "{server:?} /{n}: {text}"
            );
        }
        conn.abort();
        running.abort();
    }
}
