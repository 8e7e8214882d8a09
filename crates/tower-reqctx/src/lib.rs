//! A context per HTTP request for axum, hyper and tower: Go's `r.Context()`, with a typed
//! cause.
//!
//! [`ContextLayer`] gives every request a [`Context`](reqctx::Context) that is cancelled,
//! with a [`Cause`](reqctx::Cause) the handler can read, when the client goes away, the
//! deadline passes, the response ends, or the server shuts down. Handlers take it with the
//! `ReqCtx` extractor (feature `axum`) and hand it to everything they call.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tower_reqctx::{ContextLayer, ReqCtx, reqctx::Cancelled};
//!
//! async fn search(ctx: ReqCtx) -> Result<String, Cancelled> {
//!     // A slow backend: the context's deadline (here ?timeout=50ms) stops it.
//!     ctx.run(tokio::time::sleep(Duration::from_secs(5))).await?;
//!     Ok("results".into())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let app = Router::new()
//!     .route("/search", get(search))
//!     .layer(ContextLayer::new().timeout(Duration::from_secs(10)));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(tower_reqctx::serve(listener, app).into_future());
//!
//! // A client asks for a 50 ms budget: the handler's context ends with
//! // DeadlineExceeded { origin: Query } and the answer is 504.
//! # use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! let mut conn = tokio::net::TcpStream::connect(addr).await?;
//! conn.write_all(b"GET /search?timeout=50ms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
//! let mut answer = String::new();
//! conn.read_to_string(&mut answer).await?;
//! assert!(answer.starts_with("HTTP/1.1 504"));
//! # Ok(())
//! # }
//! # use std::future::IntoFuture;
//! ```
//!
//! # When the context ends, and the cause it reads
//!
//! | event | cause |
//! |---|---|
//! | the deadline passed | `DeadlineExceeded { origin: Query }` (the client's `?timeout=`), `{ origin: Header }` (a caller's deadline header) or `{ origin: Layer }` (the server's) |
//! | the client closed or reset the connection, reset its HTTP/2 stream, or a write to it failed | `ClientDisconnected` |
//! | the response body reached its end: `None`, `is_end_stream()`, all of its `Content-Length` yielded, or its trailers (HEAD, 204, 304 and empty bodies: when the response is returned) | `Completed` |
//! | the handler answered with a [`Cancelled`](reqctx::Cancelled) (a `?` on `ctx.run(..)`) | that `Cancelled`'s cause |
//! | the server's root was cancelled ([`serve`]'s graceful shutdown) | `Shutdown` |
//! | the inner service returned an error (it passes through unchanged) | a custom cause, [`ServiceFailed`] |
//! | the handler or its body panicked | a custom cause, [`HandlerPanicked`] (never `ClientDisconnected`) |
//! | an upgrade (101, CONNECT 2xx) ended: under [`serve`] and `WatchedListener`, when the tunnel does; under plain `axum::serve`, at the 101 | `Completed` (`ClientDisconnected` if the client closed it) |
//!
//! Work spawned with [`Context::spawn`](reqctx::Context::spawn) stops at any of them. When
//! the deadline passes while a response is streaming, the body ends with an error, so the
//! client sees a truncated response, never a clean end (a gRPC response ends with
//! `grpc-status: 4` trailers instead); the same happens at shutdown. The whole lifecycle,
//! as a state machine, is in the module docs of `src/layer/lifecycle.rs` (see the repository).
//!
//! **Which cause wins a race:** the first one recorded, and it never changes. A body that
//! reached its end is `Completed` even if the client closes a moment later; a deadline that
//! fires while the body still streams wins over the completion that would have followed; a
//! request cancelled because its connection or the server's root was cancelled reports that
//! cause. Deadlines are compared with the clock whenever a cause is read, so a deadline
//! that passed before a later event wins even if its timer had not fired yet.
//!
//! # Deadlines
//!
//! The deadline is the earliest of the effective server timeout (the `ContextLayer`'s
//! [`timeout`](ContextLayer::timeout), replaced per route by a [`RouteTimeout`], longer,
//! shorter or none) and the client's `?timeout=` (Go duration syntax, see [`duration`]). A client can shorten the
//! server's deadline, never lengthen it. A `timeout` that does not parse, is zero or
//! negative, or is rejected by [`ClampPolicy::Reject`] gets `400 Bad Request` with a
//! one-line reason, and the handler never runs. No input panics or overflows.
//!
//! # Seeing the client leave
//!
//! hyper notices a closed connection only when it reads from it: not while a request body
//! is unread, not while a pipelined request waits, not while the client has stopped
//! reading. [`serve`] (and `WatchedListener` for `axum::serve`) watch every connection
//! for the client's FIN or RST, event-driven, so those cases are seen too, in well under a
//! millisecond. Under plain `axum::serve` the layer still sees what hyper sees (the
//! response future or body dropped). On Linux the watch is one epoll instance of our own;
//! elsewhere only hyper's detection and failed reads and writes apply. A FIN queued behind a
//! full receive window (the server stopped reading a large upload) cannot be seen by anyone;
//! only the deadline ends such a request.
//!
//! The context tree is: the server's root, then one context per connection
//! ([`ConnectionContext`]), then one per request.
//!
//! # Tracing and logging
//!
//! When the context ends, the layer records the cause's [`kind`](reqctx::Cause::kind)
//! (`completed`, `client_disconnected`, `deadline_exceeded`, ...) in the field `cause` of
//! the request's span: the span current when the layer's service was called, which is the
//! request's span when a tracing layer such as tower-http's `TraceLayer` wraps the
//! `ContextLayer` and declares the field (`cause = tracing::field::Empty` in its
//! `make_span_with`). It also emits an event with target `tower_reqctx`, inside that span,
//! at `debug` for every cause but `completed` (which is at `trace`): a client that leaves
//! is not an error. Both hold for every cause, a client that left included (hyper drops
//! the response outside any span: the layer enters the request's span it kept), under
//! [`serve`], `WatchedListener` and plain `axum::serve`.
//!
//! With no tracing subscriber installed, the same events go to the [`log`] crate's logger
//! (env_logger and the like; tracing's `log` feature, which this crate enables), as
//! `request context cancelled cause=client disconnected kind=client_disconnected`. When
//! neither listens, the cost is a few loads and compares per request.
//!
//! A `504` for the client's own deadline (`?timeout=`, a deadline header) carries its
//! cause: [`is_client_deadline`] tells it from a server failure, and
//! `ServerErrorsExceptClientDeadlines` (feature `trace`) is the classifier that keeps it
//! out of `TraceLayer`'s `ERROR` lines.
//!
//! [`log`]: https://docs.rs/log
//!
//! # Cancellation safety
//!
//! The layer's response future and body may be dropped at any time (that is how hyper
//! reports a client that left); dropping them records `ClientDisconnected` unless a cause was
//! recorded before. [`Context::cancelled`](reqctx::Context::cancelled) is cancel-safe.
//!
//! # Features
//!
//! - `axum` (default): the `ReqCtx` extractor, `WatchedListener`, `IntoResponse` for
//!   [`Cancelled`](reqctx::Cancelled) (504 deadline, 503 shutdown, 499 client gone, 500
//!   otherwise).
//! - `server` (default): [`serve`], the connection watcher, the listeners and
//!   `WatchedListener` (with `axum`): hyper's server. Without it the layer and the
//!   clients still build, for a service served by something else or a client-only crate.
//! - `reqwest` (off): `propagate::ReqwestContextExt`, the same for reqwest, with no TLS;
//!   `reqwest-rustls` adds rustls (and its C-built crypto provider).
//! - `tls` (off): `TlsListener`, [`serve`] over TLS with tokio-rustls
//!   and rustls's `ring` provider (built from C with the machine's C compiler; no aws-lc).
//! - `trace` (off): `ServerErrorsExceptClientDeadlines`, a classifier for tower-http's
//!   `TraceLayer` that does not count a client's own deadline as a failure.
//! - `metrics` (off): `reqctx_requests_total{cause}` and `reqctx_live_request_contexts`
//!   through the `metrics` facade, no exporter: see `record_metrics`.
//! - `live` (off): [`live::LiveView`], a page of the requests in flight (route, age, budget
//!   and who set it, client still there, state) and of how the last ones ended, per cause
//!   and per route, with its JSON: Go's `/debug/requests`. Recorded only for a layer given
//!   a view ([`ContextLayer::live_view`]); served only where its router is mounted.
//!
//! With `axum`, `sse()` is an event stream that ends with the request's
//! context. `serve` takes any `Listener`: TCP, Unix domain sockets, TLS.
//!
//! # The crate's parts
//!
//! | module (in the source) | what | depends on |
//! |---|---|---|
//! | `wire` (public as [`duration`] and [`header`]) | Go durations, deadline headers and their names, `?timeout=`, gRPC statuses, [`ClampPolicy`] | nothing |
//! | `cause` | the custom causes: [`ServiceFailed`], [`HandlerPanicked`], [`ResponseBodyFailed`], [`ServerClosed`] | nothing |
//! | `connection` | [`ConnectionContext`], the seam between server and layer | nothing |
//! | `layer` | [`ContextLayer`], [`RouteTimeout`], the lifecycle, `ReqCtx`, [`request_context`] | `wire`, `cause`, `connection` |
//! | `server` (feature `server`) | `serve`, the listeners, the connection watcher | `cause`, `connection` |
//! | [`live`] (feature `live`) | the live view: its registry, snapshot, page and router | `cause`, `connection` |
//! | [`propagate`] | outbound clients that carry the context and its budget | `wire` |
//!
//! # Deadlines across services
//!
//! With [`ContextLayer::deadline_header`] on the server and the [`propagate`] clients on
//! the way out, a budget set by the first service's client travels down the chain, shrunk
//! by a safety margin per hop, and a client hanging up on the first service stops the
//! work in every service behind it (measured: 0.19 ms from the close at A to C's context,
//! median of 20, A → B → C on loopback). See [`propagate`].
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

