//! What a tracing subscriber sees, over real sockets, under every server, with tower-http's
//! `TraceLayer` outside the `ContextLayer`: every request's cause in its span's `cause`
//! field and the layer's event inside that span, a client that hung up included; and a
//! client's own `?timeout=` that is not an `ERROR` with `ServerErrorsExceptClientDeadlines`
//! (while the server's own timeout still is, and is with tower-http's default classifier).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::http::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use reqctx::{Cancelled, Cause};
use reqctx_tests::{BOUND, Probe, ProbeTx, Running, Server, cause_of, http_get, send};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tower_http::classify::{MakeClassifier, ServerErrorsAsFailures};
use tower_http::trace::TraceLayer;
use tower_reqctx::{ContextLayer, ReqCtx, ServerErrorsExceptClientDeadlines};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

const SERVERS: [Server; 3] = [Server::Serve, Server::AxumWatched, Server::AxumPlain];

/// An event as recorded: its level and fields (`message` included).
#[derive(Clone, Debug)]
struct Seen {
    level: Level,
    fields: HashMap<String, String>,
}

/// A span as recorded: its fields, as last recorded, and the events inside it.
#[derive(Clone, Debug, Default)]
struct SeenSpan {
    fields: HashMap<String, String>,
    events: Vec<Seen>,
}

/// A tracing layer that keeps every span's fields and events; a span moves to `closed`
/// when it closes (the registry may reuse its id afterwards).
#[derive(Default)]
struct Recorder {
    open: Mutex<HashMap<u64, SeenSpan>>,
    closed: Mutex<Vec<SeenSpan>>,
    outside: Mutex<Vec<Seen>>,
    changed: Notify,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for &'static Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut span = SeenSpan::default();
        attrs.record(&mut Fields(&mut span.fields));
        self.open.lock().unwrap().insert(id.into_u64(), span);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(span) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut span.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut seen = Seen {
            level: *event.metadata().level(),
            fields: HashMap::new(),
        };
        event.record(&mut Fields(&mut seen.fields));
        match ctx.event_span(event) {
            Some(span) => {
                if let Some(span) = self.open.lock().unwrap().get_mut(&span.id().into_u64()) {
                    span.events.push(seen);
                }
            }
            None => self.outside.lock().unwrap().push(seen),
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(span) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(span);
            self.changed.notify_waiters();
        }
    }
}

/// The recorder, installed once for this test binary (tests run in parallel: each one
/// finds its own requests by their unique `uri`).
fn recorder() -> &'static Recorder {
    static RECORDER: OnceLock<&'static Recorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static Recorder = Box::leak(Box::default());
        let subscriber = tracing_subscriber::registry().with(recorder);
        tracing::subscriber::set_global_default(subscriber).unwrap();
        recorder
    })
}

impl Recorder {
    /// The span of the request to `uri`, once it has closed (within [`BOUND`]).
    async fn closed_span(&self, uri: &str) -> SeenSpan {
        let found = tokio::time::timeout(BOUND, async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let found = {
                    let closed = self.closed.lock().unwrap();
                    let mut spans = closed.iter();
                    spans
                        .find(|s| s.fields.get("uri").map(String::as_str) == Some(uri))
                        .cloned()
                };
                if let Some(span) = found {
                    return span;
                }
                changed.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("the span of {uri} should have closed"))
    }
}

/// The layer's event inside `span`, which must be there.
fn cause_event<'a>(span: &'a SeenSpan, uri: &str) -> &'a Seen {
    span.events
        .iter()
        .find(|e| {
            e.fields
                .get("message")
                .is_some_and(|m| m.starts_with("request context"))
        })
        .unwrap_or_else(|| panic!("no cause event in the span of {uri}: {span:?}"))
}

fn errors(span: &SeenSpan) -> usize {
    span.events
        .iter()
        .filter(|e| e.level == Level::ERROR)
        .count()
}

/// An app error type that wraps `Cancelled` and delegates to its answer (as the guide shows).
enum AppError {
    Cancelled(Cancelled),
}

impl From<Cancelled> for AppError {
    fn from(c: Cancelled) -> AppError {
        AppError::Cancelled(c)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Cancelled(c) => c.into_response(),
        }
    }
}

