//! The error of a statement bound to a context.

use std::error::Error as StdError;
use std::fmt;

use reqctx::{Cancelled, Cause};

/// Why a statement run through [`ContextClient`](crate::ContextClient) did not give its
/// result.
///
/// A statement stopped because its context ended is always [`Error::Cancelled`], with the
/// context's [`Cause`], never a bare driver error: the `57014 query_canceled` that our own
/// cancel (or our own `statement_timeout`) provoked is translated. A `57014` we did not
/// cause (`pg_cancel_backend` from a DBA, a role-level `statement_timeout`) stays an
/// [`Error::Postgres`].
///
/// An application error type usually wraps it and converts the cancelled case:
///
/// ```
/// use reqctx::{Cancelled, Cause};
/// use reqctx_postgres::Error;
///
/// let err = Error::from(Cancelled::new(Cause::ClientDisconnected));
/// assert_eq!(err.cancelled().map(|c| c.cause()), Some(&Cause::ClientDisconnected));
/// let cancelled: Cancelled = err.try_into().unwrap();
/// assert_eq!(cancelled.cause(), &Cause::ClientDisconnected);
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The context ended first. The statement was not sent, or was cancelled on the
    /// server (see [`ContextClient`](crate::ContextClient) for what is guaranteed then).
    Cancelled(Cancelled),
    /// The driver or the server reported an error of its own.
    Postgres(tokio_postgres::Error),
    /// The connection was given up after a cancel that could not be confirmed (the
    /// statement finished first, the cancel connection failed or timed out, the server
    /// sent no cancel key): nothing more is sent on it. Open a new one (a pool does).
    Unusable,
    /// The configuration cannot be used: a `DATABASE_URL` that does not parse, or a
    /// setting this crate cannot cancel through (several hosts).
    Config(String),
    /// The connection could not be opened: no address answered, or `connect_timeout`
    /// passed.
    Io(std::io::Error),
    /// The transaction this statement would have run in was rolled back after a cancel
    /// (see [`ContextClient`](crate::ContextClient)): nothing was sent. End the
    /// transaction (`ROLLBACK` or `COMMIT` through
    /// [`batch_execute`](crate::ContextClient::batch_execute), answered here without
    /// reaching the server) before running more on this connection.
    RolledBack,
}

impl Error {
    /// The [`Cancelled`] error, if the context ended first.
    pub fn cancelled(&self) -> Option<&Cancelled> {
        match self {
            Error::Cancelled(c) => Some(c),
            _ => None,
        }
    }

    /// The context's cause, if the context ended first.
    pub fn cause(&self) -> Option<&Cause> {
        self.cancelled().map(Cancelled::cause)
    }
}

impl From<Cancelled> for Error {
    fn from(c: Cancelled) -> Error {
        Error::Cancelled(c)
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        Error::Postgres(e)
    }
}

/// `Ok` for [`Error::Cancelled`]; the error itself otherwise.
impl TryFrom<Error> for Cancelled {
    type Error = Error;

    fn try_from(e: Error) -> Result<Cancelled, Error> {
        match e {
            Error::Cancelled(c) => Ok(c),
            other => Err(other),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Cancelled(c) => write!(f, "statement {c}"),
            Error::Postgres(e) => write!(f, "postgres: {e}"),
            Error::Unusable => f.write_str(
                "connection unusable: a cancel on it could not be confirmed, so it was given up",
            ),
            Error::Config(msg) => write!(f, "postgres configuration: {msg}"),
            Error::Io(e) => write!(f, "postgres connection: {e}"),
            Error::RolledBack => f.write_str(
                "the transaction was rolled back after a cancel: end it before running more",
            ),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Cancelled(c) => Some(c),
            Error::Postgres(e) => Some(e),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}
