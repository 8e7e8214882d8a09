//! The HTTP side of [`reqctx`]: a context per request, cancelled on client disconnect,
//! deadline, completion and shutdown. In progress: see the issues.
#![forbid(unsafe_code)]

pub use reqctx;
