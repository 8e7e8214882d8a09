//! The connection a request arrived on: the seam between the server and the layer.
//!
//! The server makes a [`ConnectionContext`] per connection; the layer reads it from the
//! request and hands it its state (the parent context, a way to close a stalled HTTP/1
//! connection, an opaque item to keep until the connection ends). Neither knows the
//! other: both depend on this module, which depends on nothing else in the crate.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Waker;

use reqctx::Context;

/// The connection a request arrived on: its context, which is the parent of the context of
/// every request on it, and the peer's address.
///
/// [`serve`](crate::serve()) and `WatchedListener` (feature `axum`) put it in every
/// request's extensions; [`ContextLayer`](crate::ContextLayer) hangs each request's context
/// under it. Its context ends when the connection does, from either side:
/// [`Cause::ClientDisconnected`](reqctx::Cause::ClientDisconnected) when the client closes or resets it (the connection
/// watcher sees that even while hyper does not read), [`ServerClosed`](crate::ServerClosed) when the server
/// closes it (keep-alive over, a timeout, a protocol error), and [`Cause::Shutdown`](reqctx::Cause::Shutdown) when
/// the server shuts down (see [`WatchedIo`](crate::WatchedIo)). So work tied to it
/// (`spawn`, `on_cancel`) ends with the connection. Requests on it keep their own causes:
/// a request that ended before its connection is not changed by the connection's end.
///
/// An upgraded request (a WebSocket: `101 Switching Protocols`) is parked here by the
/// layer: its context lives until the upgraded connection ends, with `ClientDisconnected`
/// when the client closes it and `Completed` when the server drops it (the handler's task
/// ended).
#[derive(Clone)]
pub struct ConnectionContext {
    inner: Arc<Inner>, // one reference count per clone: one clone goes into every request
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
struct Inner {
    ctx: Context,
    remote: Option<SocketAddr>,
    held: Mutex<Vec<Held>>, // what requests left here to outlive their response (upgrades)
    spoke: AtomicBool,      // the client sent bytes: set by `WatchedIo`'s first read of data
    abort: Arc<Abort>,      // shared with the HTTP/1 request being served (`ConnectionAbort`)
}

/// A request's way to close its HTTP/1 connection when its deadline passes while hyper
/// is stalled on a client that does not read: hyper polls neither the body nor anything
/// of ours then, only the socket. `WatchedIo` keeps the waker of a write that would block
/// once a request armed this, and fails the next write once it is requested.
#[derive(Default)]
pub(crate) struct Abort {
    armed: AtomicBool, // a streaming response may ask: writes that block keep a waker
    requested: AtomicBool, // fail every write from now on
    waker: Mutex<Option<Waker>>,
}

/// What a request hands its connection to keep until the connection ends: the connection
/// knows nothing of it but that dropping it is how it learns the connection is over.
pub(crate) type Held = Box<dyn Send + 'static>;

/// The connection's [`Abort`], held by the owner of an HTTP/1 request on it.
#[derive(Clone)]
pub(crate) struct ConnectionAbort(Arc<Abort>);

impl ConnectionAbort {
    /// A streaming response may ask to close the connection: from now on, writes that
    /// would block leave their waker.
    pub(crate) fn arm(&self) {
        self.0.armed.store(true, Ordering::Relaxed);
    }

    /// Closes the connection at the next write: wakes the connection's task if a write is
    /// blocked, and fails it (and every later one).
    pub(crate) fn abort(&self) {
        self.0.requested.store(true, Ordering::Release);
        let waker = self
            .0
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped in order, before anything else of the connection: a held request records
        // its own end (the upgraded IO was dropped: its task is over) before the
        // connection's context could end with a cause of its own.
        let held = std::mem::take(self.held.get_mut().unwrap_or_else(PoisonError::into_inner));
        drop(held);
    }
}

impl ConnectionContext {
    /// A connection with context `ctx` from `remote`. For custom servers; [`serve`](crate::serve())
    /// makes these itself.
    pub fn new(ctx: Context, remote: Option<SocketAddr>) -> ConnectionContext {
        ConnectionContext {
            inner: Arc::new(Inner {
                ctx,
                remote,
                held: Mutex::new(Vec::new()),
                spoke: AtomicBool::new(false),
                abort: Arc::default(),
            }),
        }
    }

    /// The connection's context.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    /// The peer's address, when the transport has one.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote
    }

    /// The connection of the request being served on this thread by
    /// [`serve`](crate::serve()): `serve` makes it current while it polls the connection
    /// (and, over HTTP/2, each stream's task), so a handler, a middleware or a tonic method
    /// finds it here, in its own code. `None` elsewhere: in a task the handler spawns (take
    /// it first), or under `axum::serve` (with [`WatchedListener`](crate::WatchedListener)
    /// the connection is axum's `ConnectInfo<ConnectionContext>`).
    ///
    /// ```
    /// use tower_reqctx::ConnectionContext;
    ///
    /// async fn handler() -> String {
    ///     let peer = ConnectionContext::current().and_then(|c| c.remote_addr());
    ///     format!("hello, {peer:?}")
    /// }
    /// # let _ = handler;
    /// assert!(ConnectionContext::current().is_none()); // no request is being served here
    /// ```
    pub fn current() -> Option<ConnectionContext> {
        crate::current::with(&CURRENT, |conn| conn.clone())
    }
}

