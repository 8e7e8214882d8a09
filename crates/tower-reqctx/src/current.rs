//! One mechanism for the thread's *current* request, connection and header clock: a value
//! that its owner lends to a thread-local for the length of one call or poll, and takes
//! back after, also when the call unwinds.

use std::cell::Cell;
use std::thread::LocalKey;

/// A thread-local slot that [`enter`] fills for the length of a call.
pub(crate) type Slot<T> = LocalKey<Cell<Option<T>>>;

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
    struct Restore<'a, T: 'static> {
        key: &'static Slot<T>,
        outer: Option<T>,
        mine: &'a mut Option<T>,
    }

    impl<T: 'static> Drop for Restore<'_, T> {
        #[inline]
        fn drop(&mut self) {
            let outer = self.outer.take();
            if let Ok(lent) = self.key.try_with(|current| current.replace(outer)) {
                *self.mine = lent;
            }
        }
    }

    let Ok(outer) = key.try_with(|current| current.replace(mine.take())) else {
        return f();
    };
    let _restore = Restore { key, outer, mine };
    f()
}

/// `f` on the current value of `key`, if there is one. The value is taken out for the
/// length of `f` (which must not enter `key` itself) and put back.
#[inline]
pub(crate) fn with<T: 'static, R>(key: &'static Slot<T>, f: impl FnOnce(&mut T) -> R) -> Option<R> {
    key.try_with(|current| {
        let mut value = current.take();
        let out = value.as_mut().map(f);
        current.set(value);
        out
    })
    .ok()
    .flatten()
}
