//! Why a context was cancelled.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// Why a [`Context`](crate::Context) was cancelled.
///
/// A context records exactly one cause, the first one, and it never changes afterwards.
/// A child cancelled because its parent was reports the parent's cause.
///
/// The enum is `#[non_exhaustive]`: match the causes you act on and keep a `_` arm.
///
/// ```
/// use reqctx::{Cause, DeadlineOrigin};
///
/// let cause = Cause::DeadlineExceeded { origin: DeadlineOrigin::Query };
/// assert!(matches!(cause, Cause::DeadlineExceeded { .. }));
/// assert_eq!(cause.to_string(), "deadline exceeded (set by the client's query parameter)");
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub enum Cause {
    /// The client closed or reset its connection, reset its HTTP/2 stream, or stopped
    /// taking the response.
    ClientDisconnected,
    /// The context's deadline passed. `origin` says who set the deadline that fired.
    DeadlineExceeded {
        /// Who set the deadline that fired.
        origin: DeadlineOrigin,
    },
    /// The request finished normally: the handler returned and its response body ended.
    Completed,
    /// The server is shutting down.
    Shutdown,
    /// Code cancelled the context through [`Canceller::cancel`](crate::Canceller::cancel)
    /// (or by dropping the `Canceller`).
    Cancelled,
    /// An application-defined reason, given to
    /// [`Canceller::cancel_with`](crate::Canceller::cancel_with) (Go's `WithCancelCause`).
    /// Two custom causes are equal only if they are clones of the same [`Cause::custom`] call.
    Custom(Arc<dyn Error + Send + Sync + 'static>),
}

impl Cause {
    /// An application-defined cause wrapping `error`.
    ///
    /// ```
    /// use reqctx::{Cause, Context};
    ///
    /// #[derive(Debug)]
    /// struct QuotaExhausted;
    /// impl std::fmt::Display for QuotaExhausted {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         f.write_str("quota exhausted")
    ///     }
    /// }
    /// impl std::error::Error for QuotaExhausted {}
    ///
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// cancel.cancel_with(Cause::custom(QuotaExhausted));
    /// let cause = ctx.cause().unwrap();
    /// assert_eq!(cause.to_string(), "quota exhausted");
    /// assert!(cause.downcast_ref::<QuotaExhausted>().is_some());
    /// ```
    pub fn custom<E: Error + Send + Sync + 'static>(error: E) -> Cause {
        Cause::Custom(Arc::new(error))
    }

    /// The origin of the deadline that fired, for [`Cause::DeadlineExceeded`].
    pub fn deadline_origin(&self) -> Option<DeadlineOrigin> {
        match self {
            Cause::DeadlineExceeded { origin } => Some(*origin),
            _ => None,
        }
    }

    /// The application-defined error of a [`Cause::Custom`], if it is an `E`.
    pub fn downcast_ref<E: Error + 'static>(&self) -> Option<&E> {
        match self {
            Cause::Custom(e) => e.downcast_ref::<E>(),
            _ => None,
        }
    }

    /// A short name for the kind of cause, stable for logs and metrics labels:
    /// `client_disconnected`, `deadline_exceeded`, `completed`, `shutdown`, `cancelled`
    /// or `custom`.
    pub fn kind(&self) -> &'static str {
        match self {
            Cause::ClientDisconnected => "client_disconnected",
            Cause::DeadlineExceeded { .. } => "deadline_exceeded",
            Cause::Completed => "completed",
            Cause::Shutdown => "shutdown",
            Cause::Cancelled => "cancelled",
            Cause::Custom(_) => "custom",
        }
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::ClientDisconnected => f.write_str("ClientDisconnected"),
            Cause::DeadlineExceeded { origin } => f
                .debug_struct("DeadlineExceeded")
                .field("origin", origin)
                .finish(),
            Cause::Completed => f.write_str("Completed"),
            Cause::Shutdown => f.write_str("Shutdown"),
            Cause::Cancelled => f.write_str("Cancelled"),
            Cause::Custom(e) => f.debug_tuple("Custom").field(e).finish(),
        }
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        match (self, other) {
            (Cause::ClientDisconnected, Cause::ClientDisconnected)
            | (Cause::Completed, Cause::Completed)
            | (Cause::Shutdown, Cause::Shutdown)
            | (Cause::Cancelled, Cause::Cancelled) => true,
            (Cause::DeadlineExceeded { origin: a }, Cause::DeadlineExceeded { origin: b }) => {
                a == b
            }
            // Identity, as Go compares cause errors by value of the interface.
            (Cause::Custom(a), Cause::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Cause {}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::ClientDisconnected => f.write_str("client disconnected"),
            Cause::DeadlineExceeded { origin } => write!(f, "deadline exceeded (set by {origin})"),
            Cause::Completed => f.write_str("request completed"),
            Cause::Shutdown => f.write_str("server shutting down"),
            Cause::Cancelled => f.write_str("context cancelled"),
            Cause::Custom(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Cause::Custom(e) => Some(&**e),
            _ => None,
        }
    }
}

