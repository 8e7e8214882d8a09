//! `RouteTimeout`: a route's own timeout, under the request's owner.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::config::{Config, Role};
use super::service::ContextService;

/// A route's own server timeout, longer or shorter than the [`ContextLayer`]'s, or none
/// (for server-sent events, long polls). It is the only setting a route has: everything
/// else is the `ContextLayer`'s, which owns the request and its timer.
///
/// Put it on the route (`MethodRouter::layer`, `Router::route_layer`) under a
/// `ContextLayer` on the app (`Router::layer`, which axum runs first). The timeout counts
/// from the moment the `ContextLayer` received the request; a client's `?timeout=` or
/// deadline header still shortens it, never lengthens it. The innermost `RouteTimeout`
/// wins.
///
/// Without a `ContextLayer` in front, there is no context to time: the request is answered
/// `500` with a one-line reason naming the missing layer (logged at `error`), as `ReqCtx`
/// does.
///
/// [`ContextLayer`]: crate::ContextLayer
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use tower_reqctx::{ContextLayer, RouteTimeout};
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "quick" }))
///     .route("/report", get(|| async { "slow" }).layer(RouteTimeout::new(Duration::from_secs(30))))
///     .route("/events", get(|| async { "endless" }).layer(RouteTimeout::none()))
///     .layer(ContextLayer::new().timeout(Duration::from_secs(5)));
/// # let _ = app;
/// ```
#[derive(Clone, Debug)]
pub struct RouteTimeout {
    // A config of the route's role, made once here: the service stays one pointer wide.
    config: Arc<Config>,
}

impl RouteTimeout {
    /// The route's requests get `timeout`, counted from their arrival, instead of the
    /// `ContextLayer`'s.
    pub fn new(timeout: Duration) -> RouteTimeout {
        RouteTimeout::with(Some(timeout))
    }

    /// The route's requests have no server timeout; a client's still applies.
    pub fn none() -> RouteTimeout {
        RouteTimeout::with(None)
    }

    fn with(timeout: Option<Duration>) -> RouteTimeout {
        RouteTimeout {
            config: Arc::new(Config {
                role: Role::Route(timeout),
                ..Config::default()
            }),
        }
    }
}

impl<S> Layer<S> for RouteTimeout {
    type Service = ContextService<S>;

    fn layer(&self, inner: S) -> ContextService<S> {
        ContextService::new(inner, self.config.clone())
    }
}
