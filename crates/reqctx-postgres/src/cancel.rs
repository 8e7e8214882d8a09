//! Where a connection's CancelRequest goes.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_postgres::Config;
use tokio_postgres::config::Host;

use crate::Error;

/// Where the CancelRequest for a connection is sent: the server the connection was opened
/// to.
///
/// A CancelRequest is a separate connection to the postmaster carrying the backend's
/// process id and secret key (its BackendKeyData). This crate opens that connection
/// itself, sends the request and reads the connection to its end, because the server
/// closes it only after it has signalled the backend.
///
/// A connection this crate opens ([`ContextClient::connect_tls`](crate::ContextClient::connect_tls),
/// the [`pool`](crate::pool)) cancels through [`CancelTarget::Addr`], the address it
/// reached, and with its own TLS settings (`sslmode`, the connector, the host name for the
/// certificate). A connection you open yourself and wrap with
/// [`ContextClient::new`](crate::ContextClient::new) cancels through the target you give,
/// without TLS: with `sslmode=require` its cancels fail and the connection is given up
/// at each one; use `connect_tls` instead.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelTarget {
    /// The address the statement's connection reached: no new lookup of its host name,
    /// which behind round-robin DNS could reach another server, one that ignores the
    /// cancel.
    Addr(SocketAddr),
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
