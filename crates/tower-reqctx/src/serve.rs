//! [`serve`]: an HTTP/1 and HTTP/2 server whose connections carry a context.

use std::error::Error as StdError;
use std::fmt;
use std::future::{Future, IntoFuture, pending};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use reqctx::{Cause, Context};
use tokio::net::TcpListener;
use tokio::task::{JoinError, JoinSet};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::ConnectionContext;
use crate::listener::{Connections, Listener};
use crate::watch::WatchedIo;

type BoxError = Box<dyn StdError + Send + Sync>;

/// How long [`serve`] gives in-flight requests after the shutdown signal by default.
const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// How long connections may still run after the root is cancelled with
/// [`Cause::Shutdown`], before they are dropped.
const FINAL_PERIOD: Duration = Duration::from_secs(1);

/// The first and the longest pause after an accept error that is not about one connection.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `service` on `listener` over HTTP/1.1 and HTTP/2, giving every request its
/// connection's [`ConnectionContext`].
///
/// `listener` is any [`Listener`]: a [`TcpListener`], a
/// [`UnixListener`](tokio::net::UnixListener), a `TlsListener` (feature `tls`) or your own.
///
/// Like [`axum::serve`](https://docs.rs/axum/latest/axum/serve/fn.serve.html), it takes an
/// axum `Router` as it is, or any tower service of `http::Request<hyper::body::Incoming>`.
/// The returned [`Serve`] is configured with its builder methods and started with `.await`.
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{Router, routing::get};
///
/// # #[allow(dead_code)]
/// # async fn run() -> std::io::Result<()> {
/// let app = Router::new().route("/", get(|| async { "hello" }));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>(); // or tokio::signal::ctrl_c()
/// # drop(stop);
/// tower_reqctx::serve(listener, app)
///     .with_graceful_shutdown(async {
///         let _ = stopped.await;
///     })
///     .drain_timeout(Duration::from_secs(5))
///     .await
/// # }
/// ```
///
/// # Contexts
///
/// The contexts form a tree: the [`root`](Serve::root) → one per connection → one per
/// request (made by [`ContextLayer`](crate::ContextLayer) under the connection's). Each
/// request's extensions hold a [`ConnectionContext`] and, with the `axum` feature,
/// [`ConnectInfo<SocketAddr>`](https://docs.rs/axum/0.8/axum/extract/struct.ConnectInfo.html) (so handlers written for
/// `axum::serve` with connect info keep working) when the listener gives the peer's
/// [`SocketAddr`] (TCP and TLS over TCP do; a Unix socket does not).
///
/// A connection's context is cancelled:
/// - with [`Cause::ClientDisconnected`] when the connection watcher sees the client close
///   (FIN, a half-close included) or reset the connection, even when hyper is not reading
///   (an unread request body, a pipelined request, a client that stopped reading a
///   streamed response; see [`WatchedIo`]), or when a read or write on it fails;
/// - with [`Cause::Shutdown`] when the root is cancelled at the end of the drain period;
/// - when the connection ends for any other reason (then every request on it has ended
///   already), with [`Cause::Cancelled`]. An upgraded connection (a WebSocket, say) ends
///   when its upgraded IO is dropped.
///
/// The first cause recorded wins: a client that leaves during the drain period gives
/// `ClientDisconnected`; one that is still there when the root is cancelled gives
/// `Shutdown`, and its later close changes nothing.
///
/// If a socket cannot be watched (file descriptors ran out, say), the connection is served
/// without the watcher, and the failure is logged at `debug`.
///
/// # Protocols and settings
///
/// hyper-util's [`auto::Builder`](Builder) serves HTTP/1.1 and HTTP/2 (prior knowledge,
/// `h2c`) on the same port, with HTTP/1 upgrades and HTTP/2's extended CONNECT (WebSockets
/// over HTTP/2) enabled, and a [`TokioTimer`] on both, so hyper's HTTP/1 header read
/// timeout (30 s by default) applies. [`http_builder`](Serve::http_builder) reaches every
/// other setting. `TCP_NODELAY` is set on every TCP connection.
///
/// # Errors and shutdown
///
/// An accept error about one connection is skipped; any other (such as running out of
/// file descriptors) is logged at `error` and retried after a pause that grows from 5 ms to
/// 1 s, as Go's `net/http` does. A connection's own errors are logged at `debug` and never
/// end the server. The future resolves with an error only if the listener itself is
/// unusable (accept reports [`InvalidInput`](io::ErrorKind::InvalidInput), as for a socket
/// that is not listening); it first cancels every connection's context with
/// [`Cause::Shutdown`] and drops the connections. Without [`with_graceful_shutdown`](Serve::with_graceful_shutdown)
/// it never resolves otherwise; with it, see that method for the sequence.
///
/// Dropping the future drops every connection at once. It must be polled inside a tokio
/// runtime with IO and time enabled.
pub fn serve<L, S, B>(listener: L, service: S) -> Serve<S, L>
where
    L: Listener,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    Serve {
        listener,
        service,
        signal: None,
        drain_timeout: DEFAULT_DRAIN,
        root: Context::background(),
        builder,
    }
}

