//! The layer's logic, in process (`oneshot`) under a paused clock. The same behaviours over
//! real sockets are in the workspace's `tests/` crate.
#![cfg(feature = "axum")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use reqctx::{Cause, Context, DeadlineOrigin};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_reqctx::{ClampPolicy, ContextLayer, HandlerPanicked, ReqCtx, RouteTimeout};

type Seen = mpsc::UnboundedSender<Context>;

/// A handler that hands its context to the test, then waits for it to end (or `work`).
fn waiting_app(seen: Seen, work: Duration) -> Router {
    Router::new().route(
        "/",
        get(move |ctx: ReqCtx| async move {
            seen.send(ctx.0.clone()).unwrap();
            match ctx.run(tokio::time::sleep(work)).await {
                Ok(()) => "done".into_response(),
                Err(e) => e.into_response(),
            }
        }),
    )
}

async fn body_text(res: Response) -> String {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn deadline(origin: DeadlineOrigin) -> Cause {
    Cause::DeadlineExceeded { origin }
}

/// `res` is the `504` of the deadline from `origin`, given `after` ms into the paused clock
/// from `start`, and the handler's context (the next on `seen`) ended with that deadline.
async fn timed_out(
    res: &Response,
    start: Instant,
    after: u64,
    origin: DeadlineOrigin,
    seen: &mut mpsc::UnboundedReceiver<Context>,
    case: &str,
) {
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT, "{case}");
    assert_eq!(start.elapsed(), Duration::from_millis(after), "{case}");
    assert_eq!(
        seen.recv().await.unwrap().cause(),
        Some(deadline(origin)),
        "{case}"
    );
}

#[tokio::test(start_paused = true)]
async fn query_timeout_answers_504_with_query_origin() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = waiting_app(tx, Duration::from_secs(10)).layer(ContextLayer::new());
    let start = Instant::now();
    let res = app.oneshot(get_req("/?timeout=50ms")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(50));
    let ctx = rx.recv().await.unwrap();
    assert_eq!(ctx.cause(), Some(deadline(DeadlineOrigin::Query)));
}

#[tokio::test(start_paused = true)]
async fn route_timeout_and_query_the_earliest_wins() {
    let cases = [
        // (outer, route, query, fires after, origin)
        (
            Some(10_000),
            Some(100),
            Some("50ms"),
            50,
            DeadlineOrigin::Query,
        ),
        (
            Some(10_000),
            Some(100),
            Some("200ms"),
            100,
            DeadlineOrigin::Layer,
        ),
        (Some(50), Some(200), None, 200, DeadlineOrigin::Layer), // a route may lengthen
        (Some(50), Some(200), Some("1h"), 200, DeadlineOrigin::Layer), // a client may not
        (Some(300), None, Some("80ms"), 80, DeadlineOrigin::Query),
    ];
    for (outer, route, query, after, origin) in cases {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let seen = tx.clone();
        let handler = move |ctx: ReqCtx| async move {
            seen.send(ctx.0.clone()).unwrap();
            ctx.run(std::future::pending::<()>()).await.into_response()
        };
        let method = match route {
            Some(ms) => get(handler).layer(RouteTimeout::new(Duration::from_millis(ms))),
            None => get(handler),
        };
        let mut outer_layer = ContextLayer::new();
        if let Some(ms) = outer {
            outer_layer = outer_layer.timeout(Duration::from_millis(ms));
        }
        let app = Router::new().route("/", method).layer(outer_layer);
        let uri = query.map_or("/".to_owned(), |q| format!("/?timeout={q}"));
        let start = Instant::now();
        let res = app.oneshot(get_req(&uri)).await.unwrap();
        let case = format!("outer {outer:?} route {route:?} query {query:?}");
        timed_out(&res, start, after, origin, &mut rx, &case).await;
    }
}

#[tokio::test(start_paused = true)]
async fn no_timeout_on_a_route_removes_the_servers() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/stream",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
                "slow but allowed"
            })
            .layer(RouteTimeout::none()),
        )
        .layer(ContextLayer::new().timeout(Duration::from_millis(100)));
    let res = app.clone().oneshot(get_req("/stream")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let ctx = rx.recv().await.unwrap();
    assert_eq!(body_text(res).await, "slow but allowed");
    assert_eq!(ctx.cause(), Some(Cause::Completed));

    // A client may still set one.
    let start = Instant::now();
    let res = app.oneshot(get_req("/stream?timeout=30ms")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(30));
}

