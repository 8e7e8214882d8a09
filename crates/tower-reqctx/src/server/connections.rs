//! `Connections`: makes each accepted connection's context and watches its socket.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use reqctx::{Canceller, Cause, Context};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::socket::{AsSocket, BorrowedSocket, borrow};
use super::watch::{Parts, Watch, WatchedIo, Watcher};
use crate::connection::ConnectionContext;

/// Makes each accepted connection's context, under a root, and watches its socket with one
/// [`Watcher`] for the whole server.
#[derive(Debug)]
pub(crate) struct Connections {
    root: Context,
    watcher: Option<Watcher>, // made by the first accept, inside the runtime; again after a failure
    half_close: bool,         // a FIN is not a disconnect
    draining: Option<CancellationToken>, // cancelled once the server is shutting down
}

impl Connections {
    /// Connection contexts will be children of `root`.
    pub(crate) fn new(root: Context) -> Connections {
        Connections {
            root,
            watcher: None,
            half_close: false,
            draining: None,
        }
    }

    /// Under half-close a client's FIN (and a read's end-of-file) is not a disconnect.
    pub(crate) fn half_close(mut self, half_close: bool) -> Connections {
        self.half_close = half_close;
        self
    }

    /// A connection the server closes once `draining` is cancelled ends with
    /// [`Cause::Shutdown`].
    pub(crate) fn draining(mut self, draining: CancellationToken) -> Connections {
        self.draining = Some(draining);
        self
    }

    /// Wraps an accepted connection: a child context of the root, cancelled with
    /// [`Cause::ClientDisconnected`] when the watcher sees the client go, and with the
    /// server's cause when the returned IO is dropped. `permit` is released once the socket
    /// is closed. If the socket cannot be watched (the kernel's epoll memory ran out, say),
    /// the connection is served without a watch, and that is logged at `warn`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with IO enabled (the first call starts the watcher's task).
    pub(crate) fn accept<I: AsSocket>(
        &mut self,
        io: I,
        remote: Option<SocketAddr>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> WatchedIo<I> {
        let (ctx, canceller) = self.root.with_cancel();
        let canceller = Arc::new(canceller);
        let watch = self.watch(borrow(&io), Arc::downgrade(&canceller));
        let parts = Parts {
            conn: ConnectionContext::new(ctx, remote),
            canceller: Some(canceller),
            half_close: self.half_close,
            draining: self.draining.clone(),
            permit,
        };
        WatchedIo::with_parts(io, watch, parts)
    }

    fn watch(&mut self, socket: BorrowedSocket<'_>, canceller: Weak<Canceller>) -> Option<Watch> {
        if self.watcher.as_ref().is_some_and(Watcher::failed) {
            // Its task ended on an error (logged there): the connections from now on get a
            // new one. Those it held are seen when hyper reads or writes.
            self.watcher = None;
        }
        if self.watcher.is_none() {
            match Watcher::new() {
                Ok(watcher) => self.watcher = Some(watcher),
                Err(err) => {
                    tracing::warn!(%err, "cannot start the connection watcher; serving unwatched");
                    return None;
                }
            }
        }
        let watcher = self.watcher.as_ref()?;
        // Weak: the IO owns the canceller, so the connection context ends with the connection.
        let on_close = Box::new(move || {
            if let Some(canceller) = canceller.upgrade() {
                canceller.cancel_with(Cause::ClientDisconnected);
            }
        });
        match watcher.watch(socket, self.half_close, on_close) {
            Ok(watch) => Some(watch),
            Err(err) => {
                // No fd is needed to watch (the socket's own is registered): only the
                // kernel's memory for epoll entries can run out.
                tracing::warn!(%err, "cannot watch a connection; serving it unwatched");
                None
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::Duration;

    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const BOUND: Duration = Duration::from_secs(5);

    /// A watcher whose `epoll_wait` fails is replaced for the connections that come next:
    /// a client that then leaves is seen by the new one.
    #[tokio::test]
    async fn a_failed_watcher_is_replaced_for_later_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connections = Connections::new(Context::background());

        let first_client = TcpStream::connect(addr).await.unwrap();
        let (first, _) = listener.accept().await.unwrap();
        let first = connections.accept(first, None, None);
        let failing = connections.watcher.clone().expect("a watcher");
        failing.fail_next_wait_for_test();
        drop(first_client); // wakes the watcher, whose epoll_wait now fails
        tokio::time::timeout(BOUND, async {
            while !failing.failed() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the watcher should record its failure");
        drop(first);

        let client = TcpStream::connect(addr).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        let io = connections.accept(server_side, None, None);
        let replaced = connections.watcher.as_ref().expect("a new watcher");
        assert!(!replaced.failed(), "the connection got the failed watcher");
        let ctx = io.connection().context().clone();
        drop(client);
        tokio::time::timeout(BOUND, ctx.cancelled())
            .await
            .expect("the new watcher should see the client leave");
        assert_eq!(ctx.cause(), Some(Cause::ClientDisconnected));
        drop(io);
    }
}
