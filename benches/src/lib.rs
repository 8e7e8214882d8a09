//! The benchmark suite of `reqctx`: the servers it measures and the helpers its binaries
//! share. Run it with `benches/run` (see `docs/benchmarks.md`).
//!
//! - `server`: one axum hello world per [`Variant`], served by [`tower_reqctx::serve`] (or
//!   `axum::serve` with `--serve axum`); SIGTERM shuts it down gracefully, so a profiler
//!   running it writes its output.
//! - `bench`: runs every measurement and writes the report; its subcommands are the
//!   in-process measurements and the load clients it starts as separate processes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_reqctx::reqctx::Cancelled;
use tower_reqctx::{ContextLayer, ReqCtx};
use tower_service::Service;

pub mod stats;

/// The body every hello-world variant answers with.
pub const HELLO: &str = "Hello, World!";

/// The server timeout of the variants that have one.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How long the memory variants' handlers wait: longer than any measurement.
pub const SLOW: Duration = Duration::from_secs(3600);

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
    /// A handler that yields once, no layer: the base for [`Variant::CtxRun`].
    Yield,
    /// `ContextLayer::new().timeout(30s)`; the handler extracts `ReqCtx` and yields once
    /// inside `ctx.run`.
    CtxRun,
    /// tower-http's `TimeoutLayer`, 30 s.
    TowerTimeout,
    /// tower-http's `TimeoutLayer`, 30 s, over the handler that yields once.
    TowerTimeoutYield,
    /// Memory: `/slow` waits an hour, no layer; `/inflight` counts the waiting handlers.
    BareSlow,
    /// Memory: as [`Variant::BareSlow`] under `ContextLayer::new().timeout(2h)` (the
    /// deadline timer is armed while the handler waits).
    CtxSlow,
    /// Memory: as [`Variant::CtxSlow`], the handler waiting inside `ctx.run` (so the
    /// context has a waiter and its token).
    CtxRunSlow,
    /// Deadline lateness: `/late` waits for its context (the client sets `?timeout=`) and
    /// answers how many microseconds after the deadline it saw the cancellation.
    Lateness,
}

impl Variant {
    /// Every variant, with the name `--variant` takes.
    pub const ALL: [(Variant, &'static str); 12] = [
        (Variant::Bare, "bare"),
        (Variant::Noop, "noop"),
        (Variant::Ctx, "ctx"),
        (Variant::CtxTimeout, "ctx-timeout"),
        (Variant::Yield, "yield"),
        (Variant::CtxRun, "ctx-run"),
        (Variant::TowerTimeout, "tower-timeout"),
        (Variant::TowerTimeoutYield, "tower-timeout-yield"),
        (Variant::BareSlow, "bare-slow"),
        (Variant::CtxSlow, "ctx-slow"),
        (Variant::CtxRunSlow, "ctx-run-slow"),
        (Variant::Lateness, "lateness"),
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
            Variant::CtxRun => Router::new()
                .route("/", get(ctx_run))
                .layer(ContextLayer::new().timeout(TIMEOUT)),
            Variant::TowerTimeout => Router::new().route("/", get(hello)).layer(tower_timeout()),
            Variant::TowerTimeoutYield => Router::new()
                .route("/", get(yielding))
                .layer(tower_timeout()),
            Variant::BareSlow => slow_routes(Router::new().route("/slow", get(slow))),
            Variant::CtxSlow => slow_routes(Router::new().route("/slow", get(slow)))
                .layer(ContextLayer::new().timeout(2 * SLOW)),
            Variant::CtxRunSlow => slow_routes(Router::new().route("/slow", get(slow_ctx_run)))
                .layer(ContextLayer::new().timeout(2 * SLOW)),
            Variant::Lateness => Router::new()
                .route("/late", get(late))
                // The handler answers for itself after the deadline.
                .layer(ContextLayer::new().grace(Duration::from_secs(10))),
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

/// How many `/slow` handlers are waiting.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

fn slow_routes(router: Router) -> Router {
    router.route(
        "/inflight",
        get(|| async { IN_FLIGHT.load(Ordering::Relaxed).to_string() }),
    )
}

async fn slow() -> &'static str {
    IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(SLOW).await;
    HELLO
}

async fn slow_ctx_run(ctx: ReqCtx) -> Result<&'static str, Cancelled> {
    IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    ctx.run(tokio::time::sleep(SLOW)).await?;
    Ok(HELLO)
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
