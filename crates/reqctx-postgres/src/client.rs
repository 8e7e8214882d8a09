//! [`ContextClient`]: a connection whose statements stop on the server when their context
//! ends.

use std::fmt;
use std::future::{Future, poll_fn};
use std::mem;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use futures_core::Stream;
use reqctx::{Cancelled, Cause, Context, DeadlineOrigin};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{CancelToken, Client, Config, NoTls, Row, Statement};

use crate::CancelTarget;
use crate::connect::{Route, Tls, open};
use crate::params::Encoded;
use crate::timeout::{Known, Set, local, plan};
use crate::{Error, Options, TimeoutScope};

/// A PostgreSQL connection whose statements are bound to a [`Context`]: when the context
/// is cancelled while a statement runs, the statement is cancelled **on the server**, and
/// the caller gets [`Error::Cancelled`] with the context's [`Cause`].
///
/// ```no_run
/// # #![allow(dead_code)]
/// use reqctx::Context;
///
/// # async fn run(ctx: Context) -> Result<(), reqctx_postgres::Error> {
/// let mut db = reqctx_postgres::connect("postgres://app@localhost/shop").await?;
/// let rows = db.query(&ctx, "SELECT id FROM orders WHERE total > $1", &[&100_i64]).await?;
/// # let _ = rows; Ok(()) }
/// ```
///
/// # What happens when the context ends
///
/// - **Before the statement is sent** (already cancelled, or a deadline closer than
///   [`Options::min_budget`]): nothing is sent; `Err(Error::Cancelled)`.
/// - **While it runs**: a CancelRequest goes to the server over a connection of our own
///   (see [`CancelTarget`]), and the call returns only once the server has closed that
///   connection (it has signalled the backend) and the statement has ended (its
///   `ReadyForQuery`), or after [`Options::cancel_wait`]. Then `Err(Error::Cancelled)`,
///   even if the statement happened to finish in the race: as with any cancel, a write
///   may have been done.
/// - **The future is dropped instead** (a handler dropped when its client left): the same
///   cancel and wait run in a spawned task, and the next statement on this connection (or
///   the pool, before handing it out) waits for it.
///
/// A CancelRequest names a backend, not a statement. So that a late cancel never hits the
/// next statement, the connection is kept only if the statement ended with `57014
/// query_canceled` after our cancel reached the server; in every other case (it finished
/// first, the cancel connection failed or timed out, the server gave no cancel key) the
/// connection is given up: every later call returns [`Error::Unusable`], and a pool
/// discards it.
///
/// # The deadline as `statement_timeout`
///
/// With a deadline, the statement runs under a `statement_timeout` no longer than the
/// remaining budget (nor than the session's own default), a backstop for when the cancel
/// cannot reach the server. The value is cached per connection and a `SET` is pipelined
/// with the statement (no extra round trip) only when the cached value is outside
/// `[remaining, remaining + tolerance]`; a statement without a deadline restores the
/// default. A `57014` is ours only if we sent a cancel, or if our timeout was set and the
/// context's deadline has passed; otherwise (`pg_cancel_backend`, a role's own timeout)
/// it is an [`Error::Postgres`].
///
/// # Exclusive use, and the shared-`Client` hazard
///
/// Statements take `&mut self`: a cancel stops whatever the backend runs, so the
/// connection must run nothing else meanwhile. [`client`](ContextClient::client) gives
/// the plain `tokio_postgres::Client` for the rest; a statement run through it
/// concurrently with a cancellable one (a shared client, pipelining from several tasks)
/// may be cancelled in its place, and may be another request's.
///
/// # Transactions
///
/// A cancel inside a transaction leaves it aborted; it is rolled back right after the
/// cancel (when a statement's text held `BEGIN` or `START`, or
/// [`client`](ContextClient::client) was used, a check says whether a transaction is
/// open), so the backend does not sit "idle in transaction (aborted)". Your next
/// statements would then run outside your transaction, so they fail with
/// [`Error::RolledBack`] until you end it (`ROLLBACK` or `COMMIT` through
/// [`batch_execute`](ContextClient::batch_execute), answered here). The pool
/// ([`pool`](crate::pool)) also rolls back after any failed statement, and any
/// transaction a handler left open, before handing the connection to anyone. A `SET` done
/// inside a transaction that is rolled back is undone by the server; after a failed statement, or after `ROLLBACK` through
/// [`batch_execute`](ContextClient::batch_execute), the cached value is forgotten and set
/// again. A `ROLLBACK` through [`client`](ContextClient::client) is not seen: call
/// [`forget_statement_timeout`](ContextClient::forget_statement_timeout) after one.
pub struct ContextClient {
    client: Inner,
    token: CancelToken,
    route: Route,
    /// Closes the connection (its task is ours) when a cancel cannot be delivered.
    closer: Option<AbortHandle>,
    pid: i32,
    baseline_ms: u64, // the session's own statement_timeout at connect, 0 = none
    /// The budget as a session `SET` (cached); otherwise as a transaction-local one.
    session_timeout: bool,
    /// [`client`](Self::client) was called: anything may have run, a `BEGIN` too.
    raw_used: AtomicBool,
    options: Options,
    state: State,
}

