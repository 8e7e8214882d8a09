//! `Context`, `Canceller` and their handles.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cause::{Cancelled, Cause, DeadlineOrigin};
use crate::future::{Run, WaitForCancel, Which, first};
use crate::node::{CancelNode, LazyNow};

/// A cancellation signal with a typed cause, an optional deadline, and request-scoped
/// values, passed down a call tree as Go passes `context.Context`.
///
/// A `Context` is an immutable handle: cloning it is cheap (two reference counts) and all
/// clones see the same cancellation. New contexts are derived from existing ones:
///
/// - [`with_cancel`](Context::with_cancel), [`with_deadline`](Context::with_deadline) and
///   [`with_timeout`](Context::with_timeout) return a child and the [`Canceller`] that
///   cancels it;
/// - [`with_value`](Context::with_value) returns a child carrying one more value;
/// - [`detached`](Context::detached) keeps the values and drops cancellation.
///
/// The rules, one sentence each:
///
/// - A child is cancelled when its parent is, with the parent's cause; cancelling a
///   child never touches its parent.
/// - A child's deadline is the earlier of its own and its parent's.
/// - The first cause wins and never changes: once [`cause`](Context::cause) has returned
///   a cause, it returns that cause forever.
/// - A passed deadline counts at once: [`is_cancelled`](Context::is_cancelled) and
///   [`cause`](Context::cause) compare the clock, so they are right even if no timer ran.
///
/// # Cost and runtime
///
/// A context with no deadline never creates a timer and works outside any runtime. A
/// deadline costs nothing until something waits, and then reaches every waiter when it
/// passes, whoever polls what: [`cancelled`](Context::cancelled), [`run`](Context::run)
/// and [`spawn`](Context::spawn) time the earliest deadline of the chain themselves (they
/// must be polled inside a tokio runtime with the time driver enabled), while
/// [`token`](Context::token) and [`on_cancel`](Context::on_cancel) spawn one timer task
/// for each deadline in the chain, once, and panic outside a tokio runtime if there is a
/// deadline to time. A waiter registers on the context (no allocation for the first
/// one); a `CancellationToken` is created only for [`token`](Context::token) and
/// [`on_cancel`](Context::on_cancel).
///
/// Timer tasks and `on_cancel` tasks never keep a context alive: they end when its last
/// handle (clones, children, cancellers, waiters) is gone.
///
/// ```
/// use std::time::Duration;
/// use reqctx::{Cause, Context, DeadlineOrigin};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let (ctx, _cancel) = Context::background().with_timeout(Duration::from_millis(50));
/// let slow = tokio::time::sleep(Duration::from_secs(10));
/// let err = ctx.run(slow).await.unwrap_err();
/// assert_eq!(err.cause(), &Cause::DeadlineExceeded { origin: DeadlineOrigin::Code });
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Context {
    cancel: Option<Arc<CancelNode>>, // None: never cancelled (background, detached)
    values: Option<Arc<dyn ValueEntry>>,
}

impl Context {
    /// The root of every tree: never cancelled, no deadline, no values.
    pub fn background() -> Context {
        Context {
            cancel: None,
            values: None,
        }
    }

    fn child(&self, deadline: Option<(Instant, DeadlineOrigin)>, driven: bool) -> Arc<CancelNode> {
        CancelNode::new(self.cancel.clone(), deadline, driven)
    }

    /// A child that is cancelled when `self` is, or when the returned [`Canceller`] says so
    /// (or is dropped).
    ///
    /// ```
    /// use reqctx::{Cause, Context};
    ///
    /// let (parent, cancel_parent) = Context::background().with_cancel();
    /// let (child, cancel_child) = parent.with_cancel();
    /// cancel_child.cancel();
    /// assert_eq!(child.cause(), Some(Cause::Cancelled));
    /// assert!(!parent.is_cancelled()); // never up the tree
    /// cancel_parent.cancel_with(Cause::Shutdown);
    /// assert_eq!(parent.cause(), Some(Cause::Shutdown));
    /// ```
    pub fn with_cancel(&self) -> (Context, Canceller) {
        let node = self.child(None, false);
        (self.with_node(node.clone()), Canceller::new(node))
    }

