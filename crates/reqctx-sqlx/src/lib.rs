//! [sqlx](https://docs.rs/sqlx) (PostgreSQL) statements bound to a [`reqctx::Context`]:
//! when the request's context ends (the client left, the deadline passed, the server shuts
//! down), the statement stops **on the server**, and the error carries the context's
//! [`Cause`].
//!
//! sqlx keeps the backend's cancel key private, so the statement is not cancelled: its
//! connection is **closed**. PostgreSQL (14 and later, on Linux, macOS and the BSDs) checks
//! a running statement's client socket every `client_connection_check_interval`, which
//! [`ContextPool`] sets on each of its connections, and ends the statement of a client that
//! is gone. The pool opens a new connection in its place: a cut statement costs one
//! reconnect.
//!
//! ```no_run
//! # #![allow(dead_code)]
//! use axum::{Router, extract::State, http::StatusCode, routing::get};
//! use reqctx_sqlx::ContextPool;
//! use tower_reqctx::{ContextLayer, ReqCtx};
//!
//! async fn report(ReqCtx(ctx): ReqCtx, State(pool): State<ContextPool>) -> Result<String, StatusCode> {
//!     let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM big WHERE slow($1)")
//!         .bind(42_i32)
//!         .fetch_one(pool.bind(&ctx)) // the statement lives only while `ctx` does
//!         .await
//!         .map_err(|e| match reqctx_sqlx::cause(&e) {
//!             Some(_) => StatusCode::GATEWAY_TIMEOUT, // the deadline passed, or the client left
//!             None => StatusCode::INTERNAL_SERVER_ERROR,
//!         })?;
//!     Ok(n.to_string())
//! }
//!
//! # async fn run() -> Result<(), sqlx::Error> {
//! let pool = ContextPool::connect(&std::env::var("DATABASE_URL").unwrap()).await?;
//! let app: Router = Router::new()
//!     .route("/report", get(report))
//!     .layer(ContextLayer::new())
//!     .with_state(pool);
//! # let _ = app; Ok(()) }
//! # fn main() {}
//! ```
//!
//! # The rules
//!
//! - A statement runs only while its context lives: one whose context already ended is not
//!   sent; waiting for a pool connection is bound too.
//! - When the context ends mid-statement, the call returns at once with the context's cause
//!   ([`cause`]), and the statement's connection is closed, never returned to the pool;
//!   the server ends the statement within the check interval.
//! - A statement future (or row stream) dropped before its end does the same, from `Drop`.
//! - With a deadline, the statement also runs under a `statement_timeout` no longer than
//!   the remaining budget (nor than the session's own), a backstop for when this process
//!   cannot act; it is reset before the connection goes back to the pool.
//!
//! # Which cause wins
//!
//! The context is checked first at every step: a statement that ends with its result in
//! the same instant as its context is reported as cancelled (its connection closed). A
//! `57014 query_canceled` from our own `statement_timeout` after the deadline passed is
//! reported as the context's `DeadlineExceeded`; one we did not cause stays a database
//! error.
//!
//! # Cancellation safety
//!
//! Every future and stream of [`Bound`] may be dropped at any point: a statement in flight
//! then has its connection closed, so nothing it did is handed to anyone else.
//!
//! # What it costs, and where it does not apply
//!
//! - A statement without a deadline: nothing more than sqlx's own. With a deadline: one
//!   round trip before it (the `SET statement_timeout`) and a reset after it, off the
//!   request's path.
//! - A cut statement: its connection (a reconnect, TLS handshake included).
//! - PostgreSQL before 14, or a server that refuses `client_connection_check_interval`
//!   (Windows): [`ContextPool::connect`] fails with a [`sqlx::Error::Configuration`] saying
//!   so, rather than leave statements running after their client left.
//! - Behind PgBouncer in transaction mode the session settings would reach other clients'
//!   backends: connect directly, or use `reqctx-postgres` (whose cancel PgBouncer
//!   forwards). PgBouncer's session mode is not tested.
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

use std::fmt;
use std::io;
use std::time::Duration;

use futures_core::stream::BoxStream;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use reqctx::{Cancelled, Cause, Context};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgQueryResult, PgRow, PgStatement,
    PgTypeInfo,
};
use sqlx::{Connection as _, Describe, Either, Execute, Executor, Postgres};

