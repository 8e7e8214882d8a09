//! [`serve`]: an HTTP/1 and HTTP/2 server whose connections carry a context.

use std::error::Error as StdError;
use std::fmt;
use std::future::{Future, IntoFuture, pending};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll, Waker, ready};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use reqctx::{Cause, Context};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower_service::Service;

use super::connections::Connections;
use super::executor::ServeExecutor;
use super::header_timer::{Clocked, HeaderTimer};
use super::listener::{Listener, is_connection_error};
use super::socket::AsSocket;
use super::watch::WatchedIo;
use crate::connection::ConnectionContext;

type BoxError = Box<dyn StdError + Send + Sync>;

/// What `serve` runs: a clonable service of hyper's requests whose future can move
/// between threads. Spelled out on the public items (`serve`, `IntoFuture`), where a
/// private trait would hide the bounds from the docs; named here for the rest.
trait HttpService<B>:
    Service<Request<Incoming>, Response = Response<B>, Future: Send, Error: Into<BoxError>>
    + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: Service<Request<Incoming>, Response = Response<B>, Future: Send, Error: Into<BoxError>>
        + Clone
        + Send
        + 'static
{
}

/// What `serve` sends: a response body whose chunks can move between threads.
trait HttpBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> HttpBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// How long [`serve`] gives in-flight requests after the shutdown signal by default.
const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// How long connections may still run after the root is cancelled with
/// [`Cause::Shutdown`], before they are dropped.
const FINAL_PERIOD: Duration = Duration::from_secs(1);

