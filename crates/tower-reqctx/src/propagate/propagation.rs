//! What an outbound call sends and how it reads the answer.

use std::time::Duration;

use http::header::HeaderMap;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::wire::header::{DeadlineHeader, EXCEEDED, X_REQCTX_DEADLINE};

/// `grpc-status`, and `4` (`DEADLINE_EXCEEDED`).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_DEADLINE_EXCEEDED: &[u8] = b"4";

/// How outbound calls propagate a context's deadline: the header they send it in, the
/// safety margin they take off, and which answers mean "the deadline passed downstream".
///
/// ```
/// use std::time::Duration;
/// use tower_reqctx::header::{DeadlineHeader, REQUEST_TIMEOUT_MS};
/// use tower_reqctx::propagate::Propagation;
///
/// let propagation = Propagation::new()
///     .header(DeadlineHeader::millis(REQUEST_TIMEOUT_MS))
///     .margin(Duration::from_millis(20)); // a slower network than the default assumes
/// # let _ = propagation;
/// ```
///
/// # The safety margin
///
/// The budget sent is the context's remaining time minus the margin, rounded down. The
/// margin pays for the request's trip to the next service and its time there before its
/// own timer starts, so the next service's deadline passes first, and its 504 reaches the
/// caller while the caller's context is still alive to read it: the caller learns the
/// budget ran out downstream, instead of timing out blind. The default,
/// [`DEFAULT_MARGIN`](Propagation::DEFAULT_MARGIN) (5 ms), covers a round trip inside a
/// data centre with room for a scheduling delay; raise it between regions.
///
/// A context with no more than the margin left is not worth a call: the call fails at
/// once without being sent (see the [module docs](super)).
///
/// # What counts as "deadline exceeded downstream"
///
/// - `grpc-status: 4` (`DEADLINE_EXCEEDED`) in the response's headers, which is where a
///   gRPC server puts it when it fails before sending a message (a trailers-only
///   response). A `grpc-status` in the trailers, after a body, is not seen: the call has
///   returned by then.
/// - `504 Gateway Timeout` with the header `x-reqctx-deadline: exceeded`
///   ([`X_REQCTX_DEADLINE`], [`EXCEEDED`]), which a service under `ContextLayer` sends when
///   its deadline passes. A bare 504 is some gateway's own timeout, not necessarily our
///   budget, so it is an ordinary response unless
///   [`any_gateway_timeout(true)`](Propagation::any_gateway_timeout) says otherwise.
#[derive(Clone, Debug)]
pub struct Propagation {
    header: DeadlineHeader,
    margin: Duration,
    any_gateway_timeout: bool, // false: only a 504 marked `x-reqctx-deadline: exceeded`
}

impl Default for Propagation {
    fn default() -> Propagation {
        Propagation::new()
    }
}

impl Propagation {
    /// The default safety margin: 5 ms.
    pub const DEFAULT_MARGIN: Duration = Duration::from_millis(5);

    /// `grpc-timeout`, a margin of 5 ms, and only marked 504s and `grpc-status: 4` read as
    /// "deadline exceeded downstream".
    pub fn new() -> Propagation {
        Propagation {
            header: DeadlineHeader::GrpcTimeout,
            margin: Propagation::DEFAULT_MARGIN,
            any_gateway_timeout: false,
        }
    }

    /// The header the budget is sent in. Default [`DeadlineHeader::GrpcTimeout`].
    pub fn header(mut self, header: DeadlineHeader) -> Propagation {
        self.header = header;
        self
    }

    /// The safety margin taken off the budget. Default 5 ms. Zero is allowed: the
    /// downstream service then gets the whole budget, and its 504 races the caller's own
    /// deadline.
    pub fn margin(mut self, margin: Duration) -> Propagation {
        self.margin = margin;
        self
    }

    /// Whether every `504 Gateway Timeout` counts as "deadline exceeded downstream", marked
    /// or not. Default `false`: only a 504 marked `x-reqctx-deadline: exceeded` does. Turn
    /// it on when the services behind are not reqctx services but their 504 still means
    /// the budget ran out.
    pub fn any_gateway_timeout(mut self, any: bool) -> Propagation {
        self.any_gateway_timeout = any;
        self
    }