/// A server to start with `.await`: see [`serve`].
#[must_use = "a server does nothing until it is awaited"]
pub struct Serve<S, L = TcpListener> {
    listener: L,
    service: S,
    signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    drain_timeout: Duration,
    root: Context,
    builder: Builder<TokioExecutor>,
}

impl<S, L: Listener> Serve<S, L> {
    /// Shuts the server down gracefully when `signal` completes:
    ///
    /// 1. It stops accepting, and tells every connection to finish: an idle HTTP/1
    ///    keep-alive connection closes at once, a busy one after its current response
    ///    (sent with `connection: close`); HTTP/2 sends GOAWAY and finishes its open streams.
    /// 2. In-flight requests run for up to the [`drain_timeout`](Serve::drain_timeout).
    /// 3. Then the root is cancelled with [`Cause::Shutdown`]: every context under it, so
    ///    every request still running, sees `Shutdown` (and
    ///    [`ContextLayer`](crate::ContextLayer) ends streaming bodies on it).
    /// 4. Connections get one more second to finish; whatever is left (a handler that
    ///    ignores its context, a body that never ends) is dropped.
    ///
    /// The future then resolves with `Ok(())`, after every connection's task has ended. The
    /// root is cancelled with `Shutdown` in every case, even when the connections were done
    /// before the drain period ended.
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.signal = Some(Box::pin(signal));
        self
    }

    /// How long in-flight requests may run after the shutdown signal before their contexts
    /// are cancelled with [`Cause::Shutdown`]. Defaults to 10 seconds.
    pub fn drain_timeout(mut self, drain_timeout: Duration) -> Self {
        self.drain_timeout = drain_timeout;
        self
    }

    /// Makes `root` the parent of every connection's context (instead of
    /// [`Context::background`]): its values reach every request, and cancelling it cancels
    /// every request. The server cancels its own child of `root` at shutdown, never `root`
    /// itself.
    pub fn root(mut self, root: Context) -> Self {
        self.root = root;
        self
    }

    /// Changes hyper-util's connection settings: HTTP/1 and HTTP/2 options, timeouts, or
    /// one protocol only.
    ///
    /// ```no_run
    /// # #[allow(dead_code)]
    /// # async fn run(app: axum::Router) -> std::io::Result<()> {
    /// use std::time::Duration;
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// tower_reqctx::serve(listener, app)
    ///     .http_builder(|builder| {
    ///         builder.http1().header_read_timeout(Duration::from_secs(5));
    ///         builder.http2().max_concurrent_streams(100);
    ///     })
    ///     .await
    /// # }
    /// ```
    pub fn http_builder(mut self, f: impl FnOnce(&mut Builder<TokioExecutor>)) -> Self {
        f(&mut self.builder);
        self
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<L::Addr> {
        self.listener.local_addr()
    }
}

impl<S, L, B> IntoFuture for Serve<S, L>
where
    L: Listener,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = io::Result<()>;
    type IntoFuture = ServeFuture;

    fn into_future(self) -> ServeFuture {
        ServeFuture(Box::pin(self.run()))
    }
}

impl<S, L: Listener> Serve<S, L> {
    async fn run<B>(self) -> io::Result<()>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let Serve {
            mut listener,
            service,
            signal,
            drain_timeout,
            root,
            builder,
        } = self;
        // Our own child, so shutdown never cancels the caller's root.
        let (root, cancel_root) = root.with_cancel();
        let mut connections = Connections::new(root);
        let builder = Arc::new(builder);
        let graceful = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut signal = signal.unwrap_or_else(|| Box::pin(pending()));
        let mut backoff = None;

