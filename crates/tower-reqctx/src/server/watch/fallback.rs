//! Elsewhere than Linux: no OS watch. A [`Watch`] only holds its callback for
//! [`Watch::fire`], so only hyper's own detection and failed writes apply.

use std::fmt;
use std::io;
use std::sync::{Mutex, PoisonError};

use super::OnClose;

#[cfg(not(windows))]
type Socket<'a> = std::os::fd::BorrowedFd<'a>;
#[cfg(windows)]
type Socket<'a> = std::os::windows::io::BorrowedSocket<'a>;

/// Watches nothing on this system; see the [module docs](super).
#[derive(Clone, Debug)]
pub(crate) struct Watcher {
    _private: (),
}

/// Holds a callback that only [`Watch::fire`] runs; dropping it drops the callback.
pub(crate) struct Watch {
    on_close: Mutex<Option<OnClose>>, // taken by the first `fire`
}

impl Watcher {
    /// Same signature as on Linux; never fails here.
    pub(crate) fn new() -> io::Result<Watcher> {
        Ok(Watcher { _private: () })
    }

    /// Keeps `on_close` for [`Watch::fire`]; the socket is not watched.
    pub(crate) fn watch(
        &self,
        _socket: Socket<'_>,
        _half_close: bool,
        on_close: OnClose,
    ) -> io::Result<Watch> {
        Ok(Watch {
            on_close: Mutex::new(Some(on_close)),
        })
    }
}

/// No OS watch here, so no reset is known before a read or write fails.
pub(crate) fn was_reset(_socket: Socket<'_>) -> bool {
    false
}

impl Watch {
    /// Runs the callback now, on this thread, if it has not run.
    pub(crate) fn fire(&self) {
        let on_close = self
            .on_close
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(on_close) = on_close {
            on_close();
        }
    }
}

impl Watch {
    /// Drops the callback without running it.
    pub(crate) fn stop(&mut self, _socket: Socket<'_>) {
        self.on_close
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}
