//! One mechanism for the thread's *current* request, connection and header clock: a value
//! that its owner lends to a thread-local for the length of one call or poll, and takes
//! back after, also when the call unwinds.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A thread-local slot that [`enter`] fills for the length of a call.
pub(crate) type Slot<T> = LocalKey<RefCell<Option<T>>>;

/// Runs `f` with `mine`'s value in `key` (the thread's current one), and puts it back in
/// `mine` after, also when `f` unwinds; whatever was current before is current again (an
/// outer request, or connection, polled further out on the same thread). A thread being
/// torn down has no current value: `f` then runs with none.
#[inline]
pub(crate) fn enter<T: 'static, R>(
    key: &'static Slot<T>,
    mine: &mut Option<T>,
    f: impl FnOnce() -> R,
) -> R {
    // Swapped in and out: while `f` runs, `mine` holds what was current before, so the
    // value (a request's scope is over a hundred bytes) moves twice and nothing else does.
    struct Leave<'a, T: 'static> {
        key: &'static Slot<T>,
        mine: &'a mut Option<T>,
    }

    impl<T: 'static> Drop for Leave<'_, T> {
        #[inline]
        fn drop(&mut self) {
            swap(self.key, self.mine);
        }
    }

    if !swap(key, mine) {
        return f();
    }
    let _leave = Leave { key, mine };
    f()
}

/// Swaps `mine` with `key`'s value; `false` on a thread being torn down.
#[inline]
fn swap<T: 'static>(key: &'static Slot<T>, mine: &mut Option<T>) -> bool {
    key.try_with(|current| std::mem::swap(&mut *current.borrow_mut(), mine))
        .is_ok()
}

/// `f` on the current value of `key`, if there is one, in place (`f` must not enter `key`
/// itself).
#[inline]
pub(crate) fn with<T: 'static, R>(key: &'static Slot<T>, f: impl FnOnce(&mut T) -> R) -> Option<R> {
    key.try_with(|current| current.borrow_mut().as_mut().map(f))
        .ok()
        .flatten()
}

/// Whether `key` has a current value, without touching it.
#[inline]
pub(crate) fn is_set<T: 'static>(key: &'static Slot<T>) -> bool {
    key.try_with(|current| current.borrow().is_some())
        .unwrap_or(false)
}
