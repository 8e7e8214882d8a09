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