#[tokio::test(start_paused = true)]
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
        .layer(
            ContextLayer::new()
                .max_timeout(Duration::from_secs(60))
                .clamp_policy(ClampPolicy::Reject),
        );
    let ten_kb = "9".repeat(10_000);
    for q in [
        "abc",
        "-1s",
        "0",
        "0s",
        "10",
        "5x",
        "99999999999999999h",
        "2m",
        ten_kb.as_str(),
        "%FF%FE",
        "%3Cb%3E1s%3C%2Fb%3E",
    ] {
        let res = app
            .clone()
            .oneshot(get_req(&format!("/?timeout={q}")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{q}");
        let text = body_text(res).await;
        assert!(
            text.starts_with("invalid `timeout` query parameter: "),
            "{text}"
        );
        assert!(!text.contains('\n') && !text.contains("<b>"), "{text}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let res = app.oneshot(get_req("/?timeout=30s")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn huge_timeouts_are_clamped_by_default() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                "ok"
            }),
        )
        .layer(ContextLayer::new().max_timeout(Duration::from_secs(60)));
    let start = Instant::now();
    let res = app
        .clone()
        .oneshot(get_req("/?timeout=99999999999999999h"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let ctx = rx.recv().await.unwrap();
    assert_eq!(ctx.deadline(), Some(start + Duration::from_secs(60)));

    // Without a maximum, a huge value means no practical deadline; nothing overflows.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                "ok"
            }),
        )
        .layer(ContextLayer::new());
    let res = app
        .oneshot(get_req("/?timeout=99999999999999999h"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(rx.recv().await.unwrap().deadline(), None);
}

#[tokio::test(start_paused = true)]
async fn normal_request_completes_and_stops_spawned_work() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                let task = ctx.spawn(std::future::pending::<()>());
                tx.send((ctx.0.clone(), task)).unwrap();
                "hello"
            }),
        )
        .layer(ContextLayer::new().timeout(Duration::from_secs(30)));
    let res = app.oneshot(get_req("/")).await.unwrap();
    let (ctx, task) = rx.recv().await.unwrap();
    assert_eq!(body_text(res).await, "hello");
    assert_eq!(ctx.cause(), Some(Cause::Completed));
    assert_eq!(task.await.unwrap().unwrap_err().cause(), &Cause::Completed);
}

#[tokio::test(start_paused = true)]
async fn head_304_and_empty_bodies_complete_without_being_polled() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t = tx.clone();
    let t2 = tx.clone();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                "a body hyper will not send for HEAD"
            }),
        )
        .route(
            "/304",
            get(move |ctx: ReqCtx| async move {
                t.send(ctx.0.clone()).unwrap();
                (StatusCode::NOT_MODIFIED, "ignored")
            }),
        )
        .route(
            "/empty",
            get(move |ctx: ReqCtx| async move {
                t2.send(ctx.0.clone()).unwrap();
                StatusCode::ACCEPTED
            }),
        )
        .layer(ContextLayer::new());
    for (method, uri) in [
        (Method::HEAD, "/"),
        (Method::GET, "/304"),
        (Method::GET, "/empty"),
    ] {
        let req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let ctx = rx.recv().await.unwrap();
        // The response is not consumed at all: hyper would not poll such a body.
        assert_eq!(ctx.cause(), Some(Cause::Completed), "{method} {uri}");
        drop(res);
        assert_eq!(ctx.cause(), Some(Cause::Completed), "{method} {uri}");
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_response_future_is_a_client_disconnect() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = waiting_app(tx, Duration::from_secs(10)).layer(ContextLayer::new());
    let fut = app.oneshot(get_req("/"));
    let timed_out = tokio::time::timeout(Duration::from_millis(10), fut).await;
    assert!(timed_out.is_err(), "the handler waits 10 s");
    let ctx = rx.recv().await.unwrap();
    assert_eq!(ctx.cause(), Some(Cause::ClientDisconnected));
}