        loop {
            tokio::select! {
                accepted = accept(&mut listener, &mut backoff) => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            tracing::error!(%err, "the listener failed; dropping every connection");
                            cancel_root.cancel_with(Cause::Shutdown);
                            tasks.shutdown().await;
                            return Err(err);
                        }
                    };
                    let io = connections.accept(stream, peer);
                    let service = WithConnection {
                        inner: service.clone(),
                        conn: io.connection().clone(),
                        peer,
                    };
                    tasks.spawn(serve_connection(
                        Arc::clone(&builder),
                        io,
                        service,
                        graceful.clone(),
                    ));
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => reaped(joined),
                () = &mut signal => break,
            }
        }

        drop(listener);
        tracing::debug!(
            connections = tasks.len(),
            "shutting down: draining connections"
        );
        graceful.cancel();
        if timeout(drain_timeout, join_all(&mut tasks)).await.is_err() {
            tracing::debug!(
                connections = tasks.len(),
                "drain period over: cancelling with Shutdown"
            );
            cancel_root.cancel_with(Cause::Shutdown);
            if timeout(FINAL_PERIOD, join_all(&mut tasks)).await.is_err() {
                tracing::debug!(connections = tasks.len(), "dropping connections still open");
                tasks.shutdown().await;
            }
        }
        cancel_root.cancel_with(Cause::Shutdown);
        Ok(())
    }
}

/// Accepts the next connection, skipping errors that concern one connection and pausing
/// after others. `backoff` is the last pause, reset by a success.
///
/// # Cancellation safety
///
/// Cancel-safe: no connection is lost, and an interrupted pause is not shortened the next
/// time.
async fn accept<L: Listener>(
    listener: &mut L,
    backoff: &mut Option<Duration>,
) -> io::Result<(L::Io, Option<SocketAddr>)> {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                *backoff = None;
                return Ok(accepted);
            }
            Err(err) if is_connection_error(&err) => {}
            Err(err) if err.kind() == io::ErrorKind::InvalidInput => return Err(err),
            Err(err) => {
                let pause = backoff.map_or(BACKOFF_MIN, |last| (last * 2).min(BACKOFF_MAX));
                *backoff = Some(pause);
                tracing::error!(%err, ?pause, "accept error; retrying");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Waits for every task in `tasks`.
async fn join_all(tasks: &mut JoinSet<()>) {
    while let Some(joined) = tasks.join_next().await {
        reaped(joined);
    }
}

fn reaped(joined: Result<(), JoinError>) {
    if let Err(err) = joined {
        // The panic itself was reported by the panic hook.
        if err.is_panic() {
            tracing::debug!("a connection task panicked");
        }
    }
}

/// Serves one connection, and starts its graceful shutdown when `graceful` is cancelled.
async fn serve_connection<I, S, B>(
    builder: Arc<Builder<TokioExecutor>>,
    io: WatchedIo<I>,
    service: WithConnection<S>,
    graceful: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut conn = pin!(
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
    );
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = graceful.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, "connection ended with an error");
    }
}

/// Puts the connection's context (and, with `axum`, `ConnectInfo<SocketAddr>`) in every
/// request's extensions.
#[derive(Clone)]
struct WithConnection<S> {
    inner: S,
    conn: ConnectionContext,
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    peer: Option<SocketAddr>,
}

impl<S, R> Service<Request<R>> for WithConnection<S>
where
    S: Service<Request<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<R>) -> Self::Future {
        let extensions = req.extensions_mut();
        extensions.insert(self.conn.clone());
        #[cfg(feature = "axum")]
        if let Some(peer) = self.peer {
            extensions.insert(axum::extract::ConnectInfo(peer));
        }
        self.inner.call(req)
    }
}

/// The future of a [`Serve`]: see [`serve`].
#[must_use = "futures do nothing unless polled"]
pub struct ServeFuture(Pin<Box<dyn Future<Output = io::Result<()>> + Send>>);

impl Future for ServeFuture {
    type Output = io::Result<()>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for ServeFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeFuture").finish_non_exhaustive()
    }
}

impl<S, L: fmt::Debug> fmt::Debug for Serve<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("listener", &self.listener)
            .field("drain_timeout", &self.drain_timeout)
            .field("root", &self.root)
            .field("builder", &self.builder)
            .field("graceful_shutdown", &self.signal.is_some())
            .finish_non_exhaustive()
    }
}