    /// A child whose deadline is the earlier of `deadline` and `self`'s. When it passes,
    /// the child is cancelled with [`Cause::DeadlineExceeded`], origin
    /// [`DeadlineOrigin::Code`] (or the parent's cause, if the parent's deadline was the
    /// earlier one). A deadline that has already passed gives a context that is already
    /// cancelled.
    ///
    /// `deadline` is a `tokio::time::Instant`, so paused and advanced test clocks apply.
    pub fn with_deadline(&self, deadline: Instant) -> (Context, Canceller) {
        let node = self.child(Some((deadline, DeadlineOrigin::Code)), false);
        (self.with_node(node.clone()), Canceller::new(node))
    }

    /// `with_deadline(Instant::now() + timeout)`.
    ///
    /// A timeout too large to be represented (for example `Duration::MAX`) means no
    /// deadline of its own: the child behaves as [`with_cancel`](Context::with_cancel).
    ///
    /// ```
    /// use std::time::Duration;
    /// use reqctx::Context;
    ///
    /// let (ctx, _cancel) = Context::background().with_timeout(Duration::MAX);
    /// assert_eq!(ctx.deadline(), None);
    /// ```
    pub fn with_timeout(&self, timeout: Duration) -> (Context, Canceller) {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => self.with_deadline(deadline),
            None => self.with_cancel(),
        }
    }

    /// A child whose deadline is set and timed by middleware, not by this crate, for
    /// layers that own a request's timer (see [`DeadlineDriver`]). Application code
    /// wants [`with_deadline`](Context::with_deadline) instead.
    ///
    /// The driven deadline reaches waiters on the child (and its descendants) as a fixed
    /// one does, wherever the driver moves it, so every waiter wakes when it passes even
    /// if the owner is never polled. The owner may still call [`DeadlineDriver::expire`]
    /// from its own timer, to learn the cause at once.
    /// Not part of the API: the plumbing of tower-reqctx's layer, which may change in any
    /// release.
    #[doc(hidden)]
    pub fn with_driven_deadline(
        &self,
        deadline: Option<(Instant, DeadlineOrigin)>,
    ) -> (Context, DeadlineDriver) {
        let driver = self.driven(deadline);
        (driver.context(), driver)
    }

    /// How many contexts made by [`with_driven_deadline`](Context::with_driven_deadline)
    /// are alive in this process: under tower-reqctx, one per request whose context (or a
    /// clone, or a child of it) is still held somewhere. A cheap relaxed counter, for leak
    /// checks and metrics; it falls back to zero when every request is done and nothing
    /// kept its context.
    #[doc(hidden)]
    pub fn live_driven_contexts() -> usize {
        crate::node::live_driven()
    }

    /// The context's node, for the node's tests.
    #[cfg(test)]
    pub(crate) fn node(&self) -> Option<&Arc<CancelNode>> {
        self.cancel.as_ref()
    }

    fn with_node(&self, node: Arc<CancelNode>) -> Context {
        Context {
            cancel: Some(node),
            values: self.values.clone(),
        }
    }

    /// A child carrying `value`, found by [`value::<T>()`](Context::value) on the child and
    /// its descendants. The key is the type: define a newtype per value. A nearer value of
    /// the same type shadows a farther one. Cancellation is the parent's.
    ///
    /// ```
    /// use reqctx::Context;
    ///
    /// #[derive(Debug, PartialEq)]
    /// struct UserIp(std::net::IpAddr);
    ///
    /// let ctx = Context::background().with_value(UserIp([127, 0, 0, 1].into()));
    /// let (child, _cancel) = ctx.with_cancel();
    /// assert_eq!(child.value::<UserIp>(), Some(&UserIp([127, 0, 0, 1].into())));
    /// assert_eq!(child.value::<u32>(), None);
    /// ```
    pub fn with_value<T: Send + Sync + 'static>(&self, value: T) -> Context {
        Context {
            cancel: self.cancel.clone(),
            values: Some(Arc::new(ValueNode {
                parent: self.values.clone(),
                value,
            })),
        }
    }

    /// The nearest value of type `T`, if any. Looks up the chain of values: O(number of
    /// values), typically a handful.
    pub fn value<T: 'static>(&self) -> Option<&T> {
        let mut entry = self.values.as_deref();
        while let Some(e) = entry {
            if let Some(v) = e.value().downcast_ref::<T>() {
                return Some(v);
            }
            entry = e.parent();
        }
        None
    }

    /// A context with the same values and no cancellation and no deadline (Go's
    /// `WithoutCancel`), for work that must outlive the request, such as an audit write.
    ///
    /// ```
    /// use reqctx::Context;
    ///
    /// let (ctx, cancel) = Context::background().with_value(7u8).with_cancel();
    /// let detached = ctx.detached();
    /// cancel.cancel();
    /// assert!(ctx.is_cancelled());
    /// assert!(!detached.is_cancelled());
    /// assert_eq!(detached.value::<u8>(), Some(&7));
    /// ```
    pub fn detached(&self) -> Context {
        Context {
            cancel: None,
            values: self.values.clone(),
        }
    }

    /// Resolves once the context is cancelled; never, for a context that cannot be.
    ///
    /// A deadline in the chain, fixed or driven, wakes it when it passes, whether or not
    /// anything else is polled: from its first poll it times the earliest itself, unless
    /// that is a driven deadline its owner times (see [`DeadlineDriver::owner_times`]).
    /// An ancestor's cancellation wakes it too.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: dropping the future loses nothing, and a new call waits for the same
    /// event. Use it in `tokio::select!` freely.
    ///
    /// Polling it needs a tokio runtime with the time driver if the context (or an
    /// ancestor) has a deadline, fixed or driven.
    pub fn cancelled(&self) -> WaitForCancel {
        WaitForCancel::new(self.cancel.clone())
    }

    /// Whether the context is cancelled. Compares deadlines with the clock, so a passed
    /// deadline counts even if no timer ran.
    pub fn is_cancelled(&self) -> bool {
        self.cause_recorded().is_some()
    }

    /// Why the context was cancelled, or `None` while it is not. Once it returns
    /// `Some(cause)`, it always returns the same cause.
    pub fn cause(&self) -> Option<Cause> {
        self.cause_recorded()
    }

    fn cause_recorded(&self) -> Option<Cause> {
        let node = self.cancel.as_ref()?;
        node.resolve(&mut LazyNow::new()).map(|(cause, _)| cause)
    }

    /// `Err(Cancelled)` if the context is cancelled: a checkpoint for loops and
    /// synchronous work, used with `?`.
    ///
    /// ```
    /// use reqctx::{Cancelled, Context};
    ///
    /// fn work(ctx: &Context, items: &[u32]) -> Result<u32, Cancelled> {
    ///     let mut sum = 0;
    ///     for i in items {
    ///         ctx.check()?;
    ///         sum += i;
    ///     }
    ///     Ok(sum)
    /// }
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// assert_eq!(work(&ctx, &[1, 2]), Ok(3));
    /// cancel.cancel();
    /// assert!(work(&ctx, &[1, 2]).is_err());
    /// ```
    pub fn check(&self) -> Result<(), Cancelled> {
        match self.cause_recorded() {
            Some(cause) => Err(Cancelled::new(cause)),
            None => Ok(()),
        }
    }

    /// The earliest deadline of this context and its ancestors.
    pub fn deadline(&self) -> Option<Instant> {
        self.cancel.as_ref()?.deadline()
    }

    /// Where the context's [`deadline`](Context::deadline) came from: the
    /// [`DeadlineOrigin`] that [`Cause::DeadlineExceeded`] will carry when it passes.
    ///
    /// A service that sent its budget downstream reads a downstream timeout through this
    /// as its own deadline: the budget it sent was its own, set by whoever set it here.
    ///
    /// ```
    /// use std::time::Duration;
    /// use reqctx::{Context, DeadlineOrigin};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// assert_eq!(Context::background().deadline_origin(), None);
    /// let (ctx, _cancel) = Context::background().with_timeout(Duration::from_secs(1));
    /// assert_eq!(ctx.deadline_origin(), Some(DeadlineOrigin::Code));
    /// # }
    /// ```
    pub fn deadline_origin(&self) -> Option<DeadlineOrigin> {
        self.cancel.as_ref()?.earliest_deadline().map(|(_, o)| o)
    }

    /// The time left until [`deadline`](Context::deadline), zero once it has passed.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Races `work` against cancellation: `Ok(output)` if the work finishes first,
    /// `Err(Cancelled)` with the cause if the context is cancelled first. On
    /// cancellation the work is dropped at its next `.await` point.
    ///
    /// Which wins a race: cancellation is checked before the work on every poll, so work
    /// is never polled once the context is known to be cancelled, and work that is ready
    /// in the same poll in which the cancellation is first seen loses. Work that completes
    /// without ever yielding costs no registration and no timer.
    ///
    /// # Cancellation safety
    ///
    /// As cancel-safe as `work`: dropping the returned future drops `work`.
    pub fn run<F: Future>(&self, work: F) -> Run<F> {
        Run::new(work, self.cancelled())
    }

    /// Spawns `work` on the current tokio runtime, bound to this context: when the context
    /// is cancelled, the task's future is dropped and the handle yields `Err(Cancelled)`.
    /// The task holds a clone of the context while it runs.
    ///
    /// # Cancellation safety
    ///
    /// Dropping the `JoinHandle` detaches the task; it still ends when the context does.
    ///
    /// # Panics
    /// Outside a tokio runtime, as `tokio::spawn`.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<Result<F::Output, Cancelled>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        tokio::spawn(self.run(work))
    }

    /// A tokio-util token cancelled when this context is, for code that speaks
    /// `CancellationToken`. Cancelling the returned token (or a clone) does **not** cancel
    /// the context: read the cause from the context, not the token.
    ///
    /// A token follows its context while the context lives: once the context's last
    /// handle (clones, children, cancellers) is gone uncancelled, its deadline no longer
    /// reaches the token, which is then cancelled only by a cancelled ancestor.
    ///
    /// # Panics
    /// Outside a tokio runtime, if the context or an ancestor has a deadline (one timer
    /// task is spawned for each such deadline, once).
    pub fn token(&self) -> CancellationToken {
        match &self.cancel {
            Some(node) => {
                // A deadline already passed but not yet recorded cancels the token now;
                // one still to come gets its timer.
                if node.resolve(&mut LazyNow::new()).is_none() {
                    node.arm_timers();
                }
                // A child: cancelling what we hand out must not cancel the context.
                node.token().child_token()
            }
            None => CancellationToken::new(),
        }
    }

    /// Runs `f` with the cause once the context is cancelled, on a tokio task of its own
    /// (Go's `AfterFunc`). If the context is already cancelled, `f` runs soon.
    ///
    /// `f` runs if the context is cancelled while it lives: the task does not keep the
    /// context alive, and once the context's last handle (clones, children, cancellers)
    /// is gone uncancelled, the task ends without running `f`. (Dropping an armed
    /// [`Canceller`] cancels first, so `f` runs.)
    ///
    /// Dropping the returned [`OnCancel`] does not stop `f`; [`OnCancel::stop`] does.
    ///
    /// # Panics
    /// Outside a tokio runtime, unless the context can never be cancelled (then `f`
    /// never runs and nothing is spawned).
    pub fn on_cancel<F>(&self, f: F) -> OnCancel
    where
        F: FnOnce(&Cause) + Send + 'static,
    {
        let state = Arc::new(AtomicU8::new(PENDING));
        let Some(node) = &self.cancel else {
            return OnCancel { state, task: None };
        };
        let st = state.clone();
        let run = move |cause: Option<Cause>| {
            if let Some(cause) = cause {
                if st
                    .compare_exchange(PENDING, RAN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    f(&cause);
                }
            }
        };
        let task = match node.resolve(&mut LazyNow::new()) {
            Some((cause, _)) => tokio::spawn(async move { run(Some(cause)) }),
            None => {
                // Nothing here holds the node itself (invariant 6 in `node.rs`).
                node.arm_timers();
                let token = node.token();
                let hooks = node.hooks();
                let weak = Arc::downgrade(node);
                tokio::spawn(async move {
                    let cause = match first(token.cancelled(), hooks.gone()).await {
                        Which::Left(()) => match weak.upgrade() {
                            Some(node) => node.resolve(&mut LazyNow::new()).map(|(c, _)| c),
                            // Its last handle is being dropped right now: `Drop` says
                            // whether it was cancelled first.
                            None => {
                                hooks.gone().await;
                                hooks.last_cause()
                            }
                        },
                        Which::Right(()) => hooks.last_cause(),
                    };
                    run(cause);
                })
            }
        };
        OnCancel {
            state,
            task: Some(task.abort_handle()),
        }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut values = Vec::new();
        let mut entry = self.values.as_deref();
        while let Some(e) = entry {
            values.push(e.type_name());
            entry = e.parent();
        }
        f.debug_struct("Context")
            .field("cancellable", &self.cancel.is_some())
            .field("cause", &self.cause())
            .field("deadline", &self.deadline())
            .field("values", &values)
            .finish()
    }
}

