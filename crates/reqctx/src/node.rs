//! The cancellation tree.
//!
//! Each cancellable context is a [`CancelNode`] holding a strong reference to its parent.
//! Nothing points down the tree: a node learns of its ancestors' cancellation by asking
//! them (`resolve`), and waiters learn of it through tokio-util tokens, which are created
//! on demand as children of the parent's token.
//!
//! A deadline reaches every waiter when it passes, whoever polls what, in two ways:
//! - A polled waiter (`WaitForCancel`: `cancelled`, `run`, `spawn`) times the earliest
//!   deadline of its chain, fixed or driven, with a `Sleep` of its own, in its own task;
//!   when it fires, it records the cause (or, if a driven deadline moved later or went
//!   away, re-reads the chain and sleeps again). Marking each driven node it passes
//!   `Waited` is how such a node learns that a move to an earlier deadline must be timed.
//! - Everything else is timed by one task per node ([`DeadlineTimer`]): `token()` and
//!   `on_cancel` arm it on each deadline of their chain, and a driven node spawns it when
//!   its deadline moves earlier (or is set) while a waiter sleeps on the old one. It
//!   records the cause when the deadline passes, which cancels the node's token and every
//!   token below, and follows a driven deadline wherever it moves.
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
//! 4. At most one timer task exists per node, and only while `State::timer` is
//!    `Running`: the slot is set before the task is spawned, and leaves `Running` when
//!    the task ends, when a cause is recorded (a node with a cause never re-arms), when
//!    the node is dropped, or when the task is dropped unfinished (its runtime shut
//!    down), so that a later waiter arms a new one.
//! 5. Every deadline on a waiter's chain is timed no later than it passes: by the waiter's
//!    own `Sleep` (armed for the earliest deadline of the chain when it started waiting;
//!    a driven node on the chain is then at least `Waited`) or by the node's timer
//!    (`token`/`on_cancel` call `arm_timers`: every deadline node gets one, a driven node
//!    with no deadline becomes `Waited`). A driven deadline moved earlier, or set from
//!    none, on a `Waited` node spawns the node's timer; one moved later or removed is
//!    found by the waiter's `Sleep`, which re-reads the chain. A node without a deadline
//!    never has a timer.
//! 6. Tasks (timers, `on_cancel`) hold a node only by `Weak`: they never keep it alive.
//!    The node's `Drop` wakes its timer and cancels `Hooks::gone`, so both end with the
//!    node's last handle (clones, children, cancellers).
//! 7. Walks up the tree and drops of long chains are loops, not recursion: a chain of any
//!    depth is cancelled, resolved and dropped in constant stack.
//!
//! Lock order: no code holds two node locks at once. Walks take one node's lock at a
//! time; a token is created top-down, each from the token above it. Under a node's lock,
//! a token may be cancelled or derived (tokio-util's lock) and a `Sleep` is never polled;
//! neither tokio nor tokio-util calls back into this module. Wakers (the timer's) are
//! woken after the lock is released.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context as TaskContext, Poll, Waker, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
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
    parent: Option<Arc<CancelNode>>, // taken only by `Drop`, to unlink a chain in a loop
    /// A deadline that never changes; `None` for driven nodes (see `State::driven`).
    fixed: Option<Deadline>,
    /// The deadline is set by an owner (middleware) and may move; cleared by `Drop`.
    driven: bool,
    /// A driven deadline has been set at some point: until then, reading the cause needs
    /// no lock (the request of a server with no timeout).
    driven_set: AtomicBool,
    done: AtomicBool,
    /// Some descendant has a deadline of its own: record the time when cancelled (inv. 3).
    timed_descendants: AtomicBool,
    state: Mutex<State>,
}

struct State {
    cause: Option<Recorded>,
    token: Option<CancellationToken>,
    timer: TimerSlot,
    driven: Option<Deadline>,  // only for driven nodes
    hooks: Option<Arc<Hooks>>, // made by the first `on_cancel`
}

/// Who times this node's deadline (invariants 4 and 5).
enum TimerSlot {
    /// Nothing waits on the node (or nothing did since its timer's runtime went away).
    Idle,
    /// A driven node that something waits on without a timer of the node's (a waiter's
    /// own `Sleep`, or a timer that ended when the deadline was removed): a deadline set
    /// earlier than the one they time spawns the timer.
    Waited,
    /// A timer task runs; the waker is its own, once it has polled.
    Running(Option<Waker>),
}

