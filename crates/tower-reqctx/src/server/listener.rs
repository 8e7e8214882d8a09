//! The [`Listener`] trait that [`serve`](crate::serve()) accepts from: TCP, Unix domain
//! sockets, TLS with the `tls` feature, or a listener of your own.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

use super::socket::AsSocket;

/// What [`serve`](crate::serve()) accepts connections from: a [`TcpListener`](tokio::net::TcpListener),
/// a [`UnixListener`](tokio::net::UnixListener) (on Unix), a `TlsListener` (feature `tls`),
/// or a listener of your own.
///
/// A connection is any IO whose socket can be watched ([`AsFd`](std::os::fd::AsFd) on
/// Unix, `AsSocket` on Windows): the connection watcher holds that socket, whatever
/// protocol (TLS, say) runs on top of it. The peer's address, when the transport has one
/// that is a [`SocketAddr`], becomes [`ConnectionContext::remote_addr`](crate::ConnectionContext::remote_addr) and, with the
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

/// Connections have no [`SocketAddr`]: [`ConnectionContext::remote_addr`](crate::ConnectionContext::remote_addr) is `None`.
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

/// An accept error about one connection only: skip it and accept the next.
pub(crate) fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
