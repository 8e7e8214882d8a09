//! The Linux watcher: an epoll instance of our own, drained by one task.

use std::collections::HashMap;
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::task::JoinHandle;

use super::OnClose;

/// Events taken from the epoll set per `epoll_wait`.
const BATCH: usize = 64;

/// Closing is all we ask for; `EPOLLHUP` and `EPOLLERR` are always reported. No `EPOLLIN`, so
/// an arriving packet wakes no one; edge-triggered, so a closed socket is reported once, not
/// on every wait until it is deleted.
const INTEREST: EventFlags = EventFlags::RDHUP.union(EventFlags::ET);

/// Under half-close a FIN is not a disconnect: no `EPOLLRDHUP`, so only `EPOLLHUP` (both
/// directions shut) and `EPOLLERR` (a reset) are reported.
const INTEREST_HALF_CLOSE: EventFlags = EventFlags::ET;

/// An epoll instance of our own, registered with tokio, and the task that drains it.
///
/// Cloning is cheap; the task ends when the last clone and the last [`Watch`] are dropped.
#[derive(Clone)]
pub(crate) struct Watcher {
    handle: Arc<Handle>,
}

/// A socket in the epoll set, with its callback.
///
/// [`Watch::stop`], called with the same socket while it is still open, removes the callback
/// without running it and deletes the socket from the epoll set. Dropping a `Watch` that was
/// not stopped only removes the callback: the entry stays in the set until every descriptor
/// of the socket is closed, and an event it reports finds no callback (invariant 1).
pub(crate) struct Watch {
    handle: Arc<Handle>,
    id: u64,
    registered: bool, // in the epoll set: cleared by `stop`
}

/// What the watcher task shares with the [`Watcher`] and its [`Watch`]es.
struct Shared {
    epoll: AsyncFd<OwnedFd>,
    registry: Mutex<Registry>,
    task: Mutex<TaskState>,
    failed: AtomicBool, // epoll_wait failed and the task ended: make a new watcher
    #[cfg(test)]
    fail_next_wait: AtomicBool,
}

struct Registry {
    next_id: u64,
    callbacks: HashMap<u64, OnClose>,
}

struct TaskState {
    stopped: bool, // set once, when the last `Handle` is dropped
    waker: Option<Waker>,
}

/// Held by the [`Watcher`] and by every [`Watch`], not by the task: dropping the last one
/// stops the task, which holds [`Shared`] itself.
struct Handle {
    shared: Arc<Shared>,
}

impl Watcher {
    /// Creates the epoll instance and spawns the task that drains it.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime, or in one whose IO driver is disabled.
    pub(crate) fn new() -> io::Result<Watcher> {
        Self::start().map(|(watcher, _task)| watcher)
    }

    fn start() -> io::Result<(Watcher, JoinHandle<()>)> {
        let epoll = epoll::create(CreateFlags::CLOEXEC)?;
        // tokio deprecated this constructor (#8587) for any `T` whose `as_raw_fd` may change or
        // close; its replacement is `unsafe`, which this crate forbids. An `OwnedFd` keeps one
        // fd open until it is dropped with the `AsyncFd`, which is that replacement's contract.
        #[allow(deprecated)]
        let epoll = AsyncFd::with_interest(epoll, Interest::READABLE)?;
        let shared = Arc::new(Shared {
            epoll,
            registry: Mutex::new(Registry {
                next_id: 0,
                callbacks: HashMap::new(),
            }),
            task: Mutex::new(TaskState {
                stopped: false,
                waker: None,
            }),
            failed: AtomicBool::new(false),
            #[cfg(test)]
            fail_next_wait: AtomicBool::new(false),
        });
        let task = tokio::spawn(drain(Arc::clone(&shared)));
        let handle = Arc::new(Handle { shared });
        Ok((Watcher { handle }, task))
    }

    /// Whether the task ended on an error of `epoll_wait`: nothing it holds is reported any
    /// more, and a new watch would not be either. Its owner makes a new watcher.
    pub(crate) fn failed(&self) -> bool {
        self.handle.shared.failed.load(Ordering::Acquire)
    }

