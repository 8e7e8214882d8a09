//! The connection a request arrived on.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use reqctx::{Cause, Context};

use crate::body::Guard;

/// The connection a request arrived on: its context, which is the parent of the context of
/// every request on it, and the peer's address.
///
/// [`serve`](crate::serve()) and `WatchedListener` (feature `axum`) put it in every
/// request's extensions; [`ContextLayer`](crate::ContextLayer) hangs each request's context
/// under it. It is cancelled with [`Cause::ClientDisconnected`](reqctx::Cause) when the
/// connection watcher sees the client close or reset the connection, and with
/// [`Cause::Shutdown`](reqctx::Cause) when the server's root is cancelled.
///
/// An upgraded request (a WebSocket: `101 Switching Protocols`) is parked here by the
/// layer: its context lives until the upgraded connection ends, with `ClientDisconnected`
/// when the client closes it and `Completed` when the server drops it (the handler's task
/// ended).
#[derive(Clone)]
pub struct ConnectionContext {
    inner: Arc<Inner>, // one reference count per clone: one clone goes into every request
}

struct Inner {
    ctx: Context,
    remote: Option<SocketAddr>,
    parked: Mutex<Vec<Guard>>, // upgraded requests, ended when the connection is dropped
}

impl Drop for Inner {
    fn drop(&mut self) {
        let parked = std::mem::take(
            self.parked
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for guard in parked {
            // The server dropped the upgraded IO: the handler's task is over. A client that
            // closed first was recorded as ClientDisconnected through the connection.
            guard.end(Cause::Completed);
        }
    }
}

impl ConnectionContext {
    /// A connection with context `ctx` from `remote`. For custom servers; [`serve`](crate::serve())
    /// makes these itself.
    pub fn new(ctx: Context, remote: Option<SocketAddr>) -> ConnectionContext {
        ConnectionContext {
            inner: Arc::new(Inner {
                ctx,
                remote,
                parked: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The connection's context.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    /// The peer's address, when the transport has one.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote
    }

    /// Keeps an upgraded request's guard until the connection is dropped.
    pub(crate) fn park(&self, guard: Guard) {
        self.inner
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(guard);
    }
}

impl fmt::Debug for ConnectionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionContext")
            .field("ctx", &self.inner.ctx)
            .field("remote", &self.inner.remote)
            .finish_non_exhaustive()
    }
}