/// Cancels the context it was returned with, with [`Cause::Cancelled`] or a cause of your
/// choice. Dropping it cancels too, so a forgotten cancel cannot leave a context alive;
/// [`disarm`](Canceller::disarm) opts out.
///
/// Cancelling is idempotent (the first cause wins) and does not wait for the work to stop.
#[must_use = "dropping a Canceller cancels its context at once; bind it, or call disarm()"]
pub struct Canceller {
    node: Arc<CancelNode>,
    armed: bool,
}

impl Canceller {
    fn new(node: Arc<CancelNode>) -> Canceller {
        Canceller { node, armed: true }
    }

    /// Cancels with [`Cause::Cancelled`]. Returns `true` if this call's cause was
    /// recorded, `false` if the context already had one (from this canceller, an ancestor
    /// or a passed deadline).
    pub fn cancel(&self) -> bool {
        self.node.cancel(Cause::Cancelled)
    }

    /// Cancels with `cause`. Returns `true` if `cause` was recorded.
    pub fn cancel_with(&self, cause: Cause) -> bool {
        self.node.cancel(cause)
    }

    /// Whether the context this canceller cancels is cancelled, for whatever cause.
    pub fn is_cancelled(&self) -> bool {
        self.node.resolve(&mut LazyNow::new()).is_some()
    }

