//! PostgreSQL statements bound to a [`reqctx::Context`]: when the request's context ends
//! (the client left, the deadline passed, the server shuts down), the statement stops **on
//! the server**, not only in this process, and the error carries the context's
//! [`Cause`](reqctx::Cause).
//!
//! Dropping a `tokio-postgres` future does not stop its query: PostgreSQL runs it to the
//! end, holding a backend, its locks and CPU. [`ContextClient`] sends PostgreSQL's
//! CancelRequest when the context is cancelled, waits until the server has acted, keeps
//! the connection only when it can prove no stale cancel is left to hit the next
//! statement, and turns the remaining budget into a `statement_timeout` as a backstop.
//!
//! ```no_run
//! # #![allow(dead_code)]
//! # #[cfg(feature = "deadpool")] mod wrapper {
//! use axum::{Router, extract::State, http::StatusCode, routing::get};
//! use reqctx::Cause;
//! use reqctx_postgres::{Error, pool::Pool};
//! use tower_reqctx::{ContextLayer, ReqCtx};
//!
//! async fn report(ReqCtx(ctx): ReqCtx, State(pool): State<Pool>) -> Result<String, StatusCode> {
//!     let mut db = pool.get().await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
//!     match db.query(&ctx, "SELECT count(*) FROM big WHERE slow($1)", &[&42_i32]).await {
//!         Ok(rows) => Ok(rows[0].get::<_, i64>(0).to_string()),
//!         // The client left or the deadline passed: the query has already stopped.
//!         Err(Error::Cancelled(c)) if matches!(c.cause(), Cause::DeadlineExceeded { .. }) => {
//!             Err(StatusCode::GATEWAY_TIMEOUT)
//!         }
//!         Err(_) => Err(StatusCode::INTERNAL_SERVER_ERROR),
//!     }
//! }
//!
//! fn app(pool: Pool) -> Router {
//!     Router::new()
//!         .route("/report", get(report))
//!         .layer(ContextLayer::new())
//!         .with_state(pool)
//! }
//! # }
//! # fn main() {}
//! ```
//!
//!
//! # The rules
//!
//! - A statement runs only while its context lives; one whose budget is below
//!   [`Options::min_budget`] is not sent.
//! - When the context ends mid-statement, the call returns once the server closed our
//!   cancel connection and the statement ended, or after [`Options::cancel_wait`].
//! - A connection is reused after a cancel only if its statement ended with `57014` after
//!   our cancel reached the server; otherwise it is given up ([`Error::Unusable`]).
//! - A dropped statement future cancels from a spawned task; the connection waits for it.
//! - With a deadline, `statement_timeout` is at most the remaining budget; the pool
//!   restores the default before anyone else gets the connection.
//!
//! # Cancellation safety
//!
//! Every statement method of [`ContextClient`] may be dropped at any point: the cancel
//! and the wait then continue in a spawned task, and the connection is not used again
//! (by the next call, or by the pool) until they are done.
//!
//! # Fallbacks
//!
//! - A connection string that does not parse, or names several hosts:
//!   [`Error::Config`] at connect time.
//! - A server that refuses the cancel connection, or one that never closes it: the
//!   connection is given up after at most [`Options::cancel_wait`] (the statement itself is
//!   then stopped by the `statement_timeout` backstop, if there was a deadline). Never a
//!   hang, never a panic.
//! - A server that sent no BackendKeyData (some poolers): the cancel names no backend, no
//!   `57014` follows, and the connection is given up as above.
//!
//! # sqlx
//!
//! Not offered. sqlx keeps the backend's cancel key private and has no cancel API, so the
//! only route is `SELECT pg_cancel_backend(pid)` from a second connection. That needs a
//! spare connection at the worst moment (a pool under load), the role's right to signal
//! that backend, and it cannot be proven to hit the right statement; and a sqlx query
//! future dropped mid-statement has its connection drained by sqlx itself, with no hook
//! to wait for our cancel before the connection is reused. The guarantees above could not
//! be kept, so we do not pretend to.
//!
//! # Features
//!
//! - `deadpool` (off): [`pool`], a deadpool-postgres manager whose recycle step waits for
//!   cancels and resets the connection.
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod cancel;
mod client;
mod error;
mod params;
#[cfg(feature = "deadpool")]
pub mod pool;
mod timeout;

use std::time::Duration;

pub use crate::cancel::CancelTarget;
pub use crate::client::{ContextClient, SqlStatement, connect};
pub use crate::error::Error;

/// Settings of a [`ContextClient`]. Builder methods take `self` and return `Self`.
///
/// ```
/// use std::time::Duration;
/// use reqctx_postgres::Options;
///
/// let options = Options::default()
///     .cancel_wait(Duration::from_secs(2))
///     .timeout_tolerance(Duration::from_millis(50));
/// # let _ = options;
/// ```
#[derive(Clone, Debug)]
pub struct Options {
    cancel_wait: Duration,
    timeout_tolerance: Duration,
    min_budget: Duration,
    statement_timeout: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            cancel_wait: Duration::from_secs(5),
            timeout_tolerance: Duration::from_millis(100),
            min_budget: Duration::from_millis(5),
            statement_timeout: true,
        }
    }
}

impl Options {
    /// The longest wait, after a cancel, for the server to close the cancel connection and
    /// for the statement to end (default 5 s). Past it the connection is given up.
    pub fn cancel_wait(mut self, wait: Duration) -> Self {
        self.cancel_wait = wait;
        self
    }

    /// How much longer than the remaining budget a cached `statement_timeout` may be
    /// before a new `SET` is sent (default 100 ms). Larger: fewer `SET`s, a looser
    /// backstop.
    pub fn timeout_tolerance(mut self, tolerance: Duration) -> Self {
        self.timeout_tolerance = tolerance;
        self
    }

    /// A statement whose remaining budget is below this is not sent (default 5 ms); the
    /// call waits out the budget and returns the context's cause.
    pub fn min_budget(mut self, min: Duration) -> Self {
        self.min_budget = min;
        self
    }

    /// Whether a deadline is sent as `statement_timeout` (default `true`).
    pub fn statement_timeout(mut self, on: bool) -> Self {
        self.statement_timeout = on;
        self
    }
}
