//! [`WatchedIo`]: a connection's IO, holding its [`Watch`] and its connection context.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use reqctx::{Canceller, Cause};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{Watch, was_reset};
use crate::cause::{HandlerPanicked, server_closed};
use crate::connection::ConnectionContext;
use crate::server::socket::{AsSocket, borrow};

pin_project! {
    /// An accepted connection's IO, watched for the client's close, with the connection's
    /// [`ConnectionContext`].
    ///
    /// [`serve`](crate::serve()) and `WatchedListener` (feature `axum`) make these. The
    /// connection context ends when the connection does, from either side:
    /// - with [`Cause::ClientDisconnected`] when the connection watcher sees the client close
    ///   (FIN) or reset the connection, when a read returns end-of-file or an error, or when a
    ///   write, flush or shutdown fails: in each case the connection is gone, whether or not
    ///   the OS reported its close. Under [`Serve::half_close`](crate::Serve::half_close) a
    ///   FIN and an end-of-file are not a close; a reset and a failed write still are, and
    ///   so is a reset already recorded on the socket when the `WatchedIo` is dropped (the
    ///   server closed the connection before the watcher task took the reset's event).
    /// - when the `WatchedIo` is dropped (the server closed the connection: keep-alive over,
    ///   `connection: close`, a timeout, a protocol error, an upgraded connection's IO
    ///   dropped), with [`ServerClosed`](crate::ServerClosed), or with [`Cause::Shutdown`]
    ///   if the server was shutting down, or with [`HandlerPanicked`] if a handler's panic
    ///   unwinds through the connection's task (HTTP/1). Before that, whatever requests left on the
    ///   connection ([`ConnectionContext`] holds an upgraded request) is dropped, so such a
    ///   request records its own end first; requests that already ended keep their causes.
    ///
    /// Dropping it deletes the socket from the watcher's epoll set through the still-open
    /// socket, then closes the IO: one file descriptor per connection.
    ///
    /// Reads and writes go straight to the wrapped IO.
    #[derive(Debug)]
    pub struct WatchedIo<I>
    where
        I: AsSocket,
    {
        watch: Option<Watch>,
        end: Ending,
        #[pin]
        io: I,
        // Declared after `io`: the connection's slot is given back once its socket is closed.
        permit: Option<OwnedSemaphorePermit>,
    }

    impl<I> PinnedDrop for WatchedIo<I>
    where
        I: AsSocket,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Under half-close the server may close a connection whose client had closed
            // fully, right after the write that client's kernel reset: hyper read the
            // FIN as the end of its requests. The reset is recorded on the socket even if
            // the watcher task has not taken its event yet; it is the client's close.
            if this.end.half_close && was_reset(borrow(this.io.as_ref().get_ref())) {
                gone(this.watch, this.end);
            }
            if let Some(watch) = this.watch {
                // Through the socket, while it is still open: invariant 4 of the watcher.
                watch.stop(borrow(this.io.as_ref().get_ref()));
            }
            this.end.server_closed();
        }
    }
}

/// How the connection's context ends: owns its canceller.
#[derive(Debug)]
struct Ending {
    conn: ConnectionContext,
    canceller: Option<Arc<Canceller>>, // also held, weakly, by the watch's callback
    half_close: bool,                  // an end-of-file is not the client leaving
    draining: Option<CancellationToken>, // cancelled: a server close is the shutdown's
}

impl Ending {
    /// The IO is being dropped: held requests end first, then the connection, with the
    /// server's cause unless the client's came first.
    fn server_closed(&mut self) {
        self.conn.release_held();
        if let Some(canceller) = self.canceller.take() {
            let shutdown = self
                .draining
                .as_ref()
                .is_some_and(CancellationToken::is_cancelled);
            let cause = if std::thread::panicking() {
                // A handler's panic unwinds through the connection's task, which drops this
                // IO before the request it was serving: that request, and the connection,
                // end because of the panic, not the server's choice.
                Cause::custom(HandlerPanicked)
            } else if shutdown {
                Cause::Shutdown
            } else {
                server_closed()
            };
            canceller.cancel_with(cause);
        }
    }
}

/// The parts of a [`WatchedIo`] besides its IO and watch.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) conn: ConnectionContext,
    pub(crate) canceller: Option<Arc<Canceller>>,
    pub(crate) half_close: bool,
    pub(crate) draining: Option<CancellationToken>,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

