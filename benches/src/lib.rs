//! The benchmark suite of `reqctx`: the servers it measures and the helpers its binaries
//! share. Run it with `benches/run` (see `docs/benchmarks.md`).
//!
//! - `server`: one axum hello world per [`Variant`], served by plain `axum::serve`,
//!   [`tower_reqctx::serve`] or `serve` with hyper's header-read timer off (`--serve`), on a
//!   current-thread or multi-thread runtime (`--runtime`); SIGTERM shuts it down
//!   gracefully, so a profiler running it writes its output.
//! - `bench`: runs every measurement and writes the report; its subcommands are the
//!   in-process measurements and the load clients it starts as separate processes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_reqctx::live::LiveView;
use tower_reqctx::reqctx::Cancelled;
use tower_reqctx::{ContextLayer, ReqCtx};
use tower_service::Service;

pub mod stats;

/// The body every hello-world variant answers with.
pub const HELLO: &str = "Hello, World!";

/// The server timeout of the variants that have one.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The server timeout of the memory variant with a timer armed: longer than any
/// measurement.
pub const SLOW: Duration = Duration::from_secs(2 * 3600);

/// The server variants. Every layer goes through `Router::layer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Hello world, no layer.
    Bare,
    /// A pass-through layer that does nothing ([`PassLayer`]).
    Noop,
    /// `ContextLayer::new()`: no server timeout (`?timeout=` still read).
    Ctx,
    /// `ContextLayer::new().timeout(30s)`.
    CtxTimeout,
    /// A handler that yields once, no layer: the base of the yielding variants.
    Yield,
    /// `ContextLayer::new().timeout(30s)` over the handler that yields once.
    CtxTimeoutYield,
    /// `ContextLayer::new().timeout(30s)`; the handler extracts `ReqCtx` and yields once
    /// inside `ctx.run`.
    CtxRun,
    /// `ContextLayer::new().timeout(30s)`; the handler extracts `ReqCtx` and awaits
    /// `ctx.run` over work that is ready at once (the base is [`Variant::CtxTimeout`]).
    CtxRunReady,
    /// `ContextLayer::new()`; the handler extracts `ReqCtx` (the README's setup, with
    /// `tower_reqctx::serve`).
    CtxReqCtx,
    /// `ContextLayer::new().live_view(&view)`: every request recorded in a live view
    /// (issue 21's bookkeeping; the view's own page is not mounted).
    CtxLive,
    /// tower-http's `TimeoutLayer`, 30 s.
    TowerTimeout,
    /// tower-http's `TimeoutLayer`, 30 s, over the handler that yields once.
    TowerTimeoutYield,
    /// Memory: `/slow` parks on a `Notify` nobody notifies, no layer; `/inflight` counts
    /// the parked handlers.
    Park,
    /// Memory: as [`Variant::Park`] under a do-nothing `Router::layer` (what axum's
    /// layering itself keeps per request).
    NoopPark,
    /// Memory: as [`Variant::Park`] under tower-http's `TimeoutLayer`, 2 h.
    TowerTimeoutPark,
    /// Memory: as [`Variant::Park`] under `ContextLayer::new()`.
    CtxPark,
    /// Memory: as [`Variant::Park`] under `ContextLayer::new().live_view(&view)`.
    CtxLivePark,
    /// Memory: as [`Variant::Park`] under `ContextLayer::new().timeout(2h)` (the deadline
    /// timer is armed while the handler waits).
    CtxTimeoutPark,
    /// Memory: `ContextLayer::new().timeout(2h)`, the handler awaits `ctx.cancelled()`
    /// (the context has a waiter and a timer).
    CtxTimeoutCancelled,
    /// Deadline lateness: `/late` waits for its context (the client sets `?timeout=`) and
    /// answers how many microseconds after the deadline it saw the cancellation.
    Lateness,
    /// Deadline lateness without reqctx, the timer wheel's own share: no layer, `/late`
    /// reads the same `?timeout=` (with `tower_reqctx::duration`'s parser), sets its
    /// deadline on entry, waits in `tokio::time::sleep_until` and answers as
    /// [`Variant::Lateness`] does.
    LatenessTimer,
    /// Detection of an unread upload: `POST /upload` never reads its body; it prints
    /// `start` on stdout, waits for its context, then prints `end NANOS CAUSE` (NANOS: the
    /// wall clock, in ns since the Unix epoch, when the wait ended), so a client in another
    /// process can time the context's end from its own close.
    Upload,
}