/// The first and the longest pause after an accept error that is not about one connection.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// hyper's HTTP/1 header-read timeout (also how long an idle keep-alive connection is kept).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest header-read timeout: hyper computes `now + timeout`, which must not overflow.
const MAX_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// HTTP/2 keep-alive: a PING after this long without a frame from the client...
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// ...and the connection is closed if its answer takes longer than this.
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
const H2_MAX_CONCURRENT_STREAMS: u32 = 200;
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
const H2_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// The connection limit where the fd limit cannot be read.
const FALLBACK_MAX_CONNECTIONS: usize = 10_000;

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
/// request (made by [`ContextLayer`](crate::ContextLayer) under the connection's). While
/// `serve` polls a connection (and, over HTTP/2, each stream's task), the connection is
/// the thread's current one: [`ConnectionContext::current`] (its
/// [`remote_addr`](ConnectionContext::remote_addr) is the peer's address). It is not put
/// in the request's extensions, which hold, when asked for with
/// [`connect_info`](Serve::connect_info), axum's
/// [`ConnectInfo<SocketAddr>`](https://docs.rs/axum/0.8/axum/extract/struct.ConnectInfo.html).
///
/// A connection's context ends when the connection does, from either side:
/// - with [`Cause::ClientDisconnected`] when the client closes (FIN) or resets the
///   connection: the connection watcher sees that even while hyper is not reading (an
///   unread request body, a pipelined request, a client that stopped reading a streamed
///   response; see [`WatchedIo`]), and so does a read or write that fails. Under
///   [`half_close`](Serve::half_close) a FIN is not a close;
/// - with [`ServerClosed`](crate::ServerClosed) when the server closes it (keep-alive over,
///   `connection: close`, a header-read timeout, an HTTP/2 connection ended by a GOAWAY or
///   by a keep-alive PING left unanswered (the client is probably gone, but was not seen
///   leaving), a protocol error, an upgraded connection's IO dropped by its handler);
/// - with [`Cause::Shutdown`] when the server closes it during a graceful shutdown, or when
///   the root is cancelled at the end of the drain period;
/// - with [`HandlerPanicked`](crate::HandlerPanicked) when a handler's panic unwinds
///   through the connection's task (HTTP/1; an HTTP/2 stream is a task of its own).
///
/// So `spawn` and `on_cancel` on a connection's context end with the connection. The first
/// cause recorded wins: a client that leaves during the drain period gives
/// `ClientDisconnected`; one that is still there when the root is cancelled gives
/// `Shutdown`, and its later close changes nothing; a client that closes as soon as it
/// has read a `connection: close` response may be seen before the server drops the
/// connection, and gives `ClientDisconnected`. Requests keep their own causes: a
/// request that ended (`Completed`, say) before its connection is not changed by it, and an
/// upgraded request (a WebSocket) held by its connection records its own end
/// (`Completed` when the server drops the upgraded IO) before the connection's context ends.
///
/// Each connection costs one file descriptor: the watcher registers the socket itself. If
/// a socket cannot be watched (the kernel's memory for epoll entries ran out), the
/// connection is served without the watcher, and that is logged at `warn`.
///
/// # Protocols
///
/// hyper-util's [`auto::Builder`](Builder) serves HTTP/1.1 and HTTP/2 on the same port.
/// HTTP/2 is served over TLS with ALPN `h2` (`TlsListener` with the
/// `tls` feature) and in cleartext **with prior knowledge only** (the client starts with
/// the HTTP/2 preface, as `curl --http2-prior-knowledge` does); an HTTP/1.1
/// `Upgrade: h2c` request is served as HTTP/1.1, not upgraded. HTTP/1 upgrades (WebSockets)
/// and HTTP/2's extended CONNECT (WebSockets over HTTP/2) are enabled. `TCP_NODELAY` is set
/// on every TCP connection.
///
/// # Limits
///
/// | limit | default | change with |
/// |---|---|---|
/// | open connections | the soft `RLIMIT_NOFILE` minus a sixteenth of it (at least 64), kept for the application's own files; 10,000 where it cannot be read | [`max_connections`](Serve::max_connections) |
/// | a connection's first bytes (HTTP/1 or HTTP/2) must arrive within | 30 s | [`header_read_timeout`](Serve::header_read_timeout) |
/// | HTTP/1 header-read timeout (hyper's): a request head must arrive within it, counted from the connection's first bytes and from the end of each response (so it is also how long an idle keep-alive connection stays open) | 30 s | [`header_read_timeout`](Serve::header_read_timeout) |
/// | HTTP/2 keep-alive PING, after a quiet period / closed if unanswered within | 60 s / 20 s | `b.http2().keep_alive_interval(..)`, `.keep_alive_timeout(..)` |
/// | HTTP/2 concurrent streams per connection | 200 | `b.http2().max_concurrent_streams(..)` |
/// | HTTP/2 streams reset by the client before being accepted (Rapid Reset) | 20 | `b.http2().max_pending_accept_reset_streams(..)` |
/// | HTTP/2 streams the server resets for the client's protocol errors | 1,024 | `b.http2().max_local_error_reset_streams(..)` |
/// | HTTP/2 header list size | 16 KiB | `b.http2().max_header_list_size(..)` |
/// | TLS handshakes in progress, and their timeout | 256, 10 s | `TlsListener::max_handshakes`, `::handshake_timeout` (feature `tls`) |
///
/// At the connection limit `serve` stops accepting until a connection ends: new clients
/// wait in the listen backlog, and nothing is refused or spun on. The HTTP/2 values are
/// hyper's current defaults (the keep-alive PING is off in hyper), set here so that they
/// are documented and do not change under you. An HTTP/2 connection that stays idle, or
/// sends a request's HEADERS slowly, and answers PINGs is kept: hyper has no idle or
/// header timeout for HTTP/2; the connection limit bounds such connections.
///
/// # Errors and shutdown
///
/// An accept error about one connection is skipped; any other (such as running out of
/// file descriptors) pauses accepting for 5 ms, doubling up to 1 s while errors continue,
/// as Go's `net/http` does; the pause is kept even when connections end meanwhile. The
/// first error of a run is logged at `error`, the following ones at `debug`, and the
/// recovery at `info`. A connection's own errors are logged at `debug` and never end the
/// server. The future resolves with an error only if the listener itself is unusable
/// (accept reports [`InvalidInput`](io::ErrorKind::InvalidInput), as for a socket that is
/// not listening); it first cancels every connection's context with [`Cause::Shutdown`]
/// and drops the connections. Without [`with_graceful_shutdown`](Serve::with_graceful_shutdown)
/// it never resolves otherwise; with it, see that method for the sequence.
///
/// Dropping the future drops every connection at once (upgraded connections belong to
/// their handlers' tasks). It must be polled inside a tokio runtime with IO and time
/// enabled.
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
    let mut builder = Builder::new(ServeExecutor);
    builder
        .http1()
        .timer(HeaderTimer)
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_SIZE);
    Serve {
        listener,
        service: routes_made_once(service),
        signal: None,
        drain_timeout: DEFAULT_DRAIN,
        root: Context::background(),
        builder,
        max_connections: default_max_connections(),
        half_close: false,
        connect_info: false,
        first_bytes_timeout: Some(HEADER_READ_TIMEOUT),
    }
}