    /// Drops the canceller without cancelling: the context then ends only with its parent
    /// or its deadline.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Canceller {
    fn drop(&mut self) {
        if self.armed {
            self.node.cancel(Cause::Cancelled);
        }
    }
}

impl fmt::Debug for Canceller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Canceller")
            .field("armed", &self.armed)
            .field("done", &self.node.is_done())
            .finish()
    }
}

/// The owner's handle of a context made by [`Context::driven`] (or
/// [`Context::with_driven_deadline`]): it moves the deadline, records causes and reports
/// when the deadline passes. Like a [`Canceller`], it cancels (with [`Cause::Cancelled`])
/// when dropped unless the context already has a cause.
///
/// **Lazy birth.** Until something asks for the context ([`context`](Self::context),
/// [`handle`](Self::handle)), the driver allocates nothing and takes no lock: it keeps the
/// deadline and the first cause inline, and reads its parent's cause (and compares its
/// deadline with the clock) when asked, exactly as the context's node would. The first
/// request for the context makes the node, with the deadline and any cause already
/// recorded, so what every reader sees is the same as if the node had been made at once.
///
/// Moving the deadline takes `&mut`: one owner drives it ([`DeadlineHandle`] moves a made
/// context's from elsewhere).
///
/// ```
/// use std::time::Duration;
/// use reqctx::{Cause, Context, DeadlineOrigin};
/// use tokio::time::Instant;
///
/// let mut driver = Context::background().driven(None);
/// let soon = Instant::now() + Duration::from_secs(1);
/// driver.set_deadline(Some((soon, DeadlineOrigin::Layer)));
/// let ctx = driver.context(); // the node is made here
/// assert_eq!(ctx.deadline(), Some(soon));
/// driver.cancel_with(Cause::Completed);
/// assert_eq!(ctx.cause(), Some(Cause::Completed));
/// ```
#[doc(hidden)]
#[must_use = "dropping a DeadlineDriver cancels its context at once"]
pub struct DeadlineDriver {
    /// The parent's cancellation, and the values the context carries (the parent's, plus
    /// any added by [`DeadlineDriver::with_value`]).
    parent: Context,
    /// Until birth: the own deadline, and the first cause (with its instant, if known).
    deadline: Option<(Instant, DeadlineOrigin)>,
    // One word, set once by compare-and-swap (`Word`); a custom cause waits in `custom`.
    // Its instant is not kept: no descendant exists before birth to compare it with.
    word: AtomicU8,
    /// Until birth: the owner times the deadline (see `owner_times`).
    owner_timed: AtomicBool,
    custom: OnceLock<Box<Cause>>, // boxed: rare, and it keeps the driver small
    /// The node, once something asked for the context; cancelled (`Cancelled`) when the
    /// driver drops, as by a `Canceller`.
    born: OnceLock<Arc<CancelNode>>,
}

