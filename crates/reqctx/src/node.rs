//! The cancellation tree.
//!
//! Each cancellable context is a [`CancelNode`] holding a strong reference to its parent.
//! Nothing points down the tree: a node learns of its ancestors' cancellation by asking
//! them (`resolve`), and waiters learn of it through tokio-util tokens, which are created
//! on demand as children of the parent's token.
//!
//! Invariants:
//! 1. `State::cause` is written once, under the lock, and never changed; `done` is set
//!    to `true` right after, so a `true` load means a cause can be read.
//! 2. If `State::token` exists and `State::cause` is set, the token is cancelled (or is
//!    about to be, by whoever wrote the second of the two): both are written under the
//!    lock, and whoever writes second cancels it.
//! 3. A node's cause, once recorded, is the first of: an ancestor's cause, its own
//!    deadline, an explicit cancel. When both an ancestor's cause and the node's own
//!    deadline apply, the one that happened first wins; an ancestor's cancel time is
//!    known (`at`) whenever a descendant with a deadline existed at that moment.
//!
//! Lock order: up the tree only. A node's lock may be held while taking its parent's
//! (creating a token); no code takes a child's lock while holding its parent's, since
//! nothing points down. A token may be cancelled under our lock: tokio-util never calls
//! back into this module.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cause::{Cause, DeadlineOrigin};

pub(crate) type Deadline = (Instant, DeadlineOrigin);

/// A recorded cause and, when known, the instant it happened.
pub(crate) type Recorded = (Cause, Option<Instant>);

/// Reads the clock at most once per walk up the tree, and only if a deadline needs it.
pub(crate) struct LazyNow(Option<Instant>);

impl LazyNow {
    pub(crate) fn new() -> LazyNow {
        LazyNow(None)
    }

