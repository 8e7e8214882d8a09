//! The custom causes the layer and the server record, and the label each cause has in
//! metrics and on the request's span. They depend on nothing else in the crate: the layer
//! and the server both record them.

use std::error::Error as StdError;
use std::fmt;
#[cfg(feature = "server")]
use std::sync::LazyLock;

use reqctx::Cause;

/// The cause of a request whose handler (or response body) panicked: it is not the
/// client's doing. Check for it with [`Cause::downcast_ref`].
///
/// Recorded when the panic unwinds through the [`ContextLayer`](crate::ContextLayer)'s
/// future or body, whatever catches it further out (tower-http's `CatchPanicLayer`
/// outside the layer, as usual, or hyper). With `CatchPanicLayer` *inside* the layer,
/// the panic becomes an ordinary `500` before the layer sees it: give `CatchPanicLayer`
/// `PanicResponse` (feature `catch-panic`) and the cause still reads
/// `HandlerPanicked`; with tower-http's default handler it reads `Completed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerPanicked;

impl fmt::Display for HandlerPanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the handler panicked")
    }
}

impl StdError for HandlerPanicked {}

/// The cause of a request whose inner service returned an error instead of a response
/// (tower's `Timeout` elapsed, `LoadShed` shed it, ...): the error passes through the
/// layer unchanged (to axum's `HandleErrorLayer`, say), and the context ends with this
/// cause, not `ClientDisconnected`. Check for it with [`Cause::downcast_ref`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceFailed;

impl fmt::Display for ServiceFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the inner service returned an error")
    }
}

impl StdError for ServiceFailed {}

/// The error of a response body cut short by its context: the client sees a truncated
/// response, never a clean end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseBodyFailed;

impl fmt::Display for ResponseBodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the response body failed")
    }
}

impl StdError for ResponseBodyFailed {}

/// The cause of a request whose response body was dropped before anything polled it, on
/// a connection the client had not left: middleware outside the
/// [`ContextLayer`](crate::ContextLayer) replaced or discarded the response (an outer
/// `map_response` that rewrites error pages, a cache that answers from its own copy), so
/// the client got an answer, but not this one, and this one was never sent. Check for it
/// with [`Cause::downcast_ref`].
///
/// A wrapper that keeps the body and polls it through (tower-http's `CompressionLayer`,
/// `SetResponseHeader`, `TraceLayer`) leaves the body's own end, `Completed`. A client
/// that left first is `ClientDisconnected` where the connection says so (under
/// [`serve`](crate::serve()) or `WatchedListener`, or an HTTP/2 connection's close); over
/// HTTP/2, a client that resets its stream in the instant between the handler's answer
/// and hyper's first read of the body cannot be told from a discarded body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseDiscarded;

impl fmt::Display for ResponseDiscarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the response was discarded before it was sent")
    }
}

impl StdError for ResponseDiscarded {}

/// The cause of a connection context whose connection the server closed while it was not
/// shutting down: keep-alive over (`connection: close`, a header-read timeout, an HTTP/2
/// GOAWAY), a protocol error, an upgraded connection's IO dropped by its handler. A custom
/// [`Cause`]: `cause.downcast_ref::<ServerClosed>()` finds it.
///
/// ```
/// # use tower_reqctx::ServerClosed;
/// # let cause = tower_reqctx::reqctx::Cause::custom(ServerClosed);
/// if cause.downcast_ref::<ServerClosed>().is_some() {
///     // the server ended the connection; no client left
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerClosed;

impl fmt::Display for ServerClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server closed the connection")
    }
}

impl StdError for ServerClosed {}

/// [`ServerClosed`] as a cause: one allocation for the process, not one per connection.
#[cfg(feature = "server")]
pub(crate) fn server_closed() -> Cause {
    static CAUSE: LazyLock<Cause> = LazyLock::new(|| Cause::custom(ServerClosed));
    CAUSE.clone()
}

/// The labels of [`label`], by [`label_index`]: [`Cause::kind`]'s, and the layer's own
/// custom causes by name. The first five are the causes that carry nothing but their kind
/// (and a deadline's origin).
#[cfg_attr(not(feature = "live"), allow(dead_code))] // the live view counts by index
pub(crate) const LABELS: [&str; 10] = [
    "completed",
    "deadline_exceeded",
    "client_disconnected",
    "shutdown",
    "cancelled",
    "handler_panicked",
    "service_failed",
    "response_discarded",
    "response_body_failed",
    "custom",
];

/// The label of a request's cause in metrics and on its span: [`Cause::kind`], with the
/// layer's own custom causes named (`service_failed`, `handler_panicked`,
/// `response_body_failed`, `response_discarded`) rather than lumped under `custom`.
pub(crate) fn label(cause: &Cause) -> &'static str {
    LABELS[label_index(cause)]
}

/// The index of `cause`'s label in [`LABELS`].
pub(crate) fn label_index(cause: &Cause) -> usize {
    match cause {
        Cause::Completed => 0,
        Cause::DeadlineExceeded { .. } => 1,
        Cause::ClientDisconnected => 2,
        Cause::Shutdown => 3,
        Cause::Cancelled => 4,
        _ if cause.downcast_ref::<HandlerPanicked>().is_some() => 5,
        _ if cause.downcast_ref::<ServiceFailed>().is_some() => 6,
        _ if cause.downcast_ref::<ResponseDiscarded>().is_some() => 7,
        _ if cause.downcast_ref::<ResponseBodyFailed>().is_some() => 8,
        _ => 9,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_kinds_and_the_layers_own_causes() {
        for cause in [
            Cause::Completed,
            Cause::DeadlineExceeded {
                origin: reqctx::DeadlineOrigin::Query,
            },
            Cause::ClientDisconnected,
            Cause::Shutdown,
            Cause::Cancelled,
        ] {
            assert_eq!(label(&cause), cause.kind());
        }
        assert_eq!(label(&Cause::custom(HandlerPanicked)), "handler_panicked");
        assert_eq!(label(&Cause::custom(ServiceFailed)), "service_failed");
        assert_eq!(
            label(&Cause::custom(ResponseDiscarded)),
            "response_discarded"
        );
        assert_eq!(
            label(&Cause::custom(ResponseBodyFailed)),
            "response_body_failed"
        );
        assert_eq!(label(&Cause::custom(ServerClosed)), "custom");
    }
}