/// The driver's client, shared with the statement in flight (so a spawned task can read a
/// dropped statement to its end).
#[derive(Clone)]
enum Inner {
    Plain(Arc<Client>),
    #[cfg(feature = "deadpool")]
    Pooled(Arc<deadpool_postgres::ClientWrapper>),
}

impl Inner {
    fn get(&self) -> &Client {
        match self {
            Inner::Plain(c) => c,
            #[cfg(feature = "deadpool")]
            Inner::Pooled(w) => w,
        }
    }

    async fn prepare(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        match self {
            Inner::Plain(c) => c.prepare(sql).await,
            #[cfg(feature = "deadpool")]
            Inner::Pooled(w) => w.prepare_cached(sql).await,
        }
    }
}

struct State {
    timeout: Known,
    health: Health,
    // A statement failed or was cancelled since the pool handed us out: any transaction it
    // ran in is aborted, so roll back before reuse.
    rollback: bool,
    // A statement's text may have opened a transaction (`BEGIN`, `START`) since the pool
    // handed us out: check before reuse, and after a cancel.
    tx_maybe: bool,
    // The transaction was rolled back after a cancel: the user's next statements would run
    // outside it, so they are refused until the user ends it.
    rolled_back: bool,
    // The last statement ran under a transaction-local budget we set.
    local_set: bool,
}

enum Health {
    Ready,
    /// A dropped statement's cancel runs in a task.
    Cleanup(oneshot::Receiver<Outcome>),
    Unusable,
}

/// How a cancel ended, as the task that ran it saw it.
#[derive(Clone, Copy, Default)]
struct Outcome {
    /// The connection may be kept.
    keep: bool,
    /// An open transaction was rolled back after the cancel.
    rolled_back: bool,
}

/// A statement for [`ContextClient`]: SQL text (prepared on the way; through the pool's
/// statement cache when pooled) or a prepared [`Statement`].
///
/// Sealed: implemented for `str`, `String` and `Statement`.
pub trait SqlStatement: sealed::Sealed + Sync {
    #[doc(hidden)]
    fn as_sql(&self) -> Result<&str, &Statement>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for str {}
    impl Sealed for String {}
    impl Sealed for tokio_postgres::Statement {}
}

impl SqlStatement for str {
    fn as_sql(&self) -> Result<&str, &Statement> {
        Ok(self)
    }
}

impl SqlStatement for String {
    fn as_sql(&self) -> Result<&str, &Statement> {
        Ok(self)
    }
}

impl SqlStatement for Statement {
    fn as_sql(&self) -> Result<&str, &Statement> {
        Err(self)
    }
}

/// Parses `config` (a URL or `key=value` string, as `DATABASE_URL` holds), connects
/// without TLS (`sslmode=disable` or `prefer`), and wraps the connection with default
/// [`Options`]. For TLS, see [`ContextClient::connect_tls`].
///
/// # Errors
/// [`Error::Config`] if `config` does not parse or names several hosts,
/// [`Error::Postgres`] if the connection fails.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let err = reqctx_postgres::connect("postgres://[::1").await.unwrap_err();
/// assert!(matches!(err, reqctx_postgres::Error::Config(_)));
/// # }
/// ```
pub async fn connect(config: &str) -> Result<ContextClient, Error> {
    let config: Config = config
        .parse()
        .map_err(|e| Error::Config(format!("the connection string does not parse: {e}")))?;
    ContextClient::connect(&config, Options::default()).await
}

impl ContextClient {
    /// Connects without TLS (the connection's task is spawned on the current runtime) and
    /// wraps the connection. As [`connect_tls`](Self::connect_tls) with `NoTls`.
    ///
    /// # Errors
    /// As [`connect`].
    pub async fn connect(config: &Config, options: Options) -> Result<ContextClient, Error> {
        ContextClient::connect_tls(config, NoTls, options).await
    }