impl Context {
    /// A driven context that is not made yet: see [`DeadlineDriver`]. Nothing is allocated
    /// until [`DeadlineDriver::context`] is called.
    ///
    /// Not part of the API: the plumbing of tower-reqctx's layer, which may change in any
    /// release.
    #[doc(hidden)]
    pub fn driven(&self, deadline: Option<(Instant, DeadlineOrigin)>) -> DeadlineDriver {
        crate::node::unborn_driven(self.cancel.as_deref());
        DeadlineDriver {
            parent: self.clone(),
            deadline,
            word: AtomicU8::new(word::NONE),
            owner_timed: AtomicBool::new(false),
            custom: OnceLock::new(),
            born: OnceLock::new(),
        }
    }
}

impl DeadlineDriver {
    /// The node, made on first use with what the driver recorded so far.
    fn node(&self) -> &Arc<CancelNode> {
        self.born.get_or_init(|| {
            let node = CancelNode::new(self.parent.cancel.clone(), self.deadline, true);
            crate::node::born_driven(); // the node counts itself from now on
            if self.owner_timed.load(Ordering::Relaxed) {
                node.set_owner_timed(true);
            }
            if let Some(cause) = self.recorded() {
                node.adopt((cause, None));
            }
            node
        })
    }

    /// The cause an unborn context has now: the first recorded, else its parent's or its
    /// passed deadline's (the earlier of the two, as a node decides), recorded here.
    /// The cause recorded before birth, if any.
    fn recorded(&self) -> Option<Cause> {
        match self.word.load(Ordering::Acquire) {
            word::NONE => None,
            word::CUSTOM => self.custom.get().map(|c| Cause::clone(c)),
            w => word::decode(w),
        }
    }