    pub(crate) fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// Driven contexts alive now: one per request under a middleware such as tower-reqctx's.
static LIVE_DRIVEN: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn live_driven() -> usize {
    LIVE_DRIVEN.load(Ordering::Relaxed)
}

pub(crate) struct CancelNode {
    parent: Option<Arc<CancelNode>>,
    /// A deadline that never changes; `None` for driven nodes (see `State::driven`).
    fixed: Option<Deadline>,
    /// The deadline is set and timed by an owner (middleware), not by this crate.
    driven: bool,
    /// A driven deadline has been set at some point: until then, reading the cause needs
    /// no lock (the request of a server with no timeout).
    driven_set: AtomicBool,
    done: AtomicBool,
    /// Some descendant has a deadline of its own: record the time when cancelled (inv. 3).
    timed_descendants: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    cause: Option<Recorded>,
    token: Option<CancellationToken>,
    timer_armed: bool,
    driven: Option<Deadline>, // only for driven nodes
}

impl Drop for CancelNode {
    fn drop(&mut self) {
        if self.driven {
            LIVE_DRIVEN.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl CancelNode {
    pub(crate) fn new(
        parent: Option<Arc<CancelNode>>,
        deadline: Option<Deadline>,
        driven: bool,
    ) -> Arc<CancelNode> {
        if deadline.is_some() || driven {
            let mut p = parent.as_deref();
            while let Some(node) = p {
                // Load first: a shared parent (a connection) sees this once per request.
                if node.timed_descendants.load(Ordering::Relaxed) {
                    break; // its ancestors were marked by whoever set it
                }
                node.timed_descendants.store(true, Ordering::Relaxed);
                p = node.parent.as_deref();
            }
        }
        let (fixed, state) = if driven {
            (
                None,
                State {
                    driven: deadline,
                    ..State::default()
                },
            )
        } else {
            (deadline, State::default())
        };
        if driven {
            LIVE_DRIVEN.fetch_add(1, Ordering::Relaxed);
        }
        Arc::new(CancelNode {
            parent,
            fixed,
            driven,
            driven_set: AtomicBool::new(driven && deadline.is_some()),
            done: AtomicBool::new(false),
            timed_descendants: AtomicBool::new(false),
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held; recover rather than propagate.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This node's own deadline (not its ancestors').
    pub(crate) fn own_deadline(&self) -> Option<Deadline> {
        if self.driven {
            self.lock().driven
        } else {
            self.fixed
        }
    }

    /// The earliest deadline of this node and its ancestors.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.earliest_deadline().map(|(d, _)| d)
    }

    /// The earliest deadline of this node and its ancestors, with its origin. On a tie the
    /// nearer node's wins: it is the one whose cause would be recorded.
    pub(crate) fn earliest_deadline(&self) -> Option<Deadline> {
        let mut best: Option<Deadline> = None;
        let mut node = Some(self);
        while let Some(n) = node {
            if let Some((d, origin)) = n.own_deadline() {
                if best.is_none_or(|(b, _)| d < b) {
                    best = Some((d, origin));
                }
            }
            node = n.parent.as_deref();
        }
        best
    }

    /// The earliest deadline that a waiter must time itself: driven deadlines are timed
    /// by their owner, so they are left out.
    pub(crate) fn timer_deadline(&self) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut node = Some(self);
        while let Some(n) = node {
            if let Some((d, _)) = n.fixed {
                best = Some(best.map_or(d, |b| b.min(d)));
            }
            node = n.parent.as_deref();
        }
        best
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn recorded(&self) -> Option<Recorded> {
        self.lock().cause.clone()
    }

    /// The cause this node has, recording it if an ancestor or the deadline implies one.
    pub(crate) fn resolve(&self, now: &mut LazyNow) -> Option<Recorded> {
        if self.is_done() {
            return self.recorded();
        }
        let inherited = self.parent.as_ref().and_then(|p| p.resolve(now));
        if inherited.is_none() {
            // Nothing to record: skip the lock (the common case on every check).
            if self.driven {
                if !self.driven_set.load(Ordering::Acquire) {
                    return None;
                }
            } else {
                match self.fixed {
                    None => return None,
                    Some((deadline, _)) if now.get() < deadline => return None,
                    Some(_) => {}
                }
            }
        }
        self.settle(inherited, None, now).0
    }

    /// Cancels this node with `cause` unless it already has one (recorded or implied).
    /// Returns `true` if `cause` is the one recorded.
    pub(crate) fn cancel(&self, cause: Cause) -> bool {
        if self.is_done() {
            return false;
        }
        let mut now = LazyNow::new();
        let inherited = self.parent.as_ref().and_then(|p| p.resolve(&mut now));
        self.settle(inherited, Some(cause), &mut now).1
    }

    /// Picks and records the first of: what the parent has, this node's passed deadline,
    /// and `explicit`. Returns the recorded cause and whether `explicit` was recorded.
    fn settle(
        &self,
        inherited: Option<Recorded>,
        explicit: Option<Cause>,
        now: &mut LazyNow,
    ) -> (Option<Recorded>, bool) {
        let mut st = self.lock();
        if let Some(existing) = &st.cause {
            return (Some(existing.clone()), false);
        }
        let own = if self.driven { st.driven } else { self.fixed };
        let expired = own
            .filter(|(d, _)| now.get() >= *d)
            .map(|(d, origin)| (Cause::DeadlineExceeded { origin }, Some(d)));
        let implied = match (inherited, expired) {
            (Some(p), Some(e)) => match (p.1, e.1) {
                // Our deadline passed before the ancestor was cancelled.
                (Some(p_at), Some(e_at)) if e_at < p_at => Some(e),
                _ => Some(p),
            },
            (p, e) => p.or(e),
        };
        let mut ours = false;
        let chosen = match implied {
            Some(c) => c,
            None => match explicit {
                Some(cause) => {
                    ours = true;
                    let at = self
                        .timed_descendants
                        .load(Ordering::Relaxed)
                        .then(|| now.get());
                    (cause, at)
                }
                None => return (None, false),
            },
        };
        st.cause = Some(chosen.clone());
        self.done.store(true, Ordering::Release);
        if let Some(t) = &st.token {
            // Under our lock, which is safe (tokio-util never calls back into us) and
            // saves a clone; tokio-util wakes the waiters after releasing its own lock.
            t.cancel();
        }
        (Some(chosen), ours)
    }

    /// This node's token, created on first use as a child of the parent's. No timer is
    /// armed (see [`CancelNode::arm_timers`]) and a passed deadline not yet recorded is
    /// not looked for: callers resolve first, or time the deadline themselves.
    pub(crate) fn token(&self) -> CancellationToken {
        let mut st = self.lock();
        if let Some(t) = &st.token {
            return t.clone();
        }
        // Lock order allows it: a child's lock may be held while taking its parent's.
        let token = match &self.parent {
            Some(p) => p.child_token(),
            None => CancellationToken::new(),
        };
        st.token = Some(token.clone());
        let cancelled = st.cause.is_some();
        drop(st);
        if cancelled {
            token.cancel();
        }
        token
    }

    /// A new child of this node's token, without cloning this node's token.
    fn child_token(&self) -> CancellationToken {
        {
            let st = self.lock();
            if let Some(t) = &st.token {
                return t.child_token();
            }
        }
        self.token().child_token()
    }

    /// Makes sure every fixed deadline on the way to the root will cancel its node's
    /// token when it passes, by spawning one timer task per node, once.
    ///
    /// # Panics
    /// Outside a tokio runtime, if a deadline needs a timer.
    pub(crate) fn arm_timers(self: &Arc<CancelNode>) {
        let mut node = Some(self);
        while let Some(n) = node {
            if let Some((deadline, _)) = n.fixed {
                n.arm(deadline);
            }
            node = n.parent.as_ref();
        }
    }

    fn arm(self: &Arc<CancelNode>, deadline: Instant) {
        {
            let mut st = self.lock();
            if st.timer_armed || st.cause.is_some() {
                return;
            }
            st.timer_armed = true;
        }
        let handle = tokio::runtime::Handle::try_current().expect(
            "reqctx: a context with a deadline needs a tokio runtime (with the time driver) \
             to be waited on through token() or on_cancel()",
        );
        let token = self.token();
        let weak: Weak<CancelNode> = Arc::downgrade(self);
        handle.spawn(async move {
            let fired = crate::future::first(token.cancelled(), tokio::time::sleep_until(deadline));
            if fired.await.is_right() {
                if let Some(node) = weak.upgrade() {
                    node.resolve(&mut LazyNow::new());
                }
            }
        });
    }

    /// Sets a driven node's deadline. Returns `false` for a node whose deadline is fixed.
    pub(crate) fn set_driven(&self, deadline: Option<Deadline>) -> bool {
        if !self.driven {
            return false;
        }
        self.lock().driven = deadline;
        if deadline.is_some() {
            self.driven_set.store(true, Ordering::Release);
        }
        true
    }
}
