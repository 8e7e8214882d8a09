//! Metrics through the `metrics` facade (feature `metrics`); no exporter is bundled.
//!
//! - `reqctx_requests_total{cause}` (counter): requests whose context ended, by the
//!   [`kind`](reqctx::Cause::kind) of the first cause recorded (`completed`,
//!   `client_disconnected`, `deadline_exceeded`, `shutdown`, `cancelled`, `custom`), with
//!   the layer's own causes named: `service_failed` ([`ServiceFailed`](crate::ServiceFailed)),
//!   `handler_panicked` ([`HandlerPanicked`](crate::HandlerPanicked)) and
//!   `response_body_failed` ([`ResponseBodyFailed`](crate::ResponseBodyFailed)),
//!   incremented once per request by [`ContextLayer`](crate::ContextLayer) when it records
//!   the cause.
//! - `reqctx_live_request_contexts` (gauge): [`live_request_contexts`](crate::live_request_contexts()),
//!   set by [`record_metrics`], which you call before each scrape (from the scrape
//!   handler, say), so nothing is measured per request for it.
//!
//! Cost per request: one counter increment through the installed recorder, with a static
//! key (no allocation); with no recorder installed, the facade's no-op.
//!
//! Without the feature, the layer's hook compiles to nothing.

/// Counts one request whose context ended with a cause of kind `kind`.
#[cfg(feature = "metrics")]
#[allow(dead_code)] // called where the layer reports the cause
pub(crate) fn cause(kind: &'static str) {
    // One literal per known kind, so each key is a static: no allocation per request.
    macro_rules! by_kind {
        ($($known:literal),*) => {
            match kind {
                $($known => ::metrics::counter!("reqctx_requests_total", "cause" => $known),)*
                other => ::metrics::counter!("reqctx_requests_total", "cause" => other),
            }
        };
    }
    by_kind!(
        "completed",
        "client_disconnected",
        "deadline_exceeded",
        "shutdown",
        "cancelled",
        "custom",
        "service_failed",
        "handler_panicked",
        "response_body_failed"
    )
    .increment(1);
}

/// Counts one request whose context ended with a cause of kind `kind`: nothing without the
/// `metrics` feature.
#[cfg(not(feature = "metrics"))]
#[allow(dead_code)] // called where the layer reports the cause
#[inline(always)]
pub(crate) fn cause(_kind: &'static str) {}

/// Sets the gauge `reqctx_live_request_contexts` to
/// [`live_request_contexts()`](crate::live_request_contexts()). Call it before each scrape,
/// e.g. first thing in the handler that renders your exporter's output. Feature `metrics`.
///
/// ```
/// # #[allow(dead_code)]
/// async fn scrape() -> String {
///     tower_reqctx::record_metrics();
///     // ... then render the installed exporter's metrics.
///     # String::new()
/// }
/// ```
#[cfg(feature = "metrics")]
pub fn record_metrics() {
    #[allow(clippy::cast_precision_loss)] // exact below 2^53 contexts
    let live = super::scope::live_request_contexts() as f64;
    ::metrics::gauge!("reqctx_live_request_contexts").set(live);
}

/// Describes this crate's metrics to the installed recorder (their help text). Optional;
/// call it once at startup, after installing the recorder. Feature `metrics`.
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    ::metrics::describe_counter!(
        "reqctx_requests_total",
        "Requests whose context ended, by the kind of its first cause."
    );
    ::metrics::describe_gauge!(
        "reqctx_live_request_contexts",
        "Request contexts alive: requests in flight, plus any whose context a task still holds."
    );
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder,
        SharedString, Unit,
    };

    /// Keeps counters and gauges by their key, as `name{label=value}`.
    #[derive(Default)]
    struct Tiny {
        values: Mutex<HashMap<String, Arc<Value>>>,
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
    }

    impl Recorder for Tiny {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
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

    #[test]
    fn causes_are_counted_by_kind() {
        let recorder = Tiny::default();
        metrics::with_local_recorder(&recorder, || {
            super::describe_metrics();
            super::cause("completed");
            super::cause("completed");
            super::cause("client_disconnected");
            super::cause("a_future_kind");
        });
        let count = |kind: &str| recorder.get(&format!("reqctx_requests_total{{cause={kind}}}"));
        assert_eq!(count("completed"), Some(2));
        assert_eq!(count("client_disconnected"), Some(1));
        assert_eq!(count("a_future_kind"), Some(1));
        assert_eq!(count("deadline_exceeded"), None);
    }

    #[test]
    fn record_metrics_sets_the_live_gauge() {
        let recorder = Tiny::default();
        metrics::with_local_recorder(&recorder, super::record_metrics);
        let live = recorder
            .get("reqctx_live_request_contexts{}")
            .map(f64::from_bits);
        assert!(live.is_some_and(|n| n >= 0.0), "{live:?}");
    }
}