    /// Connects with `tls` as `sslmode` asks (the connection's task is spawned on the
    /// current runtime) and wraps the connection.
    ///
    /// The socket is opened here, not by `tokio-postgres`: each host of `config` is tried
    /// in turn, and each address of a host name, and the address that answered is where
    /// the cancels go ([`CancelTarget::Addr`]), over the same TLS (`sslmode`, `tls`, the
    /// host name for the certificate). `connect_timeout` and the TCP keepalive settings
    /// apply; `target_session_attrs` with several hosts is refused.
    ///
    /// Since the connection's task is ours, a connection whose cancel cannot be
    /// delivered is closed at once (see [`Options::client_check_interval`]).
    ///
    /// # Errors
    /// [`Error::Config`] for a configuration this cannot follow, [`Error::Io`] if no
    /// address answered, [`Error::Postgres`] if the handshake failed.
    ///
    /// ```no_run
    /// # #![allow(dead_code)]
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use reqctx_postgres::{ContextClient, Options};
    ///
    /// let config: tokio_postgres::Config =
    ///     "postgres://app@db.example.com/shop?sslmode=require".parse()?;
    /// // Any tokio-postgres TLS connector: tokio-postgres-rustls, postgres-native-tls, ...
    /// let tls = tokio_postgres::NoTls;
    /// let db = ContextClient::connect_tls(&config, tls, Options::default()).await?;
    /// # let _ = db; Ok(()) }
    /// ```
    pub async fn connect_tls<T: Tls>(
        config: &Config,
        tls: T,
        options: Options,
    ) -> Result<ContextClient, Error> {
        let opened = open(config, tls).await?;
        let closer = opened.closer();
        let (client, route, local_port) = (opened.client, opened.route, opened.local_port);
        drop(opened.task); // detached: it ends with the client
        ContextClient::wrap(
            Inner::Plain(Arc::new(client)),
            route,
            Some(closer),
            local_port,
            options,
        )
        .await
    }

    /// Wraps a connection you opened yourself: `target` is where its CancelRequest goes,
    /// the server it is connected to, without TLS (prefer
    /// [`connect_tls`](Self::connect_tls), which cancels over the connection's own TLS
    /// and address). Asks the server for the backend's pid and its default
    /// `statement_timeout` (one round trip).
    ///
    /// The connection's task is yours: a connection whose cancel cannot be delivered is
    /// given up ([`Error::Unusable`]) but stays open until you drop it. With
    /// [`TimeoutScope::Auto`] the budget is set transaction-locally (the connection's
    /// route is unknown).
    ///
    /// # Errors
    /// [`Error::Postgres`] if that query fails.
    pub async fn new(
        client: Client,
        target: CancelTarget,
        options: Options,
    ) -> Result<ContextClient, Error> {
        let route = Route::new(target, NoTls, String::new());
        ContextClient::wrap(Inner::Plain(Arc::new(client)), route, None, None, options).await
    }

    async fn wrap(
        client: Inner,
        route: Route,
        closer: Option<AbortHandle>,
        local_port: Option<u16>,
        options: Options,
    ) -> Result<ContextClient, Error> {
        let (pid, baseline, server_port) = identify(client.get(), &options).await?;
        let session_timeout = match options.timeout_scope {
            TimeoutScope::Session => true,
            TimeoutScope::Transaction => false,
            // Direct only if the server sees our own port: not a pooler, not a NAT.
            TimeoutScope::Auto => local_port.is_some() && local_port == server_port,
        };
        Ok(ContextClient {
            token: client.get().cancel_token(),
            client,
            route,
            closer,
            pid,
            baseline_ms: baseline,
            session_timeout,
            raw_used: AtomicBool::new(false),
            options,
            state: State {
                timeout: Known::Default,
                health: Health::Ready,
                rollback: false,
                tx_maybe: false,
                rolled_back: false,
                local_set: false,
            },
        })
    }

    #[cfg(feature = "deadpool")]
    pub(crate) async fn wrap_pooled(
        client: deadpool_postgres::ClientWrapper,
        route: Route,
        closer: Option<AbortHandle>,
        local_port: Option<u16>,
        options: Options,
    ) -> Result<ContextClient, Error> {
        ContextClient::wrap(
            Inner::Pooled(Arc::new(client)),
            route,
            closer,
            local_port,
            options,
        )
        .await
    }

    /// Whether the budget travels as a session-level `statement_timeout` (cached, reset
    /// by the pool), `false` when it is set transaction-locally: see [`TimeoutScope`].
    pub fn session_timeout(&self) -> bool {
        self.session_timeout
    }

    /// deadpool-postgres's wrapper: `None` for a plain connection, `Some(None)` while a
    /// statement task still holds it (never after `settle`).
    #[cfg(feature = "deadpool")]
    pub(crate) fn pooled_mut(&mut self) -> Option<Option<&mut deadpool_postgres::ClientWrapper>> {
        match &mut self.client {
            Inner::Pooled(w) => Some(Arc::get_mut(w)),
            Inner::Plain(_) => None,
        }
    }

