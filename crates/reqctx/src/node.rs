//! The cancellation tree.
//!
//! Each cancellable context is a [`CancelNode`] holding a strong reference to its parent.
//! A node's cause is one write-once cell (`CancelNode::cause`): whoever sets it first wins,
//! by compare-and-swap, with no lock. A node learns of its ancestors' cancellation by
//! asking them (`resolve`); the only pointers down the tree are the `Weak` links that
//! waiters put in place, so that a cancellation reaches them.
//!
//! Waiters (`WaitForCancel`: `cancelled`, `run`, `spawn`) register a waker in their node's
//! registry (`State::registry`), and the node links itself, once, into its parent's
//! registry (which links the parent into its own, up to the first node already linked).
//! Recording a cause drains the node's registry: its wakers are woken, and every linked
//! child is given the cause in turn (its registry drained the same way), in a loop over a
//! work list, so an ancestor's cancellation reaches waiters at any depth. `token()` and
//! `on_cancel` use tokio-util tokens instead, created on demand as children of the
//! parent's token and cancelled when the cause is recorded.
//!
//! A deadline reaches every waiter when it passes, whoever polls what, in three ways:
//! - A driven deadline whose owner times it (`owner_times(true)`: the owner is polled by
//!   a timer of its own and calls `expire` when the deadline passes) needs nothing more:
//!   the owner records the cause, which wakes the registered waiters. The waiter marks the
//!   node `Waited`, so that the node's timer takes over when the owner stops timing, and
//!   when the deadline moves earlier than the one the owner's timer is set for.
//! - Any other deadline of a polled waiter's chain, fixed or driven, is timed by a `Sleep`
//!   of the waiter's own (the earliest of them), in its own task; when it fires, it
//!   records the cause (or, if a driven deadline moved later or went away, re-reads the
//!   chain and sleeps again). Each driven node it passes is marked `Waited`, which is how
//!   such a node learns that a move to an earlier deadline must be timed.
//! - Everything else is timed by one task per node ([`DeadlineTimer`]): `token()` and
//!   `on_cancel` arm it on each deadline of their chain, and a driven node spawns it when
//!   its deadline moves earlier (or is set) while something waits on the old one, or when
//!   its owner stops timing it while waited. It records the cause when the deadline
//!   passes, and follows a driven deadline wherever it moves.
//!
//! Invariants:
//! 1. `CancelNode::cause` is set once and never changed: the first cause wins. A set cause
//!    can be read by anyone without a lock (`is_done`).
//! 2. Whoever sets the cause then drains the node's registry and cancels its token, under
//!    the lock, if the node is `WATCHED`; whoever adds a waker, a link, a token or a timer
//!    does so under the lock, sets `WATCHED`, and then looks at the cause again (a
//!    `SeqCst` fence on both sides): a registration never misses the cause, and a
//!    registry is never filled again once drained (registration refuses a done node).
//! 3. A node's cause, once recorded, is the first of: an ancestor's cause, its own
//!    deadline, an explicit cancel. When both an ancestor's cause and the node's own
//!    deadline apply, the one that happened first wins; an ancestor's cancel time is
//!    known (`at`) whenever a descendant with a deadline existed at that moment. A linked
//!    child is given its parent's recorded cause (with its `at`) by the same rule.
//! 4. At most one timer task exists per node, and only while `State::timer` is
//!    `Running`: the slot is set before the task is spawned, and leaves `Running` when
//!    the task ends, when a cause is recorded (a node with a cause never re-arms), when
//!    the node is dropped, or when the task is dropped unfinished (its runtime shut
//!    down), so that a later waiter arms a new one.
//! 5. Every deadline on a waiter's chain is timed no later than it passes: by the owner
//!    (a driven node while `owner_timed`, then `Waited`), by the waiter's own `Sleep`
//!    (armed for the earliest other deadline of the chain when it started waiting; a
//!    driven node on the chain is then at least `Waited`) or by the node's timer
//!    (`token`/`on_cancel` call `arm_timers`: every deadline node gets one, a driven node
//!    with no deadline becomes `Waited`). A driven deadline moved earlier, or set from
//!    none, on a `Waited` node spawns the node's timer; one moved later or removed is
//!    found by the waiter's `Sleep`, which re-reads the chain, or by the owner's timer.
//!    An owner that stops timing a `Waited` node with registered waiters or links and a
//!    deadline spawns the node's timer. A node without a deadline never has a timer.
//! 6. Tasks (timers, `on_cancel`) and links hold a node only by `Weak`: they never keep
//!    it alive. The node's `Drop` wakes its timer, removes its link from its parent's
//!    registry and cancels `Hooks::gone`, so all end with the node's last handle (clones,
//!    children, cancellers, waiters).
//! 7. Walks up the tree, the cascade down the links and drops of long chains are loops,
//!    not recursion: a chain of any depth is cancelled, resolved and dropped in constant
//!    stack.
//!
//! Lock order: no code holds two node locks at once. Walks take one node's lock at a
//! time; a token is created top-down, each from the token above it; a link is made
//! bottom-up, one lock at a time. Under a node's lock, a token may be cancelled or
//! derived (tokio-util's lock) and a `Sleep` is never polled; neither tokio nor tokio-util
//! calls back into this module. Wakers are woken after the lock is released.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering, fence};
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