impl Variant {
    /// Every variant, with the name `--variant` takes.
    pub const ALL: [(Variant, &'static str); 22] = [
        (Variant::Bare, "bare"),
        (Variant::Noop, "noop"),
        (Variant::Ctx, "ctx"),
        (Variant::CtxTimeout, "ctx-timeout"),
        (Variant::Yield, "yield"),
        (Variant::CtxTimeoutYield, "ctx-timeout-yield"),
        (Variant::CtxRun, "ctx-run"),
        (Variant::CtxRunReady, "ctx-run-ready"),
        (Variant::CtxReqCtx, "ctx-reqctx"),
        (Variant::CtxLive, "ctx-live"),
        (Variant::TowerTimeout, "tower-timeout"),
        (Variant::TowerTimeoutYield, "tower-timeout-yield"),
        (Variant::Park, "park"),
        (Variant::NoopPark, "noop-park"),
        (Variant::TowerTimeoutPark, "tower-timeout-park"),
        (Variant::CtxPark, "ctx-park"),
        (Variant::CtxLivePark, "ctx-live-park"),
        (Variant::CtxTimeoutPark, "ctx-timeout-park"),
        (Variant::CtxTimeoutCancelled, "ctx-timeout-cancelled"),
        (Variant::Lateness, "lateness"),
        (Variant::LatenessTimer, "lateness-tokio"),
        (Variant::Upload, "upload"),
    ];

    /// The variant called `name`.
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(v, _)| *v)
    }

    /// The name `--variant` takes.
    pub fn name(self) -> &'static str {
        Variant::ALL
            .iter()
            .find(|(v, _)| *v == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    /// The app.
    pub fn app(self) -> Router {
        let hello = || async { HELLO };
        let yielding = || async {
            tokio::task::yield_now().await;
            HELLO
        };
        let tower_timeout = || {
            tower_http::timeout::TimeoutLayer::with_status_code(
                http::StatusCode::REQUEST_TIMEOUT,
                TIMEOUT,
            )
        };
        match self {
            Variant::Bare => Router::new().route("/", get(hello)),
            Variant::Noop => Router::new().route("/", get(hello)).layer(PassLayer),
            Variant::Ctx => Router::new()
                .route("/", get(hello))
                .layer(ContextLayer::new()),
            Variant::CtxTimeout => Router::new()
                .route("/", get(hello))
                .layer(ContextLayer::new().timeout(TIMEOUT)),
            Variant::Yield => Router::new().route("/", get(yielding)),
            Variant::CtxTimeoutYield => Router::new()
                .route("/", get(yielding))
                .layer(ContextLayer::new().timeout(TIMEOUT)),
            Variant::CtxRun => Router::new()
                .route("/", get(ctx_run))
                .layer(ContextLayer::new().timeout(TIMEOUT)),
            Variant::CtxRunReady => Router::new()
                .route("/", get(ctx_run_ready))
                .layer(ContextLayer::new().timeout(TIMEOUT)),
            Variant::CtxReqCtx => Router::new()
                .route("/", get(ctx_reqctx))
                .layer(ContextLayer::new()),
            Variant::CtxLive => Router::new()
                .route("/", get(hello))
                .layer(ContextLayer::new().live_view(&LiveView::new())),
            Variant::TowerTimeout => Router::new().route("/", get(hello)).layer(tower_timeout()),
            Variant::TowerTimeoutYield => Router::new()
                .route("/", get(yielding))
                .layer(tower_timeout()),
            Variant::Park => slow_routes(Router::new().route("/slow", get(park))),
            Variant::NoopPark => {
                slow_routes(Router::new().route("/slow", get(park))).layer(PassLayer)
            }
            Variant::TowerTimeoutPark => slow_routes(Router::new().route("/slow", get(park)))
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    http::StatusCode::GATEWAY_TIMEOUT,
                    SLOW,
                )),
            Variant::CtxPark => {
                slow_routes(Router::new().route("/slow", get(park))).layer(ContextLayer::new())
            }
            Variant::CtxLivePark => slow_routes(Router::new().route("/slow", get(park)))
                .layer(ContextLayer::new().live_view(&LiveView::new())),
            Variant::CtxTimeoutPark => slow_routes(Router::new().route("/slow", get(park)))
                .layer(ContextLayer::new().timeout(SLOW)),
            Variant::CtxTimeoutCancelled => {
                slow_routes(Router::new().route("/slow", get(park_cancelled)))
                    .layer(ContextLayer::new().timeout(SLOW))
            }
            Variant::Lateness => Router::new()
                .route("/late", get(late))
                // The handler answers for itself after the deadline.
                .layer(ContextLayer::new().grace(Duration::from_secs(10))),
            Variant::LatenessTimer => Router::new().route("/late", get(late_timer)),
            Variant::Upload => Router::new()
                .route("/upload", axum::routing::post(unread_upload))
                .layer(ContextLayer::new()),
        }
    }
}