impl<I: AsSocket> WatchedIo<I> {
    /// Wraps `io`; with no `watch` it only delegates. Its connection context is never
    /// cancelled.
    #[cfg(test)]
    pub(crate) fn new(io: I, watch: Option<Watch>) -> Self {
        let conn = ConnectionContext::new(reqctx::Context::background(), None);
        Self::with_parts(
            io,
            watch,
            Parts {
                conn,
                canceller: None,
                half_close: false,
                draining: None,
                permit: None,
            },
        )
    }

    /// Wraps `io` of the connection `parts.conn`, which `parts.canceller` cancels; the
    /// watch's callback, if there is a watch, cancels it too.
    pub(crate) fn with_parts(io: I, watch: Option<Watch>, parts: Parts) -> Self {
        WatchedIo {
            watch,
            end: Ending {
                conn: parts.conn,
                canceller: parts.canceller,
                half_close: parts.half_close,
                draining: parts.draining,
            },
            io,
            permit: parts.permit,
        }
    }

    /// The connection's context and peer address.
    pub fn connection(&self) -> &ConnectionContext {
        &self.end.conn
    }

    /// The wrapped IO, e.g. for its peer address.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The wrapped IO, mutably, e.g. to set socket options. Reading or writing through it
    /// bypasses the end-of-file and error checks above; the OS watch still applies.
    pub fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }
}

/// The connection is gone: cancels the connection context with `ClientDisconnected` now,
/// and runs the watch's callback if it has not run. Cancelling here rather than only
/// through the callback matters: the watcher task may have taken the callback (the OS
/// reported the close) and not run it yet, and the IO's drop, which may come next, must
/// not get in first with the server's cause.
fn gone(watch: &Option<Watch>, end: &Ending) {
    if let Some(canceller) = &end.canceller {
        canceller.cancel_with(Cause::ClientDisconnected);
    }
    if let Some(watch) = watch {
        watch.fire();
    }
}

/// Calls [`gone`] if `poll` is an error, and returns `poll`.
fn gone_on_err<T>(
    watch: &Option<Watch>,
    end: &Ending,
    poll: Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    if let Poll::Ready(Err(_)) = &poll {
        gone(watch, end);
    }
    poll
}

impl<I: AsyncRead + AsSocket> AsyncRead for WatchedIo<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let asked = buf.remaining() > 0;
        let before = buf.filled().len();
        let poll = this.io.poll_read(cx, buf);
        // End-of-file (nothing read into a buffer with room) is the client's FIN: fire now,
        // so the cause is recorded before the server acts on it (and before dropping this IO
        // cancels the connection with a lesser cause). Under half-close it is only the end
        // of the client's requests.
        let eof = asked && matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() == before;
        if !eof && buf.filled().len() > before {
            this.end.conn.heard();
        }
        if eof {
            if !this.end.half_close {
                gone(this.watch, this.end);
            }
            return poll;
        }
        gone_on_err(this.watch, this.end, poll)
    }
}

/// The error a write fails with once a request closed its connection (its deadline passed
/// while the client did not read).
fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the request's deadline passed while the client was not reading",
    )
}

/// A write's outcome, after [`gone_on_err`]; a write that would block leaves its waker
/// with the connection, in case a request closes it meanwhile.
fn written<T>(
    watch: &Option<Watch>,
    end: &Ending,
    cx: &Context<'_>,
    poll: Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    if poll.is_pending() {
        end.conn.blocked(cx.waker());
    }
    gone_on_err(watch, end, poll)
}

impl<I: AsyncWrite + AsSocket> AsyncWrite for WatchedIo<I> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        if this.end.conn.aborted() {
            return Poll::Ready(Err(aborted()));
        }
        let poll = this.io.poll_write(cx, buf);
        written(this.watch, this.end, cx, poll)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        if this.end.conn.aborted() {
            return Poll::Ready(Err(aborted()));
        }
        let poll = this.io.poll_write_vectored(cx, bufs);
        written(this.watch, this.end, cx, poll)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.end.conn.aborted() {
            return Poll::Ready(Err(aborted()));
        }
        let poll = this.io.poll_flush(cx);
        written(this.watch, this.end, cx, poll)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        gone_on_err(this.watch, this.end, this.io.poll_shutdown(cx))
    }
}