/// Settings of a [`ContextPool`]. Builder methods take `self` and return `Self`.
///
/// ```
/// use std::time::Duration;
/// use reqctx_sqlx::Options;
///
/// let options = Options::default().check_interval(Duration::from_millis(50));
/// # let _ = options;
/// ```
#[derive(Clone, Debug)]
pub struct Options {
    check_interval: Duration,
    statement_timeout: bool,
    /// The sessions' own `statement_timeout` (ms, 0 = none), read at connect.
    baseline_ms: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            check_interval: Duration::from_millis(100),
            statement_timeout: true,
            baseline_ms: 0,
        }
    }
}

impl Options {
    /// `client_connection_check_interval` on each connection (default 100 ms): how long a
    /// statement whose connection was closed may still run on the server. Shorter: a
    /// faster stop, a `poll()` more often per running statement on the server.
    pub fn check_interval(mut self, every: Duration) -> Self {
        self.check_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Whether a deadline is also sent as `statement_timeout` (default `true`).
    pub fn statement_timeout(mut self, on: bool) -> Self {
        self.statement_timeout = on;
        self
    }
}

/// A sqlx PostgreSQL pool whose statements can be bound to a [`Context`]
/// ([`bind`](ContextPool::bind)). Cheap to clone (it is sqlx's pool and the options).
#[derive(Clone, Debug)]
pub struct ContextPool {
    pool: PgPool,
    options: Options,
}

impl ContextPool {
    /// Opens a pool for `url` with sqlx's default pool settings and default [`Options`],
    /// and one connection at once (so that a server this cannot work with is reported
    /// here).
    ///
    /// # Errors
    /// sqlx's errors; [`sqlx::Error::Configuration`] for a server before PostgreSQL 14 or
    /// one that refuses `client_connection_check_interval`.
    pub async fn connect(url: &str) -> Result<ContextPool, sqlx::Error> {
        ContextPool::connect_with(url.parse()?, PgPoolOptions::new(), Options::default()).await
    }

    /// Opens a pool from sqlx's settings. Its `after_connect` hook is replaced by this
    /// crate's (the version check and `client_connection_check_interval`).
    ///
    /// # Errors
    /// As [`connect`](ContextPool::connect).
    pub async fn connect_with(
        connect: PgConnectOptions,
        pool: PgPoolOptions,
        options: Options,
    ) -> Result<ContextPool, sqlx::Error> {
        let every = options.check_interval;
        // Checked on a connection of our own first: the pool retries a failing
        // `after_connect` until its acquire timeout, which would hide the reason.
        let mut probe = PgConnection::connect_with(&connect).await?;
        let checked = prepare(&mut probe, every).await;
        let _ = probe.close().await;
        checked?;
        let pool = pool
            .after_connect(move |conn, _| prepare(conn, every).boxed())
            .connect_with(connect)
            .await?;
        // The sessions' own limit (the role's, the database's): a budget is sent only when
        // shorter, so it never lifts a DBA's limit.
        let (baseline,): (i64,) = sqlx::query_as(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'",
        )
        .fetch_one(&pool)
        .await?;
        let options = Options {
            baseline_ms: u64::try_from(baseline).unwrap_or(0),
            ..options
        };
        Ok(ContextPool { pool, options })
    }

    /// The statements run through the returned executor are bound to `ctx`, each on a
    /// connection of its own from the pool (as with `&PgPool`).
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # async fn run(pool: reqctx_sqlx::ContextPool, ctx: reqctx::Context) -> Result<(), sqlx::Error> {
    /// let rows = sqlx::query("SELECT id FROM orders WHERE total > $1")
    ///     .bind(100_i64)
    ///     .fetch_all(pool.bind(&ctx))
    ///     .await?;
    /// # let _ = rows; Ok(()) }
    /// ```
    pub fn bind<'a>(&'a self, ctx: &'a Context) -> Bound<'a> {
        Bound {
            target: Target::Pool(self),
            ctx,
        }
    }

    /// A connection from the pool, held for several statements (a transaction, say), each
    /// bound with [`ContextConnection::bind`]. Waiting for it is bound to `ctx`.
    ///
    /// # Errors
    /// The context's cause (see [`cause`]) if it ended first; sqlx's errors otherwise.
    pub async fn acquire(&self, ctx: &Context) -> Result<ContextConnection, sqlx::Error> {
        let conn = acquire(&self.pool, ctx).await?;
        Ok(ContextConnection {
            conn: Some(conn),
            options: self.options.clone(),
            timeout_set: false,
        })
    }

