//! A deadpool-postgres pool of [`ContextClient`]s (feature `deadpool`).
//!
//! [`Manager`] wraps deadpool-postgres's own manager (its connection setup, recycling
//! method and statement cache) and adds, before a connection is handed to anyone:
//!
//! 1. wait for the cleanup of a statement whose future was dropped (its cancel and the
//!    statement's end), and discard the connection if that cleanup could not confirm the
//!    cancel;
//! 2. after a cancel or a failed statement, `ROLLBACK` (either leaves a transaction
//!    aborted); after a statement that may have opened a transaction (its text holds
//!    `BEGIN` or `START`, or [`ContextClient::client`] was used), a check and, if a
//!    transaction is open, `ROLLBACK`: no connection goes back inside a transaction,
//!    however its handler left it;
//! 3. restore the session's default `statement_timeout` if a budget was set on it;
//!
//! 2 and 3 are pipelined, and cost nothing on a connection that needed neither.
//!
//! ```no_run
//! # #![allow(dead_code)]
//! use reqctx::Context;
//! use reqctx_postgres::{Options, pool::{Manager, Pool}};
//!
//! # async fn run(ctx: Context) -> Result<(), Box<dyn std::error::Error>> {
//! let config: tokio_postgres::Config = std::env::var("DATABASE_URL")?.parse()?;
//! let pool = Pool::builder(Manager::new(config, Options::default())?).max_size(16).build()?;
//!
//! let mut db = ctx.run(pool.get()).await??; // waiting for a connection is bound too
//! let rows = db.query(&ctx, "SELECT pg_sleep(1)", &[]).await?;
//! # let _ = rows; Ok(()) }
//! ```

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool_postgres::{ManagerConfig, RecyclingMethod};
use tokio_postgres::{Config, NoTls};

use crate::connect::{Opener, Route, Tls, opener};
use crate::{CancelTarget, ContextClient, Error, Options};

/// A pool of [`ContextClient`]s.
pub type Pool = managed::Pool<Manager>;

/// A connection taken from a [`Pool`]; it derefs to [`ContextClient`].
pub type Object = managed::Object<Manager>;

/// The deadpool manager: see the [module docs](self).
#[derive(Debug)]
pub struct Manager {
    inner: deadpool_postgres::Manager,
    open: Source,
    options: Options,
}

enum Source {
    /// We open the connections (their address and TLS known, their task ours).
    Ours(Opener),
    /// The inner manager opens them; cancels go to `target`, without TLS.
    Inner(CancelTarget),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Ours(_) => f.write_str("Ours"),
            Source::Inner(target) => f.debug_tuple("Inner").field(target).finish(),
        }
    }
}

impl Manager {
    /// Connections without TLS from `config`: as [`with_tls`](Self::with_tls) with
    /// `NoTls`.
    ///
    /// # Errors
    /// As [`with_tls`](Self::with_tls).
    pub fn new(config: Config, options: Options) -> Result<Manager, Error> {
        Manager::with_tls(config, NoTls, options)
    }

    /// Connections from `config` with `tls` as `sslmode` asks, opened as
    /// [`ContextClient::connect_tls`] does (cancels over the same TLS, to the address
    /// reached), with deadpool-postgres's statement cache and fast recycling (no query of
    /// its own at checkout).
    ///
    /// # Errors
    /// [`Error::Config`] for a configuration with no host, or one this crate cannot
    /// follow (see [`ContextClient::connect_tls`]).
    pub fn with_tls<T: Tls>(config: Config, tls: T, options: Options) -> Result<Manager, Error> {
        let open = opener(config.clone(), tls)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // Used for its recycling checks and statement caches; it opens nothing itself.
        let inner = deadpool_postgres::Manager::from_config(config, NoTls, manager_config);
        Ok(Manager {
            inner,
            open: Source::Ours(open),
            options,
        })
    }

    /// Wraps a deadpool-postgres manager you built; `target` is where the cancel requests
    /// go (the manager's single server), without TLS. Prefer
    /// [`with_tls`](Self::with_tls): it cancels over the connections' own TLS and
    /// address, and closes a connection whose cancel cannot be delivered.
    pub fn from_deadpool(
        inner: deadpool_postgres::Manager,
        target: CancelTarget,
        options: Options,
    ) -> Manager {
        Manager {
            inner,
            open: Source::Inner(target),
            options,
        }
    }
}

impl managed::Manager for Manager {
    type Type = ContextClient;
    type Error = Error;

    async fn create(&self) -> Result<ContextClient, Error> {
        let options = self.options.clone();
        match &self.open {
            Source::Ours(open) => {
                let opened = open().await?;
                let closer = opened.closer();
                // Its statement cache is its own (deadpool's registry of caches is private
                // to its manager, and nothing here clears them all).
                let client = deadpool_postgres::ClientWrapper::new(opened.client, opened.task);
                ContextClient::wrap_pooled(
                    client,
                    opened.route,
                    Some(closer),
                    opened.local_port,
                    options,
                )
                .await
            }
            Source::Inner(target) => {
                let client = managed::Manager::create(&self.inner).await?;
                let route = Route::new(target.clone(), NoTls, String::new());
                ContextClient::wrap_pooled(client, route, None, None, options).await
            }
        }
    }

    async fn recycle(&self, client: &mut ContextClient, metrics: &Metrics) -> RecycleResult<Error> {
        client
            .reset_for_reuse()
            .await
            .map_err(RecycleError::Backend)?;
        let inner = match client.pooled_mut() {
            None => return Ok(()),
            Some(Some(inner)) => inner,
            Some(None) => {
                return Err(RecycleError::message(
                    "a statement task still holds the connection",
                ));
            }
        };
        managed::Manager::recycle(&self.inner, inner, metrics)
            .await
            .map_err(|e| match e {
                RecycleError::Message(m) => RecycleError::Message(m),
                RecycleError::Backend(e) => RecycleError::Backend(Error::Postgres(e)),
            })
    }

    fn detach(&self, client: &mut ContextClient) {
        if let Some(Some(inner)) = client.pooled_mut() {
            managed::Manager::detach(&self.inner, inner);
        }
    }
}