    /// The plain client, for what need not be cancellable. See the type's docs for the
    /// hazard of running statements through it while a cancellable one runs.
    pub fn client(&self) -> &Client {
        // Anything may run through it, a `BEGIN` too: the pool checks before reuse.
        self.raw_used.store(true, Ordering::Relaxed);
        self.client.get()
    }

    /// Where this connection's cancels go: for a connection this crate opened, the
    /// address it reached ([`CancelTarget::Addr`]).
    pub fn cancel_target(&self) -> &CancelTarget {
        &self.route.target
    }

    /// The server process id of this connection's backend (as in `pg_stat_activity.pid`).
    pub fn backend_pid(&self) -> i32 {
        self.pid
    }

    /// `false` once the connection was given up (see [`Error::Unusable`]) or closed. A
    /// dropped statement's cleanup still running counts as usable: the next call waits.
    pub fn is_usable(&self) -> bool {
        !matches!(self.state.health, Health::Unusable) && !self.client.get().is_closed()
    }

    /// Forgets the cached `statement_timeout`, so the next statement sets it again: call
    /// it after a `ROLLBACK` sent through [`client`](ContextClient::client).
    pub fn forget_statement_timeout(&mut self) {
        self.state.timeout = Known::Unknown;
    }

    /// Runs `statement` with `params`, bound to `ctx`, and returns its rows.
    ///
    /// # Errors
    /// [`Error::Cancelled`] if `ctx` ended first (see the type's docs for what the server
    /// saw), [`Error::Unusable`] on a connection given up earlier, [`Error::Postgres`]
    /// otherwise.
    ///
    /// # Cancellation safety
    ///
    /// Dropping the future while the statement runs cancels the statement on the server
    /// from a spawned task (inside a tokio runtime; outside one, the connection is given
    /// up); the next call on this connection waits for that to finish.
    pub async fn query<S>(
        &mut self,
        ctx: &Context,
        statement: &S,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error>
    where
        S: ?Sized + SqlStatement,
    {
        Ok(self.run(ctx, statement, params).await?.rows)
    }

    /// Runs `statement` with `params`, bound to `ctx`, and returns the number of rows it
    /// changed.
    ///
    /// # Errors
    /// As [`query`](ContextClient::query).
    ///
    /// # Cancellation safety
    /// As [`query`](ContextClient::query).
    pub async fn execute<S>(
        &mut self,
        ctx: &Context,
        statement: &S,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error>
    where
        S: ?Sized + SqlStatement,
    {
        Ok(self
            .run(ctx, statement, params)
            .await?
            .affected
            .unwrap_or(0))
    }

    /// Runs one or more statements separated by semicolons (the simple query protocol,
    /// no parameters), bound to `ctx`: `BEGIN`, `COMMIT`, DDL, a batch.
    ///
    /// # Errors
    /// As [`query`](ContextClient::query).
    ///
    /// # Cancellation safety
    /// As [`query`](ContextClient::query).
    pub async fn batch_execute(&mut self, ctx: &Context, sql: &str) -> Result<(), Error> {
        if self.state.rolled_back {
            // The server's transaction is gone already: its end is answered here.
            if ends_transaction(sql) {
                self.state.rolled_back = false;
                return Ok(());
            }
            return Err(Error::RolledBack);
        }
        self.note_sql(sql);
        self.note_raw();
        let set = match self.before_fast(ctx) {
            Some(set) => set?,
            // Cold and rare: boxed, so the common path's future stays small.
            None => Box::pin(self.before(ctx)).await?,
        };
        let sql_owned = sql.to_owned();
        let statement = in_flight(set, &self.client, move |c: Inner| async move {
            let stream = pin!(c.get().simple_query_raw(&sql_owned).await?);
            drain(stream).await
        });
        self.drive(ctx, statement).await?;
        if sql
            .trim_start()
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("ROLLBACK"))
        {
            self.state.timeout = Known::Unknown; // a SET inside the transaction was undone
        }
        Ok(())
    }

    async fn run<S>(
        &mut self,
        ctx: &Context,
        statement: &S,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Done, Error>
    where
        S: ?Sized + SqlStatement,
    {
        if self.state.rolled_back {
            return Err(Error::RolledBack);
        }
        if let Ok(sql) = statement.as_sql() {
            self.note_sql(sql);
        }
        self.note_raw();
        let set = match self.before_fast(ctx) {
            Some(set) => set?,
            // Cold and rare: boxed, so the common path's future stays small.
            None => Box::pin(self.before(ctx)).await?,
        };
        let statement = match statement.as_sql() {
            Err(prepared) => prepared.clone(),
            // Preparing runs nothing: dropping it mid-way needs no cancel.
            Ok(sql) => Box::pin(self.prepare(ctx, sql)).await?,
        };
        let params = Encoded::all(params, statement.params());
        let statement = in_flight(set, &self.client, move |c: Inner| async move {
            let mut stream = pin!(c.get().query_raw(&statement, params).await?);
            let mut done = drain(stream.as_mut()).await?;
            done.affected = stream.rows_affected();
            Ok(done)
        });
        self.drive(ctx, statement).await
    }

    /// Notes that `sql` may open a transaction. Errs on the side of yes (a `'begin'`
    /// literal counts): a wrong yes costs one check query when the pool takes the
    /// connection back, a wrong no would hand out a connection inside a transaction.
    fn note_sql(&mut self, sql: &str) {
        if !self.state.tx_maybe && (contains_word(sql, b"begin") || contains_word(sql, b"start")) {
            self.state.tx_maybe = true;
        }
    }

    /// Notes that the plain client was used (a `BEGIN` may have gone through it).
    fn note_raw(&mut self) {
        if !self.state.tx_maybe && self.raw_used.load(Ordering::Relaxed) {
            self.state.tx_maybe = true;
        }
    }

    /// Prepares `sql` (through the pool's statement cache when pooled), while `ctx` lasts.
    async fn prepare(&mut self, ctx: &Context, sql: &str) -> Result<Statement, Error> {
        tokio::select! {
            biased;
            () = ctx.cancelled() => Err(cancelled(ctx)),
            prepared = self.client.prepare(sql) => prepared.map_err(|e| self.failed(ctx, e)),
        }
    }

    /// [`before`](Self::before) without waiting, for the common case: `None` if it would
    /// have to wait (a dropped statement's cleanup, a budget below the margin).
    fn before_fast(&mut self, ctx: &Context) -> Option<Result<Option<Set>, Error>> {
        if !matches!(self.state.health, Health::Ready) || self.client.get().is_closed() {
            return None;
        }
        if let Err(c) = ctx.check() {
            return Some(Err(c.into()));
        }
        if !self.options.statement_timeout {
            return Some(Ok(None));
        }
        let remaining = ctx.remaining();
        if remaining.is_some_and(|left| left < self.options.min_budget) {
            return None;
        }
        Some(Ok(self.plan(remaining)))
    }

    /// Waits for a dropped statement's cleanup, checks the context and the budget, and
    /// says which `SET statement_timeout` to pipeline.
    async fn before(&mut self, ctx: &Context) -> Result<Option<Set>, Error> {
        self.settle(Some(ctx)).await?;
        ctx.check()?;
        if !self.options.statement_timeout {
            return Ok(None);
        }
        let remaining = ctx.remaining();
        if let Some(left) = remaining {
            if left < self.options.min_budget {
                // Too little to be worth sending: wait out the last instants so the error
                // carries the context's own cause (and the deadline's origin).
                let _ =
                    tokio::time::timeout(left + Duration::from_millis(50), ctx.cancelled()).await;
                let cause = ctx.cause().unwrap_or(Cause::DeadlineExceeded {
                    origin: DeadlineOrigin::Code,
                });
                return Err(Cancelled::new(cause).into());
            }
        }
        Ok(self.plan(remaining))
    }

    /// The `SET` to pipeline with a statement that has `remaining` to run.
    fn plan(&self, remaining: Option<Duration>) -> Option<Set> {
        if self.session_timeout {
            plan(
                self.state.timeout,
                remaining,
                self.baseline_ms,
                self.options.timeout_tolerance,
            )
        } else {
            local(remaining, self.baseline_ms)
        }
    }

    /// Races the statement against `ctx`; on cancellation, cancels it on the server.
    async fn drive(&mut self, ctx: &Context, statement: InFlight) -> Result<Done, Error> {
        let mut flight = Flight {
            state: &mut self.state,
            token: &self.token,
            route: &self.route,
            client: &self.client,
            closer: self.closer.as_ref(),
            wait: self.options.cancel_wait,
            inflight: Some(statement),
        };
        let mut ended_ctx = pin!(ctx.cancelled());
        let ended = poll_fn(|cx| {
            // The context first, as `Context::run` does: a cancelled context is never ignored.
            if ended_ctx.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            flight.poll_end(cx).map(Some)
        })
        .await;
        match ended {
            Some(Ok(done)) => Ok(done),
            Some(Err(e)) => Err(classify(ctx, flight.state, e)),
            None => {
                // The same path as a dropped statement: the cancel and the wait run in a
                // task and the connection records that it waits for them, so dropping this
                // future while it waits can neither skip the rollback nor send a second
                // cancel behind the first.
                drop(flight);
                let _ = self.settle(None).await;
                Err(cancelled(ctx))
            }
        }
    }

    /// An error before the statement ran (while preparing).
    fn failed(&mut self, ctx: &Context, e: tokio_postgres::Error) -> Error {
        classify(ctx, &mut self.state, e)
    }

    /// Waits for a dropped statement's cleanup (while `ctx` lasts, if given). `Err` if the
    /// connection is given up.
    pub(crate) async fn settle(&mut self, ctx: Option<&Context>) -> Result<(), Error> {
        if let Health::Cleanup(rx) = &mut self.state.health {
            let outcome = match ctx {
                Some(ctx) => tokio::select! {
                    biased;
                    r = &mut *rx => r.unwrap_or_default(),
                    () = ctx.cancelled() => return Err(cancelled(ctx)),
                },
                None => rx.await.unwrap_or_default(),
            };
            if outcome.rolled_back {
                self.state.rolled_back = true;
                self.state.tx_maybe = false;
                self.state.rollback = false;
            }
            self.state.health = if outcome.keep {
                Health::Ready
            } else {
                Health::Unusable
            };
        }
        if matches!(self.state.health, Health::Unusable) || self.client.get().is_closed() {
            self.state.health = Health::Unusable;
            return Err(Error::Unusable);
        }
        Ok(())
    }

    /// What the pool does before handing the connection out: wait for any cleanup, roll
    /// back after a cancel, restore the default `statement_timeout` (pipelined).
    #[cfg(feature = "deadpool")]
    pub(crate) async fn reset_for_reuse(&mut self) -> Result<(), Error> {
        self.settle(None).await?;
        let rollback = mem::take(&mut self.state.rollback);
        let tx_maybe =
            mem::take(&mut self.state.tx_maybe) | self.raw_used.swap(false, Ordering::Relaxed);
        self.state.rolled_back = false;
        let reset = self.state.timeout != Known::Default;
        let client = self.client.get();
        let (a, b) = tokio::join!(
            async {
                if rollback {
                    // Outside a transaction this is only a warning.
                    client.batch_execute("ROLLBACK").await?;
                } else if tx_maybe {
                    // However the handler left it: no connection goes back inside a
                    // transaction.
                    roll_back_if_open(client).await?;
                }
                Ok::<(), tokio_postgres::Error>(())
            },
            async {
                if reset {
                    client.batch_execute(&Set::Default.sql()).await?;
                }
                Ok::<(), tokio_postgres::Error>(())
            },
        );
        a?;
        b?;
        self.state.timeout = Known::Default;
        Ok(())
    }
}

impl fmt::Debug for ContextClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextClient")
            .field("backend_pid", &self.pid)
            .field("cancel_target", &self.route.target)
            .field("usable", &self.is_usable())
            .finish_non_exhaustive()
    }
}