#[tokio::test(start_paused = true)]
async fn dropped_unfinished_body_is_a_client_disconnect() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                let ticks = futures_stream(Duration::from_millis(10));
                Body::from_stream(ticks)
            }),
        )
        .layer(ContextLayer::new());
    let mut res = app.oneshot(get_req("/")).await.unwrap();
    let ctx = rx.recv().await.unwrap();
    poll_once(res.body_mut()).await; // hyper reads a body as soon as it has the head
    assert_eq!(ctx.cause(), None, "streaming");
    drop(res);
    assert_eq!(ctx.cause(), Some(Cause::ClientDisconnected));
}

/// Polls `body` for a frame once, as hyper does right after it wrote the response's head.
async fn poll_once<B: http_body::Body + Unpin>(body: &mut B) {
    std::future::poll_fn(|cx| {
        let _ = std::pin::Pin::new(&mut *body).poll_frame(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

/// A body dropped before anything polled it was replaced further out (an outer
/// `map_response`), not left by the client: `ResponseDiscarded`.
#[tokio::test]
async fn a_body_dropped_unpolled_is_discarded() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                Body::from_stream(futures_stream(Duration::from_millis(10)))
            }),
        )
        .layer(ContextLayer::new());
    let res = app.oneshot(get_req("/")).await.unwrap();
    let ctx = rx.recv().await.unwrap();
    drop(res);
    let cause = ctx.cause().expect("ended");
    assert!(
        cause
            .downcast_ref::<tower_reqctx::ResponseDiscarded>()
            .is_some(),
        "{cause:?}"
    );
}

/// An endless stream of ticks, one every `every`.
fn futures_stream(
    every: Duration,
) -> impl futures_core::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    struct Ticks(tokio::time::Interval);
    impl futures_core::Stream for Ticks {
        type Item = Result<bytes::Bytes, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0
                .poll_tick(cx)
                .map(|_| Some(Ok(bytes::Bytes::from_static(b"tick\n"))))
        }
    }
    Ticks(tokio::time::interval(every))
}

#[tokio::test(start_paused = true)]
async fn deadline_during_a_stream_truncates_it() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                Body::from_stream(futures_stream(Duration::from_millis(10)))
            }),
        )
        .layer(ContextLayer::new());
    let res = app.oneshot(get_req("/?timeout=55ms")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let start = Instant::now();
    let err = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap_err();
    assert!(start.elapsed() <= Duration::from_millis(55));
    assert!(format!("{err:?}").contains("DeadlineExceeded"), "{err:?}");
    assert_eq!(
        rx.recv().await.unwrap().cause(),
        Some(deadline(DeadlineOrigin::Query))
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_of_the_root_ends_an_endless_stream() {
    let (root, shutdown) = Context::background().with_cancel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                Body::from_stream(futures_stream(Duration::from_millis(10)))
            }),
        )
        .layer(ContextLayer::new().root(root));
    let res = app.oneshot(get_req("/")).await.unwrap();
    let ctx = rx.recv().await.unwrap();
    let reader = tokio::spawn(axum::body::to_bytes(res.into_body(), 1 << 20));
    tokio::time::sleep(Duration::from_millis(35)).await; // a few ticks flow
    shutdown.cancel_with(Cause::Shutdown);
    assert!(reader.await.unwrap().is_err(), "truncated, not a clean end");
    assert_eq!(ctx.cause(), Some(Cause::Shutdown));
}