    /// sqlx's pool itself, for what needs no context. A statement run through it is not
    /// bound to anything.
    pub fn inner(&self) -> &PgPool {
        &self.pool
    }
}

/// A pooled connection whose statements are bound with [`bind`](ContextConnection::bind).
///
/// Once a statement on it was cut by its context, the connection is closed: every later
/// statement fails with an [`sqlx::Error::Io`] of kind `NotConnected`. Dropped, it goes
/// back to the pool (its `statement_timeout` reset first, if a statement set it).
///
/// ```no_run
/// # #![allow(dead_code)]
/// # async fn run(pool: reqctx_sqlx::ContextPool, ctx: reqctx::Context) -> Result<(), sqlx::Error> {
/// let mut conn = pool.acquire(&ctx).await?;
/// sqlx::query("BEGIN").execute(conn.bind(&ctx)).await?;
/// sqlx::query("UPDATE stock SET n = n - 1 WHERE id = $1").bind(7_i64).execute(conn.bind(&ctx)).await?;
/// sqlx::query("COMMIT").execute(conn.bind(&ctx)).await?;
/// // Cut in between: the connection closes, and the server rolls the transaction back.
/// # Ok(()) }
/// ```
pub struct ContextConnection {
    conn: Option<PoolConnection<Postgres>>,
    options: Options,
    timeout_set: bool,
}

impl ContextConnection {
    /// The statements run through the returned executor are bound to `ctx`.
    pub fn bind<'a>(&'a mut self, ctx: &'a Context) -> Bound<'a> {
        Bound {
            target: Target::Conn(self),
            ctx,
        }
    }

    /// `false` once a statement on it was cut (the connection is closed).
    pub fn is_open(&self) -> bool {
        self.conn.is_some()
    }
}

impl fmt::Debug for ContextConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextConnection")
            .field("open", &self.is_open())
            .finish_non_exhaustive()
    }
}

impl Drop for ContextConnection {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            release(conn, self.timeout_set);
        }
    }
}

/// A sqlx [`Executor`] whose statements are bound to a [`Context`]: made by
/// [`ContextPool::bind`] or [`ContextConnection::bind`].
#[derive(Debug)]
pub struct Bound<'a> {
    target: Target<'a>,
    ctx: &'a Context,
}

#[derive(Debug)]
enum Target<'a> {
    Pool(&'a ContextPool),
    Conn(&'a mut ContextConnection),
}

/// The context's cause, if `error` says that a statement was cut (or not sent) because
/// its context ended.
///
/// ```
/// use reqctx::{Cancelled, Cause};
///
/// let err = reqctx_sqlx::cancelled_error(Cancelled::new(Cause::ClientDisconnected));
/// assert_eq!(reqctx_sqlx::cause(&err), Some(&Cause::ClientDisconnected));
/// assert_eq!(reqctx_sqlx::cause(&sqlx::Error::RowNotFound), None);
/// ```
pub fn cause(error: &sqlx::Error) -> Option<&Cause> {
    cancelled(error).map(Cancelled::cause)
}

/// The [`Cancelled`] inside `error`, if its statement was cut by its context: an
/// [`sqlx::Error::Io`] whose inner error is the `Cancelled` (kind `TimedOut` for a
/// deadline, `Interrupted` otherwise).
pub fn cancelled(error: &sqlx::Error) -> Option<&Cancelled> {
    match error {
        sqlx::Error::Io(e) => e.get_ref()?.downcast_ref::<Cancelled>(),
        _ => None,
    }
}

/// The sqlx error this crate returns for a statement cut by its context.
pub fn cancelled_error(c: Cancelled) -> sqlx::Error {
    let kind = match c.cause() {
        Cause::DeadlineExceeded { .. } => io::ErrorKind::TimedOut,
        _ => io::ErrorKind::Interrupted,
    };
    sqlx::Error::Io(io::Error::new(kind, c))
}

fn ended(ctx: &Context) -> sqlx::Error {
    cancelled_error(Cancelled::new(ctx.cause().unwrap_or(Cause::Cancelled)))
}

fn closed() -> sqlx::Error {
    sqlx::Error::Io(io::Error::new(
        io::ErrorKind::NotConnected,
        "connection closed after a statement on it was cut by its context",
    ))
}

/// The version check and the check interval, on each new connection.
async fn prepare(conn: &mut PgConnection, every: Duration) -> Result<(), sqlx::Error> {
    let version = match conn.server_version_num() {
        Some(v) => v,
        None => {
            let (v,): (String,) = sqlx::query_as("SHOW server_version_num")
                .fetch_one(&mut *conn)
                .await?;
            v.parse().unwrap_or(0)
        }
    };
    if version < 140_000 {
        return Err(sqlx::Error::Configuration(
            format!(
                "reqctx-sqlx needs PostgreSQL 14 or later (client_connection_check_interval); \
                 the server is {version}"
            )
            .into(),
        ));
    }
    let ms = every.as_millis().clamp(1, i32::MAX as u128);
    conn.execute(format!("SET client_connection_check_interval = {ms}").as_str())
        .await
        .map_err(|e| {
            sqlx::Error::Configuration(
                format!(
                    "the server refused client_connection_check_interval ({e}): a statement \
                     whose client left would run on, so reqctx-sqlx does not use it"
                )
                .into(),
            )
        })?;
    Ok(())
}

async fn acquire(pool: &PgPool, ctx: &Context) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    ctx.check().map_err(cancelled_error)?;
    tokio::select! {
        biased;
        () = ctx.cancelled() => Err(ended(ctx)),
        conn = pool.acquire() => conn,
    }
}

