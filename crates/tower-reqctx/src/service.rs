//! `ContextService`: creates (outer layer) or refines (inner layer) a request's context.

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use reqctx::{Cancelled, Cause, Context, DeadlineHandle, DeadlineOrigin};
use tokio::time::{Instant, Sleep, sleep_until};
use tower_service::Service;

use crate::body::{ContextBody, GRPC_DEADLINE_EXCEEDED, grpc_status};
use crate::conn::ConnectionContext;
use crate::duration::{MAX_INPUT_LEN, ParseDurationError, parse_duration_bytes};
use crate::layer::{ClampPolicy, Config, TimeoutSetting};
use crate::lifecycle::{Owner, RequestKind, is_grpc};
use crate::propagate::X_REQCTX_DEADLINE;
use crate::propagate::header::{DeadlineHeader, earliest_budget};

/// The service made by [`ContextLayer`](crate::ContextLayer).
#[derive(Clone, Debug)]
pub struct ContextService<S> {
    inner: S,
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

/// What the outer layer leaves in the request's extensions, for the extractor and for
/// inner layers.
#[derive(Clone, Debug)]
pub(crate) struct RequestScope {
    pub(crate) ctx: Context,
    handle: DeadlineHandle,
    start: Option<Instant>, // when the request arrived, read only if a timeout needs it
    client: Option<(Instant, DeadlineOrigin)>, // the client's own deadline, if it set one
}

impl RequestScope {
    /// An inner layer's timeout replaces the server's; the client's still applies.
    fn set_server_timeout(&mut self, setting: TimeoutSetting) {
        let server = match setting {
            TimeoutSetting::Unset => return,
            TimeoutSetting::Never => None,
            TimeoutSetting::After(d) => {
                let start = *self.start.get_or_insert_with(Instant::now);
                start.checked_add(d).map(|at| (at, DeadlineOrigin::Layer))
            }
        };
        self.handle.set_deadline(earliest(server, self.client));
    }
}

fn earliest(
    a: Option<(Instant, DeadlineOrigin)>,
    b: Option<(Instant, DeadlineOrigin)>,
) -> Option<(Instant, DeadlineOrigin)> {
    match (a, b) {
        // On a tie the client's wins: it is the more specific reason.
        (Some(a), Some(b)) => Some(if b.0 <= a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The context a [`ContextLayer`](crate::ContextLayer) gave this request, from the
/// request's extensions, for code that is not an axum handler: a tonic service
/// (`request.extensions()` of a `tonic::Request`), plain hyper, other middleware.
///
/// ```
/// use tower_reqctx::request_context;
///
/// fn handle(req: &http::Request<()>) -> &'static str {
///     match request_context(req.extensions()) {
///         Some(ctx) if ctx.is_cancelled() => "too late",
///         Some(_) => "working",
///         None => "no ContextLayer in front of this service",
///     }
/// }
/// assert_eq!(handle(&http::Request::new(())), "no ContextLayer in front of this service");
/// ```
pub fn request_context(extensions: &http::Extensions) -> Option<&Context> {
    extensions.get::<RequestScope>().map(|s| &s.ctx)
}

/// Adds `value` to the context of this request, as Go's
/// `r.WithContext(context.WithValue(r.Context(), k, v))`: middleware between the
/// [`ContextLayer`](crate::ContextLayer) and the handler uses it to hand request-scoped
/// data (an authenticated user, a request id) to everything the handler calls. The
/// handler's `ReqCtx` carries it; cancellation is unchanged. Returns
/// `false` (and drops `value`) if no `ContextLayer` ran.
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use axum::{Router, extract::Request, middleware::{self, Next}, response::Response, routing::get};
/// use tower_reqctx::{ContextLayer, ReqCtx};
///
/// #[derive(Clone, Debug)]
/// struct User(String);
///
/// async fn authenticate(mut req: Request, next: Next) -> Response {
///     tower_reqctx::set_request_value(&mut req, User("alice".into()));
///     next.run(req).await
/// }
///
/// async fn handler(ctx: ReqCtx) -> String {
///     ctx.value::<User>().map_or("anonymous".into(), |u| u.0.clone())
/// }
///
/// let app: Router = Router::new()
///     .route("/", get(handler))
///     .layer(middleware::from_fn(authenticate))
///     .layer(ContextLayer::new());
/// # let _ = app;
/// # }
/// ```
pub fn set_request_value<B, T: Send + Sync + 'static>(req: &mut Request<B>, value: T) -> bool {
    match req.extensions_mut().get_mut::<RequestScope>() {
        Some(scope) => {
            scope.ctx = scope.ctx.with_value(value);
            true
        }
        None => false,
    }
}

/// How many request contexts made by a [`ContextLayer`](crate::ContextLayer) are alive in
/// this process: requests in flight, plus any whose context a task still holds. Zero once
/// everything is done and nothing leaked. A relaxed counter: two atomic additions per
/// request.
pub fn live_request_contexts() -> usize {
    Context::live_driven_contexts()
}

/// As [`request_context`], from `http::request::Parts`.
pub fn parts_context(parts: &http::request::Parts) -> Option<&Context> {
    parts.extensions.get::<RequestScope>().map(|s| &s.ctx)
}

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

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let config = &*self.config;
        if let Some(scope) = req.extensions_mut().get_mut::<RequestScope>() {
            // An inner layer: the outer one owns the context and its timer.
            scope.set_server_timeout(config.timeout);
            return ResponseFuture::passthrough(self.inner.call(req));
        }

        // A gRPC service enables grpc-timeout; only then is the content type looked at.
        let grpc = config
            .deadline_headers
            .iter()
            .any(|h| matches!(h, DeadlineHeader::GrpcTimeout))
            && is_grpc(req.headers().get(http::header::CONTENT_TYPE));
        let query = match config.query_param {
            Some(name) => match client_timeout(req.uri().query(), name, config) {
                Ok(t) => t,
                Err(message) => return ResponseFuture::early(Answer::bad_request(grpc, message)),
            },
            None => None,
        };
        let header = match config.deadline_headers.is_empty() {
            true => None,
            false => match header_timeout(&req, config) {
                Ok(t) => t,
                Err(message) => return ResponseFuture::early(Answer::bad_request(grpc, message)),
            },
        };
        let server = match config.timeout {
            TimeoutSetting::After(d) => Some(d),
            TimeoutSetting::Unset | TimeoutSetting::Never => None,
        };
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
        let parent = match conn {
            Some(conn) => conn.context().clone(),
            None => config.root.clone().unwrap_or_default(),
        };
        // hyper marks requests that may upgrade (a WebSocket handshake, CONNECT).
        let upgrade = conn
            .filter(|_| {
                req.extensions()
                    .get::<hyper::upgrade::OnUpgrade>()
                    .is_some()
            })
            .cloned();
        let abort = conn
            .filter(|_| req.version() <= http::Version::HTTP_11)
            .map(ConnectionContext::abort_handle);
        let (ctx, driver) = parent.with_driven_deadline(deadline);
        let ctx = with_request_values(ctx, &req, conn, config);
        record_route(&req);
        let kind = match *req.method() {
            Method::HEAD => RequestKind::Head,
            Method::CONNECT => RequestKind::Connect,
            _ => RequestKind::Other,
        };
        req.extensions_mut().insert(RequestScope {
            ctx,
            handle: driver.handle(),
            start,
            client,
        });
        let mut owner = Owner::new(driver, kind);
        if let Some(abort) = abort {
            owner.closes_on_stall(abort);
        }
        if let Some(conn) = upgrade {
            owner.upgrades_on(conn);
        }
        ResponseFuture::owner(
            self.inner.call(req),
            owner,
            config.grace,
            match grpc {
                true => OnTimeout::Grpc,
                false => OnTimeout::Status(config.timeout_status),
            },
        )
    }
}

const GRPC_INVALID_ARGUMENT: u8 = 3;

/// How the layer answers when the handler has not by the deadline (small: it rides in
/// every response future).
#[derive(Clone, Copy, Debug)]
enum OnTimeout {
    Status(StatusCode),
    Grpc,
}

impl From<OnTimeout> for Answer {
    fn from(on_timeout: OnTimeout) -> Answer {
        match on_timeout {
            OnTimeout::Status(status) => Answer::Timeout(status),
            OnTimeout::Grpc => Answer::Grpc(GRPC_DEADLINE_EXCEEDED, "deadline exceeded"),
        }
    }
}

/// What the layer answers by itself.
#[derive(Clone, Debug)]
enum Answer {
    /// An HTTP status with a one-line plain-text body.
    Text(StatusCode, String),
    /// The handler did not answer by the deadline: this status, and the body a
    /// [`Cancelled`] for the cause answers with, so one cause reads the same whoever
    /// answers.
    Timeout(StatusCode),
    /// A gRPC trailers-only answer: HTTP 200 with `grpc-status` and `grpc-message`.
    Grpc(u8, &'static str),
}

impl Answer {
    fn bad_request(grpc: bool, message: String) -> Answer {
        match grpc {
            true => Answer::Grpc(GRPC_INVALID_ARGUMENT, "invalid grpc-timeout"),
            false => Answer::Text(StatusCode::BAD_REQUEST, message),
        }
    }

