//! A deadpool-postgres pool of [`ContextClient`]s (feature `deadpool`).
//!
//! [`Manager`] wraps deadpool-postgres's own manager (its connection setup, recycling
//! method and statement cache) and adds, before a connection is handed to anyone:
//!
//! 1. wait for the cleanup of a statement whose future was dropped (its cancel and the
//!    statement's end), and discard the connection if that cleanup could not confirm the
//!    cancel;
//! 2. after a cancel or a failed statement, `ROLLBACK` (either leaves a transaction
//!    aborted);
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

use crate::{CancelTarget, ContextClient, Error, Options};

/// A pool of [`ContextClient`]s.
pub type Pool = managed::Pool<Manager>;

/// A connection taken from a [`Pool`]; it derefs to [`ContextClient`].
pub type Object = managed::Object<Manager>;

/// The deadpool manager: see the [module docs](self).
#[derive(Debug)]
pub struct Manager {
    inner: deadpool_postgres::Manager,
    target: CancelTarget,
    options: Options,
}

impl Manager {
    /// Connections without TLS from `config`, with deadpool-postgres's fast recycling
    /// (no query of its own at checkout).
    ///
    /// # Errors
    /// [`Error::Config`] as [`CancelTarget::from_config`].
    pub fn new(config: Config, options: Options) -> Result<Manager, Error> {
        let target = CancelTarget::from_config(&config)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let inner = deadpool_postgres::Manager::from_config(config, NoTls, manager_config);
        Ok(Manager::from_deadpool(inner, target, options))
    }

    /// Wraps a deadpool-postgres manager you built (with TLS, say); `target` is where the
    /// cancel requests go (the manager's single server).
    pub fn from_deadpool(
        inner: deadpool_postgres::Manager,
        target: CancelTarget,
        options: Options,
    ) -> Manager {
        Manager {
            inner,
            target,
            options,
        }
    }
}

impl managed::Manager for Manager {
    type Type = ContextClient;
    type Error = Error;

    async fn create(&self) -> Result<ContextClient, Error> {
        let client = managed::Manager::create(&self.inner).await?;
        ContextClient::wrap_pooled(client, self.target.clone(), self.options.clone()).await
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