fn cancelled(ctx: &Context) -> Error {
    Cancelled::new(ctx.cause().unwrap_or(Cause::Cancelled)).into()
}

/// A statement in flight, owning everything it needs (the shared client, its encoded
/// parameters, its responses), so that it can move to a spawned task if its caller's
/// future is dropped. One allocation per statement.
///
/// With the extended protocol the server sends `BindComplete` only with the statement's
/// first results, so the driver's `query_raw` itself lasts as long as the statement: the
/// whole statement, not only its rows, has to be movable.
type InFlight = Pin<Box<dyn Future<Output = Ended> + Send>>;

/// How a statement ended: the pipelined `SET`'s outcome, if one was sent, and its result
/// read up to its `ReadyForQuery`.
struct Ended {
    set: Option<(Set, bool)>,
    result: Result<Done, tokio_postgres::Error>,
}

/// Boxes `work`, preceded by `set` (if any) without waiting in between: both are written
/// to the connection back to back, so a `SET` costs no round trip.
///
/// `work` makes its future inside the box: a future captured by an async block and then
/// awaited is stored twice, and this allocation is on every statement's path.
fn in_flight<W, F>(set: Option<Set>, client: &Inner, work: W) -> InFlight
where
    W: FnOnce(Inner) -> F + Send + 'static,
    F: Future<Output = Result<Done, tokio_postgres::Error>> + Send + 'static,
{
    let client = client.clone();
    match set {
        None => Box::pin(async move {
            Ended {
                set: None,
                result: work(client).await,
            }
        }),
        Some(set) => Box::pin(async move {
            let sql = set.sql();
            let c = client.clone();
            let (set_result, result) = tokio::join!(client.get().batch_execute(&sql), work(c));
            Ended {
                set: Some((set, set_result.is_ok())),
                result,
            }
        }),
    }
}