pub use reqctx;

mod cause;
mod connection;
mod current;
mod layer;
#[cfg(feature = "live")]
pub mod live;
pub mod propagate;
#[cfg(feature = "server")]
mod server;
mod wire;

pub use crate::cause::{
    HandlerPanicked, ResponseBodyFailed, ResponseDiscarded, ServerClosed, ServiceFailed,
};
pub use crate::connection::ConnectionContext;
#[cfg(feature = "catch-panic")]
pub use crate::layer::PanicResponse;
#[cfg(feature = "trace")]
pub use crate::layer::ServerErrorsExceptClientDeadlines;
pub use crate::layer::{
    ContextBody, ContextLayer, ContextService, RequestId, ResponseFuture, RouteTimeout,
    is_client_deadline, live_request_contexts, request_context, set_request_value,
};
#[cfg(feature = "axum")]
pub use crate::layer::{MissingContextLayer, ReqCtx, sse};
#[cfg(feature = "metrics")]
pub use crate::layer::{describe_metrics, record_metrics};
#[cfg(all(feature = "server", feature = "axum"))]
pub use crate::server::WatchedListener;
#[cfg(feature = "server")]
pub use crate::server::{Listener, Serve, ServeExecutor, ServeFuture, WatchedIo, serve};
#[cfg(feature = "tls")]
pub use crate::server::{TlsListener, TlsStream};
pub use crate::wire::{ClampPolicy, duration, header};