#[tokio::test(start_paused = true)]
async fn without_grace_an_answer_after_the_deadline_loses() {
    // The handler's own wait sees the deadline at the same instant as the layer's timer;
    // whichever wakes first, the layer answers, so the status never depends on the order.
    for _ in 0..20 {
        let app = Router::new()
            .route(
                "/",
                get(|ctx: ReqCtx| async move {
                    ctx.cancelled().await;
                    "late"
                }),
            )
            .layer(
                ContextLayer::new()
                    .timeout(Duration::from_millis(20))
                    .timeout_status(StatusCode::SERVICE_UNAVAILABLE),
            );
        let start = Instant::now();
        let res = app.oneshot(get_req("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_eq!(
            body_text(res).await,
            "request cancelled: deadline exceeded (set by the server's timeout)"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn grace_lets_the_handler_answer_for_itself() {
    let app = Router::new()
        .route(
            "/",
            get(|ctx: ReqCtx| async move {
                ctx.cancelled().await;
                tokio::time::sleep(Duration::from_millis(5)).await; // cleaning up
                (StatusCode::SERVICE_UNAVAILABLE, "partial results")
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_millis(20))
                .grace(Duration::from_millis(10)),
        );
    let start = Instant::now();
    let res = app.clone().oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(start.elapsed(), Duration::from_millis(25));

    // Past the grace, the layer answers.
    let app = Router::new()
        .route("/", get(std::future::pending::<&'static str>))
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_millis(20))
                .grace(Duration::from_millis(10))
                .timeout_status(StatusCode::SERVICE_UNAVAILABLE),
        );
    let start = Instant::now();
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(start.elapsed(), Duration::from_millis(30));
    assert_eq!(
        body_text(res).await,
        "request cancelled: deadline exceeded (set by the server's timeout)",
        "the same answer a handler's `Cancelled` gives"
    );
}

#[tokio::test]
async fn a_panicking_handler_is_not_a_client_disconnect() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                tokio::task::yield_now().await;
                if ctx.value::<u8>().is_none() {
                    panic!("handler bug");
                }
                "unreachable"
            }),
        )
        .layer(ContextLayer::new());
    let joined = tokio::spawn(app.oneshot(get_req("/"))).await;
    assert!(joined.unwrap_err().is_panic());
    let cause = rx.recv().await.unwrap().cause().unwrap();
    assert!(
        cause.downcast_ref::<HandlerPanicked>().is_some(),
        "{cause:?}"
    );
}

#[tokio::test]
async fn missing_layer_is_a_500_that_names_it() {
    let app = Router::new().route("/", get(|_ctx: ReqCtx| async { "unreachable" }));
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let text = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("ContextLayer::new()"), "{text}");

    let app = Router::new().route(
        "/",
        get(|ctx: Option<ReqCtx>| async move { format!("{}", ctx.is_some()) }),
    );
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn cancelled_answers_with_its_status() {
    // A handler returning Result<_, Cancelled> uses `?` and answers 504 by itself.
    async fn handler(ctx: ReqCtx) -> Result<&'static str, reqctx::Cancelled> {
        ctx.run(tokio::time::sleep(Duration::from_secs(1))).await?;
        Ok("done")
    }
    let app = Router::new()
        .route("/", get(handler))
        .layer(ContextLayer::new().grace(Duration::from_millis(100)));
    let res = app.oneshot(get_req("/?timeout=10ms")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(body_text(res).await.contains("deadline exceeded"));
}

/// A subscriber that knows the current span and keeps what is recorded in `cause`.
mod recorder {
    use std::sync::{Arc, Mutex};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};
    use tracing_core::span::Current;

    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) causes: Arc<Mutex<Vec<String>>>,
        pub(crate) routes: Arc<Mutex<Vec<String>>>,
        stack: Mutex<Vec<(Id, &'static Metadata<'static>)>>,
        spans: Mutex<Vec<&'static Metadata<'static>>>,
    }

    struct CauseVisitor<'a>(&'a Mutex<Vec<String>>, &'a Mutex<Vec<String>>);
    impl Visit for CauseVisitor<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            match field.name() {
                "cause" => self.0.lock().unwrap().push(value.to_owned()),
                "route" => self.1.lock().unwrap().push(value.to_owned()),
                _ => {}
            }
        }
        // The layer records `cause` as `Display` (a `DisplayValue`, whose `Debug` is the text).
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.record_str(field, &format!("{value:?}"));
        }
    }

    impl Subscriber for Recorder {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, attrs: &Attributes<'_>) -> Id {
            let mut spans = self.spans.lock().unwrap();
            spans.push(attrs.metadata());
            Id::from_u64(spans.len() as u64)
        }
        fn record(&self, _: &Id, values: &Record<'_>) {
            values.record(&mut CauseVisitor(&self.causes, &self.routes));
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, id: &Id) {
            let meta = self.spans.lock().unwrap()[id.into_u64() as usize - 1];
            self.stack.lock().unwrap().push((id.clone(), meta));
        }
        fn exit(&self, _: &Id) {
            self.stack.lock().unwrap().pop();
        }
        fn current_span(&self) -> Current {
            match self.stack.lock().unwrap().last() {
                Some((id, meta)) => Current::new(id.clone(), meta),
                None => Current::none(),
            }
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_requests_span_records_the_cause() {
    use tracing::Instrument;
    let recorder = recorder::Recorder::default();
    let causes = recorder.causes.clone();
    let _default = tracing::subscriber::set_default(recorder);

    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/slow", get(std::future::pending::<&'static str>))
        .layer(ContextLayer::new());
    for (uri, kind) in [
        ("/", "completed"),
        ("/slow?timeout=10ms", "deadline_exceeded"),
    ] {
        let span = tracing::info_span!("request", cause = tracing::field::Empty);
        let app = app.clone();
        async move {
            let res = app.oneshot(get_req(uri)).await.unwrap();
            axum::body::to_bytes(res.into_body(), 1 << 16)
                .await
                .unwrap();
        }
        .instrument(span)
        .await;
        assert_eq!(
            causes.lock().unwrap().last().map(String::as_str),
            Some(kind),
            "{uri}"
        );
    }
}

mod deadline_header {
    use super::*;
    use tower_reqctx::header::DeadlineHeader;

    fn req(header: &str, value: &str) -> Request<Body> {
        Request::get("/")
            .header(header, value)
            .body(Body::empty())
            .unwrap()
    }

    fn app(tx: mpsc::UnboundedSender<Context>, layer: ContextLayer) -> Router {
        Router::new()
            .route(
                "/",
                get(move |ctx: ReqCtx| async move {
                    tx.send(ctx.0.clone()).unwrap();
                    ctx.run(std::future::pending::<()>())
                        .await
                        .map(|()| "never")
                }),
            )
            .layer(layer)
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_unless_enabled() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let app = app(tx, ContextLayer::new().timeout(Duration::from_millis(100)));
        let start = Instant::now();
        let res = app.oneshot(req("grpc-timeout", "10m")).await.unwrap();
        timed_out(&res, start, 100, DeadlineOrigin::Layer, &mut rx, "").await;
    }

    #[tokio::test(start_paused = true)]
    async fn shortens_never_lengthens_and_marks_its_504() {
        for (value, after, origin) in [
            ("50m", 50, DeadlineOrigin::Header),
            ("1S", 100, DeadlineOrigin::Layer),
            ("99999999H", 100, DeadlineOrigin::Layer),
        ] {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let layer = ContextLayer::new()
                .timeout(Duration::from_millis(100))
                .deadline_header(DeadlineHeader::grpc());
            let start = Instant::now();
            let res = app(tx, layer)
                .oneshot(req("grpc-timeout", value))
                .await
                .unwrap();
            assert_eq!(res.headers()["x-reqctx-deadline"], "exceeded");
            timed_out(&res, start, after, origin, &mut rx, value).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_earlier_of_query_and_header_wins() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let layer = ContextLayer::new().deadline_header(DeadlineHeader::millis(
            http::HeaderName::from_static("x-request-timeout-ms"),
        ));
        let r = Request::get("/?timeout=30ms")
            .header("x-request-timeout-ms", "20")
            .body(Body::empty())
            .unwrap();
        let start = Instant::now();
        let res = app(tx, layer).oneshot(r).await.unwrap();
        timed_out(&res, start, 20, DeadlineOrigin::Header, &mut rx, "").await;
    }

    #[tokio::test(start_paused = true)]
    async fn capped_by_max_timeout() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let layer = ContextLayer::new()
            .max_timeout(Duration::from_millis(40))
            .deadline_header(DeadlineHeader::grpc());
        let start = Instant::now();
        let res = app(tx, layer)
            .oneshot(req("grpc-timeout", "5S"))
            .await
            .unwrap();
        timed_out(&res, start, 40, DeadlineOrigin::Header, &mut rx, "").await;

        let (tx, _rx) = mpsc::unbounded_channel();
        let layer = ContextLayer::new()
            .max_timeout(Duration::from_millis(40))
            .clamp_policy(ClampPolicy::Reject)
            .deadline_header(DeadlineHeader::grpc());
        let res = app(tx, layer)
            .oneshot(req("grpc-timeout", "5S"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            body_text(res).await,
            "invalid `grpc-timeout` header: above the maximum of 40ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_values_get_400_naming_the_header() {
        for value in ["", "10", "123456789m", "5x", "-5m", "1.5S", "<b>"] {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let layer = ContextLayer::new().deadline_header(DeadlineHeader::grpc());
            let res = app(tx, layer)
                .oneshot(req("grpc-timeout", value))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{value:?}");
            let text = body_text(res).await;
            assert!(
                text.starts_with("invalid `grpc-timeout` header: "),
                "{text}"
            );
            assert!(!text.contains("<b>"), "{text}");
            assert!(rx.try_recv().is_err(), "the handler never ran");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_requests_get_grpc_statuses_not_http_ones() {
        let grpc = |value: &str| {
            Request::post("/")
                .header("content-type", "application/grpc+proto")
                .header("grpc-timeout", value)
                .body(Body::empty())
                .unwrap()
        };
        let layer = || ContextLayer::new().deadline_header(DeadlineHeader::grpc());
        let app = |tx: mpsc::UnboundedSender<Context>| {
            Router::new()
                .route(
                    "/",
                    axum::routing::post(move |ctx: ReqCtx| async move {
                        tx.send(ctx.0.clone()).unwrap();
                        std::future::pending::<()>().await;
                    }),
                )
                .layer(layer())
        };
        // The deadline: HTTP 200, grpc-status 4 (DEADLINE_EXCEEDED), no body.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let res = app(tx).oneshot(grpc("30m")).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(30));
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "4");
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(body_text(res).await, "");
        assert_eq!(
            rx.recv().await.unwrap().cause(),
            Some(deadline(DeadlineOrigin::Header))
        );

        // A malformed budget: grpc-status 3 (INVALID_ARGUMENT), the handler never runs.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let res = app(tx).oneshot(grpc("soon")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "3");
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_is_born_cancelled() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let app = Router::new()
            .route(
                "/",
                get(move |ctx: ReqCtx| async move {
                    tx.send(ctx.0.clone()).unwrap();
                    // A handler checks before calling downstream: nothing is spent.
                    ctx.check()?;
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, reqctx::Cancelled>("called downstream")
                }),
            )
            .layer(ContextLayer::new().deadline_header(DeadlineHeader::grpc()));
        let start = Instant::now();
        let res = app.oneshot(req("grpc-timeout", "0n")).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO, "answered at once");
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(res.headers()["x-reqctx-deadline"], "exceeded");
        assert_eq!(
            rx.recv().await.unwrap().cause(),
            Some(deadline(DeadlineOrigin::Header))
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_stops_on_cancellation_is_still_truncated() {
    // The stream ends itself (None) when its context is cancelled: the client must not see
    // that as a clean end.
    let (root, shutdown) = Context::background().with_cancel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                let ctx = ctx.0;
                let ticks = futures_stream(Duration::from_millis(10));
                Body::from_stream(StopOnCancel {
                    ctx,
                    ticks: Box::pin(ticks),
                })
            }),
        )
        .layer(ContextLayer::new().root(root));
    let res = app.oneshot(get_req("/")).await.unwrap();
    let ctx = rx.recv().await.unwrap();
    let reader = tokio::spawn(axum::body::to_bytes(res.into_body(), 1 << 20));
    tokio::time::sleep(Duration::from_millis(25)).await;
    shutdown.cancel_with(Cause::Shutdown);
    assert!(reader.await.unwrap().is_err(), "truncated");
    assert_eq!(ctx.cause(), Some(Cause::Shutdown));
}

/// Ends (None) once its context is cancelled, and records the cause it saw when dropped.
struct StopOnCancel<S> {
    ctx: Context,
    ticks: std::pin::Pin<Box<S>>,
}

impl<S: futures_core::Stream + Send> futures_core::Stream for StopOnCancel<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if self.ctx.is_cancelled() {
            return std::task::Poll::Ready(None);
        }
        let wait = std::pin::pin!(self.ctx.cancelled());
        if std::future::Future::poll(wait, cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        self.ticks.as_mut().poll_next(cx)
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_by_the_server_can_read_its_cause_in_drop() {
    struct ReportOnDrop(Context, mpsc::UnboundedSender<Option<Cause>>);
    impl Drop for ReportOnDrop {
        fn drop(&mut self) {
            let _ = self.1.send(self.0.cause());
        }
    }
    impl futures_core::Stream for ReportOnDrop {
        type Item = Result<bytes::Bytes, std::io::Error>;
        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Pending
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move { Body::from_stream(ReportOnDrop(ctx.0, tx)) }),
        )
        .layer(ContextLayer::new());
    let mut res = app.oneshot(get_req("/")).await.unwrap();
    poll_once(res.body_mut()).await;
    drop(res); // as hyper does when the client leaves
    assert_eq!(rx.recv().await.unwrap(), Some(Cause::ClientDisconnected));
}

#[tokio::test]
async fn middleware_adds_values_the_handler_sees() {
    use axum::extract::Request as AxumRequest;
    use axum::middleware::{self, Next};

    #[derive(Debug, PartialEq)]
    struct User(&'static str);
    async fn authenticate(req: AxumRequest, next: Next) -> Response {
        assert!(tower_reqctx::set_request_value(User("alice")));
        next.run(req).await
    }
    let app = Router::new()
        .route(
            "/",
            get(|ctx: ReqCtx| async move { format!("{:?}", ctx.value::<User>()) }),
        )
        .layer(middleware::from_fn(authenticate))
        .layer(ContextLayer::new());
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(body_text(res).await, "Some(User(\"alice\"))");

    assert!(
        !tower_reqctx::set_request_value(User("bob")),
        "no layer is serving a request here"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_matched_route_goes_on_the_span() {
    use tracing::Instrument;
    let recorder = recorder::Recorder::default();
    let routes = recorder.routes.clone();
    let _default = tracing::subscriber::set_default(recorder);
    let app = Router::new()
        .route("/users/{id}", get(|| async { "user" }))
        .layer(ContextLayer::new());
    let span = tracing::info_span!("request", route = tracing::field::Empty);
    let res = app
        .oneshot(get_req("/users/42"))
        .instrument(span)
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(routes.lock().unwrap().as_slice(), ["/users/{id}"]);
}

/// One owner per request: a `ContextLayer` inside another answers 500 and names the fix,
/// and the handler never runs.
#[tokio::test]
async fn a_context_layer_inside_another_is_a_500_naming_route_timeout() {
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || async move {
                flag.store(true, Ordering::SeqCst);
                "ran"
            })
            .layer(ContextLayer::new().timeout(Duration::from_secs(1))),
        )
        .layer(ContextLayer::new());
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = body_text(res).await;
    assert!(body.contains("RouteTimeout"), "{body}");
    assert!(!ran.load(Ordering::SeqCst), "the handler must not run");
}

/// A `RouteTimeout` with no `ContextLayer` in front has no context to time: a 500 that
/// names the missing layer, as `ReqCtx` does.
#[tokio::test]
async fn a_route_timeout_without_a_context_layer_is_a_500_naming_it() {
    let app = Router::new().route(
        "/",
        get(|| async { "ran" }).layer(RouteTimeout::new(Duration::from_secs(1))),
    );
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = body_text(res).await;
    assert!(body.contains("ContextLayer"), "{body}");
}

/// `RouteTimeout::none()` removes the app's timeout for its route; the client's still
/// applies.
#[tokio::test(start_paused = true)]
async fn route_timeout_none_keeps_the_clients_timeout() {
    let app = Router::new()
        .route(
            "/",
            get(|ctx: ReqCtx| async move {
                ctx.run(std::future::pending::<()>()).await.into_response()
            })
            .layer(RouteTimeout::none()),
        )
        .layer(ContextLayer::new().timeout(Duration::from_millis(50)));
    let start = Instant::now();
    let res = app.oneshot(get_req("/?timeout=300ms")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(300));
}

/// When the layer answers `504` at the deadline (no grace), the handler's own code still
/// sees the cause first, whatever it waits on (here a token, woken by no timer of its
/// own): the layer records the deadline before its last poll of the handler.
#[tokio::test(start_paused = true)]
async fn the_handler_sees_the_deadline_before_the_layers_504() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| {
                let tx = tx.clone();
                async move {
                    ctx.token().cancelled_owned().await;
                    tx.send(ctx.cause()).unwrap();
                    "too late"
                }
            }),
        )
        .layer(ContextLayer::new().timeout(Duration::from_millis(100)));
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        rx.try_recv().ok(),
        Some(Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Layer
        })),
        "the handler's code ran with the cause before the layer answered"
    );
}
