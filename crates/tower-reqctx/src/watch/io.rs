//! [`WatchedIo`]: a connection's IO, holding its [`Watch`] and its connection context.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use reqctx::{Canceler, Cause};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Watch;
use crate::ConnectionContext;

pin_project! {
    /// An accepted connection's IO, watched for the client's close, with the connection's
    /// [`ConnectionContext`].
    ///
    /// [`serve`](crate::serve()) and `WatchedListener` (feature `axum`) make these:
    /// the connection context is cancelled with
    /// [`Cause::ClientDisconnected`](reqctx::Cause::ClientDisconnected) when the connection
    /// watcher sees the client close (FIN, including a half-close) or reset the connection,
    /// when a read returns end-of-file or an error, or when a write, flush or shutdown fails:
    /// in each case the connection is gone, whether or not the OS reported its close.
    /// Dropping the `WatchedIo` stops the watch, then closes the IO. It does not cancel the
    /// connection context: a connection the server ends (keep-alive over, a protocol error,
    /// a panic unwinding through a handler) is not a cause for the requests on it, which
    /// record their own as hyper drops them. Shutdown reaches it through the root.
    ///
    /// Reads and writes go straight to the wrapped IO.
    #[derive(Debug)]
    pub struct WatchedIo<I> {
        // Declared before `io` so it is dropped first: the watch holds a duplicate of the fd
        // and must leave the epoll set before the socket closes.
        watch: Option<Watch>,
        // Also held, weakly, by the watch's callback.
        canceler: Owner,
        conn: ConnectionContext,
        #[pin]
        io: I,
    }
}

impl<I> WatchedIo<I> {
    /// Wraps `io`; with no `watch` it only delegates. Its connection context is never
    /// cancelled.
    #[cfg(test)]
    pub(crate) fn new(io: I, watch: Option<Watch>) -> Self {
        let conn = ConnectionContext::new(reqctx::Context::background(), None);
        WatchedIo {
            watch,
            canceler: Owner(None),
            conn,
            io,
        }
    }

    /// Wraps `io` of the connection `conn`, which `canceler` cancels; the watch's callback,
    /// if there is a watch, cancels it too.
    pub(crate) fn with_connection(
        io: I,
        watch: Option<Watch>,
        conn: ConnectionContext,
        canceler: Arc<Canceler>,
    ) -> Self {
        WatchedIo {
            watch,
            canceler: Owner(Some(canceler)),
            conn,
            io,
        }
    }

    /// The connection's context and peer address.
    pub fn connection(&self) -> &ConnectionContext {
        &self.conn
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

/// Owns the connection context's canceler; disarms it when dropped (see [`WatchedIo`]).
#[derive(Debug)]
struct Owner(Option<Arc<Canceler>>);

impl Drop for Owner {
    fn drop(&mut self) {
        // If the watch's callback holds it right now, it is cancelling: let it.
        if let Some(Ok(canceler)) = self.0.take().map(Arc::try_unwrap) {
            canceler.disarm();
        }
    }
}

/// The connection is gone: runs the watch's callback if it has not run, or, with no watch,
/// cancels the connection context itself.
fn gone(watch: &Option<Watch>, canceler: &Option<Arc<Canceler>>) {
    match (watch, canceler) {
        (Some(watch), _) => watch.fire(),
        (None, Some(canceler)) => {
            canceler.cancel_with(Cause::ClientDisconnected);
        }
        (None, None) => {}
    }
}

/// Calls [`gone`] if `poll` is an error, and returns `poll`.
fn gone_on_err<T>(
    watch: &Option<Watch>,
    canceler: &Option<Arc<Canceler>>,
    poll: Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    if let Poll::Ready(Err(_)) = &poll {
        gone(watch, canceler);
    }
    poll
}

impl<I: AsyncRead> AsyncRead for WatchedIo<I> {
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
        // cancels the connection with a lesser cause).
        let eof = asked && matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() == before;
        if eof {
            gone(this.watch, &this.canceler.0);
            return poll;
        }
        gone_on_err(this.watch, &this.canceler.0, poll)
    }
}

impl<I: AsyncWrite> AsyncWrite for WatchedIo<I> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        gone_on_err(this.watch, &this.canceler.0, this.io.poll_write(cx, buf))
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        gone_on_err(
            this.watch,
            &this.canceler.0,
            this.io.poll_write_vectored(cx, bufs),
        )
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        gone_on_err(this.watch, &this.canceler.0, this.io.poll_flush(cx))
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        gone_on_err(this.watch, &this.canceler.0, this.io.poll_shutdown(cx))
    }
}