    /// Records `cause` unless a cause was recorded first. Returns whether it was.
    fn record(&self, cause: Cause) -> bool {
        let w = match word::encode(&cause) {
            Some(w) => w,
            None => {
                // Set before the word is, so a reader who sees the word finds it; a cause
                // that then loses the word is never read.
                if self.custom.set(Box::new(cause)).is_err() {
                    return false; // another custom cause is being recorded, or was
                }
                word::CUSTOM
            }
        };
        self.word
            .compare_exchange(word::NONE, w, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn resolve_unborn(&self) -> Option<Cause> {
        if let Some(cause) = self.recorded() {
            return Some(cause);
        }
        if self.parent.cancel.is_none() && self.deadline.is_none() {
            return None; // nothing to inherit, no deadline: nothing implied
        }
        let mut now = LazyNow::new();
        let inherited = self
            .parent
            .cancel
            .as_ref()
            .and_then(|p| p.resolve(&mut now));
        let expired = self
            .deadline
            .filter(|(d, _)| now.get() >= *d)
            .map(|(d, origin)| (Cause::DeadlineExceeded { origin }, Some(d)));
        let (implied, _) = crate::node::first_of(inherited, expired)?;
        if self.record(implied.clone()) {
            return Some(implied);
        }
        self.recorded() // another thread recorded one first
    }

    fn resolve(&self) -> Option<Cause> {
        match self.born.get() {
            Some(node) => node.resolve(&mut LazyNow::new()).map(|(cause, _)| cause),
            None => self.resolve_unborn(),
        }
    }

    /// The context (made now, if it was not yet), with the parent's values and any added
    /// by [`with_value`](Self::with_value).
    pub fn context(&self) -> Context {
        Context {
            cancel: Some(self.node().clone()),
            values: self.parent.values.clone(),
        }
    }

    /// Whether the context has been made.
    pub fn is_born(&self) -> bool {
        self.born.get().is_some()
    }

    /// Adds `value` to the contexts handed out from now on (Go's `WithValue` on the
    /// request): earlier ones keep what they had.
    pub fn with_value<T: Send + Sync + 'static>(&mut self, value: T) {
        self.parent = self.parent.with_value(value);
    }

    /// Replaces the context's own deadline (`None` removes it), for everyone: contexts
    /// derived from it see the new deadline, and waiters wake at the new deadline, not
    /// the old one. A deadline already passed is not undone once a cause is recorded.
    ///
    /// # Panics
    /// Outside a tokio runtime, when something waits on the context and `deadline` is
    /// `Some` (its timer is spawned then).
    pub fn set_deadline(&mut self, deadline: Option<(Instant, DeadlineOrigin)>) {
        match self.born.get() {
            Some(node) => {
                CancelNode::set_driven(node, deadline);
            }
            None => self.deadline = deadline,
        }
    }

    /// The context's own deadline and its origin.
    pub fn deadline(&self) -> Option<(Instant, DeadlineOrigin)> {
        match self.born.get() {
            Some(node) => node.own_deadline(),
            None => self.deadline,
        }
    }

    /// A handle that can move the deadline but not cancel, for code that refines the
    /// deadline of a context it does not own. Makes the context.
    pub fn handle(&self) -> DeadlineHandle {
        DeadlineHandle {
            node: self.node().clone(),
        }
    }

    /// Cancels with [`Cause::Cancelled`], as [`Canceller::cancel`].
    pub fn cancel(&self) -> bool {
        self.cancel_with(Cause::Cancelled)
    }

    /// Cancels with `cause` unless the context already has one (recorded, its parent's, or
    /// a passed deadline). Returns `true` if `cause` is the one recorded.
    pub fn cancel_with(&self, cause: Cause) -> bool {
        match self.born.get() {
            Some(node) => node.cancel(cause),
            None => {
                if self.resolve_unborn().is_some() {
                    return false;
                }
                self.record(cause)
            }
        }
    }

    /// Whether the context is cancelled, for whatever cause.
    pub fn is_cancelled(&self) -> bool {
        self.resolve().is_some()
    }

    /// Whether the owner times the driven deadline itself: while `on`, the owner promises
    /// to call [`expire`](DeadlineDriver::expire) once the deadline passes (it is polled
    /// by a timer of its own, set for [`deadline`](DeadlineDriver::deadline) as it reads it
    /// on each poll), so waiters on the context (and its descendants) whose earliest
    /// deadline is this one arm no timer of their own: they are woken by the cause the
    /// owner records. Switch it off when the owner stops being polled by its timer (the
    /// response went on to the body, or the owner is about to be dropped without a cause):
    /// if something waits on the context then, the context's own timer takes over, so no
    /// waiter sleeps past the deadline. A deadline moved earlier while the owner times it
    /// and something waits is timed by the context's timer too, until the owner's next
    /// poll. Off when the driver is made; dropping the driver cancels the context, which
    /// needs no timer.
    ///
    /// ```
    /// use std::time::Duration;
    /// use reqctx::{Cause, Context, DeadlineOrigin};
    /// use tokio::time::Instant;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let at = Instant::now() + Duration::from_secs(1);
    /// let (ctx, driver) =
    ///     Context::background().with_driven_deadline(Some((at, DeadlineOrigin::Layer)));
    /// driver.owner_times(true);
    /// let waiter = tokio::spawn(async move {
    ///     ctx.cancelled().await; // arms no timer of its own
    ///     ctx.cause()
    /// });
    /// tokio::time::sleep_until(at).await; // the owner's own timer
    /// driver.expire();
    /// let exceeded = Cause::DeadlineExceeded { origin: DeadlineOrigin::Layer };
    /// assert_eq!(waiter.await.unwrap(), Some(exceeded));
    /// # }
    /// ```
    ///
    /// # Panics
    /// Outside a tokio runtime, when switched off while something waits on the context
    /// and it has a deadline (its timer is spawned then).
    pub fn owner_times(&self, on: bool) {
        match self.born.get() {
            Some(node) => node.set_owner_timed(on),
            // Applied when the node is made.
            None => self.owner_timed.store(on, Ordering::Relaxed),
        }
    }

    /// Records [`Cause::DeadlineExceeded`] if the deadline has passed and the context had
    /// no cause yet, for an owner whose own timer fired (the context's timer does the same
    /// for waiters). Returns the context's cause, if it has one now.
    pub fn expire(&self) -> Option<Cause> {
        self.resolve()
    }
}

impl Drop for DeadlineDriver {
    fn drop(&mut self) {
        match self.born.get() {
            Some(node) => {
                node.cancel(Cause::Cancelled);
            }
            None => crate::node::unborn_dropped(),
        }
    }
}

impl fmt::Debug for DeadlineDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineDriver")
            .field("deadline", &self.deadline())
            .field("born", &self.is_born())
            .field("done", &self.is_cancelled())
            .finish()
    }
}

