//! `ReqCtx`: the axum extractor (feature `axum`).

use std::convert::Infallible;
use std::ops::Deref;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;
use reqctx::Context;

use super::scope::request_context;

/// The request's [`Context`], given by [`ContextLayer`](crate::ContextLayer).
///
/// It derefs to [`Context`]; pass `&ctx` (or `ctx.0`) on to every call the handler makes.
/// Without a `ContextLayer` in front of the route, extraction fails with a 500 that says
/// how to add one; `Option<ReqCtx>` is `None` instead.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_reqctx::{ContextLayer, ReqCtx};
///
/// async fn handler(ctx: ReqCtx) -> String {
///     format!("deadline: {:?}", ctx.remaining())
/// }
///
/// let app: Router = Router::new()
///     .route("/", get(handler))
///     .layer(ContextLayer::new());
/// # let _ = app;
/// ```
#[derive(Clone, Debug)]
pub struct ReqCtx(pub Context);

impl Deref for ReqCtx {
    type Target = Context;

    fn deref(&self) -> &Context {
        &self.0
    }
}

impl From<ReqCtx> for Context {
    fn from(ctx: ReqCtx) -> Context {
        ctx.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ReqCtx {
    type Rejection = MissingContextLayer;

    async fn from_request_parts(
        _parts: &mut Parts,
        _state: &S,
    ) -> Result<ReqCtx, MissingContextLayer> {
        request_context().map(ReqCtx).ok_or(MissingContextLayer)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for ReqCtx {
    type Rejection = Infallible;

    async fn from_request_parts(
        _parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<ReqCtx>, Infallible> {
        Ok(request_context().map(ReqCtx))
    }
}

/// The rejection of [`ReqCtx`] when no [`ContextLayer`](crate::ContextLayer) ran: a 500
/// whose body names the missing layer and how to add it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MissingContextLayer;

impl MissingContextLayer {
    const MESSAGE: &'static str = "Missing request context: the `ReqCtx` extractor needs a \
        `tower_reqctx::ContextLayer` in front of this route. Add \
        `.layer(tower_reqctx::ContextLayer::new())` to the Router (after the routes, so it \
        wraps them all). If it is there, a middleware between the layer and this route moves \
        the inner call into another task (tokio::spawn, tower's Buffer): the layer hands the \
        context only to what it polls itself.";
}

impl std::fmt::Display for MissingContextLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::MESSAGE)
    }
}

impl std::error::Error for MissingContextLayer {}

impl IntoResponse for MissingContextLayer {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, Self::MESSAGE).into_response()
    }
}
