//! Outbound calls bound to a context, and deadlines that travel from service to service.
//!
//! Go's `httpDo` binds an outbound call to the request's context. Here the call is bound,
//! and the remaining budget also travels to the next service, so a client that hangs up on
//! service A stops the work in B and C behind it:
//!
//! ```text
//!            ?timeout=300ms          grpc-timeout: ≤ 295m        grpc-timeout: ≤ 290m
//!   client ─────────────────▶  A  ─────────────────────────▶  B  ─────────────────────▶  C
//!            deadline T          deadline ≤ T − 5 ms           deadline ≤ T − 10 ms
//!
//!   client hangs up ─▶ A's context: ClientDisconnected ─▶ A's call to B is dropped (reset)
//!                    ─▶ B's context: ClientDisconnected ─▶ B's call to C is dropped (reset)
//!                    ─▶ C's context: ClientDisconnected
//!
//!   the budget runs out: C's deadline passes first (the margins) ─▶ C answers 504
//!                    ─▶ B's call fails: Cancelled(DeadlineExceeded { origin: Header })
//!                       (B's deadline came from A's header)  ─▶ B answers 504
//!                    ─▶ A's call fails: Cancelled(DeadlineExceeded { origin: Query })
//!                       (A's deadline came from its client's ?timeout=)
//! ```
//!
//! Each service reads the failure as its own deadline, with its own deadline's origin:
//! the budget that ran out downstream was the one it sent.
//!
//! A call bound to a context:
//!
//! - **fails fast**: when the context is already cancelled, or has no more than the
//!   [safety margin](Propagation#the-safety-margin) left, the call is never sent and fails
//!   with `Cancelled` carrying the context's own cause. (Within the margin but before the
//!   deadline, the failure waits for the deadline, at most the margin, so that the cause
//!   is the one the context records, with its deadline's origin.)
//! - **is aborted** when the context is cancelled in flight: the client's future is
//!   dropped, and with it the HTTP/1 connection (closed) or the HTTP/2 stream (reset), so
//!   the service called sees its client leave. The call fails with the context's cause.
//! - **sends its budget**: the context's remaining time minus the margin, rounded down, in
//!   a [deadline header](crate::header::DeadlineHeader) (`grpc-timeout` by default), as a relative
//!   duration, never a wall-clock time. Any value of that header set by the caller is
//!   replaced, or removed if the context has no deadline: the context is the one source
//!   of the budget (derive a context with a shorter timeout to send less).
//! - **reads the answer**: one that says the deadline passed downstream (a marked 504, or
//!   `grpc-status: 4`, see [`Propagation`]) fails with `Cancelled` carrying
//!   `DeadlineExceeded { origin }`, where `origin` is the origin of the caller's own
//!   deadline ([`Context::deadline_origin`](reqctx::Context::deadline_origin)): the
//!   budget that ran out was the caller's, so a `?timeout=` set by the caller's client
//!   reads `Query` and a route's timeout `Layer`, never the service called's view
//!   (`Header`). The caller can tell "my budget ran out" from other failures, and its
//!   answer (504) names the right party.
//!
//! The response body is not bound: read it under the context's
//! [`run`](reqctx::Context::run). (The reqwest helper's timeout bounds it.)
//!
//! The clients:
//!
//! - `ContextClientLayer`: a tower layer for hyper-util's legacy
//!   `Client` or any tower HTTP client; the context is attached to the request with
//!   `RequestContextExt::with_context`.
//! - `ReqwestContextExt` (feature `reqwest`): `.context(&ctx).send()` on a reqwest
//!   `RequestBuilder`. reqwest comes with no TLS; the feature `reqwest-rustls` adds rustls.
//!
//! The [`header`](crate::header) module holds the codecs and the header names, which the
//! server side reads with too.
//!
//! # Build the hyper-util client with `TCP_NODELAY`
//!
//! hyper-util's `HttpConnector` leaves Nagle's algorithm on unless told
//! (`set_nodelay(true)`). Over HTTP/2 an aborted call is a stream reset: one small
//! `RST_STREAM` frame on a connection whose last write (the request) the peer has not yet
//! acknowledged. Nagle holds the frame until that acknowledgement, and the peer, which has
//! nothing to send until its handler answers, delays it (Linux: up to 40 ms). The service
//! called then learns of the abort 40 ms late, and its work runs that much longer. Over
//! HTTP/1 an abort closes the connection, which Nagle does not delay. reqwest sets
//! `TCP_NODELAY` by default.
//!
//! # Example: service B calling C
//!
//! ```
//! # #[cfg(feature = "axum")] {
//! use axum::body::Body;
//! use axum::extract::State;
//! use axum::http::StatusCode;
//! use axum::response::{IntoResponse, Response};
//! use axum::{Router, routing::get};
//! use hyper_util::client::legacy::{Client, connect::HttpConnector};
//! use hyper_util::rt::TokioExecutor;
//! use tower::ServiceExt;
//! use tower_reqctx::propagate::{ClientError, ContextClient, ContextClientLayer, RequestContextExt};
//! use tower_reqctx::{ContextLayer, ReqCtx};
//!
//! type Outbound = ContextClient<Client<HttpConnector, Body>>;
//!
//! async fn stock(State(client): State<Outbound>, ctx: ReqCtx) -> Response {
//!     let req = http::Request::get("http://c.internal/stock")
//!         .with_context(&ctx)
//!         .body(Body::empty())
//!         .unwrap();
//!     match client.oneshot(req).await {
//!         Ok(res) => res.map(Body::new).into_response(),
//!         // 504 when a deadline passed, here or in C; 499 when our client left.
//!         Err(ClientError::Cancelled(cancelled)) => cancelled.into_response(),
//!         Err(ClientError::Inner(_)) => StatusCode::BAD_GATEWAY.into_response(),
//!     }
//! }
//!
//! // TCP_NODELAY, or an aborted HTTP/2 call reaches C up to 40 ms late: the RST_STREAM
//! // is a small frame written while the request is still unacknowledged, so Nagle's
//! // algorithm holds it for that ACK, which C, with nothing to send, delays (see below).
//! let mut connector = HttpConnector::new();
//! connector.set_nodelay(true);
//! let client = Client::builder(TokioExecutor::new()).build(connector);
//! let outbound: Outbound = tower::Layer::layer(&ContextClientLayer::default(), client);
//! let app: Router = Router::new()
//!     .route("/stock", get(stock))
//!     .with_state(outbound)
//!     .layer(ContextLayer::new());
//! # let _ = app;
//! # }
//! ```

mod client;
mod error;
mod future;
mod propagation;
#[cfg(feature = "reqwest")]
mod reqwest;

pub use self::client::{ContextClient, ContextClientLayer, RequestContextExt};
pub use self::error::ClientError;
pub use self::future::ResponseFuture;
pub use self::propagation::Propagation;
#[cfg(feature = "reqwest")]
pub use self::reqwest::{ContextRequestBuilder, ReqwestContextExt};
