//! The socket under a connection, as the watcher holds it: a file descriptor on Unix, a
//! socket on Windows.

#[cfg(not(windows))]
pub(crate) use std::os::fd::{AsFd as AsSocket, BorrowedFd as BorrowedSocket};
#[cfg(windows)]
pub(crate) use std::os::windows::io::{AsSocket, BorrowedSocket};

#[cfg(not(windows))]
pub(crate) fn borrow<I: AsSocket>(io: &I) -> BorrowedSocket<'_> {
    io.as_fd()
}

#[cfg(windows)]
pub(crate) fn borrow<I: AsSocket>(io: &I) -> BorrowedSocket<'_> {
    io.as_socket()
}