/// `CancelNode::flags`: a driven deadline has been set at some point (until then, reading
/// the deadline needs no lock: the request of a server with no timeout).
const DRIVEN_SET: u8 = 1;
/// Some descendant has a deadline of its own: record the time when cancelled (inv. 3).
const TIMED_DESCENDANTS: u8 = 2;
/// The locked state holds something a cause must reach: a waker, a link, a token or a
/// running timer (invariant 2). Never cleared.
const WATCHED: u8 = 4;

pub(crate) struct CancelNode {
    parent: Option<Arc<CancelNode>>, // taken only by `Drop`, to unlink a chain in a loop
    /// A deadline that never changes; `None` for driven nodes (see `State::driven`).
    fixed: Option<Deadline>,
    /// The deadline is set by an owner (middleware) and may move; cleared by `Drop`.
    driven: bool,
    /// The cause, set once (invariant 1).
    cause: OnceLock<Recorded>,
    flags: AtomicU8,
    state: Mutex<State>,
}

struct State {
    registry: Registry,
    /// Where this node sits in its parent's registry.
    link: Link,
    token: Option<CancellationToken>,
    timer: TimerSlot,
    driven: Option<Deadline>, // only for driven nodes
    /// The owner times the driven deadline and calls `expire` when it passes.
    owner_timed: bool,
    hooks: Option<Arc<Hooks>>, // made by the first `on_cancel`
}

/// Who times this node's deadline (invariants 4 and 5).
enum TimerSlot {
    /// Nothing waits on the node (or nothing did since its timer's runtime went away).
    Idle,
    /// A driven node that something waits on without a timer of the node's (the owner's
    /// timer, a waiter's own `Sleep`, or a timer that ended when the deadline was
    /// removed): a deadline set earlier than the one they time spawns the timer.
    Waited,
    /// A timer task runs; the waker is its own, once it has polled.
    Running(Option<Waker>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not in the parent's registry (or no parent).
    None,
    /// Being put there by some thread, which resolves from below once done.
    Linking,
    /// In the parent's registry under this key.
    Linked(usize),
    /// The parent had a cause when we tried: nothing more will come down.
    Settled,
}

/// One registration on a node.
enum Entry {
    /// A waiter's waker.
    Waker(Waker),
    /// A child with waiters of its own (or links below it): it is given the cause.
    Child(Weak<CancelNode>),
}

/// The wakers and links of a node, keyed so that each holder can remove or update its
/// own: key 0 inline (the one waiter of the common case, with no allocation), the rest
/// in a slab, boxed so that a node nobody waits on many times stays small.
#[derive(Default)]
struct Registry {
    first: Option<Entry>,
    more: Option<Box<Slab>>,
    live: usize,
}

#[derive(Default)]
struct Slab {
    entries: Vec<Option<Entry>>, // key i + 1
    free: Vec<usize>,            // vacant indices of `entries`
}

impl Registry {
    fn insert(&mut self, entry: Entry) -> usize {
        self.live += 1;
        if self.first.is_none() {
            self.first = Some(entry);
            return 0;
        }
        let slab = self.more.get_or_insert_with(Box::default);
        match slab.free.pop() {
            Some(i) => {
                slab.entries[i] = Some(entry);
                i + 1
            }
            None => {
                slab.entries.push(Some(entry));
                slab.entries.len()
            }
        }
    }

    fn slot(&mut self, key: usize) -> Option<&mut Option<Entry>> {
        match key {
            0 => Some(&mut self.first),
            k => self.more.as_mut()?.entries.get_mut(k - 1),
        }
    }