    /// The response; `cause` is the context's, for a timeout's answer.
    fn into_response<B>(self, cause: Option<Cause>) -> Response<ContextBody<B>> {
        match self {
            Answer::Text(status, message) => ContextBody::message_response(status, message),
            Answer::Timeout(status) => {
                let cause = cause.unwrap_or(Cause::DeadlineExceeded {
                    origin: DeadlineOrigin::Layer,
                });
                let deadline = cause.is_deadline_exceeded();
                let text = Cancelled::new(cause).answer_text();
                let mut res = ContextBody::message_response(status, text);
                if deadline {
                    // Tells an upstream reqctx client that the budget ran out here.
                    res.headers_mut().insert(
                        X_REQCTX_DEADLINE,
                        http::HeaderValue::from_static("exceeded"),
                    );
                }
                res
            }
            Answer::Grpc(code, message) => match cause.as_ref().and_then(grpc_status) {
                Some((code, message)) => ContextBody::grpc_response(code, message),
                None => ContextBody::grpc_response(code, message),
            },
        }
    }
}

/// The client's address, a value of the request's context with
/// [`ContextLayer::peer_addr_value`](crate::ContextLayer::peer_addr_value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// The request's id, a value of the request's context with
/// [`ContextLayer::request_id`](crate::ContextLayer::request_id): the caller's header, or a
/// new id unique in this process.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub http::HeaderValue);

impl RequestId {
    /// The id as text, when it is visible ASCII.
    pub fn as_str(&self) -> Option<&str> {
        self.0.to_str().ok()
    }
}

fn with_request_values<B>(
    mut ctx: Context,
    req: &Request<B>,
    conn: Option<&ConnectionContext>,
    config: &Config,
) -> Context {
    if config.peer_value {
        let peer = conn.and_then(ConnectionContext::remote_addr);
        #[cfg(feature = "axum")]
        let peer = peer.or_else(|| {
            req.extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0)
        });
        if let Some(peer) = peer {
            ctx = ctx.with_value(PeerAddr(peer));
        }
    }
    if let Some(name) = &config.request_id {
        let id = match req.headers().get(name) {
            Some(id) => id.clone(),
            None => {
                use std::sync::atomic::{AtomicU64, Ordering};
                static NEXT: AtomicU64 = AtomicU64::new(1);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                http::HeaderValue::from(n)
            }
        };
        ctx = ctx.with_value(RequestId(id));
    }
    ctx
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

/// The connection the request arrived on, from `serve` or `WatchedListener`.
fn connection<B>(req: &Request<B>) -> Option<&ConnectionContext> {
    let ext = req.extensions();
    let conn = ext.get::<ConnectionContext>();
    #[cfg(feature = "axum")]
    let conn = conn.or_else(|| {
        ext.get::<axum::extract::ConnectInfo<ConnectionContext>>()
            .map(|info| &info.0)
    });
    conn
}

/// The client's timeout from the query, capped by policy. `Err` is the 400's one line.
fn client_timeout(
    query: Option<&str>,
    name: &str,
    config: &Config,
) -> Result<Option<Duration>, String> {
    let Some(raw) = find_param(query, name) else {
        return Ok(None);
    };
    let invalid = |e: ParseDurationError| format!("invalid `{name}` query parameter: {e}");
    let mut buf = [0u8; MAX_INPUT_LEN];
    let value = percent_decode(raw.as_bytes(), &mut buf).map_err(invalid)?;
    let d = parse_duration_bytes(value).map_err(invalid)?;
    cap(d, config)
        .map_err(|max| format!("invalid `{name}` query parameter: above the maximum of {max}"))
}

/// The caller's budget from the deadline headers (the earliest of them), capped by
/// policy. Zero is valid (a spent budget). `Err` is the 400's one line.
fn header_timeout<B>(req: &Request<B>, config: &Config) -> Result<Option<Duration>, String> {
    let Some((d, header)) =
        earliest_budget(req.headers(), &config.deadline_headers).map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    cap(d, config).map_err(|max| {
        format!(
            "invalid `{}` header: above the maximum of {max}",
            header.name()
        )
    })
}

/// Applies `max_timeout` and its policy to a client's value; `Err` is the maximum, for
/// the message.
fn cap(d: Duration, config: &Config) -> Result<Option<Duration>, DisplayDuration> {
    match config.max_timeout {
        Some(max) if d > max => match config.policy {
            ClampPolicy::Clamp => Ok(Some(max)),
            ClampPolicy::Reject => Err(DisplayDuration(max)),
        },
        _ => Ok(Some(d)),
    }
}

/// The raw value of the first `name=` pair. Keys are compared as written (not decoded).
fn find_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Decodes `%XX` escapes into `buf`; longer than `buf` is `TooLong`, whatever the input's size.
fn percent_decode<'b>(raw: &[u8], buf: &'b mut [u8]) -> Result<&'b [u8], ParseDurationError> {
    let mut n = 0;
    let mut i = 0;
    while i < raw.len() {
        if n == buf.len() {
            return Err(ParseDurationError::TooLong);
        }
        let b = match raw[i] {
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let hi = raw.get(i + 1).and_then(|&c| hex(c));
                let lo = raw.get(i + 2).and_then(|&c| hex(c));
                match (hi, lo) {
                    (Some(h), Some(l)) => {
                        i += 2;
                        (h * 16 + l) as u8
                    }
                    _ => return Err(ParseDurationError::Invalid),
                }
            }
            b => b,
        };
        buf[n] = b;
        n += 1;
        i += 1;
    }
    Ok(&buf[..n])
}

