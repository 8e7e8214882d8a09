//! [`TlsListener`]: TLS over any [`Listener`], with tokio-rustls.
//!
//! Why not the `tls-listener` crate, which also runs handshakes concurrently with a cap
//! and a timeout: the connection watcher needs the socket under the TLS session as a
//! borrowed fd (`AsFd`), which tokio-rustls's stream does not offer (only `AsRawFd`), so
//! a stream type of ours is needed either way; `tls-listener` brings a listener trait of
//! its own, a third beside ours and axum's; and it would be a dependency for the sixty
//! lines of `JoinSet` and `select!` below: the cap, the timeout, and the socket.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

use super::listener::{Listener, is_connection_error};
use super::socket::{AsSocket, BorrowedSocket};

/// How long a client has to finish its TLS handshake by default.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many handshakes may be in progress at once by default.
const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// A [`Listener`] that runs TLS (tokio-rustls) over the connections of another, a
/// [`TcpListener`](tokio::net::TcpListener) by default. Feature `tls`.
///
/// Handshakes run concurrently, each in its own task, so a slow or silent client never
/// holds up the others; one that has not finished within the
/// [`handshake_timeout`](TlsListener::handshake_timeout) (10 s by default), or fails, is
/// dropped and logged at `debug`. At most [`max_handshakes`](TlsListener::max_handshakes)
/// (256 by default) are in progress at once: beyond that the inner listener is not asked
/// for more connections until one finishes, so a flood of handshakes holds at most that
/// many tasks and file descriptors, and the clients beyond it wait in the listen backlog.
/// Those are file descriptors on top of [`Serve::max_connections`](crate::Serve::max_connections).
/// Connections whose handshake is done are not held back: a flood of clients that connect
/// and say nothing delays new TLS clients (by up to the handshake timeout once every slot
/// is taken), never the requests on established connections. [`accept`](Listener::accept) yields connections whose
/// handshake is done. The connection watcher watches the TCP socket under the TLS stream,
/// so a client that leaves is seen as over plain TCP.
///
/// To serve HTTP/2 as well as HTTP/1.1, put `h2` and `http/1.1` in the config's
/// `alpn_protocols`; the server detects HTTP/2 by its preface either way.
///
/// ```no_run
/// use std::sync::Arc;
/// use tokio_rustls::rustls::ServerConfig;
/// use tower_reqctx::TlsListener;
///
/// # #[allow(dead_code)]
/// # async fn run(app: axum::Router, config: ServerConfig) -> std::io::Result<()> {
/// // `config`: a rustls ServerConfig with the certificate chain and key.
/// let mut config = config;
/// config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
/// let tcp = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
/// tower_reqctx::serve(TlsListener::new(tcp, Arc::new(config)), app).await
/// # }
/// ```
pub struct TlsListener<L: Listener = tokio::net::TcpListener> {
    inner: L,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    max_handshakes: usize,
    handshakes: JoinSet<Option<Accepted<L::Io>>>, // None: failed or timed out
}

/// A connection whose handshake is done, and its peer.
type Accepted<IO> = (TlsStream<IO>, Option<SocketAddr>);

impl<L: Listener> TlsListener<L> {
    /// Runs TLS with `config` over the connections `inner` accepts.
    pub fn new(inner: L, config: Arc<ServerConfig>) -> TlsListener<L> {
        TlsListener {
            inner,
            acceptor: TlsAcceptor::from(config),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            handshakes: JoinSet::new(),
        }
    }

    /// How long a client has to finish its handshake, from its connection's accept.
    /// Defaults to 10 seconds.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How many handshakes may be in progress at once; at least 1. Defaults to 256: a few
    /// hundred milliseconds of handshakes for one core, so legitimate bursts are not held
    /// back, while a flood holds at most that many file descriptors.
    pub fn max_handshakes(mut self, max: usize) -> Self {
        self.max_handshakes = max.max(1);
        self
    }

    /// The wrapped listener.
    pub fn get_ref(&self) -> &L {
        &self.inner
    }
}