#[derive(Default)]
struct Done {
    rows: Vec<Row>,
    affected: Option<u64>,
}

/// Something a statement's responses can become: a row, or a simple-query message (of
/// which we keep nothing).
trait Response {
    fn into_row(self) -> Option<Row>;
}

impl Response for Row {
    fn into_row(self) -> Option<Row> {
        Some(self)
    }
}

impl Response for tokio_postgres::SimpleQueryMessage {
    fn into_row(self) -> Option<Row> {
        None
    }
}

/// Reads a statement's responses up to its `ReadyForQuery` (the stream's end), keeping
/// the rows and the first error: after an error the driver still delivers the
/// `ReadyForQuery`, and the statement is over only then.
async fn drain<S, T>(mut stream: Pin<&mut S>) -> Result<Done, tokio_postgres::Error>
where
    S: Stream<Item = Result<T, tokio_postgres::Error>>,
    T: Response,
{
    let mut done = Done::default();
    let mut error = None;
    loop {
        match poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
            Some(Ok(item)) => {
                if error.is_none() {
                    done.rows.extend(item.into_row());
                }
            }
            Some(Err(e)) => {
                // A second error (the connection closed) ends the wait.
                if error.is_some() || e.is_closed() {
                    return Err(error.unwrap_or(e));
                }
                error = Some(e);
            }
            None => return error.map_or(Ok(done), Err),
        }
    }
}

