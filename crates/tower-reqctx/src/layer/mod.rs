//! The layer: the request's owner ([`ContextLayer`] and its service, response future and
//! body, with the lifecycle they share), a route's timeout ([`RouteTimeout`]), and what
//! handlers read (the request's scope, the `ReqCtx` extractor, `sse`, metrics).
//!
//! The arrows run one way: `builder` and `route` → `service` → `future` → `body` →
//! `lifecycle`, each reading `config` and `scope`; the layer reads the connection's handle
//! ([`crate::connection`]) and the wire formats ([`crate::wire`]), and knows nothing of the
//! server.

mod body;
mod builder;
mod classify;
mod config;
#[cfg(feature = "axum")]
mod extract;
mod future;
mod lifecycle;
mod metrics;
mod route;
mod scope;
mod service;
#[cfg(feature = "axum")]
mod sse;
mod values;

pub use self::body::ContextBody;
pub use self::builder::ContextLayer;
#[cfg(feature = "trace")]
pub use self::classify::ServerErrorsExceptClientDeadlines;
pub use self::classify::is_client_deadline;
#[cfg(feature = "axum")]
pub use self::extract::{MissingContextLayer, ReqCtx};
pub use self::future::ResponseFuture;
#[cfg(feature = "catch-panic")]
pub use self::lifecycle::PanicResponse;
#[cfg(feature = "metrics")]
pub use self::metrics::{describe_metrics, record_metrics};
pub use self::route::RouteTimeout;
pub use self::scope::{live_request_contexts, request_context, set_request_value};
pub use self::service::ContextService;
#[cfg(feature = "axum")]
pub use self::sse::sse;
pub use self::values::RequestId;