    /// Starts watching `fd`, a connected socket, itself (no duplicate: one fd per
    /// connection): `on_close` runs at most once, on the watcher task, when the peer closes
    /// or resets the connection, or with `half_close` only when it resets it or both
    /// directions are shut.
    ///
    /// If the peer is already gone, `on_close` may run before this returns. On an error (`fd`
    /// is not something epoll can watch, or the kernel's epoll memory ran out) `on_close` is
    /// dropped without running. Call [`Watch::stop`] with the same socket before closing it.
    pub(crate) fn watch(
        &self,
        fd: BorrowedFd<'_>,
        half_close: bool,
        on_close: OnClose,
    ) -> io::Result<Watch> {
        let shared = &self.handle.shared;
        let id = {
            let mut registry = shared.registry();
            let id = registry.next_id;
            registry.next_id += 1;
            registry.callbacks.insert(id, on_close);
            id
        };
        // Invariant 2: registered before it can be reported.
        let interest = if half_close {
            INTEREST_HALF_CLOSE
        } else {
            INTEREST
        };
        if let Err(err) = epoll::add(shared.epoll.get_ref(), fd, EventData::new_u64(id), interest) {
            let on_close = shared.registry().callbacks.remove(&id);
            drop(on_close);
            return Err(err.into());
        }
        Ok(Watch {
            handle: Arc::clone(&self.handle),
            id,
            registered: true,
        })
    }
}

impl Watch {
    /// Runs the callback now, on this thread, if it has not run: for a connection known to be
    /// broken (a failed write) before its close is reported.
    pub(crate) fn fire(&self) {
        let on_close = self.handle.shared.registry().callbacks.remove(&self.id);
        if let Some(on_close) = on_close {
            on_close();
        }
    }

    /// Stops the watch: removes the callback without running it, then deletes `fd` from the
    /// epoll set. `fd` must be the socket given to [`Watcher::watch`], still open: the
    /// kernel finds the entry by the open socket and its number, so a number that was
    /// reused by another socket cannot reach it. Idempotent.
    pub(crate) fn stop(&mut self, fd: BorrowedFd<'_>) {
        self.forget();
        if !std::mem::replace(&mut self.registered, false) {
            return;
        }
        match epoll::delete(self.handle.shared.epoll.get_ref(), fd) {
            Ok(()) | Err(Errno::NOENT | Errno::BADF) => {}
            Err(err) => {
                tracing::warn!(id = self.id, %err, "connection watcher: EPOLL_CTL_DEL failed")
            }
        }
    }