impl<L: Listener> Listener for TlsListener<L> {
    type Io = TlsStream<L::Io>;
    type Addr = L::Addr;

    /// Yields the next connection whose handshake succeeded; errors are the inner
    /// listener's. Cancel-safe if the inner listener's `accept` is: a handshake in progress
    /// goes on in its task.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (each handshake is a task).
    async fn accept(&mut self) -> io::Result<(Self::Io, Option<SocketAddr>)> {
        loop {
            // At the limit, only finishing handshakes: `join_next` is enabled then.
            let room = self.handshakes.len() < self.max_handshakes;
            tokio::select! {
                accepted = self.inner.accept(), if room => {
                    let (io, peer) = accepted?;
                    let handshake = self.acceptor.accept(io);
                    let limit = self.handshake_timeout;
                    self.handshakes.spawn(async move {
                        match tokio::time::timeout(limit, handshake).await {
                            Ok(Ok(stream)) => Some((TlsStream(stream), peer)),
                            Ok(Err(err)) => {
                                tracing::debug!(%err, ?peer, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(?peer, ?limit, "TLS handshake timed out");
                                None
                            }
                        }
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return Ok(connection);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<L::Addr> {
        self.inner.local_addr()
    }
}

/// `TlsListener` under `axum::serve` (feature `axum`), over a listener with socket
/// addresses (TCP): the peer's address is the connection's `ConnectInfo<SocketAddr>`.
/// Wrap it in [`WatchedListener`](crate::WatchedListener) to watch its connections too.
///
/// An error of one connection (reset, aborted) is skipped; any other is logged at `error`
/// and accepting resumes a second later, as axum does for a `TcpListener`.
///
/// ```no_run
/// use std::sync::Arc;
/// use tokio_rustls::rustls::ServerConfig;
/// use tower_reqctx::{ConnectionContext, TlsListener, WatchedListener};
///
/// # #[allow(dead_code)]
/// # async fn run(app: axum::Router, config: Arc<ServerConfig>) -> std::io::Result<()> {
/// let tcp = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
/// let listener = WatchedListener::new(TlsListener::new(tcp, config));
/// axum::serve(listener, app.into_make_service_with_connect_info::<ConnectionContext>()).await
/// # }
/// ```
#[cfg(feature = "axum")]
impl<L> axum::serve::Listener for TlsListener<L>
where
    L: Listener<Addr = SocketAddr>,
{
    type Io = TlsStream<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            match Listener::accept(self).await {
                // A TCP listener always knows the peer.
                Ok((io, peer)) => {
                    return (io, peer.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))));
                }
                Err(err) if is_connection_error(&err) => {}
                Err(err) => {
                    tracing::error!(%err, "accept failed; accepting again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Listener::local_addr(self)
    }
}

impl<L: Listener + fmt::Debug> fmt::Debug for TlsListener<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("inner", &self.inner)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_handshakes", &self.max_handshakes)
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

/// A server-side TLS connection accepted by [`TlsListener`]: tokio-rustls's stream, whose
/// socket (the IO under the TLS session) the connection watcher can hold.
#[derive(Debug)]
pub struct TlsStream<IO>(tokio_rustls::server::TlsStream<IO>);

impl<IO> TlsStream<IO> {
    /// The tokio-rustls stream: its `get_ref()` gives the IO and the rustls session (the
    /// negotiated ALPN protocol, the client's SNI name).
    pub fn get_ref(&self) -> &tokio_rustls::server::TlsStream<IO> {
        &self.0
    }

    /// The tokio-rustls stream.
    pub fn into_inner(self) -> tokio_rustls::server::TlsStream<IO> {
        self.0
    }
}

impl<IO: AsSocket> AsSocket for TlsStream<IO> {
    #[cfg(not(windows))]
    fn as_fd(&self) -> BorrowedSocket<'_> {
        self.0.get_ref().0.as_fd()
    }

    #[cfg(windows)]
    fn as_socket(&self) -> BorrowedSocket<'_> {
        self.0.get_ref().0.as_socket()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