/// The statement in flight on a connection, with the connection's state. If dropped
/// before the statement ended, it hands the statement, the cancel and the wait to a
/// spawned task and leaves the connection waiting for it.
struct Flight<'a> {
    state: &'a mut State,
    token: &'a CancelToken,
    route: &'a Route,
    client: &'a Inner,
    closer: Option<&'a AbortHandle>,
    wait: Duration,
    inflight: Option<InFlight>, // None once it ended (or was given up)
}

impl Flight<'_> {
    fn poll_end(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Done, tokio_postgres::Error>> {
        let Some(statement) = self.inflight.as_mut() else {
            return Poll::Pending; // never polled again once it ended
        };
        let ended = ready!(statement.as_mut().poll(cx));
        self.inflight = None;
        self.state.local_set = false;
        match ended.set {
            Some((Set::Local(_), ok)) => self.state.local_set = ok,
            Some((set, ok)) => self.state.timeout = if ok { set.known() } else { Known::Unknown },
            None => {}
        }
        Poll::Ready(ended.result)
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let Some(mut statement) = self.inflight.take() else {
            return;
        };
        self.state.rollback = true;
        self.state.timeout = Known::Unknown; // a pipelined SET's outcome is not ours to see
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.state.health = Health::Unusable;
            return;
        };
        let (tx, rx) = oneshot::channel();
        let (route, token, wait) = (self.route.clone(), self.token.clone(), self.wait);
        let (client, closer) = (self.client.clone(), self.closer.cloned());
        let tx_maybe = self.state.tx_maybe;
        runtime.spawn(async move {
            let mut outcome = Outcome {
                keep: cancel_and_end(&route, &token, wait, |cx| {
                    statement.as_mut().poll(cx).map(|ended| ended.result)
                })
                .await,
                rolled_back: false,
            };
            drop(statement);
            if outcome.keep && tx_maybe {
                // A transaction the cancel aborted is rolled back now, not at the next
                // checkout: meanwhile it would sit "idle in transaction (aborted)".
                let rollback = roll_back_if_open(client.get());
                match tokio::time::timeout(wait, rollback).await {
                    Ok(Ok(rolled_back)) => outcome.rolled_back = rolled_back,
                    _ => outcome.keep = false,
                }
            }
            if !outcome.keep {
                // The close route: with `client_connection_check_interval` set, the server
                // ends a statement whose client is gone.
                if let Some(closer) = closer {
                    closer.abort();
                }
            }
            drop(client); // release the shared client before the connection is reused
            let _ = tx.send(outcome);
        });
        self.state.health = Health::Cleanup(rx);
    }
}

fn is_query_canceled(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::QUERY_CANCELED)
}

/// A statement that ended with an error before we sent any cancel: ours only if our
/// `statement_timeout` was set and the context's deadline has passed.
fn classify(ctx: &Context, state: &mut State, e: tokio_postgres::Error) -> Error {
    let our_timeout = matches!(state.timeout, Known::Ms(_)) || state.local_set;
    // After an error a transaction may be rolled back, undoing a SET made inside it; or
    // left aborted (the server's `statement_timeout` can fire just before our cancel), in
    // which case the next `SET` fails: roll back before reuse.
    state.timeout = Known::Unknown;
    state.rollback = true;
    if e.is_closed() {
        state.health = Health::Unusable;
    }
    if is_query_canceled(&e) && our_timeout {
        if let Some(cause) = ctx
            .cause()
            .filter(|c| matches!(c, Cause::DeadlineExceeded { .. }))
        {
            return Cancelled::new(cause).into();
        }
    }
    Error::Postgres(e)
}