/// An axum `Router` as `axum::serve` runs it: `with_state(())` turns its handlers into
/// services once, where a `Router` called as it is does that for every request (a clone
/// and an allocation each). Any other service is returned as it is.
fn routes_made_once<S: 'static>(service: S) -> S {
    #[cfg(feature = "axum")]
    {
        let mut slot = Some(service);
        let any: &mut dyn std::any::Any = &mut slot;
        if let Some(router) = any.downcast_mut::<Option<axum::Router>>() {
            *router = router.take().map(|router| router.with_state(()));
        }
        slot.expect("put back above")
    }
    #[cfg(not(feature = "axum"))]
    {
        service
    }
}

/// The soft limit on open files, less a sixteenth (at least 64) for everything else.
fn default_max_connections() -> usize {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, getrlimit};
        match getrlimit(Resource::Nofile).current {
            Some(limit) => {
                let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                limit.saturating_sub((limit / 16).max(64)).max(1)
            }
            None => FALLBACK_MAX_CONNECTIONS,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        FALLBACK_MAX_CONNECTIONS
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
    builder: Builder<ServeExecutor>,
    max_connections: usize,
    half_close: bool,
    connect_info: bool,
    first_bytes_timeout: Option<Duration>, // a connection must say something within it
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
    /// The future then resolves with `Ok(())`, after every connection has ended, upgraded
    /// ones (WebSockets) included: those end when their handlers drop the upgraded IO, and
    /// are not waited for past the final second (they stay with their handlers' tasks). The
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

    /// How many connections may be open at once, upgraded ones included. At the limit,
    /// accepting waits until a connection ends; new clients wait in the listen backlog. The
    /// default is the soft `RLIMIT_NOFILE` minus a sixteenth of it (at least 64), so that
    /// `serve` holds as many connections as the process may open files while leaving room
    /// for the application's own (10,000 where the limit cannot be read). At least 1.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long an HTTP/1 client has to send a request head: hyper's
    /// `http1().header_read_timeout`, counted from the connection's first bytes and from the
    /// end of each response (so also how long an idle keep-alive connection stays open).
    /// `serve` applies it to the first bytes of every connection too (HTTP/1 or HTTP/2),
    /// which hyper-util awaits without a timeout: a client that connects and says nothing
    /// is dropped when it passes. `None` turns both off. Defaults to 30 seconds; a value
    /// above a year counts as a year (hyper adds it to the clock, which a longer one
    /// could overflow).
    ///
    /// Prefer this to `http1().header_read_timeout` in
    /// [`http_builder`](Serve::http_builder), which leaves the first-bytes timeout at
    /// its own value.
    pub fn header_read_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        let timeout = timeout.into().map(|t| t.min(MAX_HEADER_READ_TIMEOUT));
        self.first_bytes_timeout = timeout;
        self.builder.http1().header_read_timeout(timeout);
        self
    }

    /// Lets HTTP/1 clients half-close: a client may shut down its sending side after its
    /// request and still read the whole response. Sets hyper's
    /// `http1().half_close(half_close)` and the connection watcher together (hyper's setting
    /// alone would be overridden by the watcher, which takes a FIN for a disconnect).
    ///
    /// With `true`, a FIN is not a disconnect: only a reset (RST, `EPOLLERR`), a socket shut
    /// in both directions, or a failed read or write is. Defaults to `false`, as hyper's
    /// setting does.
    ///
    /// What it can and cannot know: a client that closed its socket fully and one that
    /// only shut down its sending side send the same FIN, so while the handler works the
    /// two look alike, and the request runs on. The difference shows only when the server
    /// writes: a closed socket's kernel answers the write with a reset, a round trip later.
    /// So such a client is seen
    /// - by a response still streaming when the reset comes back: at its next write, as
    ///   `ClientDisconnected`;
    /// - by a response written in one write (a fixed-length body, sent with its head), or
    ///   whose last bytes were taken before the reset came back: not by the request. Its
    ///   context records the body's end (`Completed`) when hyper takes the last bytes,
    ///   before writing them, so before any reset to them exists; it ends `Completed`.
    ///   The connection's context ends `ClientDisconnected` once the reset arrives (when
    ///   the server then closes the connection, the reset is checked for on the socket
    ///   first);
    /// - or at the request's deadline, whichever comes first.
    ///
    /// Use it only for clients that half-close, and keep a deadline.
    pub fn half_close(mut self, half_close: bool) -> Self {
        self.half_close = half_close;
        self.builder.http1().half_close(half_close);
        self
    }

    /// Puts axum's `ConnectInfo<SocketAddr>` (the peer's address) in every request's
    /// extensions, as `axum::serve` does with `into_make_service_with_connect_info`, for
    /// handlers that extract it. Off by default, as in `axum::serve`: it costs an extensions
    /// entry per request, and the address is also at hand without it, through the request's
    /// [`ConnectionContext::remote_addr`]. Only a listener that gives the peer's
    /// [`SocketAddr`] (TCP, TLS over TCP) has one to give; a Unix socket does not.
    ///
    /// ```no_run
    /// use axum::{Router, extract::ConnectInfo, routing::get};
    /// use std::net::SocketAddr;
    ///
    /// # #[allow(dead_code)]
    /// # async fn run() -> std::io::Result<()> {
    /// let app = Router::new().route(
    ///     "/",
    ///     get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
    /// );
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// tower_reqctx::serve(listener, app).connect_info(true).await
    /// # }
    /// ```
    #[cfg(feature = "axum")]
    pub fn connect_info(mut self, connect_info: bool) -> Self {
        self.connect_info = connect_info;
        self
    }

    /// Changes hyper-util's connection settings: HTTP/1 and HTTP/2 options, timeouts, or
    /// one protocol only.
    ///
    /// Call [`half_close`](Serve::half_close) rather than `http1().half_close` here, which
    /// would leave the watcher taking a FIN for a disconnect.
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
    pub fn http_builder(mut self, f: impl FnOnce(&mut Builder<ServeExecutor>)) -> Self {
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
        S: HttpService<B>,
        B: HttpBody,
    {
        let Serve {
            mut listener,
            service,
            signal,
            drain_timeout,
            root,
            builder,
            max_connections,
            half_close,
            connect_info,
            first_bytes_timeout,
        } = self;
        // Our own child, so shutdown never cancels the caller's root.
        let (root, cancel_root) = root.with_cancel();
        let draining = Arc::new(Draining::default());
        let mut connections = Connections::new(root)
            .half_close(half_close)
            .draining(draining.token.clone());
        let builder = Arc::new(builder);
        let mut tasks = JoinSet::new();
        let mut signal = signal.unwrap_or_else(|| Box::pin(pending()));
        // One permit per open connection, held by its IO (so by an upgraded one too).
        let slots = max_connections.min(Semaphore::MAX_PERMITS);
        let slots = u32::try_from(slots).unwrap_or(u32::MAX);
        let open = Arc::new(Semaphore::new(slots as usize));
        let mut acceptor = Acceptor::default();

        loop {
            tokio::select! {
                accepted = acceptor.accept(&mut listener, &open) => {
                    let (stream, peer, permit) = match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            tracing::error!(%err, "the listener failed; dropping every connection");
                            cancel_root.cancel_with(Cause::Shutdown);
                            tasks.shutdown().await;
                            return Err(err);
                        }
                    };
                    let io = connections.accept(stream, peer, Some(permit));
                    let service = WithConnection {
                        inner: service.clone(),
                        peer: peer.filter(|_| connect_info),
                    };
                    tasks.spawn(serve_connection(
                        Arc::clone(&builder),
                        io,
                        service,
                        Arc::clone(&draining),
                        first_bytes_timeout,
                    ));
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => reaped(joined),
                () = &mut signal => break,
            }
        }

        drop(listener);
        drop(acceptor); // and the permit it may hold
        tracing::debug!(
            connections = slots as usize - open.available_permits(),
            "shutting down: draining connections"
        );
        draining.start();
        if timeout(drain_timeout, all_closed(&mut tasks, &open, slots))
            .await
            .is_err()
        {
            tracing::debug!(
                connections = slots as usize - open.available_permits(),
                "drain period over: cancelling with Shutdown"
            );
            cancel_root.cancel_with(Cause::Shutdown);
            if timeout(FINAL_PERIOD, all_closed(&mut tasks, &open, slots))
                .await
                .is_err()
            {
                tracing::debug!(
                    connections = slots as usize - open.available_permits(),
                    "dropping connections still open"
                );
                tasks.shutdown().await;
            }
        }
        cancel_root.cancel_with(Cause::Shutdown);
        Ok(())
    }
}