/// `90s`, `1500ms`: for messages, without depending on the client's spelling.
struct DisplayDuration(Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else {
            write!(f, "{}ms", d.as_millis())
        }
    }
}

pin_project! {
    /// The response future of [`ContextService`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        // The layer answers without calling the handler (a bad timeout, or the deadline).
        Early {
            answer: Option<(Answer, Option<Cause>)>,
        },
        // An inner layer: the outer one does the work.
        Passthrough {
            #[pin]
            inner: F,
        },
        // The outer layer: the request's owner, while the handler runs.
        Owner {
            #[pin]
            inner: F,
            owner: Option<Owner>,
            // Armed only once the handler is pending and a deadline applies; boxed so that
            // the future stays small to move (tokio's Sleep is large).
            timer: Option<Pin<Box<Sleep>>>,
            expired: bool, // the deadline fired; the timer now counts the grace
            grace: Duration,
            on_timeout: OnTimeout,
        },
    }
}

impl<F> ResponseFuture<F> {
    fn early(answer: Answer) -> ResponseFuture<F> {
        ResponseFuture {
            kind: Kind::Early {
                answer: Some((answer, None)),
            },
        }
    }

    fn passthrough(inner: F) -> ResponseFuture<F> {
        ResponseFuture {
            kind: Kind::Passthrough { inner },
        }
    }