/// `/`: 200. `/wait`: waits for the context (the layer answers at the deadline).
/// `/answer`: the handler answers with its own error at the deadline (a grace applies).
fn app<M>(tx: ProbeTx, classifier: M, timeout: Duration) -> Router
where
    M: MakeClassifier + Clone + Send + Sync + 'static,
    M::Classifier: Clone + Send + Sync + 'static,
    M::FailureClass: std::fmt::Display + Send + Sync + 'static,
    <M::Classifier as tower_http::classify::ClassifyResponse>::ClassifyEos: Send + Sync + 'static,
{
    let answers = tx.clone();
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/wait",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                std::future::pending::<()>().await;
                "never"
            }),
        )
        .route(
            "/answer",
            get(move |ctx: ReqCtx| async move {
                answers.send(ctx.0.clone()).unwrap();
                ctx.run(std::future::pending::<()>()).await?;
                Ok::<_, AppError>("never")
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(timeout)
                .grace(Duration::from_millis(10)),
        )
        .layer(
            TraceLayer::new(classifier).make_span_with(|req: &Request<_>| {
                tracing::info_span!(
                    "request",
                    method = %req.method(),
                    uri = %req.uri(),
                    cause = tracing::field::Empty,
                )
            }),
        )
}

/// A GET to `path` that the client abandons once the handler has started.
async fn hang_up(addr: std::net::SocketAddr, path: &str, probe: &mut Probe) {
    let mut s = send(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    )
    .await;
    let ctx = probe.started().await;
    s.shutdown().await.unwrap();
    drop(s);
    assert_eq!(cause_of(&ctx).await, Cause::ClientDisconnected, "{path}");
}

#[tokio::test]
async fn every_cause_is_recorded_in_the_requests_span_a_hang_up_included() {
    let recorder = recorder();
    for (i, server) in SERVERS.into_iter().enumerate() {
        let (tx, mut probe) = reqctx_tests::probe();
        let app = app(tx, ServerErrorsAsFailures::make_classifier(), BOUND * 6);
        let running = Running::start(server, app, BOUND).await;

        let ok = format!("/?case=spans-{i}");
        assert_eq!(http_get(running.addr, &ok).await.0, 200);
        let timeout = format!("/wait?timeout=20ms&case=spans-{i}");
        assert_eq!(http_get(running.addr, &timeout).await.0, 504);
        probe.started().await;
        let gone = format!("/wait?case=spans-{i}");
        hang_up(running.addr, &gone, &mut probe).await;

        for (uri, kind) in [
            (ok, "completed"),
            (timeout, "deadline_exceeded"),
            (gone, "client_disconnected"),
        ] {
            let span = recorder.closed_span(&uri).await;
            let cause = span.fields.get("cause").map(String::as_str);
            assert_eq!(cause, Some(kind), "{server:?} {uri}: {span:?}");
            let event = cause_event(&span, &uri);
            if kind != "completed" {
                assert_eq!(event.level, Level::DEBUG, "{server:?} {uri}");
                assert_eq!(event.fields["kind"], kind, "{server:?} {uri}");
            }
        }
        running.abort();
    }
    // Every cause event was inside a request's span.
    let outside = recorder.outside.lock().unwrap();
    let stray: Vec<_> = outside
        .iter()
        .filter(|e| {
            e.fields
                .get("message")
                .is_some_and(|m| m.starts_with("request context"))
        })
        .collect();
    assert!(stray.is_empty(), "cause events outside a span: {stray:?}");
}

#[tokio::test]
async fn a_clients_own_deadline_is_not_an_error_with_the_classifier() {
    let recorder = recorder();
    for (i, server) in SERVERS.into_iter().enumerate() {
        for classify in [false, true] {
            let (tx, mut probe) = reqctx_tests::probe();
            let timeout = Duration::from_millis(200);
            let app = match classify {
                true => app(
                    tx,
                    ServerErrorsExceptClientDeadlines::make_classifier(),
                    timeout,
                ),
                false => app(tx, ServerErrorsAsFailures::make_classifier(), timeout),
            };
            let running = Running::start(server, app, BOUND).await;
            let case = format!("case=classify-{i}-{classify}");
            // The layer's 504 and the handler's own, at the client's deadline; the layer's
            // 504 at the server's (200 ms).
            let query = format!("/wait?timeout=20ms&{case}");
            let answer = format!("/answer?timeout=20ms&{case}");
            let server_timeout = format!("/wait?{case}");
            for uri in [&query, &answer, &server_timeout] {
                assert_eq!(http_get(running.addr, uri).await.0, 504, "{uri}");
                probe.started().await;
            }
            for (uri, origin_is_client) in
                [(&query, true), (&answer, true), (&server_timeout, false)]
            {
                let span = recorder.closed_span(uri).await;
                assert_eq!(
                    span.fields["cause"], "deadline_exceeded",
                    "{server:?} {uri}"
                );
                let errors = errors(&span);
                let expected = usize::from(!(classify && origin_is_client));
                assert_eq!(
                    errors, expected,
                    "{server:?} {uri} (classifier: {classify}): {span:?}"
                );
            }
            running.abort();
        }
    }
}

#[tokio::test]
async fn is_client_deadline_tells_the_clients_504_from_the_servers() {
    use axum::body::Body;
    use tower::ServiceExt;
    let app = Router::new()
        .route("/", get(std::future::pending::<&'static str>))
        .layer(ContextLayer::new().timeout(Duration::from_millis(50)));
    let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    for (uri, client) in [("/?timeout=10ms", true), ("/", false)] {
        let res = app.clone().oneshot(get(uri)).await.unwrap();
        assert_eq!(res.status(), 504);
        assert_eq!(tower_reqctx::is_client_deadline(&res), client, "{uri}");
    }
    let ok = Response::new(Body::empty());
    assert!(!tower_reqctx::is_client_deadline(&ok));
}
