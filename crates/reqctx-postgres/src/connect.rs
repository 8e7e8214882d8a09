//! Opening connections ourselves: so that the cancel goes to the address the connection
//! reached (not a fresh lookup of its host name), over the connection's own TLS, and so
//! that a connection whose cancel cannot be delivered can be closed.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{CancelToken, Client, Config};

use crate::{CancelTarget, Error};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The byte stream under a connection this crate opens: TCP or a Unix-domain socket.
///
/// It is the `S` of the [`MakeTlsConnect<S>`] that
/// [`ContextClient::connect_tls`](crate::ContextClient::connect_tls) and
/// [`pool::Manager::with_tls`](crate::pool::Manager::with_tls) take. The usual TLS
/// crates (`tokio-postgres-rustls`, `postgres-native-tls`, `postgres-openssl`)
/// implement `MakeTlsConnect<S>` for every async stream, this one included.
pub struct PgStream {
    transport: Transport,
    /// The cancel connection: shutting it down also waits for the server to close it.
    drain_on_shutdown: bool,
    shut: bool,
}

enum Transport {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

impl fmt::Debug for PgStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.transport {
            Transport::Tcp(_) => "tcp",
            #[cfg(unix)]
            Transport::Unix(_) => "unix",
        };
        f.debug_struct("PgStream")
            .field("transport", &kind)
            .finish_non_exhaustive()
    }
}

impl PgStream {
    fn new(transport: Transport, drain_on_shutdown: bool) -> PgStream {
        PgStream {
            transport,
            drain_on_shutdown,
            shut: false,
        }
    }

    /// Opens the cancel connection to `target`.
    pub(crate) async fn cancel_to(target: &CancelTarget) -> io::Result<PgStream> {
        let transport = match target {
            CancelTarget::Addr(addr) => Transport::Tcp(tcp(TcpStream::connect(addr).await?)?),
            CancelTarget::Tcp { host, port } => {
                Transport::Tcp(tcp(TcpStream::connect((host.as_str(), *port)).await?)?)
            }
            #[cfg(unix)]
            CancelTarget::Unix(path) => {
                Transport::Unix(tokio::net::UnixStream::connect(path).await?)
            }
            #[cfg(not(unix))]
            CancelTarget::Unix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Unix sockets are not available on this platform",
                ));
            }
        };
        Ok(PgStream::new(transport, true))
    }
}

