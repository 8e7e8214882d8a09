//! The `metrics` feature through a tiny in-test recorder: causes counted by kind once per
//! request, the live-context gauge, and the descriptions.
//!
//! Every test here takes [`SERIAL`] first: the live-context count is global to the
//! process, so the gauge test can assert exact values only while no other test in this
//! binary holds a context.
#![cfg(all(feature = "metrics", feature = "axum"))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use tower::ServiceExt;
use tower_reqctx::{ContextLayer, ReqCtx};

/// Held by each test for its whole run (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Keeps counters and gauges by their key, as `name{label=value}`, and the help texts by
/// name.
#[derive(Default)]
struct Tiny {
    values: Mutex<HashMap<String, Arc<Value>>>,
    descriptions: Mutex<HashMap<String, String>>,
}

#[derive(Default)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Value {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

impl Tiny {
    fn value(&self, key: &Key) -> Arc<Value> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Arc::clone(self.values.lock().unwrap().entry(name).or_default())
    }

    fn get(&self, name: &str) -> Option<u64> {
        let values = self.values.lock().unwrap();
        values.get(name).map(|v| v.0.load(Ordering::Relaxed))
    }

    fn describe(&self, name: KeyName, help: SharedString) {
        let mut descriptions = self.descriptions.lock().unwrap();
        descriptions.insert(name.as_str().to_owned(), help.into_owned());
    }
}

impl Recorder for Tiny {
    fn describe_counter(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.describe(name, help);
    }
    fn describe_gauge(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.describe(name, help);
    }
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.value(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.value(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn app() -> Router {
    Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|ctx: ReqCtx| async move {
                ctx.run(tokio::time::sleep(Duration::from_secs(5)))
                    .await
                    .map(|()| "done")
            }),
        )
        .layer(ContextLayer::new().timeout(Duration::from_secs(10)))
}

async fn get_to_end(app: Router, uri: &str) -> u16 {
    let req = http::Request::get(uri).body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    status
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn each_request_counts_its_cause_once() {
    let _serial = SERIAL.lock().await;
    let recorder = Tiny::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    assert_eq!(get_to_end(app(), "/ok").await, 200);
    assert_eq!(get_to_end(app(), "/ok").await, 200);
    assert_eq!(get_to_end(app(), "/slow?timeout=10ms").await, 504);
    let count = |kind: &str| recorder.get(&format!("reqctx_requests_total{{cause={kind}}}"));
    assert_eq!(count("completed"), Some(2));
    assert_eq!(count("deadline_exceeded"), Some(1));
}

/// An inner service's error is counted as `service_failed`, not lumped under `custom`.
#[tokio::test(flavor = "current_thread")]
async fn an_inner_error_is_counted_as_service_failed() {
    use tower::Layer;
    let _serial = SERIAL.lock().await;
    let recorder = Tiny::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let failing = tower::service_fn(|_req: http::Request<Body>| async {
        Err::<http::Response<Body>, &'static str>("shed")
    });
    let req = http::Request::get("/").body(Body::empty()).unwrap();
    let err = ContextLayer::new().layer(failing).oneshot(req).await;
    assert_eq!(
        err.err(),
        Some("shed"),
        "the error passes through unchanged"
    );
    let count = |kind: &str| recorder.get(&format!("reqctx_requests_total{{cause={kind}}}"));
    assert_eq!(count("service_failed"), Some(1));
    assert_eq!(count("custom"), None);
}

/// The gauge follows a request: zero before it, one while its handler runs, zero once its
/// response has been read and dropped.
#[tokio::test(flavor = "current_thread")]
async fn record_metrics_sets_the_live_request_contexts_gauge() {
    let _serial = SERIAL.lock().await;
    let recorder = Tiny::default();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let live = || {
        tower_reqctx::record_metrics();
        let gauge = recorder.get("reqctx_live_request_contexts{}");
        gauge
            .map(f64::from_bits)
            .expect("record_metrics sets the gauge")
    };
    // A context's count is released when its last handle drops, which no signal announces;
    // with this runtime's one thread, a few yields let any such drop run.
    async fn settled(live: impl Fn() -> f64, want: f64) {
        for _ in 0..100 {
            if live() == want {
                return;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(live(), want, "live request contexts");
    }
    settled(live, 0.0).await;

    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let slot = Arc::new(Mutex::new(Some((started_tx, released)))); // handlers are `Clone`
    let app = Router::new()
        .route(
            "/held",
            get(move || {
                let (started_tx, released) = slot.lock().unwrap().take().expect("one request");
                async move {
                    started_tx.send(()).unwrap();
                    released.await.unwrap();
                    "released"
                }
            }),
        )
        .layer(ContextLayer::new());
    let request = tokio::spawn(get_to_end(app, "/held"));
    started.await.unwrap();
    assert_eq!(live(), 1.0, "one request in its handler");
    release.send(()).unwrap();
    assert_eq!(request.await.unwrap(), 200);
    settled(live, 0.0).await;
}

/// `describe_metrics` gives both metrics their help text.
#[test]
fn describe_metrics_describes_both_metrics() {
    let recorder = Tiny::default();
    metrics::with_local_recorder(&recorder, tower_reqctx::describe_metrics);
    let descriptions = recorder.descriptions.lock().unwrap();
    let mut names: Vec<&str> = descriptions.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["reqctx_live_request_contexts", "reqctx_requests_total"]
    );
    assert!(descriptions.values().all(|help| !help.is_empty()));
}
