//! The wire formats: what a request or a response carries about deadlines, and how it is
//! read. Go's duration syntax ([`duration`]), the deadline headers and their codecs, with the
//! header names the layer and the clients share ([`header`]), the `?timeout=` query
//! parameter, the gRPC statuses the layer answers with, and the policy for a client's
//! timeout above the server's maximum.
//!
//! Nothing here depends on the rest of the crate: the layer, the server and the clients all
//! read and write through it.

pub mod duration;
pub(crate) mod grpc;
pub mod header;
pub(crate) mod query;

use std::time::Duration;

/// What to do with a client-requested timeout above
/// [`ContextLayer::max_timeout`](crate::ContextLayer::max_timeout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClampPolicy {
    /// Use the maximum instead (the default).
    #[default]
    Clamp,
    /// Answer `400 Bad Request`; the handler never runs.
    Reject,
}

impl ClampPolicy {
    /// A client's timeout `d` under the maximum `max`: `Ok` is the timeout to use, `Err`
    /// the maximum it went over (for the 400's message).
    pub(crate) fn apply(self, d: Duration, max: Option<Duration>) -> Result<Duration, Duration> {
        match max {
            Some(max) if d > max => match self {
                ClampPolicy::Clamp => Ok(max),
                ClampPolicy::Reject => Err(max),
            },
            _ => Ok(d),
        }
    }
}

/// Splits off the leading ASCII digits.
#[inline]
pub(crate) fn split_digits(bytes: &[u8]) -> (&[u8], &[u8]) {
    let n = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    bytes.split_at(n)
}
