//! The error of an outbound call bound to a context.

use std::error::Error;
use std::fmt;

use reqctx::{Cancelled, Cause};

/// The error of an outbound call bound to a context: the context stopped it, or the client
/// failed.
///
/// `Cancelled` carries a cause:
///
/// - the context's own, when it was cancelled before the call was sent or while it was in
///   flight (a deadline that passed reads `DeadlineExceeded` with the deadline's own
///   origin);
/// - `DeadlineExceeded { origin }`, when the service called answered that its deadline,
///   the budget this call sent it, passed (see [`Propagation`](super::Propagation)). That
///   budget was the caller's own deadline less a margin, so `origin` is the origin of the
///   caller's deadline ([`Context::deadline_origin`](reqctx::Context::deadline_origin)):
///   `Query` when the caller's client set it with `?timeout=`, `Layer` for a server or
///   route timeout, `Header` when the caller's own caller sent it, `Code` for a
///   `with_timeout`. (A context with no deadline sends no budget; a deadline that passes
///   downstream then reads `Header`.) The caller's context is not cancelled by that: its
///   own deadline is still a margin away.
///
/// ```
/// use tower_reqctx::propagate::ClientError;
/// use tower_reqctx::reqctx::{Cancelled, Cause, DeadlineOrigin};
///
/// let err: ClientError<std::io::Error> =
///     Cancelled::new(Cause::DeadlineExceeded { origin: DeadlineOrigin::Query }).into();
/// assert!(err.cause().is_some_and(|c| matches!(c, Cause::DeadlineExceeded { .. })));
/// assert_eq!(err.to_string(), "context cancelled: deadline exceeded (set by the client's query parameter)");
/// ```
#[derive(Debug)]
pub enum ClientError<E> {
    /// The context stopped the call, or the downstream service's deadline passed.
    Cancelled(Cancelled),
    /// The client's own error: the request was sent (or sending it was attempted) and
    /// failed.
    Inner(E),
}

impl<E> ClientError<E> {
    /// The cause, for [`ClientError::Cancelled`].
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            ClientError::Cancelled(c) => Some(c.cause()),
            ClientError::Inner(_) => None,
        }
    }

    /// The client's own error, for [`ClientError::Inner`].
    pub fn into_inner(self) -> Option<E> {
        match self {
            ClientError::Cancelled(_) => None,
            ClientError::Inner(e) => Some(e),
        }
    }
}

impl<E> From<Cancelled> for ClientError<E> {
    fn from(c: Cancelled) -> ClientError<E> {
        ClientError::Cancelled(c)
    }
}

impl<E: fmt::Display> fmt::Display for ClientError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Cancelled(c) => fmt::Display::fmt(c, f),
            ClientError::Inner(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<E: Error + 'static> Error for ClientError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            ClientError::Cancelled(c) => c.source(),
            ClientError::Inner(e) => e.source(),
        }
    }
}

/// The context's cause, which a resolved `cancelled()` guarantees is recorded.
pub(crate) fn cancelled(ctx: &reqctx::Context) -> Cancelled {
    Cancelled::new(ctx.cause().unwrap_or(Cause::Cancelled))
}

/// The error for an answer that says the deadline passed downstream: the budget the call
/// sent ran out, so the caller reads it as its own deadline, with its own deadline's origin
/// (the client's `?timeout=` reads `Query`, a layer's timeout `Layer`), not as the service
/// called saw it (`Header`, the budget it was sent).
///
/// A context with no deadline sent no budget: the deadline that passed was the service
/// called's own, and reads `Header`, as from any service that sent it a deadline.
pub(crate) fn exceeded_downstream(ctx: &reqctx::Context) -> Cancelled {
    Cancelled::new(Cause::DeadlineExceeded {
        origin: ctx
            .deadline_origin()
            .unwrap_or(reqctx::DeadlineOrigin::Header),
    })
}
