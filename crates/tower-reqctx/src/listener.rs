//! A connection context for each accepted connection; the [`Listener`] trait that
//! [`serve`](crate::serve()) accepts from (TCP, Unix domain sockets, TLS with the `tls`
//! feature); and [`WatchedListener`], which gives a connection context to `axum::serve`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

#[cfg(not(windows))]
pub(crate) use std::os::fd::{AsFd as AsSocket, BorrowedFd as BorrowedSocket};
#[cfg(windows)]
pub(crate) use std::os::windows::io::{AsSocket, BorrowedSocket};

use reqctx::{Canceler, Cause, Context};

use crate::ConnectionContext;
use crate::watch::{Parts, Watch, WatchedIo, Watcher};

/// What [`serve`](crate::serve()) accepts connections from: a [`TcpListener`](tokio::net::TcpListener),
/// a [`UnixListener`](tokio::net::UnixListener) (on Unix), a `TlsListener` (feature `tls`),
/// or a listener of your own.
///
/// A connection is any IO whose socket can be watched ([`AsFd`](std::os::fd::AsFd) on
/// Unix, `AsSocket` on Windows): the connection watcher holds that socket, whatever
/// protocol (TLS, say) runs on top of it. The peer's address, when the transport has one
/// that is a [`SocketAddr`], becomes [`ConnectionContext::remote_addr`] and, with the
/// `axum` feature, the request's `ConnectInfo<SocketAddr>`; a Unix socket has none, so
/// both are absent there.
///
/// ```no_run
/// # #[cfg(unix)]
/// # #[allow(dead_code)]
/// # async fn run(app: axum::Router) -> std::io::Result<()> {
/// let listener = tokio::net::UnixListener::bind("/run/app.sock")?;
/// tower_reqctx::serve(listener, app).await
/// # }
/// ```
pub trait Listener: Send + 'static {
    /// An accepted connection.
    type Io: AsyncRead + AsyncWrite + AsSocket + Unpin + Send + 'static;
    /// The listener's own address, as [`local_addr`](Listener::local_addr) reports it.
    type Addr;

    /// Accepts the next connection, with the peer's address if it has one that is a
    /// [`SocketAddr`].
    ///
    /// An error is handled as [`serve`](crate::serve()) says: one about a single
    /// connection (`ConnectionAborted`, `ConnectionReset`, ...) is skipped; `InvalidInput`
    /// ends the server; any other pauses it, then accepting resumes.
    ///
    /// # Cancellation safety
    ///
    /// Must be cancel-safe: the server drops this future whenever a connection task ends
    /// or the shutdown signal fires, and a connection accepted meanwhile must not be lost.
    fn accept(&mut self)
    -> impl Future<Output = io::Result<(Self::Io, Option<SocketAddr>)>> + Send;

    /// The address the listener is bound to.
    fn local_addr(&self) -> io::Result<Self::Addr>;
}

/// Sets `TCP_NODELAY` on every connection.
impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Io, Option<SocketAddr>)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, %peer, "cannot set TCP_NODELAY");
        }
        Ok((stream, Some(peer)))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

/// Connections have no [`SocketAddr`]: [`ConnectionContext::remote_addr`] is `None`.
#[cfg(unix)]
impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Io, Option<SocketAddr>)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((stream, None))
    }

    fn local_addr(&self) -> io::Result<tokio::net::unix::SocketAddr> {
        tokio::net::UnixListener::local_addr(self)
    }
}

/// Makes each accepted connection's context, under a root, and watches its socket with one
/// [`Watcher`] for the whole server.
#[derive(Debug)]
pub(crate) struct Connections {
    root: Context,
    watcher: Option<Watcher>, // made by the first accept, inside the runtime; again after a failure
    half_close: bool,         // a FIN is not a disconnect
    draining: Option<CancellationToken>, // cancelled once the server is shutting down
}

impl Connections {
    /// Connection contexts will be children of `root`.
    pub(crate) fn new(root: Context) -> Connections {
        Connections {
            root,
            watcher: None,
            half_close: false,
            draining: None,
        }
    }

    /// Under half-close a client's FIN (and a read's end-of-file) is not a disconnect.
    pub(crate) fn half_close(mut self, half_close: bool) -> Connections {
        self.half_close = half_close;
        self
    }

    /// A connection the server closes once `draining` is cancelled ends with
    /// [`Cause::Shutdown`].
    pub(crate) fn draining(mut self, draining: CancellationToken) -> Connections {
        self.draining = Some(draining);
        self
    }

    /// Wraps an accepted connection: a child context of the root, cancelled with
    /// [`Cause::ClientDisconnected`] when the watcher sees the client go, and with the
    /// server's cause when the returned IO is dropped. `permit` is released once the socket
    /// is closed. If the socket cannot be watched (the kernel's epoll memory ran out, say),
    /// the connection is served without a watch, and that is logged at `warn`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with IO enabled (the first call starts the watcher's task).
    pub(crate) fn accept<I: AsSocket>(
        &mut self,
        io: I,
        remote: Option<SocketAddr>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> WatchedIo<I> {
        let (ctx, canceler) = self.root.with_cancel();
        let canceler = Arc::new(canceler);
        let watch = self.watch(borrow(&io), Arc::downgrade(&canceler));
        let parts = Parts {
            conn: ConnectionContext::new(ctx, remote),
            canceler: Some(canceler),
            half_close: self.half_close,
            draining: self.draining.clone(),
            permit,
        };
        WatchedIo::with_parts(io, watch, parts)
    }

    fn watch(&mut self, socket: BorrowedSocket<'_>, canceler: Weak<Canceler>) -> Option<Watch> {
        if self.watcher.is_none() {
            match Watcher::new() {
                Ok(watcher) => self.watcher = Some(watcher),
                Err(err) => {
                    tracing::warn!(%err, "cannot start the connection watcher; serving unwatched");
                    return None;
                }
            }
        }
        let watcher = self.watcher.as_ref()?;
        // Weak: the IO owns the canceler, so the connection context ends with the connection.
        let on_close = Box::new(move || {
            if let Some(canceler) = canceler.upgrade() {
                canceler.cancel_with(Cause::ClientDisconnected);
            }
        });
        match watcher.watch(socket, self.half_close, on_close) {
            Ok(watch) => Some(watch),
            Err(err) => {
                // No fd is needed to watch (the socket's own is registered): only the
                // kernel's memory for epoll entries can run out.
                tracing::warn!(%err, "cannot watch a connection; serving it unwatched");
                None
            }
        }
    }
}

#[cfg(not(windows))]
pub(crate) fn borrow<I: AsSocket>(io: &I) -> BorrowedSocket<'_> {
    io.as_fd()
}

#[cfg(windows)]
pub(crate) fn borrow<I: AsSocket>(io: &I) -> BorrowedSocket<'_> {
    io.as_socket()
}

#[cfg(feature = "tls")]
mod tls;
#[cfg(feature = "tls")]
pub use self::tls::{TlsListener, TlsStream};

#[cfg(feature = "axum")]
pub use self::axum_listener::WatchedListener;

#[cfg(feature = "axum")]
mod axum_listener {
    use std::any::Any;
    use std::fmt;
    use std::io;
    use std::net::SocketAddr;

    use axum::extract::connect_info::Connected;
    use axum::serve::{IncomingStream, Listener};
    use reqctx::Context;

    use super::{AsSocket, Connections};
    use crate::ConnectionContext;
    use crate::watch::WatchedIo;

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
}