/// Who set the deadline that fired, in [`Cause::DeadlineExceeded`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadlineOrigin {
    /// The client's `?timeout=` query parameter.
    Query,
    /// A deadline header sent by the caller (a budget propagated from an upstream service).
    Header,
    /// The server's own timeout, configured on a layer.
    Layer,
    /// [`Context::with_deadline`](crate::Context::with_deadline) or
    /// [`Context::with_timeout`](crate::Context::with_timeout) in application code.
    Code,
}

impl fmt::Display for DeadlineOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeadlineOrigin::Query => "the client's query parameter",
            DeadlineOrigin::Header => "the caller's deadline header",
            DeadlineOrigin::Layer => "the server's timeout",
            DeadlineOrigin::Code => "application code",
        })
    }
}

/// The error of work that was stopped because its context was cancelled, returned by
/// [`Context::run`](crate::Context::run), [`Context::spawn`](crate::Context::spawn) and
/// [`Context::check`](crate::Context::check).
///
/// With the `axum` feature it implements `IntoResponse`: 504 for a deadline, 503 for a
/// shutdown, 499 for a client that is gone, 500 otherwise, with a one-line plain-text body.
///
/// ```
/// use reqctx::{Cause, Cancelled};
///
/// let err = Cancelled::new(Cause::Shutdown);
/// assert_eq!(err.cause(), &Cause::Shutdown);
/// assert_eq!(err.to_string(), "context cancelled: server shutting down");
/// assert_eq!(Cancelled::new(Cause::Cancelled).to_string(), "context cancelled");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancelled {
    cause: Cause,
}

impl Cancelled {
    /// An error carrying `cause`.
    pub fn new(cause: Cause) -> Cancelled {
        Cancelled { cause }
    }

    /// Why the context was cancelled.
    pub fn cause(&self) -> &Cause {
        &self.cause
    }

    /// The cause, by value.
    pub fn into_cause(self) -> Cause {
        self.cause
    }

    /// The one line a server answers with for this cause, whoever answers (a handler's
    /// `Cancelled`, or tower-reqctx's layer at a deadline). A custom cause's text is the
    /// application's own and is not shown: the line then says only `request cancelled`.
    #[doc(hidden)]
    pub fn answer_text(&self) -> String {
        match &self.cause {
            Cause::Custom(_) => "request cancelled".to_owned(),
            cause => format!("request cancelled: {cause}"),
        }
    }
}

impl From<Cause> for Cancelled {
    fn from(cause: Cause) -> Cancelled {
        Cancelled { cause }
    }
}

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Cancelled => f.write_str("context cancelled"),
            cause => write!(f, "context cancelled: {cause}"),
        }
    }
}

impl Error for Cancelled {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.cause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Boom;
    impl fmt::Display for Boom {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("boom")
        }
    }
    impl Error for Boom {}

    #[test]
    fn custom_causes_compare_by_identity() {
        let a = Cause::custom(Boom);
        let b = Cause::custom(Boom);
        assert_eq!(a, a.clone());
        assert_ne!(a, b);
        assert_ne!(a, Cause::Cancelled);
        assert!(a.source().is_some());
        assert_eq!(a.kind(), "custom");
    }

    #[test]
    fn deadline_equality_includes_origin() {
        let q = Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Query,
        };
        let l = Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Layer,
        };
        assert_ne!(q, l);
        assert_eq!(q.deadline_origin(), Some(DeadlineOrigin::Query));
        assert_eq!(Cause::Completed.deadline_origin(), None);
    }

    #[test]
    fn cancelled_is_send_sync_error() {
        fn assert_err<E: Error + Send + Sync + 'static>() {}
        assert_err::<Cancelled>();
        assert_err::<Cause>();
        let e = Cancelled::new(Cause::ClientDisconnected);
        assert_eq!(e.source().unwrap().to_string(), "client disconnected");
    }
}