/// Moves the deadline of a context made by [`Context::with_driven_deadline`], without the
/// power to cancel it. Made by [`DeadlineDriver::handle`]; dropping it does nothing.
#[doc(hidden)]
#[derive(Clone)]
pub struct DeadlineHandle {
    node: Arc<CancelNode>,
}

impl DeadlineHandle {
    /// As [`DeadlineDriver::set_deadline`]: waiters follow the new deadline at once, and
    /// the driver's owner sees it the next time it reads [`DeadlineDriver::deadline`].
    ///
    /// # Panics
    /// As [`DeadlineDriver::set_deadline`].
    pub fn set_deadline(&self, deadline: Option<(Instant, DeadlineOrigin)>) {
        CancelNode::set_driven(&self.node, deadline);
    }

    /// The context's own deadline and its origin.
    pub fn deadline(&self) -> Option<(Instant, DeadlineOrigin)> {
        self.node.own_deadline()
    }
}

impl fmt::Debug for DeadlineHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineHandle")
            .field("deadline", &self.deadline())
            .finish()
    }
}

const PENDING: u8 = 0;
const RAN: u8 = 1;
const STOPPED: u8 = 2;

/// The handle returned by [`Context::on_cancel`].
#[derive(Debug)]
pub struct OnCancel {
    state: Arc<AtomicU8>,
    task: Option<tokio::task::AbortHandle>,
}

