//! Go-style contexts for Rust: a cancellation signal with a typed [`Cause`], a deadline,
//! and request-scoped values, handed down a call tree.
//!
//! ```
//! use std::time::Duration;
//! use reqctx::{Cause, Context, DeadlineOrigin};
//!
//! #[derive(Debug)]
//! struct UserId(u64);
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A server gives each request a context; here we make one by hand.
//! let (request, _cancel) = Context::background().with_timeout(Duration::from_secs(2));
//! let request = request.with_value(UserId(42));
//!
//! // Pass it to every call; each may narrow the deadline for its own part.
//! let (db, _cancel_db) = request.with_timeout(Duration::from_millis(100));
//! let query = tokio::time::sleep(Duration::from_secs(1)); // a slow database
//! let err = db.run(query).await.unwrap_err();
//! assert_eq!(err.cause(), &Cause::DeadlineExceeded { origin: DeadlineOrigin::Code });
//!
//! // The request itself is still alive, and its values reach every descendant.
//! assert!(!request.is_cancelled());
//! assert_eq!(db.value::<UserId>().map(|u| u.0), Some(42));
//! # }
//! ```
//!
//! # The rules
//!
//! - A child is cancelled when its parent is, with the parent's cause; cancelling a child
//!   never touches its parent.
//! - A child's deadline is the earlier of its own and its parent's: if the parent's
//!   deadline is already earlier, `with_deadline(d)` behaves as `with_cancel()`.
//! - [`Canceller::cancel`] is idempotent and does not wait for the work to stop. Dropping a
//!   [`Canceller`] cancels; [`Canceller::disarm`] opts out.
//! - The first cause wins and never changes. When two causes race (say, a deadline and a
//!   client disconnect), the one recorded first wins, and every later reader sees it; a
//!   deadline counts from the instant it passed, even if nobody looked until later.
//! - Values are immutable, inherited by children, looked up by type; the nearest wins.
//! - A deadline reaches every waiter when it passes, whoever polls what; a deadline that
//!   its middleware moves (a route's own timeout) moves for every waiter.
//! - Nothing this crate spawns keeps a context alive: a token follows its context while
//!   the context lives, and an [`on_cancel`](Context::on_cancel) callback runs if the
//!   context is cancelled while it lives.
//!
//! # Cancellation safety
//!
//! [`Context::cancelled`] is cancel-safe. [`Context::run`] is as cancel-safe as the work it
//! wraps. Nothing in this crate blocks: the only lock is held for a few instructions and
//! never across an `.await`.
//!
//! # Cost
//!
//! Deriving a context allocates once and takes no lock. A waiter (`cancelled`, `run`,
//! `spawn`) registers its waker on the context, with no allocation for the first one; a
//! `CancellationToken` exists only for [`Context::token`] and [`Context::on_cancel`]. No
//! timer exists until something waits on a deadline (a waiter's own `Sleep`, unless the
//! deadline is a driven one its owner times; for tokens and `on_cancel`, one task per
//! deadline, ending with the context), and a context without a deadline never reads the
//! clock. Chains of any depth are walked and dropped in constant stack. See [`Context`]
//! for which methods need a tokio runtime.
//!
//! # Features
//!
//! - `axum` (off): `impl IntoResponse for Cancelled` (504 deadline, 503 shutdown, 499
//!   client gone, 500 otherwise), depending only on `axum-core`.
//! - `stream` (off): [`Context::bind`] and [`Context::bind_try`], streams that end with the
//!   context, depending only on `futures-core`.
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod cause;
mod context;
mod future;
mod node;

#[cfg(feature = "axum")]
mod axum;
#[cfg(feature = "stream")]
mod stream;

pub use crate::cause::{Cancelled, Cause, DeadlineOrigin};
pub use crate::context::{Canceller, Context, OnCancel};
#[doc(hidden)]
pub use crate::context::{DeadlineDriver, DeadlineHandle};
pub use crate::future::{Run, WaitForCancel};
#[doc(hidden)]
pub use crate::node::wheel_instant as timer_instant;
#[cfg(feature = "stream")]
pub use crate::stream::{Bound, BoundTry};
