//! The gRPC statuses the layer answers with, and how it tells a gRPC request.

use http::HeaderValue;
use reqctx::Cause;

/// `DEADLINE_EXCEEDED`.
pub(crate) const DEADLINE_EXCEEDED: u8 = 4;
/// `INVALID_ARGUMENT`: a `grpc-timeout` that does not decode.
pub(crate) const INVALID_ARGUMENT: u8 = 3;
/// `UNAVAILABLE`: the server is shutting down.
const UNAVAILABLE: u8 = 14;

/// The gRPC status of a cause the client can still be told about.
pub(crate) fn status(cause: &Cause) -> Option<(u8, &'static str)> {
    match cause {
        Cause::DeadlineExceeded { .. } => Some((DEADLINE_EXCEEDED, "deadline exceeded")),
        Cause::Shutdown => Some((UNAVAILABLE, "server shutting down")),
        _ => None,
    }
}

/// `content-type: application/grpc` (or `application/grpc+proto`, ...).
pub(crate) fn is_grpc(content_type: Option<&HeaderValue>) -> bool {
    content_type.is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