    fn owner(inner: F, owner: Owner, grace: Duration, on_timeout: OnTimeout) -> ResponseFuture<F> {
        ResponseFuture {
            kind: Kind::Owner {
                inner,
                owner: Some(owner),
                timer: None,
                expired: false,
                grace,
                on_timeout,
            },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<ContextBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        let timed_out = match kind.as_mut().project() {
            KindProj::Early { answer } => {
                let Some((answer, cause)) = answer.take() else {
                    panic!("ResponseFuture polled after completion");
                };
                return Poll::Ready(Ok(answer.into_response(cause)));
            }
            KindProj::Passthrough { inner } => {
                return inner
                    .poll(cx)
                    .map(|r| r.map(|res| res.map(ContextBody::plain)));
            }
            KindProj::Owner {
                mut inner,
                owner,
                timer,
                expired,
                grace,
                on_timeout,
            } => 'owner: {
                // A panic that unwinds through here is the handler's, whatever catches it
                // further out (tower-http's CatchPanicLayer drops us only after catching).
                let polled = match catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
                    Ok(polled) => polled,
                    Err(panic) => {
                        if let Some(o) = owner.as_ref() {
                            o.panicked();
                        }
                        resume_unwind(panic)
                    }
                };
                if let Poll::Ready(result) = polled {
                    // Without a grace, the layer answers at the deadline: a response that
                    // arrives once our timer has fired (the handler saw the deadline at the
                    // same instant, its own wait fired in the same pass of the timer wheel)
                    // loses, so the status never depends on which of two wakeups ran first.
                    // `is_elapsed` reads the timer's state: no clock, no lock.
                    if result.is_ok()
                        && !*expired
                        && grace.is_zero()
                        && timer.as_ref().is_some_and(|t| t.is_elapsed())
                    {
                        if let Some(o) = owner.as_ref() {
                            o.expire();
                        }
                        break 'owner Some(Answer::from(*on_timeout));
                    }
                    let Some(o) = owner.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    return Poll::Ready(match result {
                        Ok(res) => Ok(o.answered(res)),
                        Err(e) => {
                            o.failed();
                            Err(e)
                        }
                    });
                }
                let Some(o) = owner.as_ref() else {
                    return Poll::Pending;
                };
                if !*expired {
                    // The deadline may have been moved by an inner layer since the last poll.
                    match o.driver().deadline() {
                        None => *timer = None,
                        Some((at, _)) => match timer {
                            Some(t) if t.deadline() == at => {}
                            Some(t) => t.as_mut().reset(at),
                            None => *timer = Some(Box::pin(sleep_until(at))),
                        },
                    }
                }
                let fired = timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if !fired {
                    None
                } else {
                    o.expire();
                    if *expired || grace.is_zero() {
                        Some(Answer::from(*on_timeout))
                    } else {
                        // Cancelled now; the handler may still answer during the grace. A
                        // grace too long to represent means the handler always may.
                        *expired = true;
                        match (timer.as_mut(), Instant::now().checked_add(*grace)) {
                            (Some(t), Some(end)) => {
                                t.as_mut().reset(end);
                                // Registers the new instant with the waker.
                                t.as_mut()
                                    .poll(cx)
                                    .is_ready()
                                    .then(|| Answer::from(*on_timeout))
                            }
                            (_, None) => {
                                *timer = None;
                                None
                            }
                            (None, Some(_)) => Some(Answer::from(*on_timeout)),
                        }
                    }
                }
            }
        };
        match timed_out {
            Some(answer) => {
                let cause = match kind.as_mut().project() {
                    KindProj::Owner { owner, .. } => owner.as_ref().and_then(Owner::cause),
                    _ => None,
                };
                // Drops the handler's future; the context's cause is already recorded.
                kind.set(Kind::Early { answer: None });
                Poll::Ready(Ok(answer.into_response(cause)))
            }
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            timeout: TimeoutSetting::Unset,
            max_timeout: None,
            policy: ClampPolicy::Clamp,
            query_param: Some("timeout"),
            timeout_status: StatusCode::GATEWAY_TIMEOUT,
            grace: Duration::ZERO,
            root: None,
            deadline_headers: Arc::new([]),
            peer_value: false,
            request_id: None,
        }
    }

    #[test]
    fn finds_the_first_exact_key() {
        assert_eq!(
            find_param(Some("a=1&timeout=2s&timeout=3s"), "timeout"),
            Some("2s")
        );
        assert_eq!(find_param(Some("timeouts=1s&xtimeout=2s"), "timeout"), None);
        assert_eq!(find_param(Some("timeout"), "timeout"), Some(""));
        assert_eq!(find_param(None, "timeout"), None);
    }

    #[test]
    fn client_timeouts() {
        let c = config();
        let t = |q: &str| client_timeout(Some(q), "timeout", &c);
        assert_eq!(t("timeout=300ms"), Ok(Some(Duration::from_millis(300))));
        assert_eq!(t("timeout=1%2E5s"), Ok(Some(Duration::from_millis(1500))));
        assert_eq!(t("timeout=5%C2%B5s"), Ok(Some(Duration::from_micros(5))));
        assert_eq!(t("q=go"), Ok(None));
        for bad in [
            "timeout=",
            "timeout=-1s",
            "timeout=0",
            "timeout=abc",
            "timeout=%ZZ",
            "timeout=%FF%FEs",
        ] {
            let err = t(bad).unwrap_err();
            assert!(
                err.starts_with("invalid `timeout` query parameter: "),
                "{bad}: {err}"
            );
        }
        let huge = format!("timeout={}", "9".repeat(10_000));
        assert!(t(&huge).unwrap_err().contains("too long"));
        assert_eq!(
            t("timeout=99999999999999999h"),
            Ok(Some(Duration::MAX)),
            "saturates; the deadline computation then means no practical deadline"
        );
    }

    #[test]
    fn error_messages_never_echo_input() {
        let c = config();
        let err = client_timeout(Some("timeout=<script>s"), "timeout", &c).unwrap_err();
        assert!(!err.contains("<script>"), "{err}");
    }

    #[test]
    fn max_timeout_policy() {
        let mut c = config();
        c.max_timeout = Some(Duration::from_secs(60));
        let t = |q: &str, c: &Config| client_timeout(Some(q), "timeout", c);
        assert_eq!(t("timeout=2h", &c), Ok(Some(Duration::from_secs(60))));
        assert_eq!(
            t("timeout=99999999999999999h", &c),
            Ok(Some(Duration::from_secs(60)))
        );
        c.policy = ClampPolicy::Reject;
        assert_eq!(
            t("timeout=2h", &c).unwrap_err(),
            "invalid `timeout` query parameter: above the maximum of 60s"
        );
        assert_eq!(t("timeout=59s", &c), Ok(Some(Duration::from_secs(59))));
    }
}
