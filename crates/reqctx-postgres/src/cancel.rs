//! The cancel connection: PostgreSQL's CancelRequest over a stream we open ourselves, read
//! to its end.

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;
use tokio_postgres::{CancelToken, Config, NoTls};

use crate::Error;

/// Where the CancelRequest for a connection is sent: the server the connection was opened
/// to.
///
/// A CancelRequest is a separate connection to the postmaster carrying the backend's
/// process id and secret key (its BackendKeyData). This crate opens that connection
/// itself, plain (no TLS, whatever the statement's connection uses: PostgreSQL reads a
/// CancelRequest before any TLS negotiation or `pg_hba.conf` check), sends the request and
/// reads the connection to its end, because the server closes it only after it has
/// signalled the backend.
///
/// TLS for the cancel connection is not supported yet: the cancel key (not the
/// password) then crosses the network in clear, as with libpq's `sslmode=disable`. Use a
/// Unix socket or a trusted network for the cancel path.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelTarget {
    /// A TCP server: a host name or an IP address, and a port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix-domain socket: the socket file itself (`<dir>/.s.PGSQL.<port>`).
    Unix(PathBuf),
}

impl CancelTarget {
    /// The target a connection made from `config` cancels through.
    ///
    /// # Errors
    /// [`Error::Config`] for a configuration with no host, or with several hosts (the
    /// connection may have reached any of them, and a cancel sent to the wrong one would
    /// be silently ignored).
    ///
    /// ```
    /// use reqctx_postgres::CancelTarget;
    ///
    /// let config: tokio_postgres::Config = "postgres://app@db.internal:6432/shop".parse().unwrap();
    /// assert_eq!(
    ///     CancelTarget::from_config(&config).unwrap(),
    ///     CancelTarget::Tcp { host: "db.internal".into(), port: 6432 },
    /// );
    /// let two: tokio_postgres::Config = "host=a,b user=app".parse().unwrap();
    /// assert!(CancelTarget::from_config(&two).is_err());
    /// ```
    pub fn from_config(config: &Config) -> Result<CancelTarget, Error> {
        let hosts = config.get_hosts();
        let addrs = config.get_hostaddrs();
        if hosts.len() > 1 || addrs.len() > 1 {
            return Err(Error::Config(
                "several hosts: a cancel must reach the server the connection went to; \
                 connect yourself and pass a CancelTarget"
                    .into(),
            ));
        }
        let port = match config.get_ports() {
            [] => 5432,
            [port] => *port,
            _ => {
                return Err(Error::Config("several ports for one host".into()));
            }
        };
        // `hostaddr` wins over `host` for where the socket goes, as in libpq.
        if let Some(addr) = addrs.first() {
            return Ok(CancelTarget::Tcp {
                host: addr.to_string(),
                port,
            });
        }
        match hosts.first() {
            Some(Host::Tcp(host)) => Ok(CancelTarget::Tcp {
                host: host.clone(),
                port,
            }),
            Some(Host::Unix(dir)) => Ok(CancelTarget::Unix(dir.join(format!(".s.PGSQL.{port}")))),
            None => Err(Error::Config(
                "no host: set `host` (or a host in the URL) so the cancel connection can be opened"
                    .into(),
            )),
        }
    }
}

/// Sends the CancelRequest for `token`'s backend to `target` and waits until the server
/// closes the cancel connection, which it does after signalling the backend.
///
/// Not bounded in time here; callers wrap it in their own timeout.
pub(crate) async fn send_cancel(target: &CancelTarget, token: &CancelToken) -> io::Result<()> {
    match target {
        CancelTarget::Tcp { host, port } => {
            let mut stream = TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            cancel_over(&mut stream, token).await
        }
        #[cfg(unix)]
        CancelTarget::Unix(path) => {
            let mut stream = tokio::net::UnixStream::connect(path).await?;
            cancel_over(&mut stream, token).await
        }
        #[cfg(not(unix))]
        CancelTarget::Unix(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "Unix sockets are not available on this platform",
        )),
    }
}

async fn cancel_over<S>(stream: &mut S, token: &CancelToken) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // `cancel_query_raw` writes the request and shuts our side down, but returns before
    // the server acted; the stream is lent, so we can read it to the end afterwards.
    token
        .cancel_query_raw(&mut *stream, NoTls)
        .await
        .map_err(io::Error::other)?;
    let mut buf = [0u8; 64];
    loop {
        // The server sends nothing on a cancel connection: EOF is the answer.
        if stream.read(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