impl OnCancel {
    /// Prevents the callback from running. Returns `true` if this call stopped it,
    /// `false` if it has already started (or was already stopped), as Go's `stop`.
    pub fn stop(&self) -> bool {
        let stopped = self
            .state
            .compare_exchange(PENDING, STOPPED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if stopped {
            if let Some(task) = &self.task {
                task.abort();
            }
        }
        stopped
    }
}

/// One link of the value chain; `ValueNode<T>` behind a trait object keeps it to one
/// allocation per value.
trait ValueEntry: Send + Sync {
    fn value(&self) -> &dyn Any;
    fn parent(&self) -> Option<&dyn ValueEntry>;
    fn type_name(&self) -> &'static str;
    fn take_parent(&mut self) -> Option<Arc<dyn ValueEntry>>;
}

struct ValueNode<T> {
    parent: Option<Arc<dyn ValueEntry>>, // taken only by `Drop`
    value: T,
}

impl<T> Drop for ValueNode<T> {
    fn drop(&mut self) {
        // Unlink the ancestors this node held last, one by one: a recursive `Arc` drop
        // would use stack in proportion to the chain's length.
        let mut next = self.parent.take();
        while let Some(mut entry) = next {
            next = match Arc::get_mut(&mut entry) {
                Some(unique) => unique.take_parent(),
                None => None, // shared: whoever drops it last unlinks the rest
            };
            // `entry` drops here with no parent, or is shared and only decremented.
        }
    }
}

impl<T: Send + Sync + 'static> ValueEntry for ValueNode<T> {
    fn value(&self) -> &dyn Any {
        &self.value
    }

    fn parent(&self) -> Option<&dyn ValueEntry> {
        self.parent.as_deref()
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }

    fn take_parent(&mut self) -> Option<Arc<dyn ValueEntry>> {
        self.parent.take()
    }
}

/// The causes a lazy driver records in one byte; a custom cause is `CUSTOM`, kept aside.
mod word {
    use crate::cause::{Cause, DeadlineOrigin};

    pub(super) const NONE: u8 = 0;
    pub(super) const CUSTOM: u8 = 0xff;
    const DEADLINE: u8 = 0x10; // + the origin's index

    const ORIGINS: [DeadlineOrigin; 4] = [
        DeadlineOrigin::Query,
        DeadlineOrigin::Header,
        DeadlineOrigin::Layer,
        DeadlineOrigin::Code,
    ];

    pub(super) fn encode(cause: &Cause) -> Option<u8> {
        Some(match cause {
            Cause::ClientDisconnected => 1,
            Cause::Completed => 2,
            Cause::Shutdown => 3,
            Cause::Cancelled => 4,
            Cause::DeadlineExceeded { origin } => {
                DEADLINE + ORIGINS.iter().position(|o| o == origin)? as u8
            }
            _ => return None,
        })
    }

    pub(super) fn decode(w: u8) -> Option<Cause> {
        Some(match w {
            1 => Cause::ClientDisconnected,
            2 => Cause::Completed,
            3 => Cause::Shutdown,
            4 => Cause::Cancelled,
            w if w >= DEADLINE => Cause::DeadlineExceeded {
                origin: *ORIGINS.get(usize::from(w - DEADLINE))?,
            },
            _ => return None,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_cause_but_a_custom_one_round_trips_through_a_word() {
            let mut causes = vec![
                Cause::ClientDisconnected,
                Cause::Completed,
                Cause::Shutdown,
                Cause::Cancelled,
            ];
            causes.extend(ORIGINS.map(|origin| Cause::DeadlineExceeded { origin }));
            for cause in causes {
                let w = encode(&cause).unwrap();
                assert!(w != NONE && w != CUSTOM);
                assert_eq!(decode(w), Some(cause));
            }
            assert_eq!(encode(&Cause::custom(std::fmt::Error)), None);
        }
    }
}