/// What `on_cancel` tasks share with their node, so that they hold it only by `Weak`.
pub(crate) struct Hooks {
    /// The node's cause when its last handle went, if it had one; set before `gone`.
    last_cause: OnceLock<Cause>,
    /// Cancelled by the node's `Drop`.
    gone: CancellationToken,
}

impl Hooks {
    /// Resolves once the node is gone.
    pub(crate) async fn gone(&self) {
        self.gone.cancelled().await;
    }

    /// The node's cause when it was dropped; read after [`Hooks::gone`] resolved.
    pub(crate) fn last_cause(&self) -> Option<Cause> {
        self.last_cause.get().cloned()
    }
}

impl Drop for CancelNode {
    fn drop(&mut self) {
        self.release();
        // Unlink the ancestors this node held last, one by one: a recursive `Arc` drop
        // would use stack in proportion to the chain's depth.
        let mut next = self.parent.take();
        while let Some(node) = next {
            match Arc::into_inner(node) {
                Some(mut node) => {
                    node.release();
                    next = node.parent.take();
                    // `node` drops here with no parent: its own `Drop` does nothing more.
                }
                None => break, // someone else still holds it
            }
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
            mark_timed(parent.as_deref());
        }
        let (fixed, own_driven) = if driven {
            (None, deadline)
        } else {
            (deadline, None)
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
            state: Mutex::new(State {
                cause: None,
                token: None,
                timer: TimerSlot::Idle,
                driven: own_driven,
                hooks: None,
            }),
        })
    }

    /// What the node's last handle leaves behind: `on_cancel` tasks learn the cause it had
    /// (or that it had none) and end, its timer ends, the live count drops. Idempotent.
    fn release(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let hooks = st.hooks.take();
        let timer = std::mem::replace(&mut st.timer, TimerSlot::Idle);
        if let Some(hooks) = hooks {
            self.hand_over(&hooks);
        }
        if let TimerSlot::Running(Some(waker)) = timer {
            waker.wake(); // it finds the node gone and ends
        }
        if self.driven {
            self.driven = false;
            LIVE_DRIVEN.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Tells `on_cancel` tasks the cause the node has as its last handle goes (ancestors
    /// and its own passed deadline included: it was cancelled while it lived), or that it
    /// has none, and lets them end.
    #[cold]
    fn hand_over(&self, hooks: &Hooks) {
        if let Some((cause, _)) = self.resolve(&mut LazyNow::new()) {
            let _ = hooks.last_cause.set(cause);
        }
        hooks.gone.cancel();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held; recover rather than propagate.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn own(&self, st: &State) -> Option<Deadline> {
        if self.driven { st.driven } else { self.fixed }
    }

    /// This node's own deadline (not its ancestors').
    pub(crate) fn own_deadline(&self) -> Option<Deadline> {
        if self.driven {
            // Never set: no lock (a server without a timeout reads this on every poll).
            if !self.driven_set.load(Ordering::Acquire) {
                return None;
            }
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

    /// The earliest deadline of this node and its ancestors, for a waiter that is about
    /// to time it with a `Sleep` of its own: each driven node on the way is marked
    /// `Waited`, so that a move to an earlier deadline spawns its timer (invariant 5).
    pub(crate) fn waiter_deadline(&self) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut node = Some(self);
        while let Some(n) = node {
            let own = if n.driven {
                let mut st = n.lock();
                if matches!(st.timer, TimerSlot::Idle) {
                    st.timer = TimerSlot::Waited;
                }
                st.driven
            } else {
                n.fixed
            };
            if let Some((d, _)) = own {
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

    /// Whether this node's own deadline has passed. Takes no lock unless a driven
    /// deadline was ever set.
    #[inline(always)]
    fn own_passed(&self, now: &mut LazyNow) -> bool {
        match self.fixed {
            Some((d, _)) => now.get() >= d,
            // A driven node has no fixed deadline.
            None => {
                self.driven && self.driven_set.load(Ordering::Acquire) && self.driven_passed(now)
            }
        }
    }

    #[inline(never)]
    fn driven_passed(&self, now: &mut LazyNow) -> bool {
        let own = self.lock().driven;
        own.is_some_and(|(d, _)| now.get() >= d)
    }

    /// The cause this node has, recording it (on this node and on every ancestor up to
    /// the one that had it) if an ancestor or a passed deadline implies one.
    pub(crate) fn resolve(&self, now: &mut LazyNow) -> Option<Recorded> {
        if self.is_done() {
            return self.recorded();
        }
        // First a look up the chain, without allocating or recording: is there anything
        // to record? (The common case on every check is no.)
        let mut depth = 0;
        let mut top: Option<&CancelNode> = None; // the nearest ancestor with a cause
        let mut passed = false;
        let mut node = Some(self);
        while let Some(n) = node {
            if n.is_done() {
                top = Some(n);
                break;
            }
            passed = passed || n.own_passed(now);
            depth += 1;
            node = n.parent.as_deref();
        }
        if top.is_none() && !passed {
            return None;
        }
        self.record_down(top, depth, now)
    }

    /// The rest of `resolve`, out of line so that the common check stays small: records
    /// top-down, each of the `depth` nodes from `self` up from its parent's cause
    /// (invariant 3), starting from `top`'s.
    #[inline(never)]
    fn record_down(
        &self,
        top: Option<&CancelNode>,
        depth: usize,
        now: &mut LazyNow,
    ) -> Option<Recorded> {
        let mut inherited = top.and_then(CancelNode::recorded);
        let mut path = Path::new(self, depth);
        while let Some(n) = path.pop() {
            if inherited.is_some() || n.own_passed(now) {
                inherited = n.settle(inherited, None, now).0;
            }
        }
        inherited
    }

    /// Records `recorded`, the cause a lazy driver recorded before this node existed, unless
    /// the node has an earlier one (its own deadline, passed before that cause's instant).
    pub(crate) fn adopt(&self, recorded: Recorded) {
        self.settle(Some(recorded), None, &mut LazyNow::new());
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
        let expired = self
            .own(&st)
            .filter(|(d, _)| now.get() >= *d)
            .map(|(d, origin)| (Cause::DeadlineExceeded { origin }, Some(d)));
        let implied = first_of(inherited, expired);
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
        // The timer has nothing left to time (invariant 4): wake it so that it ends now
        // rather than at the deadline.
        let timer = std::mem::replace(&mut st.timer, TimerSlot::Idle);
        drop(st);
        if let TimerSlot::Running(Some(waker)) = timer {
            waker.wake();
        }
        (Some(chosen), ours)
    }

    /// This node's token, created on first use as a child of the parent's. No timer is
    /// armed (see [`CancelNode::arm_timers`]) and a passed deadline not yet recorded is
    /// not looked for: callers resolve first.
    pub(crate) fn token(&self) -> CancellationToken {
        if let Some(t) = &self.lock().token {
            return t.clone();
        }
        // Find the nearest ancestor with a token, counting the nodes below it that need
        // one; the topmost of those gets a child of that token (or a new root).
        let mut depth = 1;
        let mut node = self;
        let mut above = loop {
            match node.parent.as_deref() {
                None => break CancellationToken::new(),
                Some(p) => {
                    if let Some(t) = &p.lock().token {
                        break t.child_token();
                    }
                    depth += 1;
                    node = p;
                }
            }
        };
        // Top-down, one lock at a time: each node keeps the token made for it (or one
        // another thread made first) and hands a child of it to the node below.
        let mut path = Path::new(self, depth);
        loop {
            let Some(n) = path.pop() else {
                unreachable!("the path holds at least this node")
            };
            let mut st = n.lock();
            let token = match &st.token {
                Some(t) => t.clone(),
                None => {
                    st.token = Some(above.clone());
                    if st.cause.is_some() {
                        above.cancel(); // invariant 2: we wrote the token second
                    }
                    above
                }
            };
            drop(st);
            if path.is_empty() {
                return token;
            }
            above = token.child_token();
        }
    }

    /// The state shared with `on_cancel` tasks, made on first use.
    pub(crate) fn hooks(&self) -> Arc<Hooks> {
        self.lock()
            .hooks
            .get_or_insert_with(|| {
                Arc::new(Hooks {
                    last_cause: OnceLock::new(),
                    gone: CancellationToken::new(),
                })
            })
            .clone()
    }

    /// Makes sure every deadline on the way to the root, fixed or driven, cancels its
    /// node's token when it passes, by spawning one timer task per node, once
    /// (invariants 4 and 5). Called by `token()` and `on_cancel`, which have no `Sleep`
    /// of their own.
    ///
    /// # Panics
    /// Outside a tokio runtime, if a deadline needs a timer.
    pub(crate) fn arm_timers(self: &Arc<CancelNode>) {
        let mut node = Some(self);
        while let Some(n) = node {
            if n.fixed.is_some() || n.driven {
                n.arm();
            }
            node = n.parent.as_ref();
        }
    }

    fn arm(self: &Arc<CancelNode>) {
        let at = {
            let mut st = self.lock();
            if st.cause.is_some() || matches!(st.timer, TimerSlot::Running(_)) {
                return;
            }
            match self.own(&st) {
                None => {
                    st.timer = TimerSlot::Waited; // only a driven node has no deadline here
                    return;
                }
                Some((at, _)) => {
                    st.timer = TimerSlot::Running(None);
                    at
                }
            }
        };
        self.spawn_timer(at);
    }

    /// Spawns the timer task; the slot is already `Running`.
    fn spawn_timer(self: &Arc<CancelNode>, at: Instant) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.lock().timer = TimerSlot::Idle;
            panic!(
                "reqctx: a context with a deadline needs a tokio runtime (with the time \
                 driver) to be waited on"
            );
        };
        handle.spawn(DeadlineTimer {
            node: Arc::downgrade(self),
            sleep: sleep_until(wheel_instant(at)),
            armed_for: at,
            ended: false,
        });
    }

    /// Sets a driven node's deadline, for everyone: its running timer re-reads it, and a
    /// node whose waiters sleep until a later deadline (or none) gets its timer now, so
    /// nobody sleeps past the new one. A waiter whose deadline moved later or went away
    /// finds out when its `Sleep` fires, and records no cause that no longer applies.
    /// Returns `false` for a node whose deadline is fixed.
    ///
    /// # Panics
    /// Outside a tokio runtime, if something waits on the node and `deadline` is `Some`.
    pub(crate) fn set_driven(self: &Arc<CancelNode>, deadline: Option<Deadline>) -> bool {
        if !self.driven {
            return false;
        }
        let mut wake = None;
        let mut spawn_at = None;
        {
            let mut st = self.lock();
            let old = std::mem::replace(&mut st.driven, deadline);
            if deadline.is_some() {
                self.driven_set.store(true, Ordering::Release);
            }
            if st.cause.is_none() {
                match (&mut st.timer, deadline) {
                    (TimerSlot::Running(waker), _) => wake = waker.take(),
                    // Waiters sleep until the old deadline (or none): time the earlier one.
                    (TimerSlot::Waited, Some((at, _))) if old.is_none_or(|(o, _)| at < o) => {
                        st.timer = TimerSlot::Running(None);
                        spawn_at = Some(at);
                    }
                    _ => {}
                }
            }
        }
        if let Some(waker) = wake {
            waker.wake();
        }
        if let Some(at) = spawn_at {
            self.spawn_timer(at);
        }
        true
    }
}

/// Of an ancestor's cause and a node's own passed deadline, the one that happened first
/// (invariant 3): the ancestor's, unless both instants are known and the deadline's is
/// earlier.
pub(crate) fn first_of(inherited: Option<Recorded>, expired: Option<Recorded>) -> Option<Recorded> {
    match (inherited, expired) {
        (Some(p), Some(e)) => match (p.1, e.1) {
            // Our deadline passed before the ancestor was cancelled.
            (Some(p_at), Some(e_at)) if e_at < p_at => Some(e),
            _ => Some(p),
        },
        (p, e) => p.or(e),
    }
}

/// Marks `parent` and its ancestors as having a descendant with a deadline, so that they
/// record the instant of their cancellation (invariant 3).
fn mark_timed(parent: Option<&CancelNode>) {
    let mut p = parent;
    while let Some(node) = p {
        // Load first: a shared parent (a connection) sees this once per request.
        if node.timed_descendants.load(Ordering::Relaxed) {
            break; // its ancestors were marked by whoever set it
        }
        node.timed_descendants.store(true, Ordering::Relaxed);
        p = node.parent.as_deref();
    }
}

/// A driven context that is not made yet (a lazy `DeadlineDriver`): it counts as live, and
/// its ancestors record when they are cancelled, as if its node existed.
pub(crate) fn unborn_driven(parent: Option<&CancelNode>) {
    mark_timed(parent);
    LIVE_DRIVEN.fetch_add(1, Ordering::Relaxed);
}

/// An unborn driven context got its node, which counts itself.
pub(crate) fn born_driven() {
    LIVE_DRIVEN.fetch_sub(1, Ordering::Relaxed);
}

/// An unborn driven context went away without its node.
pub(crate) fn unborn_dropped() {
    LIVE_DRIVEN.fetch_sub(1, Ordering::Relaxed);
}

/// The nodes from `start` up `depth` levels, handed out top-down by `pop`, in constant
/// stack and without allocating for short chains.
struct Path<'a> {
    small: [Option<&'a CancelNode>; 8],
    big: Vec<&'a CancelNode>,
    len: usize,
}

impl<'a> Path<'a> {
    fn new(start: &'a CancelNode, depth: usize) -> Path<'a> {
        let mut path = Path {
            small: [None; 8],
            big: Vec::new(),
            len: depth,
        };
        if depth > path.small.len() {
            path.big.reserve_exact(depth);
        }
        let mut node = Some(start);
        for i in 0..depth {
            let Some(n) = node else { break };
            match path.small.get_mut(i) {
                Some(slot) if depth <= 8 => *slot = Some(n),
                _ => path.big.push(n),
            }
            node = n.parent.as_deref();
        }
        path
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn pop(&mut self) -> Option<&'a CancelNode> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        if self.big.is_empty() {
            self.small[self.len]
        } else {
            self.big.pop()
        }
    }
}

pin_project! {
    /// The one timer of a node with a deadline (see the module docs). It holds the node
    /// by `Weak`, records the cause when the deadline passes, follows a driven deadline
    /// that moves, and ends when the node has a cause, loses its driven deadline, or is
    /// dropped.
    struct DeadlineTimer {
        node: Weak<CancelNode>,
        #[pin]
        sleep: Sleep,
        armed_for: Instant, // the deadline `sleep` was last set for
        ended: bool,
    }

    impl PinnedDrop for DeadlineTimer {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.ended {
                return;
            }
            // Dropped unfinished, with its runtime: let a later waiter arm a new timer.
            if let Some(node) = this.node.upgrade() {
                let mut st = node.lock();
                if matches!(st.timer, TimerSlot::Running(_)) {
                    st.timer = TimerSlot::Idle;
                }
            }
        }
    }
}

impl Future for DeadlineTimer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            let Some(node) = this.node.upgrade() else {
                *this.ended = true; // the node is gone (its `Drop` reset the slot)
                return Poll::Ready(());
            };
            let at = {
                let mut st = node.lock();
                if st.cause.is_some() {
                    *this.ended = true; // `settle` reset the slot
                    return Poll::Ready(());
                }
                let Some((at, _)) = node.own(&st) else {
                    // A driven deadline was removed: `set_driven` re-arms from `Waited`.
                    st.timer = TimerSlot::Waited;
                    *this.ended = true;
                    return Poll::Ready(());
                };
                if let TimerSlot::Running(waker) = &mut st.timer {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                }
                at
            };
            if at != *this.armed_for {
                *this.armed_for = at;
                this.sleep.as_mut().reset(wheel_instant(at));
            }
            ready!(this.sleep.as_mut().poll(cx));
            // Records DeadlineExceeded (or an ancestor's earlier cause), which cancels the
            // node's token and every token below it; the next turn of the loop ends.
            if node.resolve(&mut LazyNow::new()).is_none() && node.own_deadline_is(at) {
                // Not passed by the clock (tokio's timer never fires early; stay correct
                // anyway): look again a millisecond later rather than spin.
                match Instant::now().checked_add(Duration::from_millis(1)) {
                    Some(later) => this.sleep.as_mut().reset(wheel_instant(later)),
                    None => return Poll::Pending, // the end of time: never passes
                }
            }
        }
    }
}

/// `at`, or a second earlier for a deadline within a millisecond of the end of time: tokio
/// rounds a deadline up by adding just under a millisecond, which would overflow there.
///
/// The one guard every timer of ours goes through (`sleep_until`, `Sleep::reset`), this
/// crate's and `tower-reqctx`'s (re-exported as `timer_instant`: not API, may change in any
/// release).
pub fn wheel_instant(at: Instant) -> Instant {
    match at.checked_add(Duration::from_millis(1)) {
        Some(_) => at,
        None => at.checked_sub(Duration::from_secs(1)).unwrap_or(at),
    }
}

impl CancelNode {
    fn own_deadline_is(&self, at: Instant) -> bool {
        self.own_deadline().is_some_and(|(d, _)| d == at)
    }
}