    /// Whether a response's head says the deadline passed downstream (see the [type's
    /// docs](Propagation)).
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode};
    /// use tower_reqctx::header::{EXCEEDED, X_REQCTX_DEADLINE};
    /// use tower_reqctx::propagate::Propagation;
    ///
    /// let p = Propagation::new();
    /// let mut headers = HeaderMap::new();
    /// assert!(!p.is_deadline_exceeded(StatusCode::GATEWAY_TIMEOUT, &headers));
    /// assert!(p.clone().any_gateway_timeout(true).is_deadline_exceeded(StatusCode::GATEWAY_TIMEOUT, &headers));
    /// headers.insert(X_REQCTX_DEADLINE, EXCEEDED);
    /// assert!(p.is_deadline_exceeded(StatusCode::GATEWAY_TIMEOUT, &headers));
    /// assert!(!p.is_deadline_exceeded(StatusCode::OK, &headers));
    ///
    /// let mut grpc = HeaderMap::new();
    /// grpc.insert("grpc-status", "4".parse().unwrap());
    /// assert!(p.is_deadline_exceeded(StatusCode::OK, &grpc));
    /// ```
    pub fn is_deadline_exceeded(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        self.exceeded_check().matches(status, headers)
    }

    /// The part of the configuration a response future keeps.
    pub(crate) fn exceeded_check(&self) -> ExceededCheck {
        ExceededCheck {
            any_gateway_timeout: self.any_gateway_timeout,
        }
    }

    /// What an outbound call bound to `ctx` should do now.
    pub(crate) fn plan(&self, ctx: &reqctx::Context) -> Plan {
        if let Some(cause) = ctx.cause() {
            return Plan::Cancelled(cause);
        }
        let Some(remaining) = ctx.remaining() else {
            return Plan::Send {
                header: None,
                remaining: None,
            };
        };
        let budget = remaining.saturating_sub(self.margin);
        if remaining <= self.margin || budget < self.header.resolution() {
            // Re-read: the deadline may have passed since `cause` was read, and `cause`
            // records it with its origin.
            return match ctx.cause() {
                Some(cause) => Plan::Cancelled(cause),
                None => Plan::Spent,
            };
        }
        Plan::Send {
            header: Some(self.header.encode(budget)),
            remaining: Some(remaining),
        }
    }

    /// Removes any value of the deadline header and sets `value`, if any.
    pub(crate) fn set_header(&self, headers: &mut HeaderMap, value: Option<HeaderValue>) {
        let name = self.header.name();
        match value {
            Some(value) => {
                headers.insert(name, value); // replaces every value of that name
            }
            None => {
                headers.remove(name);
            }
        }
    }
}

/// Reads "deadline exceeded downstream" in a response's head, as [`Propagation`] says.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExceededCheck {
    any_gateway_timeout: bool,
}

impl ExceededCheck {
    pub(crate) fn matches(self, status: StatusCode, headers: &HeaderMap) -> bool {
        if headers
            .get(GRPC_STATUS)
            .is_some_and(|v| v.as_bytes() == GRPC_DEADLINE_EXCEEDED)
        {
            return true;
        }
        status == StatusCode::GATEWAY_TIMEOUT
            && (self.any_gateway_timeout
                || headers
                    .get_all(X_REQCTX_DEADLINE)
                    .iter()
                    .any(|v| v.as_bytes().eq_ignore_ascii_case(EXCEEDED.as_bytes())))
    }
}

/// What [`Propagation::plan`] decided.
#[derive(Debug)]
pub(crate) enum Plan {
    /// The context is cancelled: fail with this cause, send nothing.
    Cancelled(reqctx::Cause),
    /// No more than the margin is left, but the deadline has not passed: send nothing, and
    /// fail with the cause the context records when it ends (its deadline is at most the
    /// margin away).
    Spent,
    /// Send, with this deadline header (`None`: the context has no deadline).
    Send {
        header: Option<HeaderValue>,
        #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
        remaining: Option<Duration>, // the context's remaining time when planned
    },
}
