//! The server: [`serve`] over any [`Listener`] (TCP, Unix domain sockets, TLS), the
//! connection watcher that sees a client leave while hyper does not read, and
//! [`WatchedListener`], the same watcher for `axum::serve`.
//!
//! The server knows nothing of the layer: it gives each connection a
//! [`ConnectionContext`](crate::ConnectionContext), which is all a request's owner needs
//! from it (the parent context, a way to close a stalled HTTP/1 connection, and a slot to
//! park an upgraded request in).
//!
//! The arrows run one way: `serve` → `connections` → `watch` → `socket`; `executor`,
//! `listener`, `tls` and `watched` sit beside `serve`.
//!
//! Why the watcher is an epoll set of its own, not tokio's: tokio registers a socket once,
//! for the task that reads it, and gives no other task a way to learn that the peer hung
//! up without reading from it (and so taking bytes hyper has not read yet). Our set holds
//! the same descriptor for `EPOLLRDHUP` only, so data wakes nobody, and one task drains it
//! for the whole server (see the `watch` module).

mod connections;
mod executor;
mod header_timer;
mod listener;
mod serve;
mod socket;
#[cfg(feature = "tls")]
mod tls;
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
mod watch;
#[cfg(feature = "axum")]
mod watched;

pub use self::executor::ServeExecutor;
pub use self::listener::Listener;
pub use self::serve::{Serve, ServeFuture, serve};
#[cfg(feature = "tls")]
pub use self::tls::{TlsListener, TlsStream};
pub use self::watch::WatchedIo;
#[cfg(feature = "axum")]
pub use self::watched::WatchedListener;