thread_local! {
    /// The connection `serve` is polling on this thread (see [`ConnectionContext::current`]).
    static CURRENT: std::cell::RefCell<Option<ConnectionContext>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `slot`'s connection as the thread's current one, and puts it back in
/// `slot` after, also when `f` unwinds.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn serving<R>(slot: &mut Option<ConnectionContext>, f: impl FnOnce() -> R) -> R {
    crate::current::enter(&CURRENT, slot, f)
}

impl ConnectionContext {
    /// The seam between a request's owner and its connection: keeps `item` until the
    /// connection ends (its IO is dropped), then drops it. An upgraded request (101,
    /// CONNECT 2xx, HTTP/2 extended CONNECT) hands its lifecycle here to outlive its
    /// response.
    pub(crate) fn hold(&self, item: Held) {
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(item);
    }
}

/// What the server's side of a connection uses.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
impl ConnectionContext {
    /// Records that the client sent bytes; cheap to call on every read.
    #[inline]
    pub(crate) fn heard(&self) {
        if !self.inner.spoke.load(Ordering::Relaxed) {
            self.inner.spoke.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the client has sent any bytes (that `WatchedIo` read).
    pub(crate) fn spoke(&self) -> bool {
        self.inner.spoke.load(Ordering::Relaxed)
    }

    /// The connection ended: drops what requests left here, in order, before the
    /// connection's context is cancelled with a cause of its own (so a held request records
    /// its own end first).
    /// The handle an HTTP/1 request's owner keeps, to close the connection (see [`Abort`]).
    pub(crate) fn abort_handle(&self) -> ConnectionAbort {
        ConnectionAbort(self.inner.abort.clone())
    }

    /// For `WatchedIo`, before a write: `true` if the connection must fail it.
    #[inline]
    pub(crate) fn aborted(&self) -> bool {
        let abort = &self.inner.abort;
        abort.armed.load(Ordering::Relaxed) && abort.requested.load(Ordering::Acquire)
    }

    /// For `WatchedIo`, after a write that would block: keeps its waker if armed.
    #[inline]
    pub(crate) fn blocked(&self, waker: &Waker) {
        let abort = &self.inner.abort;
        if !abort.armed.load(Ordering::Relaxed) {
            return;
        }
        let mut slot = abort.waker.lock().unwrap_or_else(PoisonError::into_inner);
        match &*slot {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
        drop(slot);
        // An abort between the check before the write and now found no waker.
        if abort.requested.load(Ordering::Acquire) {
            waker.wake_by_ref();
        }
    }

    pub(crate) fn release_held(&self) {
        let held = std::mem::take(
            &mut *self
                .inner
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        drop(held);
    }
}

impl fmt::Debug for ConnectionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionContext")
            .field("ctx", &self.inner.ctx)
            .field("remote", &self.inner.remote)
            .finish_non_exhaustive()
    }
}

/// The seam for HTTP/2 tunnels (CONNECT, extended CONNECT: a WebSocket over HTTP/2). Such
/// a tunnel is one stream of a connection that goes on, so the connection cannot hold its
/// owner (it would keep every tunnel's until the whole connection ends). Under
/// [`serve`](crate::serve()), hyper spawns one task per tunnel through `serve`'s executor,
/// during the poll of the stream that answered `2xx`: the owner parks itself here in that
/// poll, the executor hands it to that task, and the task drops it when the tunnel ends.
///
/// The slot is open only while `serve`'s executor polls a task of its own; elsewhere
/// (`axum::serve`) [`park`](tunnel::park) refuses and the owner ends at the answer.
pub(crate) mod tunnel {
    use std::cell::RefCell;

    use super::Held;

    enum Slot {
        Closed,       // not inside a poll of serve's executor
        Open,         // inside one, nothing parked
        Parked(Held), // an owner waits for its tunnel's task
    }

    thread_local! {
        static SLOT: RefCell<Slot> = const { RefCell::new(Slot::Closed) };
    }

    /// The owner of a tunnel that just opened: parks `item` for the task hyper spawns next
    /// in this poll. `Err(item)` if no executor of `serve`'s is polling.
    pub(crate) fn park(item: Held) -> Result<(), Held> {
        SLOT.with(|slot| {
            let mut slot = slot.borrow_mut();
            match &*slot {
                Slot::Closed => Err(item),
                // Two tunnels in one poll: not how hyper works; the first ends now.
                Slot::Open | Slot::Parked(_) => {
                    *slot = Slot::Parked(item);
                    Ok(())
                }
            }
        })
    }

    /// For `serve`'s executor, spawning a task: what was parked in this poll, which the
    /// task then carries.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn take() -> Option<Held> {
        SLOT.with(|slot| {
            let mut slot = slot.borrow_mut();
            match std::mem::replace(&mut *slot, Slot::Open) {
                Slot::Parked(item) => Some(item),
                Slot::Open => None,
                Slot::Closed => {
                    *slot = Slot::Closed;
                    None
                }
            }
        })
    }

    /// For `serve`'s executor: runs one poll of its task with the slot open. What was parked
    /// and not taken (hyper refused the tunnel) is dropped after the poll: its end.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn polling<R>(poll: impl FnOnce() -> R) -> R {
        let outer = SLOT.with(|slot| std::mem::replace(&mut *slot.borrow_mut(), Slot::Open));
        let out = poll();
        let left = SLOT.with(|slot| std::mem::replace(&mut *slot.borrow_mut(), outer));
        drop(left); // outside the borrow: a dropped owner records its end
        out
    }
}