async fn ctx_run(ctx: ReqCtx) -> Result<&'static str, Cancelled> {
    ctx.run(async {
        tokio::task::yield_now().await;
        HELLO
    })
    .await
}

async fn ctx_run_ready(ctx: ReqCtx) -> Result<&'static str, Cancelled> {
    ctx.run(async { HELLO }).await
}

/// How many `/slow` handlers are waiting.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

fn slow_routes(router: Router) -> Router {
    router.route(
        "/inflight",
        get(|| async { IN_FLIGHT.load(Ordering::Relaxed).to_string() }),
    )
}

/// What the parked handlers wait on; nothing notifies it.
static PARKED: Notify = Notify::const_new();

async fn park() -> &'static str {
    IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    PARKED.notified().await;
    HELLO
}

async fn park_cancelled(ctx: ReqCtx) -> &'static str {
    IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    ctx.cancelled().await;
    HELLO
}

async fn ctx_reqctx(_ctx: ReqCtx) -> &'static str {
    HELLO
}

/// Waits for the context; answers how late after its deadline the wait ended, in µs.
async fn late(ctx: ReqCtx) -> String {
    ctx.cancelled().await;
    let now = Instant::now();
    match ctx.deadline() {
        Some(deadline) => now
            .saturating_duration_since(deadline)
            .as_micros()
            .to_string(),
        None => "no deadline".to_owned(),
    }
}

/// [`late`] without a context: the deadline is `?timeout=` from the handler's entry (the
/// layer's is from its `call`, microseconds earlier), the wait one tokio `Sleep`.
async fn late_timer(uri: http::Uri) -> String {
    let timeout = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("timeout=")))
        .and_then(|t| tower_reqctx::duration::parse_duration(t).ok());
    let Some(timeout) = timeout else {
        return "no deadline".to_owned();
    };
    let deadline = Instant::now() + timeout;
    tokio::time::sleep_until(deadline).await;
    Instant::now()
        .saturating_duration_since(deadline)
        .as_micros()
        .to_string()
}

/// Never reads its body: says when it started and when its context ended (see
/// [`Variant::Upload`]). The end is reported by a task of its own: hyper may drop the
/// handler when it sees the client leave.
async fn unread_upload(ctx: ReqCtx, _body: axum::body::Body) -> &'static str {
    let ctx = ctx.0;
    let waiter = ctx.clone();
    tokio::spawn(async move {
        waiter.cancelled().await;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let cause = waiter
            .cause()
            .map_or_else(|| "none".to_owned(), |c| format!("{c:?}"));
        println!("end {at} {}", cause.replace(char::is_whitespace, ""));
    });
    println!("start");
    ctx.cancelled().await;
    HELLO
}

/// A layer that does nothing, but is one: `tower::layer::util::Identity` returns the
/// inner service itself, so nothing of it is left to measure.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassLayer;

impl<S> Layer<S> for PassLayer {
    type Service = Pass<S>;

    fn layer(&self, inner: S) -> Pass<S> {
        Pass(inner)
    }
}

/// The service of [`PassLayer`].
#[derive(Clone, Copy, Debug)]
pub struct Pass<S>(S);

impl<S: Service<R>, R> Service<R> for Pass<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        self.0.call(req)
    }
}

/// Parses `--name value` pairs; `Err` names what is wrong.
pub fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Result<Option<T>, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let raw = args
                .get(i + 1)
                .ok_or_else(|| format!("{name} needs a value"))?;
            raw.parse()
                .map(Some)
                .map_err(|_| format!("{name}: cannot parse {raw:?}"))
        }
    }
}

/// The body of a raw HTTP/1.1 answer (what follows the headers), for the load clients.
pub fn response_body(raw: &[u8]) -> Option<&[u8]> {
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(&raw[at + 4..])
}
