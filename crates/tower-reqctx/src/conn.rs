//! The connection a request arrived on.

use std::net::SocketAddr;

use reqctx::Context;

/// The connection a request arrived on: its context, which is the parent of the context of
/// every request on it, and the peer's address.
///
/// [`serve`](crate::serve()) and `WatchedListener` (feature `axum`) put it in every
/// request's extensions; [`ContextLayer`](crate::ContextLayer) hangs each request's context
/// under it. It is cancelled with [`Cause::ClientDisconnected`](reqctx::Cause) when the
/// connection watcher sees the client close or reset the connection, and with
/// [`Cause::Shutdown`](reqctx::Cause) when the server's root is cancelled.
#[derive(Clone, Debug)]
pub struct ConnectionContext {
    ctx: Context,
    remote: Option<SocketAddr>,
}

impl ConnectionContext {
    /// A connection with context `ctx` from `remote`. For custom servers; [`serve`](crate::serve)
    /// makes these itself.
    pub fn new(ctx: Context, remote: Option<SocketAddr>) -> ConnectionContext {
        ConnectionContext { ctx, remote }
    }

    /// The connection's context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The peer's address, when the transport has one.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote
    }
}