    /// Invariant 3: out of the registry first, so an event that comes now is ignored.
    fn forget(&self) {
        let on_close = self.handle.shared.registry().callbacks.remove(&self.id);
        drop(on_close);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.forget();
        if self.registered {
            // No socket to delete it through: the kernel drops the entry when the socket's
            // last descriptor closes; until then its events find no callback.
            tracing::debug!(
                id = self.id,
                "connection watcher: a watch dropped without stop"
            );
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let waker = {
            let mut task = self.shared.task();
            task.stopped = true;
            task.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Nothing panics while holding the lock (callbacks run outside it), but should an
        // allocation fail there, the map is still consistent.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn task(&self) -> MutexGuard<'_, TaskState> {
        self.task.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ready when the epoll set has events, `None` once every handle is gone.
    fn poll_ready(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<AsyncFdReadyGuard<'_, OwnedFd>>>> {
        {
            let mut task = self.task();
            if task.stopped {
                return Poll::Ready(None);
            }
            if !task.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                task.waker = Some(cx.waker().clone());
            }
        }
        self.epoll.poll_read_ready(cx).map(Some)
    }

    /// Takes up to [`BATCH`] events without waiting, and moves their callbacks to `ready`.
    /// Returns how many events there were.
    fn harvest(&self, ready: &mut Vec<OnClose>) -> io::Result<usize> {
        let mut buf = [MaybeUninit::<Event>::uninit(); BATCH];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        #[cfg(test)]
        if self.fail_next_wait.swap(false, Ordering::Relaxed) {
            return Err(io::Error::other("injected epoll_wait failure"));
        }
        let events = loop {
            match epoll::wait(self.epoll.get_ref(), &mut buf, Some(&now)) {
                Ok((events, _)) => break events,
                Err(Errno::INTR) => {}
                Err(err) => return Err(err.into()),
            }
        };
        if !events.is_empty() {
            let mut registry = self.registry();
            // Every event is a close: we asked for nothing else, and HUP and ERR are final.
            // An unknown id is a watch dropped since, or a callback `fire` already ran.
            ready.extend(
                events
                    .iter()
                    .filter_map(|event| registry.callbacks.remove(&event.data.u64())),
            );
        }
        Ok(events.len())
    }
}

/// A watcher of this process failed already: the next failure is logged at `debug` only.
static FAILED_ONCE: AtomicBool = AtomicBool::new(false);

/// Whether the kernel has recorded an error on `fd`, a connected socket: a reset from the
/// peer (`POLLERR`; a peer that closed fully answers a write with one), whether or not the
/// watcher task has taken its event yet. Not `POLLHUP`, which both sides shutting down
/// their sending directions also gives. One `poll` that does not wait.
pub(crate) fn was_reset(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::empty())];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().contains(PollFlags::ERR)
}

/// The watcher task.
async fn drain(shared: Arc<Shared>) {
    let mut ready = Vec::new();
    loop {
        let mut guard = match poll_fn(|cx| shared.poll_ready(cx)).await {
            None => return,
            Some(Ok(guard)) => guard,
            Some(Err(err)) => {
                // The runtime is shutting down.
                tracing::debug!(%err, "connection watcher stopped");
                return;
            }
        };
        loop {
            let n = match shared.harvest(&mut ready) {
                Ok(n) => n,
                Err(err) => {
                    // Never seen, but never silent: the owner replaces a failed watcher
                    // for the connections that come next (see `Connections::watch`).
                    shared.failed.store(true, Ordering::Release);
                    tracing::debug!(%err, "connection watcher: epoll_wait failed; watcher stopped");
                    if !FAILED_ONCE.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            %err,
                            "connection watcher: epoll_wait failed; connections open now are \
                             no longer watched (a client that leaves is seen when hyper reads \
                             or writes), and new ones get a new watcher"
                        );
                    }
                    return;
                }
            };
            for on_close in ready.drain(..) {
                // One callback's panic must not end the watch on every other connection.
                if catch_unwind(AssertUnwindSafe(on_close)).is_err() {
                    tracing::error!("connection watcher: an on_close callback panicked");
                }
            }
            if n < BATCH {
                break;
            }
        }
        // The set is empty now (every socket in it is edge-triggered, so a reported one is not
        // queued again). An event that arrived since the last `epoll_wait` is not lost:
        // tokio's registration of our epoll fd is edge-triggered too, so that event makes the
        // reactor set readiness again with a new tick, and `clear_ready` only clears the
        // readiness of the tick this guard saw.
        guard.clear_ready();
    }
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("epoll", self.handle.shared.epoll.get_ref())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("id", &self.id)
            .field("registered", &self.registered)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl Watcher {
    /// A watcher and its task, to see the task end.
    pub(super) fn start_for_test() -> io::Result<(Watcher, JoinHandle<()>)> {
        Self::start()
    }

    /// Makes the next `epoll_wait` fail, as a broken epoll instance would.
    pub(crate) fn fail_next_wait_for_test(&self) {
        self.handle
            .shared
            .fail_next_wait
            .store(true, Ordering::Relaxed);
    }

    /// How many sockets the epoll set holds, as the kernel lists them.
    pub(super) fn entries_for_test(&self) -> usize {
        use std::os::fd::AsRawFd;
        let fd = self.handle.shared.epoll.get_ref().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        info.lines().filter(|line| line.starts_with("tfd:")).count()
    }
}