fn tcp(stream: TcpStream) -> io::Result<TcpStream> {
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl AsyncRead for PgStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.transport {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // The cancel connection keeps its write side open, as libpq does: PgBouncer drops a
        // cancel whose client has closed (a FIN counts) before it was forwarded.
        if !this.shut && !this.drain_on_shutdown {
            ready!(match &mut this.transport {
                Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                #[cfg(unix)]
                Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
            })?;
            this.shut = true;
        }
        if !this.drain_on_shutdown {
            return Poll::Ready(Ok(()));
        }
        // The server closes a cancel connection only after it has signalled the backend:
        // its end of the stream is the answer. Under TLS it may send a close_notify first;
        // whatever comes is discarded (TLS sits above this stream).
        let mut chunk = [0u8; 256];
        loop {
            let mut buf = ReadBuf::new(&mut chunk);
            let read = match &mut this.transport {
                Transport::Tcp(s) => Pin::new(s).poll_read(cx, &mut buf),
                #[cfg(unix)]
                Transport::Unix(s) => Pin::new(s).poll_read(cx, &mut buf),
            };
            match ready!(read) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => {}
                // A server that closes with our close_notify unread resets instead: closed too.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Poll::Ready(Ok(()));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Sends a CancelRequest over a stream we opened, with the connection's TLS, and returns
/// once the server closed that stream.
pub(crate) type CancelFn =
    Arc<dyn Fn(PgStream, CancelToken) -> BoxFuture<io::Result<()>> + Send + Sync>;

/// Where and how a connection's cancel is sent.
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) target: CancelTarget,
    cancel: CancelFn,
}

impl Route {
    /// A route over the connection's TLS (`tls` for `host`: certificate name and SNI).
    pub(crate) fn new<T>(target: CancelTarget, tls: T, host: String) -> Route
    where
        T: Tls,
    {
        let cancel: CancelFn = Arc::new(move |stream, token| {
            let mut tls = tls.clone();
            let host = host.clone();
            Box::pin(async move {
                let connect = tls
                    .make_tls_connect(&host)
                    .map_err(|e| io::Error::other(e.into()))?;
                token
                    .cancel_query_raw(stream, connect)
                    .await
                    .map_err(io::Error::other)
            })
        });
        Route { target, cancel }
    }

    /// Sends the cancel and waits until the server closed the cancel connection, which
    /// it does after signalling the backend. Not bounded in time here.
    pub(crate) async fn send(&self, token: &CancelToken) -> io::Result<()> {
        let stream = PgStream::cancel_to(&self.target).await?;
        (self.cancel)(stream, token.clone()).await
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.target.fmt(f)
    }
}

/// The bounds a TLS connector needs here: `tokio-postgres`'s [`MakeTlsConnect`] for
/// [`PgStream`], cloneable and sendable, as for a connection spawned on a runtime. Every
/// connector that `tokio-postgres` accepts for a spawned connection qualifies (`NoTls`,
/// `tokio-postgres-rustls`, `postgres-native-tls`, `postgres-openssl`).
pub trait Tls:
    MakeTlsConnect<
        PgStream,
        Stream: Send + 'static,
        TlsConnect: Send + TlsConnect<PgStream, Future: Send>,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Tls for T where
    T: MakeTlsConnect<
            PgStream,
            Stream: Send + 'static,
            TlsConnect: Send + TlsConnect<PgStream, Future: Send>,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A connection we opened.
pub(crate) struct Opened {
    pub(crate) client: Client,
    pub(crate) task: JoinHandle<()>,
    pub(crate) route: Route,
    /// Our end's TCP port (`None` over a Unix socket): compared with what the server
    /// sees, it tells a direct connection from one through a pooler or a NAT.
    pub(crate) local_port: Option<u16>,
}

impl Opened {
    pub(crate) fn closer(&self) -> AbortHandle {
        self.task.abort_handle()
    }
}

/// Opens connections from a configuration with a TLS connector, again and again.
pub(crate) type Opener = Arc<dyn Fn() -> BoxFuture<Result<Opened, Error>> + Send + Sync>;

pub(crate) fn opener<T: Tls>(config: Config, tls: T) -> Result<Opener, Error> {
    endpoints_check(&config)?;
    let config = Arc::new(config);
    Ok(Arc::new(move || {
        let (config, tls) = (config.clone(), tls.clone());
        Box::pin(async move { open(&config, tls).await })
    }))
}

fn endpoints_check(config: &Config) -> Result<usize, Error> {
    let n = config.get_hosts().len().max(config.get_hostaddrs().len());
    if n == 0 {
        return Err(Error::Config(
            "no host: set `host` (or a host in the URL)".into(),
        ));
    }
    let ports = config.get_ports().len();
    if ports > 1 && ports != n {
        return Err(Error::Config(format!(
            "{ports} ports for {n} hosts: give one port, or one per host"
        )));
    }
    if n > 1 && config.get_target_session_attrs() != TargetSessionAttrs::Any {
        return Err(Error::Config(
            "target_session_attrs with several hosts is not supported here: name one host".into(),
        ));
    }
    Ok(n)
}

/// Tries each host in turn, and each address of a host name, as libpq does: the first
/// that accepts the connection and its handshake wins, and its address is where the
/// connection's cancels go.
pub(crate) async fn open<T: Tls>(config: &Config, tls: T) -> Result<Opened, Error> {
    let n = endpoints_check(config)?;
    let (hosts, addrs, ports) = (
        config.get_hosts(),
        config.get_hostaddrs(),
        config.get_ports(),
    );
    let mut last = None;
    for i in 0..n {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let name = match (hosts.get(i), addrs.get(i)) {
            (Some(Host::Tcp(h)), _) => h.clone(),
            (_, Some(a)) => a.to_string(),
            (Some(Host::Unix(dir)), None) => dir.display().to_string(),
            (None, None) => unreachable!("n is the longer of the two lists"),
        };
        let targets: Vec<CancelTarget> = match (hosts.get(i), addrs.get(i)) {
            (_, Some(a)) => vec![CancelTarget::Addr(SocketAddr::new(*a, port))],
            (Some(Host::Tcp(h)), None) => match tokio::net::lookup_host((h.as_str(), port)).await {
                Ok(found) => found.map(CancelTarget::Addr).collect(),
                Err(e) => {
                    last = Some(Error::Io(e));
                    continue;
                }
            },
            (Some(Host::Unix(dir)), None) => {
                vec![CancelTarget::Unix(dir.join(format!(".s.PGSQL.{port}")))]
            }
            (None, None) => unreachable!("n is the longer of the two lists"),
        };
        for target in targets {
            let attempt = attempt(config, tls.clone(), target, &name);
            let result = match config.get_connect_timeout() {
                Some(limit) => tokio::time::timeout(*limit, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connect_timeout passed",
                        )))
                    }),
                None => attempt.await,
            };
            match result {
                Ok(opened) => return Ok(opened),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Config("the host name resolved to no address".into())))
}

async fn attempt<T: Tls>(
    config: &Config,
    tls: T,
    target: CancelTarget,
    name: &str,
) -> Result<Opened, Error> {
    let (transport, local_port) = match &target {
        CancelTarget::Addr(addr) => {
            let s = tcp(TcpStream::connect(addr).await.map_err(Error::Io)?).map_err(Error::Io)?;
            keepalive(&s, config).map_err(Error::Io)?;
            let local = s.local_addr().map_err(Error::Io)?.port();
            (Transport::Tcp(s), Some(local))
        }
        #[cfg(unix)]
        CancelTarget::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(Error::Io)?;
            (Transport::Unix(s), None)
        }
        _ => {
            return Err(Error::Config(format!(
                "cannot connect to {target:?} on this platform"
            )));
        }
    };
    let stream = PgStream::new(transport, false);
    let mut make = tls.clone();
    let connect = make
        .make_tls_connect(name)
        .map_err(|e| Error::Config(format!("TLS for {name}: {}", e.into())))?;
    let (client, connection) = config.connect_raw(stream, connect).await?;
    let task = tokio::spawn(async move {
        // Its error also reaches the client: the next call fails with it.
        let _ = connection.await;
    });
    Ok(Opened {
        client,
        task,
        route: Route::new(target, tls, name.to_owned()),
        local_port,
    })
}

/// TCP keepalives as the configuration asks (tokio-postgres's defaults: on, 2 h idle).
fn keepalive(stream: &TcpStream, config: &Config) -> io::Result<()> {
    if !config.get_keepalives() {
        return Ok(());
    }
    let mut ka = socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
    #[cfg(not(any(target_os = "openbsd", target_os = "redox", target_os = "solaris")))]
    if let Some(interval) = config.get_keepalives_interval() {
        ka = ka.with_interval(interval);
    }
    #[cfg(not(any(
        target_os = "openbsd",
        target_os = "redox",
        target_os = "solaris",
        target_os = "windows"
    )))]
    if let Some(retries) = config.get_keepalives_retries() {
        ka = ka.with_retries(retries);
    }
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}