/// Back to the pool: at once, or after resetting the `statement_timeout` we set (in a
/// task, off the caller's path).
fn release(conn: PoolConnection<Postgres>, timeout_set: bool) {
    if !timeout_set {
        return drop(conn);
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(async move {
                let mut conn = conn;
                if conn
                    .execute("SET statement_timeout TO DEFAULT")
                    .await
                    .is_err()
                {
                    drop(conn.detach());
                }
            });
        }
        Err(_) => drop(conn.detach()),
    }
}

/// Closes the connection in `slot` when dropped armed: a statement on it was cut, or its
/// stream dropped before the end.
struct CloseGuard<'s> {
    slot: &'s mut Option<PoolConnection<Postgres>>,
    armed: bool,
}

impl Drop for CloseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(conn) = self.slot.take() {
                // Detached (the pool opens another) and dropped: the socket closes now.
                drop(conn.detach());
            }
        }
    }
}

/// `SET statement_timeout` to the budget (rounded up: the server's clock starts after
/// ours), or `None` when the session's own limit is already no longer.
fn timeout_sql(budget: Duration, baseline_ms: u64) -> Option<String> {
    let ms = budget.as_nanos().div_ceil(1_000_000).max(1);
    if ms > i32::MAX as u128 || (baseline_ms != 0 && u128::from(baseline_ms) <= ms) {
        return None;
    }
    Some(format!("SET statement_timeout = {ms}"))
}

fn is_query_canceled(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
}

/// A statement's own error: the context's `DeadlineExceeded` if it is the `57014` of the
/// `statement_timeout` we set for the deadline; the error itself otherwise.
async fn classify(ctx: &Context, our_timeout: bool, e: sqlx::Error) -> sqlx::Error {
    if !(our_timeout && is_query_canceled(&e)) {
        return e;
    }
    // The server's clock may fire a moment before ours.
    let _ = tokio::time::timeout(Duration::from_millis(50), ctx.cancelled()).await;
    match ctx.cause() {
        Some(cause @ Cause::DeadlineExceeded { .. }) => cancelled_error(Cancelled::new(cause)),
        _ => e,
    }
}