/// Waits for every connection task, then for every connection's IO (an upgraded
/// connection outlives its task) to give its slot back.
async fn all_closed(tasks: &mut JoinSet<()>, open: &Semaphore, slots: u32) {
    join_all(tasks).await;
    // The semaphore is never closed.
    let _ = open.acquire_many(slots).await;
}

/// Accepts connections within the connection limit, pausing after errors. Its state
/// survives the `select!` in `run` dropping [`Acceptor::accept`]: a pause is never cut short
/// by a connection ending meanwhile, and a slot taken is kept.
#[derive(Debug, Default)]
struct Acceptor {
    permit: Option<OwnedSemaphorePermit>, // a slot for the next connection
    backoff: Option<Duration>,            // the last pause; reset by a success
    paused_until: Option<Instant>,
    failures: u64, // errors in the current run
}

impl Acceptor {
    /// Accepts the next connection, skipping errors that concern one connection and pausing
    /// after others.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: no connection is lost, and an interrupted pause resumes where it was.
    async fn accept<L: Listener>(
        &mut self,
        listener: &mut L,
        open: &Arc<Semaphore>,
    ) -> io::Result<(L::Io, Option<SocketAddr>, OwnedSemaphorePermit)> {
        loop {
            if let Some(until) = self.paused_until {
                sleep_until(until).await;
                self.paused_until = None;
            }
            if self.permit.is_none() {
                let permit = Arc::clone(open).acquire_owned().await;
                self.permit = Some(permit.expect("the connection semaphore is never closed"));
            }
            match listener.accept().await {
                Ok((io, peer)) => {
                    if self.failures > 0 {
                        tracing::info!(errors = self.failures, "accepting again");
                    }
                    self.failures = 0;
                    self.backoff = None;
                    let permit = self.permit.take().expect("taken above");
                    return Ok((io, peer, permit));
                }
                Err(err) if is_connection_error(&err) => {}
                Err(err) if err.kind() == io::ErrorKind::InvalidInput => return Err(err),
                Err(err) => {
                    let pause = self
                        .backoff
                        .map_or(BACKOFF_MIN, |last| (last * 2).min(BACKOFF_MAX));
                    self.backoff = Some(pause);
                    self.paused_until = Some(Instant::now() + pause);
                    self.failures += 1;
                    if self.failures == 1 {
                        tracing::error!(%err, ?pause, "accept failed; pausing before retrying");
                    } else {
                        tracing::debug!(%err, ?pause, errors = self.failures, "accept failed again");
                    }
                }
            }
        }
    }
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

/// Serves one connection, and starts its graceful shutdown when `draining` says so.
/// Drops it if the client sends nothing within `first_bytes_timeout`.
async fn serve_connection<I, S, B>(
    builder: Arc<Builder<ServeExecutor>>,
    io: WatchedIo<I>,
    service: WithConnection<S>,
    draining: Arc<Draining>,
    first_bytes_timeout: Option<Duration>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + AsSocket + Unpin + Send + 'static,
    S: HttpService<B>,
    B: HttpBody,
{
    let connection = io.connection().clone();
    // hyper's HTTP/1 header-read sleeps use the connection's clock, set while it is polled.
    // hyper's HTTP/1 header-read sleeps use the connection's clock, and the layer (and
    // `ConnectionContext::current`) the connection, both set while it is polled.
    let mut conn = pin!(Clocked::new(
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service)),
        connection.clone(),
    ));
    // hyper-util waits for a connection's first bytes (to tell HTTP/1 from HTTP/2) with no
    // timeout, and hyper's header-read timeout starts only after them.
    let mut silent = pin!(Silent {
        sleep: first_bytes_timeout.map(tokio::time::sleep),
        connection,
    });
    let mut drain = pin!(OnDrain {
        wait: draining.token.clone().cancelled_owned(),
        draining,
        waker: None,
    });
    // The connection first: the others are polled on every wake of the task too, and are
    // built to cost an atomic load or two then.
    let result = tokio::select! {
        biased;
        result = conn.as_mut() => result,
        () = &mut silent => {
            tracing::debug!("closing a connection that sent nothing");
            return;
        }
        () = &mut drain => {
            conn.as_mut().inner().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, "connection ended with an error");
    }
}