/// Sends the cancel and polls the statement to its end, both within `wait`. The connection
/// may be kept (`true`) only if the server closed the cancel connection (it signalled the
/// backend) and the statement ended with `57014`: then the signal was spent on it.
async fn cancel_and_end<E>(
    route: &Route,
    token: &CancelToken,
    wait: Duration,
    mut poll_end: E,
) -> bool
where
    E: FnMut(&mut TaskContext<'_>) -> Poll<Result<Done, tokio_postgres::Error>>,
{
    let mut cancel = pin!(route.send(token));
    let mut sent = None;
    let mut canceled = None;
    let both = poll_fn(|cx| {
        if sent.is_none() {
            if let Poll::Ready(r) = cancel.as_mut().poll(cx) {
                sent = Some(r.is_ok());
            }
        }
        if sent == Some(false) {
            return Poll::Ready(()); // the cancel cannot reach the server: give up the connection
        }
        if canceled.is_none() {
            if let Poll::Ready(r) = poll_end(cx) {
                canceled = Some(matches!(&r, Err(e) if is_query_canceled(e)));
            }
        }
        if sent.is_some() && canceled.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    let _ = tokio::time::timeout(wait, both).await;
    sent == Some(true) && canceled == Some(true)
}

/// Rolls back if the session is inside a transaction (open, or aborted by a failed or
/// cancelled statement); `Ok(true)` if it was. One round trip when there is none, two
/// otherwise; no `ROLLBACK` (a server-log warning) outside a transaction.
///
/// Inside a transaction block `now()` is the transaction's start, earlier than the
/// statement's; outside one the statement is its own transaction and the two are equal.
async fn roll_back_if_open(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let open = match client
        .simple_query("SELECT now() <> statement_timestamp()")
        .await
    {
        Ok(messages) => messages.iter().any(|m| {
            matches!(m, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))
        }),
        Err(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => true,
        Err(e) => return Err(e),
    };
    if open {
        client.batch_execute("ROLLBACK").await?;
    }
    Ok(open)
}

/// Whether `sql` ends a transaction (`ROLLBACK`, `ABORT`, `COMMIT`, `END`).
fn ends_transaction(sql: &str) -> bool {
    let word = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    ["rollback", "abort", "commit", "end"]
        .iter()
        .any(|w| word.eq_ignore_ascii_case(w))
}

/// Whether `word` (lowercase ASCII) occurs in `sql`, in any case.
fn contains_word(sql: &str, word: &[u8]) -> bool {
    sql.as_bytes()
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// The backend's pid, its default `statement_timeout` (ms, 0 = none) and the client port
/// it sees (`None` over a Unix socket); sets `client_connection_check_interval` on
/// PostgreSQL 14 and later when asked. One round trip (two if the server refuses the
/// setting: a platform without it).
async fn identify(client: &Client, options: &Options) -> Result<(i32, u64, Option<u16>), Error> {
    const BASE: &str = "SELECT pg_backend_pid(), \
         (SELECT setting FROM pg_settings WHERE name = 'statement_timeout'), \
         inet_client_port()";
    let with_check = options.client_check_interval.map(|every| {
        let ms = every.as_millis().clamp(1, i32::MAX as u128);
        format!(
            "{BASE}, CASE WHEN current_setting('server_version_num')::int >= 140000 \
             THEN set_config('client_connection_check_interval', '{ms}', false) END"
        )
    });
    let messages = match with_check {
        Some(sql) => match client.simple_query(&sql).await {
            Ok(m) => m,
            // Refused (a platform without it): the close route then ends a statement
            // only when it next writes. Documented on the option.
            Err(e) if e.code().is_some() => client.simple_query(BASE).await?,
            Err(e) => return Err(e.into()),
        },
        None => client.simple_query(BASE).await?,
    };
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or_else(|| Error::Config("the server answered no row to the setup query".into()))?;
    let pid = row
        .get(0)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Config("pg_backend_pid() unreadable".into()))?;
    let baseline = row.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let port = row.get(2).and_then(|v| v.parse().ok());
    Ok((pid, baseline, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_words() {
        assert!(ends_transaction("  rollback"));
        assert!(ends_transaction("COMMIT;"));
        assert!(ends_transaction("end"));
        assert!(!ends_transaction("endless"));
        assert!(!ends_transaction("SELECT 1"));
        assert!(contains_word(
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            b"begin"
        ));
        assert!(contains_word("start transaction", b"start"));
        assert!(!contains_word("SELECT 1", b"begin"));
    }
}
