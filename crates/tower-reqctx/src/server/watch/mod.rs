//! The connection watcher: learns that a client closed or reset its connection, whatever hyper
//! is doing with it.
//!
//! hyper notices a closed connection only when it reads from it, and it does not read while a
//! request body sits unread, while a pipelined request waits its turn, or while the client has
//! stopped reading the response. A [`Watcher`] learns of the FIN or RST anyway, and runs a
//! per-connection callback (which cancels that connection's request contexts).
//!
//! On Linux a [`Watcher`] is one epoll instance of our own, itself registered with tokio through
//! [`AsyncFd`](tokio::io::unix::AsyncFd), and one task that drains it. Each socket is held with
//! `EPOLLRDHUP | EPOLLET` and no `EPOLLIN`, so a data packet wakes nobody: the task wakes once
//! per closing connection, with no polling. Under half-close (`Serve::half_close`) it is held
//! with `EPOLLET` alone: a FIN is then not a close, and only a reset (`EPOLLERR`) or both
//! directions shut (`EPOLLHUP`) are reported. The invariants:
//!
//! 1. A watch is keyed by a connection id, a counter that is never reused, stored in the epoll
//!    event; never by fd number. An event for an id that is no longer registered is ignored.
//! 2. The callback is in the registry before the socket is added to the epoll set, so an event
//!    that is ready at once (the client already left) is not lost.
//! 3. A callback runs at most once: whoever removes it from the registry (the watcher task, or
//!    [`Watch::fire`]) runs it, after releasing the lock. [`Watch::stop`] (and dropping a
//!    [`Watch`]) removes it first, then deletes the socket from the epoll set, so no callback
//!    starts after that (one the task had already taken may still be finishing).
//! 4. The epoll set holds the socket's own fd, not a duplicate: one fd per connection.
//!    [`Watch::stop`] deletes it with `EPOLL_CTL_DEL` through the still-open socket, before
//!    the socket closes; [`WatchedIo`]'s drop does so. Relying on the kernel's removal at
//!    the last close is not enough: it removes an entry only when every descriptor of the
//!    open file is closed (a fork, `try_clone` or SCM_RIGHTS keep it alive). Should an entry
//!    stay behind anyway, invariant 1 makes its events harmless, and a new socket that gets
//!    the same fd number is a different entry (the kernel keys entries by file and number).
//! 5. The task ends when the [`Watcher`] and every [`Watch`] are dropped.
//!
//! Limits: a FIN queued behind a full receive window (the server stopped reading a large
//! upload) never arrives, so no one can see it; only the deadline ends such a request. On other
//! systems there is no OS watch: [`Watcher::watch`] returns a [`Watch`] that only
//! [`Watch::fire`] triggers, so only what [`WatchedIo`] sees applies: a read that returns
//! end-of-file or an error (when hyper reads), and a failed write.

#[cfg(target_os = "linux")]
mod epoll;
#[cfg(not(target_os = "linux"))]
mod fallback;
mod io;
#[cfg(all(test, target_os = "linux"))]
mod tests;

#[cfg(target_os = "linux")]
pub(crate) use epoll::{Watch, Watcher, was_reset};
#[cfg(not(target_os = "linux"))]
pub(crate) use fallback::{Watch, Watcher, was_reset};
pub(crate) use io::Parts;
pub use io::WatchedIo;

/// What runs when the peer closes: at most once.
pub(crate) type OnClose = Box<dyn FnOnce() + Send>;