pin_project! {
    /// Ready if the client has sent nothing when `sleep` ends; never once it has spoken
    /// (and then its timer is dropped at the next poll).
    struct Silent {
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        connection: ConnectionContext,
    }
}

impl Future for Silent {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(sleep) = this.sleep.as_mut().as_pin_mut() else {
            return Poll::Pending;
        };
        if !this.connection.spoke() {
            ready!(sleep.poll(cx));
            if !this.connection.spoke() {
                return Poll::Ready(());
            }
        }
        this.sleep.set(None);
        Poll::Pending
    }
}

/// The server's graceful shutdown, as its connections see it: `flag` is set before `token`
/// is cancelled.
#[derive(Debug, Default)]
struct Draining {
    flag: AtomicBool,
    token: CancellationToken,
}

impl Draining {
    fn start(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }
}

pin_project! {
    /// Ready once the server drains. tokio-util's future takes a lock or two per poll; it
    /// is polled only when the task's waker is not the one it already holds (its wake-up
    /// stays registered until the token is cancelled), and the flag tells the rest.
    struct OnDrain {
        #[pin]
        wait: WaitForCancellationFutureOwned,
        draining: Arc<Draining>,
        waker: Option<Waker>,
    }
}

impl Future for OnDrain {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.project();
        if this.draining.flag.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        if this.wait.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Puts `ConnectInfo<SocketAddr>` in every request's extensions, when asked for. The
/// connection itself is not put there: requests find it as the current one while `serve`
/// polls them (see [`ConnectionContext::current`]), which keeps axum's map of three entries
/// from growing to four on every request.
#[derive(Clone)]
struct WithConnection<S> {
    inner: S,
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
        #[cfg(feature = "axum")]
        if let Some(peer) = self.peer {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        #[cfg(not(feature = "axum"))]
        let _ = &mut req;
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
            .field("max_connections", &self.max_connections)
            .field("half_close", &self.half_close)
            .field("first_bytes_timeout", &self.first_bytes_timeout)
            .field("graceful_shutdown", &self.signal.is_some())
            .finish_non_exhaustive()
    }
}
