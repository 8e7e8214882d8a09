//! `WatchedListener`: the connection watcher for `axum::serve`.

use std::any::Any;
use std::fmt;
use std::io;
use std::net::SocketAddr;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use reqctx::Context;

use super::connections::Connections;
use super::socket::AsSocket;
use super::watch::WatchedIo;
use crate::connection::ConnectionContext;

/// An [`axum::serve`](axum::serve()) [`Listener`] that gives each connection a [`ConnectionContext`],
/// cancelled with [`Cause::ClientDisconnected`](reqctx::Cause::ClientDisconnected) when
/// the client closes or resets the connection, and with
/// [`ServerClosed`](crate::ServerClosed) when the server closes it (see
/// [`WatchedIo`](crate::WatchedIo)). One file descriptor per connection.
///
/// Requests carry it as [`ConnectInfo<ConnectionContext>`](axum::extract::ConnectInfo)
/// when the app is served with
/// [`into_make_service_with_connect_info::<ConnectionContext>()`](axum::Router::into_make_service_with_connect_info);
/// [`ContextLayer`](crate::ContextLayer) finds it there and hangs each request's context
/// under it. The peer's address is [`ConnectionContext::remote_addr`] (for listeners whose
/// address type is [`SocketAddr`]).
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use tower_reqctx::{ConnectionContext, WatchedListener};
///
/// # #[allow(dead_code)]
/// # async fn run() -> std::io::Result<()> {
/// let app = Router::new().route("/", get(|| async { "hello" }));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(
///     WatchedListener::new(listener),
///     app.into_make_service_with_connect_info::<ConnectionContext>(),
/// )
/// .await
/// # }
/// ```
///
/// # Set `TCP_NODELAY`
///
/// `axum::serve` does not set `TCP_NODELAY` on the connections it accepts (`serve` does),
/// and Nagle's algorithm then holds small writes back behind the peer's delayed ACK: a
/// gRPC unary call was measured at 23–32 ms under `axum::serve` + `WatchedListener`
/// against 1.4 ms with it set; an aborted HTTP/2 call's reset is late by as much. Set it
/// on the listener you wrap, with axum's `ListenerExt::tap_io`:
///
/// ```no_run
/// use axum::{Router, routing::get, serve::ListenerExt};
/// use tower_reqctx::{ConnectionContext, WatchedListener};
///
/// # #[allow(dead_code)]
/// # async fn run() -> std::io::Result<()> {
/// # let app = Router::new().route("/", get(|| async { "hello" }));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000")
///     .await?
///     .tap_io(|tcp| {
///         if let Err(err) = tcp.set_nodelay(true) {
///             tracing::warn!("cannot set TCP_NODELAY: {err}");
///         }
///     });
/// axum::serve(
///     WatchedListener::new(listener),
///     app.into_make_service_with_connect_info::<ConnectionContext>(),
/// )
/// .await
/// # }
/// ```
///
/// # What it adds to plain `axum::serve`
///
/// hyper notices a closed connection only when it reads from it. Under plain
/// `axum::serve` a request keeps running after its client left while the handler has
/// not read the request body (any size), while a pipelined request waits its turn, and
/// while a client keeps the socket open but stops reading a streamed response. The
/// watcher sees the FIN or RST in all of those cases (on Linux; elsewhere only reads
/// and writes that fail or see end-of-file, as hyper itself does). A FIN queued behind
/// a full receive window cannot be seen by anyone; only a deadline ends that request.
///
/// # Shutdown
///
/// With `axum::serve`, graceful shutdown is axum's: it stops accepting and waits for
/// every connection, with no drain period, and nothing cancels the contexts with
/// [`Cause::Shutdown`](reqctx::Cause::Shutdown) unless you cancel the
/// [`root`](WatchedListener::root) yourself. [`serve`](crate::serve()) does both: a drain
/// period, then `Shutdown`, then a bounded wait.
pub struct WatchedListener<L> {
    listener: L,
    connections: Connections,
}

impl<L> WatchedListener<L> {
    /// Wraps `listener`; connection contexts are children of
    /// [`Context::background`] until [`root`](WatchedListener::root) says otherwise.
    pub fn new(listener: L) -> WatchedListener<L> {
        WatchedListener {
            listener,
            connections: Connections::new(Context::background()),
        }
    }

    /// Makes every connection's context a child of `root`, so cancelling `root` (for
    /// example with [`Cause::Shutdown`](reqctx::Cause::Shutdown)) cancels every request
    /// under it, and its values reach every request.
    pub fn root(mut self, root: Context) -> WatchedListener<L> {
        self.connections = Connections::new(root);
        self
    }

    /// The wrapped listener.
    pub fn get_ref(&self) -> &L {
        &self.listener
    }

    /// The wrapped listener, mutably.
    pub fn get_mut(&mut self) -> &mut L {
        &mut self.listener
    }
}

impl<L> Listener for WatchedListener<L>
where
    L: Listener,
    L::Io: AsSocket,
    L::Addr: Any,
{
    type Io = WatchedIo<L::Io>;
    type Addr = L::Addr;

    /// Accepts as `L` does, then watches the connection.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with IO enabled.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.listener.accept().await;
        let remote = (&addr as &dyn Any).downcast_ref::<SocketAddr>().copied();
        (self.connections.accept(io, remote, None), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Each request's [`ConnectInfo`](axum::extract::ConnectInfo) is its connection's
/// context, with
/// [`into_make_service_with_connect_info::<ConnectionContext>()`](axum::Router::into_make_service_with_connect_info).
impl<L> Connected<IncomingStream<'_, WatchedListener<L>>> for ConnectionContext
where
    L: Listener,
    L::Io: AsSocket,
    L::Addr: Any,
{
    fn connect_info(stream: IncomingStream<'_, WatchedListener<L>>) -> ConnectionContext {
        stream.io().connection().clone()
    }
}

impl<L: fmt::Debug> fmt::Debug for WatchedListener<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchedListener")
            .field("listener", &self.listener)
            .field("connections", &self.connections)
            .finish()
    }
}
