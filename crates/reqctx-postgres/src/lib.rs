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
//! # TLS, several addresses, poolers
//!
//! - **TLS**: [`ContextClient::connect_tls`] and [`pool::Manager::with_tls`] take any
//!   `tokio-postgres` TLS connector; the cancel goes over the same TLS as the connection
//!   (with `sslmode=require` a plain cancel would be refused).
//! - **Several addresses**: the cancel goes to the address the connection reached, not to
//!   a new lookup of its host name ([`CancelTarget::Addr`]).
//! - **Poolers** (PgBouncer in transaction mode): a session-level `SET statement_timeout`
//!   would stay on a server backend another client gets. [`TimeoutScope::Auto`] (the
//!   default) sets the budget per session only on a connection that reaches PostgreSQL
//!   directly (the server sees our own TCP port), and transaction-locally otherwise. The
//!   cancel itself goes through PgBouncer, which forwards it.
//!
//! # Fallbacks
//!
//! - A connection string that does not parse, or that this crate cannot follow
//!   (`target_session_attrs` with several hosts): [`Error::Config`] at connect time.
//! - A server that refuses the cancel connection, or one that never closes it, or sent no
//!   BackendKeyData (a pooler): the connection is given up after at most
//!   [`Options::cancel_wait`], and, if this crate opened it, **closed**: with
//!   `client_connection_check_interval` (set at connect on PostgreSQL 14 and later, see
//!   [`Options::client_check_interval`]) the server then ends the statement within that
//!   interval. Before 14, only the `statement_timeout` backstop (with a deadline) stops it.
//!   Never a hang, never a panic.
//!
//! # sqlx
//!
//! See the `reqctx-sqlx` crate: sqlx keeps the cancel key private, so a statement cut by
//! its context is stopped by closing its connection instead.
//!
//! # Features
//!
//! - `deadpool` (off): [`pool`], a deadpool-postgres manager whose recycle step waits for
//!   cancels and resets the connection.
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod cancel;
mod client;
mod connect;
mod error;
mod params;
#[cfg(feature = "deadpool")]
pub mod pool;
mod timeout;

use std::time::Duration;

pub use crate::cancel::CancelTarget;
pub use crate::client::{ContextClient, SqlStatement, connect};
pub use crate::connect::{PgStream, Tls};
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
    timeout_scope: TimeoutScope,
    client_check_interval: Option<Duration>,
}

/// How the budget travels as `statement_timeout` (see [`Options::timeout_scope`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutScope {
    /// [`Session`](TimeoutScope::Session) on a connection this crate opened that reaches
    /// PostgreSQL directly (the server sees the TCP port we connect from),
    /// [`Transaction`](TimeoutScope::Transaction) otherwise: through a pooler or a NAT,
    /// over a Unix socket, or on a connection opened by you. Safe behind PgBouncer without
    /// a setting.
    #[default]
    Auto,
    /// `SET statement_timeout`, cached on the session and pipelined only when it must
    /// change; the pool restores the default. Every statement with a deadline is bounded.
    /// Wrong behind a pooler in transaction mode: the `SET` and the statement can reach
    /// different server backends, and the budget stays on one another client gets.
    Session,
    /// `set_config('statement_timeout', .., true)` pipelined before each statement with a
    /// deadline: it ends with the transaction, so it never outlives it, even behind
    /// PgBouncer. Outside a transaction block it does nothing: such statements are
    /// stopped by the cancel (and the close route) only.
    Transaction,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            cancel_wait: Duration::from_secs(5),
            timeout_tolerance: Duration::from_millis(100),
            min_budget: Duration::from_millis(5),
            statement_timeout: true,
            timeout_scope: TimeoutScope::Auto,
            client_check_interval: Some(Duration::from_millis(100)),
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

    /// How the deadline travels as `statement_timeout` (default [`TimeoutScope::Auto`]).
    ///
    /// ```
    /// use reqctx_postgres::{Options, TimeoutScope};
    ///
    /// // Behind PgBouncer in transaction mode, say so rather than rely on detection.
    /// let options = Options::default().timeout_scope(TimeoutScope::Transaction);
    /// # let _ = options;
    /// ```
    pub fn timeout_scope(mut self, scope: TimeoutScope) -> Self {
        self.timeout_scope = scope;
        self
    }

    /// `client_connection_check_interval` set on each connection at connect (default
    /// 100 ms; `None`: left as the server has it). With it, a statement whose connection
    /// was closed (the fallback when its cancel cannot be delivered) ends within the
    /// interval instead of running to its end. Set only on PostgreSQL 14 and later; a
    /// server that refuses it (a platform without it) keeps its own value.
    pub fn client_check_interval(mut self, every: Option<Duration>) -> Self {
        self.client_check_interval = every;
        self
    }
}
