//! The connection a request arrived on.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use reqctx::Context;

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
    held: Mutex<Vec<Held>>, // what requests left here to outlive their response (upgrades)
}

/// What a request hands its connection to keep until the connection ends: the connection
/// knows nothing of it but that dropping it is how it learns the connection is over.
pub(crate) type Held = Box<dyn Send + 'static>;

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped in order, before anything else of the connection: a held request records
        // its own end (the upgraded IO was dropped: its task is over) before the
        // connection's context could end with a cause of its own.
        let held = std::mem::take(self.held.get_mut().unwrap_or_else(PoisonError::into_inner));
        drop(held);
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
                held: Mutex::new(Vec::new()),
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

    /// The seam between a request's owner and its connection: keeps `item` until the
    /// connection ends (its IO is dropped), then drops it. An upgraded request (101,
    /// CONNECT 2xx, HTTP/2 extended CONNECT) hands its lifecycle here to outlive its
    /// response.
    pub(crate) fn hold(&self, item: Held) {
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(item);
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