    fn remove(&mut self, key: usize) -> Option<Entry> {
        let entry = self.slot(key)?.take()?;
        self.live -= 1;
        if let (Some(slab), Some(i)) = (self.more.as_mut(), key.checked_sub(1)) {
            slab.free.push(i);
        }
        Some(entry)
    }

    /// Every entry, leaving the registry empty.
    fn drain(self) -> impl Iterator<Item = Entry> {
        let more = self.more.map(|slab| slab.entries).unwrap_or_default();
        self.first.into_iter().chain(more.into_iter().flatten())
    }
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

/// Children to be given a cause: the cascade down the links, as a work list.
type Cascade = Vec<(Weak<CancelNode>, Recorded)>;

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
            cause: OnceLock::new(),
            flags: AtomicU8::new(if driven && deadline.is_some() {
                DRIVEN_SET
            } else {
                0
            }),
            state: Mutex::new(State {
                registry: Registry::default(),
                link: Link::None,
                token: None,
                timer: TimerSlot::Idle,
                driven: own_driven,
                owner_timed: false,
                hooks: None,
            }),
        })
    }

    fn flag(&self, flag: u8) -> bool {
        self.flags.load(Ordering::Acquire) & flag != 0
    }

    /// Marks the node `WATCHED` after something was put in its locked state, then fences,
    /// so that either the recorder sees the mark or the caller's next look at the cause
    /// sees the cause (invariant 2).
    fn watch(&self) {
        self.flags.fetch_or(WATCHED, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// What the node's last handle leaves behind: `on_cancel` tasks learn the cause it had
    /// (or that it had none) and end, its timer ends, its link leaves the parent's
    /// registry, the live count drops. Idempotent.
    fn release(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let hooks = st.hooks.take();
        let timer = std::mem::replace(&mut st.timer, TimerSlot::Idle);
        let link = std::mem::replace(&mut st.link, Link::None);
        if let Some(hooks) = hooks {
            self.hand_over(&hooks);
        }
        if let TimerSlot::Running(Some(waker)) = timer {
            waker.wake(); // it finds the node gone and ends
        }
        if let (Link::Linked(key), Some(parent)) = (link, self.parent.as_deref()) {
            let entry = parent.lock().registry.remove(key);
            drop(entry); // a `Weak` of ours: outside the parent's lock anyway
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
            if !self.flag(DRIVEN_SET) {
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

    /// The earliest deadline of this node and its ancestors that a registered waiter must
    /// time with a `Sleep` of its own: driven deadlines timed by their owner are left out.
    /// Each driven node on the way is marked `Waited`, so that a move to an earlier
    /// deadline, or the owner no longer timing it, spawns its timer (invariant 5).
    pub(crate) fn waiter_deadline(&self) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut node = Some(self);
        while let Some(n) = node {
            let own = if n.driven {
                let mut st = n.lock();
                if matches!(st.timer, TimerSlot::Idle) {
                    st.timer = TimerSlot::Waited;
                }
                if st.owner_timed { None } else { st.driven }
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
        self.cause.get().is_some()
    }

    fn recorded(&self) -> Option<Recorded> {
        self.cause.get().cloned()
    }

    /// Whether this node's own deadline has passed. Takes no lock unless a driven
    /// deadline was ever set.
    #[inline(always)]
    fn own_passed(&self, now: &mut LazyNow) -> bool {
        match self.fixed {
            Some((d, _)) => now.get() >= d,
            // A driven node has no fixed deadline.
            None => self.driven && self.flag(DRIVEN_SET) && self.driven_passed(now),
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
        if let Some(recorded) = self.cause.get() {
            return Some(recorded.clone());
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
        let mut cascade = Cascade::new();
        while let Some(n) = path.pop() {
            if inherited.is_some() || n.own_passed(now) {
                inherited = n.settle(inherited, None, now, &mut cascade).0;
            }
        }
        run_cascade(cascade, now);
        inherited
    }

    /// Records `recorded`, the cause a lazy driver recorded before this node existed, unless
    /// the node has an earlier one (its own deadline, passed before that cause's instant).
    pub(crate) fn adopt(&self, recorded: Recorded) {
        let mut now = LazyNow::new();
        let mut cascade = Cascade::new();
        self.settle(Some(recorded), None, &mut now, &mut cascade);
        run_cascade(cascade, &mut now);
    }

    /// Cancels this node with `cause` unless it already has one (recorded or implied).
    /// Returns `true` if `cause` is the one recorded.
    pub(crate) fn cancel(&self, cause: Cause) -> bool {
        if self.is_done() {
            return false;
        }
        let mut now = LazyNow::new();
        let inherited = self.parent.as_ref().and_then(|p| p.resolve(&mut now));
        let mut cascade = Cascade::new();
        let ours = self
            .settle(inherited, Some(cause), &mut now, &mut cascade)
            .1;
        run_cascade(cascade, &mut now);
        ours
    }

    /// Picks and records the first of: what the parent has, this node's passed deadline,
    /// and `explicit`. Returns the recorded cause and whether `explicit` was recorded.
    /// The node's linked children are pushed on `cascade`, to be given the cause.
    fn settle(
        &self,
        inherited: Option<Recorded>,
        explicit: Option<Cause>,
        now: &mut LazyNow,
        cascade: &mut Cascade,
    ) -> (Option<Recorded>, bool) {
        if let Some(existing) = self.cause.get() {
            return (Some(existing.clone()), false);
        }
        let expired = self
            .own_deadline()
            .filter(|(d, _)| now.get() >= *d)
            .map(|(d, origin)| (Cause::DeadlineExceeded { origin }, Some(d)));
        let implied = first_of(inherited, expired);
        let (chosen, ours) = match implied {
            Some(c) => (c, false),
            None => match explicit {
                Some(cause) => {
                    let at = self.flag(TIMED_DESCENDANTS).then(|| now.get());
                    ((cause, at), true)
                }
                None => return (None, false),
            },
        };
        if let Err(lost) = self.cause.set(chosen) {
            drop(lost);
            // Someone else recorded first: theirs stands (invariant 1).
            return (self.recorded(), false);
        }
        fence(Ordering::SeqCst);
        if self.flags.load(Ordering::Relaxed) & WATCHED != 0 {
            self.notify(cascade);
        }
        (self.recorded(), ours)
    }

    /// After the cause is set on a watched node: drains the registry (waking its wakers
    /// and pushing its children on `cascade`), cancels the token, and ends the timer.
    #[inline(never)]
    fn notify(&self, cascade: &mut Cascade) {
        let (registry, timer) = {
            let mut st = self.lock();
            if let Some(t) = &st.token {
                // Under our lock, which is safe (tokio-util never calls back into us) and
                // saves a clone; tokio-util wakes the waiters after releasing its own lock.
                t.cancel();
            }
            // The timer has nothing left to time (invariant 4): wake it so that it ends
            // now rather than at the deadline.
            (
                std::mem::take(&mut st.registry),
                std::mem::replace(&mut st.timer, TimerSlot::Idle),
            )
        };
        if let TimerSlot::Running(Some(waker)) = timer {
            waker.wake();
        }
        let recorded = self.recorded();
        for entry in registry.drain() {
            match entry {
                Entry::Waker(waker) => waker.wake(),
                Entry::Child(child) => {
                    if let Some(cause) = &recorded {
                        cascade.push((child, cause.clone()));
                    }
                }
            }
        }
    }

    /// Registers `waker` to be woken when the node records a cause. Returns its key, or
    /// `None` if the node already has a cause. The caller then links the node up
    /// ([`CancelNode::link_up`]) and resolves, to catch a cause recorded meanwhile.
    pub(crate) fn register(&self, waker: &Waker) -> Option<usize> {
        let key = {
            let mut st = self.lock();
            if self.is_done() {
                return None;
            }
            st.registry.insert(Entry::Waker(waker.clone()))
        };
        self.watch();
        Some(key)
    }

    /// Replaces the waker registered under `key`, unless it would wake the same task.
    /// Returns `false` if the registration is gone: the registry was drained, so the node
    /// has a cause (and the waker drained may have been another task's).
    pub(crate) fn update(&self, key: usize, waker: &Waker) -> bool {
        let mut st = self.lock();
        match st.registry.slot(key) {
            Some(Some(Entry::Waker(w))) => {
                if !w.will_wake(waker) {
                    let old = std::mem::replace(w, waker.clone());
                    drop(st);
                    drop(old); // outside the lock
                }
                true
            }
            _ => false,
        }
    }

    /// Removes the registration under `key` (a waiter that stops waiting).
    pub(crate) fn deregister(&self, key: usize) {
        let entry = self.lock().registry.remove(key);
        drop(entry); // the waker is dropped outside the lock
    }

    /// Links this node into its parent's registry, the parent into its own, and so on up
    /// to the first node already linked, once each, so that an ancestor's cause reaches
    /// this node's registry. One lock at a time, in a loop.
    pub(crate) fn link_up(self: &Arc<CancelNode>) {
        let mut node = self;
        while let Some(parent) = node.parent.as_ref() {
            {
                let mut st = node.lock();
                if st.link != Link::None {
                    return; // linked, or being linked by a thread that resolves afterwards
                }
                st.link = Link::Linking;
            }
            let key = {
                let mut pst = parent.lock();
                if parent.is_done() {
                    None
                } else {
                    Some(pst.registry.insert(Entry::Child(Arc::downgrade(node))))
                }
            };
            node.lock().link = key.map_or(Link::Settled, Link::Linked);
            let Some(_) = key else {
                return; // the parent has a cause: the caller's resolve finds it
            };
            parent.watch();
            node = parent;
        }
    }

    /// Live registrations (wakers and links) on this node.
    #[cfg(test)]
    pub(crate) fn registered(&self) -> usize {
        self.lock().registry.live
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
            let (token, fresh) = {
                let mut st = n.lock();
                match &st.token {
                    Some(t) => (t.clone(), false),
                    None => {
                        st.token = Some(above.clone());
                        (above, true)
                    }
                }
            };
            if fresh {
                n.watch();
                if n.is_done() {
                    token.cancel(); // invariant 2: the recorder may not have seen it
                }
            }
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
            if self.is_done() || matches!(st.timer, TimerSlot::Running(_)) {
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
        self.watch(); // the timer's waker must be woken by a cause
        handle.spawn(DeadlineTimer {
            node: Arc::downgrade(self),
            sleep: sleep_until(wheel_instant(at)),
            armed_for: at,
            ended: false,
        });
    }

    /// Sets a driven node's deadline, for everyone: its running timer re-reads it, and a
    /// node whose waiters sleep until a later deadline (or none), or whose owner's timer
    /// is set for a later one, gets its timer now, so nobody sleeps past the new one. A
    /// waiter whose deadline moved later or went away finds out when its `Sleep` fires,
    /// and records no cause that no longer applies. Returns `false` for a node whose
    /// deadline is fixed.
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
                self.flags.fetch_or(DRIVEN_SET, Ordering::Release);
            }
            if !self.is_done() {
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

    /// Whether the owner of a driven node times its deadline (and calls `expire` when it
    /// passes): while it does, waiters register without a `Sleep` for it. Switched off
    /// while the node is waited, uncancelled and has a deadline, the node's timer takes
    /// over (invariant 5).
    ///
    /// # Panics
    /// Outside a tokio runtime, when switched off while the node's timer must take over.
    pub(crate) fn set_owner_timed(self: &Arc<CancelNode>, on: bool) {
        if !self.driven {
            return;
        }
        let spawn_at = {
            let mut st = self.lock();
            let was = std::mem::replace(&mut st.owner_timed, on);
            if !was || on || self.is_done() || st.registry.live == 0 {
                return;
            }
            match (&st.timer, st.driven) {
                (TimerSlot::Waited, Some((at, _))) => {
                    st.timer = TimerSlot::Running(None);
                    at
                }
                _ => return,
            }
        };
        self.spawn_timer(spawn_at);
    }
}

/// Gives each child on the work list its parent's cause, and so on down the links, in a
/// loop (invariant 7).
fn run_cascade(mut cascade: Cascade, now: &mut LazyNow) {
    while let Some((child, cause)) = cascade.pop() {
        if let Some(child) = child.upgrade() {
            child.settle(Some(cause), None, now, &mut cascade);
            // `child` may be the last handle: its `Drop` locks its parent, which we do
            // not hold.
        }
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
        if node.flag(TIMED_DESCENDANTS) {
            break; // its ancestors were marked by whoever set it
        }
        node.flags.fetch_or(TIMED_DESCENDANTS, Ordering::Relaxed);
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
                if node.is_done() {
                    // `notify` reset the slot, or the cause came before the slot was set.
                    st.timer = TimerSlot::Idle;
                    *this.ended = true;
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
            // Records DeadlineExceeded (or an ancestor's earlier cause), which wakes the
            // node's waiters and links and cancels its token; the next turn ends.
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

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
