//! `ContextClientLayer`, `ContextClient` and the request extension they read.

use std::task::{Context as TaskContext, Poll};

use http::{Request, Response};
use reqctx::{Cancelled, Context};
use tower_layer::Layer;
use tower_service::Service;

use super::error::ClientError;
use super::future::ResponseFuture;
use super::propagation::{Plan, Propagation};

/// The context an outbound request is bound to, in the request's extensions: attached by
/// [`RequestContextExt::with_context`], read by [`ContextClient`].
#[derive(Clone, Debug)]
pub(crate) struct OutboundContext(pub(crate) Context);

/// Binds an outbound `http::Request` to a [`Context`], for [`ContextClient`].
///
/// ```
/// use http::Request;
/// use tower_reqctx::propagate::RequestContextExt;
/// use tower_reqctx::reqctx::Context;
///
/// let (ctx, _cancel) = Context::background().with_cancel();
/// // On a builder, or on a request already built.
/// let req = Request::get("http://inventory.internal/items").with_context(&ctx).body(()).unwrap();
/// let req = req.with_context(&ctx);
/// # let _ = req;
/// ```
pub trait RequestContextExt {
    /// Attaches `ctx` (a clone: two reference counts), replacing any context attached
    /// before.
    fn with_context(self, ctx: &Context) -> Self;
}

impl<B> RequestContextExt for Request<B> {
    fn with_context(mut self, ctx: &Context) -> Request<B> {
        self.extensions_mut().insert(OutboundContext(ctx.clone()));
        self
    }
}

impl RequestContextExt for http::request::Builder {
    fn with_context(self, ctx: &Context) -> http::request::Builder {
        self.extension(OutboundContext(ctx.clone()))
    }
}

/// Wraps a tower HTTP client in [`ContextClient`].
///
/// ```
/// use std::time::Duration;
/// use tower_reqctx::propagate::{ContextClientLayer, Propagation};
///
/// let layer = ContextClientLayer::new(Propagation::new().margin(Duration::from_millis(10)));
/// # let _ = layer;
/// ```
#[derive(Clone, Debug, Default)]
pub struct ContextClientLayer {
    propagation: Propagation,
}

impl ContextClientLayer {
    /// A layer that propagates as `propagation` says.
    pub fn new(propagation: Propagation) -> ContextClientLayer {
        ContextClientLayer { propagation }
    }
}

impl<S> Layer<S> for ContextClientLayer {
    type Service = ContextClient<S>;

    fn layer(&self, inner: S) -> ContextClient<S> {
        ContextClient {
            inner,
            propagation: self.propagation.clone(),
        }
    }
}

/// A tower HTTP client that binds each request to the context attached to it
/// ([`RequestContextExt::with_context`]). See the [module docs](super) for what it does.
///
/// A request with no context attached passes through untouched, its response too.
#[derive(Clone, Debug)]
pub struct ContextClient<S> {
    inner: S,
    propagation: Propagation,
}

impl<S> ContextClient<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, propagation: Propagation) -> ContextClient<S> {
        ContextClient { inner, propagation }
    }

    /// The wrapped client.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped client, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped client, by value.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for ContextClient<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = ClientError<S::Error>;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ClientError::Inner)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(OutboundContext(ctx)) = req.extensions().get::<OutboundContext>().cloned() else {
            return ResponseFuture::passthrough(self.inner.call(req));
        };
        // A service that was made ready and then not called keeps its reservation until
        // the next call, as tower allows.
        match self.propagation.plan(&ctx) {
            Plan::Cancelled(cause) => ResponseFuture::failed(Cancelled::new(cause)),
            Plan::Spent => ResponseFuture::spent(ctx),
            Plan::Send { header, .. } => {
                self.propagation.set_header(req.headers_mut(), header);
                let check = self.propagation.exceeded_check();
                ResponseFuture::bound(self.inner.call(req), ctx, check)
            }
        }
    }
}
