//! `ContextService`, the service of both layers. As the owner (`ContextLayer`) it reads the
//! request's deadline, makes its context under the connection's, and hands the [`Owner`]
//! to the response future; as a route's (`RouteTimeout`) it moves the owner's deadline and
//! passes the request on.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use http::{Method, Request, Response};
use reqctx::{DeadlineDriver, DeadlineOrigin};
use tokio::time::Instant;
use tower_service::Service;

use super::body::ContextBody;
use super::config::{Config, Role};
use super::future::{Answer, OnTimeout, ResponseFuture};
use super::lifecycle::{Owner, RequestKind};
use super::scope::{self, Scope, earliest};
use crate::connection::ConnectionContext;
use crate::wire::grpc;
use crate::wire::header::{DeadlineHeader, earliest_budget};
use crate::wire::query::{DisplayDuration, client_timeout};

/// The service made by [`ContextLayer`](crate::ContextLayer) (the request's owner) and
/// by [`RouteTimeout`](crate::RouteTimeout) (a route's timeout under the owner).
#[derive(Clone, Debug)]
pub struct ContextService<S> {
    inner: S,
    // One pointer: a clone of this service rides in every request (axum clones the route).
    config: Arc<Config>,
}

impl<S> ContextService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> ContextService<S> {
        ContextService { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The 500 of a `ContextLayer` called while another one's request is current.
const NESTED: &str = "two ContextLayers on one request: keep the outer one, and give a route \
                      its own timeout with RouteTimeout (an app with a ContextLayer of its own, \
                      called from inside a handler, must be called from a spawned task)";

/// The 500 of a `RouteTimeout` with no request in scope.
const ALONE: &str = "RouteTimeout found no request context: add tower_reqctx::ContextLayer in \
                     front of the app (Router::layer), and no middleware between the two that \
                     moves the inner call into another task (tokio::spawn, tower's Buffer)";

impl<S, ReqB, ResB> Service<Request<ReqB>> for ContextService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: http_body::Body,
{
    type Response = Response<ContextBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let config = &*self.config;
        if let Role::Route(timeout) = config.role {
            if !scope::set_route_timeout(timeout) {
                return ResponseFuture::early(Answer::misconfigured(ALONE));
            }
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        // One owner per request: a second one would cut the first one's lifecycle in two.
        if scope::is_current() {
            return ResponseFuture::early(Answer::misconfigured(NESTED));
        }

        // A gRPC service enables grpc-timeout; only then is the content type looked at.
        let grpc = match config
            .deadline_headers
            .iter()
            .any(|h| matches!(h, DeadlineHeader::GrpcTimeout))
        {
            true => grpc::Wire::of(req.headers().get(http::header::CONTENT_TYPE)),
            false => None,
        };
        let query = match config.query_param {
            Some(name) => {
                match client_timeout(req.uri().query(), name, config.max_timeout, config.policy) {
                    Ok(t) => t,
                    Err(message) => {
                        return ResponseFuture::early(Answer::bad_request(grpc, message));
                    }
                }
            }
            None => None,
        };
        let header = match config.deadline_headers.is_empty() {
            true => None,
            false => match header_timeout(&req, config) {
                Ok(t) => t,
                Err(message) => return ResponseFuture::early(Answer::bad_request(grpc, message)),
            },
        };
        let server = config.timeout;
        // The clock is read only if some timeout applies.
        let start = (server.is_some() || query.is_some() || header.is_some()).then(Instant::now);
        let at = |d: Option<Duration>, origin| {
            d.and_then(|d| start?.checked_add(d)).map(|t| (t, origin))
        };
        let client = earliest(
            at(query, DeadlineOrigin::Query),
            at(header, DeadlineOrigin::Header),
        );
        let deadline = earliest(at(server, DeadlineOrigin::Layer), client);

        let conn = connection(&req);
        let parent = match &conn {
            Some(conn) => conn.context().clone(),
            None => config.root.clone().unwrap_or_default(),
        };
        // hyper marks requests that may upgrade (a WebSocket handshake, CONNECT).
        let upgrade = conn
            .as_ref()
            .filter(|_| {
                req.extensions()
                    .get::<hyper::upgrade::OnUpgrade>()
                    .is_some()
            })
            .cloned();
        let http1 = req.version() <= http::Version::HTTP_11;
        let abort = conn
            .as_ref()
            .filter(|_| http1)
            .map(ConnectionContext::abort_handle);
        let mut driver = parent.driven(deadline);
        // The response future's timer times the deadline while it lives (it arms it on
        // every pending poll): waiters need no timer of their own until it hands over.
        driver.owner_times(true);
        with_request_id(&mut driver, &req, config);
        record_route(&req);
        let kind = match *req.method() {
            Method::HEAD => RequestKind::Head,
            Method::CONNECT => RequestKind::Connect,
            _ => RequestKind::Other,
        };
        let mut owner = Owner::new(Scope::new(driver, start, client), kind);
        #[cfg(feature = "live")]
        if let Some(registry) = &config.live {
            owner.live_in(live_register(registry, &req, deadline, conn.as_ref()));
        }
        if let Some(abort) = abort {
            owner.closes_on_stall(abort);
        }
        match upgrade {
            // An HTTP/1 upgrade takes the whole connection: the connection holds the owner.
            Some(conn) if http1 => owner.upgrades_on(conn),
            // An HTTP/2 tunnel is one stream of it: the stream's own task holds it.
            Some(_) => owner.tunnels_on_its_stream(),
            None => {}
        }
        // The inner service finds the request through the thread's current scope while it
        // is called (and, in the response future, while it is polled).
        #[cfg(feature = "live")]
        owner.live_before_call();
        let inner = scope::enter(owner.scope_slot(), || self.inner.call(req));
        #[cfg(feature = "live")]
        owner.live_route_moved();
        ResponseFuture::owner(
            inner,
            owner,
            config.grace,
            match grpc {
                Some(wire) => OnTimeout::Grpc(wire),
                None => OnTimeout::Status(config.timeout_status),
            },
        )
    }
}

/// The request id for the context: the header's value, when it is one (see
/// [`ContextLayer::request_id`](crate::ContextLayer::request_id)).
fn with_request_id<B>(driver: &mut DeadlineDriver, req: &Request<B>, config: &Config) {
    let Some(name) = &config.request_id else {
        return;
    };
    if let Some(id) = req
        .headers()
        .get(name)
        .and_then(super::values::RequestId::parse)
    {
        driver.with_value(id);
    }
}

/// Records axum's matched route (`/users/{id}`) in the `route` field of the current span,
/// if it declares one. `Router::layer` runs after routing, so the path is known here.
fn record_route<B>(req: &Request<B>) {
    #[cfg(feature = "axum")]
    if !tracing::dispatcher::has_been_set() {
        return; // no subscriber was ever installed: no span to record on
    }
    #[cfg(feature = "axum")]
    if let Some(path) = req.extensions().get::<axum::extract::MatchedPath>() {
        tracing::Span::current().record("route", path.as_str());
    }
    #[cfg(not(feature = "axum"))]
    let _ = req;
}

/// The request's row in the layer's live view.
#[cfg(feature = "live")]
fn live_register<B>(
    registry: &Arc<crate::live::Registry>,
    req: &Request<B>,
    deadline: Option<(Instant, DeadlineOrigin)>,
    conn: Option<&ConnectionContext>,
) -> Option<crate::live::Ticket> {
    use crate::live::Origin;
    #[cfg(feature = "axum")]
    let route = req.extensions().get::<axum::extract::MatchedPath>();
    #[cfg(not(feature = "axum"))]
    let route = None;
    let deadline = deadline.map(|(at, origin)| (at.into_std(), Origin::of(origin)));
    registry.register(req, route, deadline, conn)
}

/// The connection the request arrived on: `serve`'s current one, or `WatchedListener`'s
/// from axum's `ConnectInfo`.
fn connection<B>(req: &Request<B>) -> Option<ConnectionContext> {
    let conn = ConnectionContext::current();
    // `WatchedListener` under `axum::serve`.
    #[cfg(all(feature = "axum", feature = "server"))]
    let conn = conn.or_else(|| {
        req.extensions()
            .get::<axum::extract::ConnectInfo<ConnectionContext>>()
            .map(|info| info.0.clone())
    });
    #[cfg(not(all(feature = "axum", feature = "server")))]
    let _ = req;
    conn
}

/// The caller's budget from the deadline headers (the earliest of them), capped by
/// policy. Zero is valid (a spent budget). `Err` is the 400's one line.
fn header_timeout<B>(req: &Request<B>, config: &Config) -> Result<Option<Duration>, String> {
    let Some((d, header)) =
        earliest_budget(req.headers(), &config.deadline_headers).map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    match config.policy.apply(d, config.max_timeout) {
        Ok(d) => Ok(Some(d)),
        Err(max) => Err(format!(
            "invalid `{}` header: above the maximum of {}",
            header.name(),
            DisplayDuration(max)
        )),
    }
}