impl<'c> Bound<'c> {
    fn run<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let Bound { target, ctx } = self;
        Box::pin(async_stream::try_stream! {
            ctx.check().map_err(cancelled_error)?;
            let mut owned: Option<PoolConnection<Postgres>> = None;
            let mut owned_timeout = false;
            let (slot, timeout_set, options) = match target {
                Target::Pool(pool) => {
                    owned = Some(acquire(&pool.pool, ctx).await?);
                    (&mut owned, &mut owned_timeout, &pool.options)
                }
                Target::Conn(c) => (&mut c.conn, &mut c.timeout_set, &c.options),
            };
            let mut guard = CloseGuard { slot, armed: true };
            let remaining = ctx.remaining().filter(|_| options.statement_timeout);
            let conn = guard.slot.as_mut().ok_or_else(closed)?;
            let set_sql = remaining.and_then(|budget| timeout_sql(budget, options.baseline_ms));
            if let Some(set) = set_sql.as_deref() {
                let set = tokio::select! {
                    biased;
                    () = ctx.cancelled() => None,
                    r = conn.execute(set) => Some(r),
                };
                match set {
                    // Cut while setting it: the guard closes the connection.
                    None => Err(ended(ctx))?,
                    Some(Ok(_)) => *timeout_set = true,
                    // Refused (an aborted transaction, whose `ROLLBACK` must still go
                    // through): the statement runs without the backstop.
                    Some(Err(sqlx::Error::Database(_))) => {}
                    Some(Err(e)) => Err(e)?,
                }
            }
            if set_sql.is_none() && *timeout_set {
                // A held connection after a statement with a deadline: no budget now.
                let reset = tokio::select! {
                    biased;
                    () = ctx.cancelled() => None,
                    r = conn.execute("SET statement_timeout TO DEFAULT") => Some(r),
                };
                match reset {
                    None => Err(ended(ctx))?,
                    Some(Ok(_)) => *timeout_set = false,
                    Some(Err(sqlx::Error::Database(_))) => {}
                    Some(Err(e)) => Err(e)?,
                }
            }
            let our_timeout = set_sql.is_some() && *timeout_set;
            let mut inner = conn.fetch_many(query);
            let failure = loop {
                let next = tokio::select! {
                    biased;
                    () = ctx.cancelled() => None,
                    item = inner.next() => Some(item),
                };
                match next {
                    // The context ended mid-statement: the guard closes the connection.
                    None => break Some(ended(ctx)),
                    Some(None) => break None,
                    Some(Some(Ok(item))) => yield item,
                    Some(Some(Err(e))) => {
                        // sqlx read the statement to its end: the connection is sound.
                        guard.armed = false;
                        break Some(classify(ctx, our_timeout, e).await);
                    }
                }
            };
            drop(inner);
            if let Some(e) = failure {
                Err(e)?;
            }
            guard.armed = false;
            drop(guard);
            if let Some(conn) = owned.take() {
                release(conn, owned_timeout);
            }
        })
    }
}

impl<'c> Executor<'c> for Bound<'c> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        self.run(query)
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        // Read to the end, as sqlx does: stopping at the first row would cut the statement.
        let stream = self.run(query);
        async move {
            let mut stream = stream;
            let mut first = None;
            while let Some(step) = stream.try_next().await? {
                if let Either::Right(row) = step {
                    first.get_or_insert(row);
                }
            }
            Ok(first)
        }
        .boxed()
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        // Preparing runs nothing: bound only while waiting for a connection.
        async move {
            match self.target {
                Target::Pool(pool) => {
                    let mut conn = acquire(&pool.pool, self.ctx).await?;
                    conn.prepare_with(sql, parameters).await
                }
                Target::Conn(c) => {
                    let conn = c.conn.as_mut().ok_or_else(closed)?;
                    conn.prepare_with(sql, parameters).await
                }
            }
        }
        .boxed()
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        async move {
            match self.target {
                Target::Pool(pool) => {
                    let mut conn = acquire(&pool.pool, self.ctx).await?;
                    conn.describe(sql).await
                }
                Target::Conn(c) => {
                    let conn = c.conn.as_mut().ok_or_else(closed)?;
                    conn.describe(sql).await
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_rounded_up_and_never_lifts_the_sessions_limit() {
        let ms = Duration::from_millis;
        assert_eq!(
            timeout_sql(Duration::from_micros(1500), 0).as_deref(),
            Some("SET statement_timeout = 2")
        );
        assert_eq!(
            timeout_sql(Duration::from_nanos(1), 0).as_deref(),
            Some("SET statement_timeout = 1")
        );
        // A DBA's 30 s beats a 60 s budget; a 1 s budget is sent.
        assert_eq!(timeout_sql(ms(60_000), 30_000), None);
        assert_eq!(
            timeout_sql(ms(1_000), 30_000).as_deref(),
            Some("SET statement_timeout = 1000")
        );
        assert_eq!(timeout_sql(Duration::MAX, 0), None);
    }

    #[test]
    fn the_cause_survives_the_sqlx_error() {
        let deadline = Cause::DeadlineExceeded {
            origin: reqctx::DeadlineOrigin::Query,
        };
        let err = cancelled_error(Cancelled::new(deadline.clone()));
        assert_eq!(cause(&err), Some(&deadline));
        assert!(matches!(&err, sqlx::Error::Io(e) if e.kind() == io::ErrorKind::TimedOut));
        assert_eq!(cause(&closed()), None);
    }
}
