//! A live view of the requests in flight and of how the last ones ended, for operators:
//! Go's `golang.org/x/net/trace` `/debug/requests`, for reqctx's contexts.
//!
//! Make a [`LiveView`], give it to the [`ContextLayer`](crate::ContextLayer) with
//! [`live_view`](crate::ContextLayer::live_view), and mount [`LiveView::router`] where
//! only operators reach it. Nothing is recorded for a layer without a view, and nothing is
//! served where the router is not mounted.
//!
//! # What it shows
//!
//! - **In flight**, oldest first, the [`max_rows`](LiveView::max_rows) oldest at most
//!   (1,000 by default) with the total: the method, the *matched route* (axum's
//!   `MatchedPath`, such as `/users/{id}`, never the path itself), the age, the budget
//!   left and who set it (`query`, `header`, `layer` or `route`), whether the client is
//!   still connected (under [`serve`](crate::serve) and `WatchedListener`; unknown under
//!   plain `axum::serve`), the view's own id for the request, and its state (`running`,
//!   `streaming` its body, or `upgraded`). A route's
//!   [`RouteTimeout`](crate::RouteTimeout) shows once the call or poll it ran in returns
//!   (the layer looks after each), microseconds later.
//! - **Recently ended**: the last [`recent_per_cause`](LiveView::recent_per_cause) per
//!   cause (10 by default), each with its route, duration, status and cause.
//! - **Per route**, over the last minute (in 10-second steps) and the last hour (in
//!   5-minute steps): counts per cause and latency buckets as `x/net/trace`'s (all, above
//!   10 ms, 100 ms, 1 s and 10 s). Routes past [`max_routes`](LiveView::max_routes) (64 by
//!   default) count together under `other`.
//!
//! The view's own page and JSON are not listed.
//!
//! # What it never shows unless asked
//!
//! Paths, query strings and header values can carry tokens and personal data: none of
//! them appears unless the user opts in, field by field, with
//! [`show_path`](LiveView::show_path), [`show_query`](LiveView::show_query) and
//! [`show_header`](LiveView::show_header). The request id header is a header like any
//! other. Mount the view behind authentication or on an internal listener: it shows
//! which routes are in use, and how often.
//!
//! ```
//! use axum::{Router, routing::get, middleware::{self, Next}, extract::Request};
//! use axum::{http::StatusCode, response::Response};
//! use tower_reqctx::{ContextLayer, live::LiveView};
//!
//! // Any auth middleware does; this one wants a fixed bearer token.
//! async fn operators_only(req: Request, next: Next) -> Result<Response, StatusCode> {
//!     match req.headers().get("authorization") {
//!         Some(v) if v == "Bearer let-me-see" => Ok(next.run(req).await),
//!         _ => Err(StatusCode::UNAUTHORIZED),
//!     }
//! }
//!
//! let view = LiveView::new();
//! let app: Router = Router::new()
//!     .route("/search", get(|| async { "results" }))
//!     .nest(
//!         "/debug/requests",
//!         view.router().route_layer(middleware::from_fn(operators_only)),
//!     )
//!     .layer(ContextLayer::new().live_view(&view));
//! # let _ = app;
//! ```
//!
//! # What it costs
//!
//! Without the `live` feature, or with it but no view given to the layer, nothing: the
//! layer's path is the same but for a few branches on a `None` (about 50 instructions per
//! request, measured). With a view, each request takes its shard's lock twice (it
//! arrives; it ends), stores one byte when its body starts to stream, reads the clock
//! twice (quanta's: the CPU's time-stamp counter, calibrated once per process, which takes
//! up to 200 ms of one core when the first view is made), and allocates nothing once the
//! view's tables have grown to the load, unless a `show_*` option is on (then one box per
//! request holds what it shows). About 630 instructions per request in all:
//! `docs/benchmarks.md` has the figures.
//! Memory is bounded whatever the load: the in-flight table by the peak number of requests
//! in flight, the rest by the settings (see [`LiveView::new`]).

mod registry;
#[cfg(feature = "axum")]
mod router;
mod snapshot;

use std::fmt;
use std::sync::Arc;

use http::HeaderName;

use self::registry::Settings;
pub(crate) use self::registry::{Origin, Registry, State, Ticket, code, is_common};
pub use self::snapshot::{
    CauseRing, EndedRow, InFlight, Recent, RouteRow, Routes, Row, Snapshot, WindowCounts,
};

/// A live view of the requests a [`ContextLayer`](crate::ContextLayer) serves: see the
/// [module docs](self). Cheap to clone (a pointer); every clone is the same view.
///
/// ```
/// use tower_reqctx::{ContextLayer, live::LiveView};
///
/// let view = LiveView::new().recent_per_cause(20);
/// let layer = ContextLayer::new().live_view(&view);
/// # let _ = layer;
/// assert_eq!(view.snapshot().in_flight.total, 0);
/// ```
#[derive(Clone)]
pub struct LiveView {
    registry: Arc<Registry>,
}

impl fmt::Debug for LiveView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveView")
            .field("settings", &self.registry.settings)
            .finish_non_exhaustive()
    }
}

impl Default for LiveView {
    fn default() -> LiveView {
        LiveView::new()
    }
}

impl LiveView {
    /// A view with the defaults: the 1,000 oldest requests in flight, the last 10 per
    /// cause, 64 routes, and no path, query or header shown.
    ///
    /// Its memory: one slot (48 bytes) per request in flight at the peak, the rings
    /// (`recent_per_cause` × 10 causes × the shards, 40 bytes an entry), about 1.3 KB per
    /// route and shard for the counters, and 1 KB per shard for the states of its first
    /// slots. The shards are the machine's cores rounded up to a power of two, at most 64.
    /// What a `show_*` option keeps comes on top, for the requests in flight and in the
    /// rings only.
    pub fn new() -> LiveView {
        LiveView::with(Settings::default())
    }

    fn with(settings: Settings) -> LiveView {
        LiveView {
            registry: Arc::new(Registry::new(settings)),
        }
    }

    // The settings are fixed once a layer has the view: each change makes a new, empty
    // view with the changed settings.
    fn set(self, f: impl FnOnce(&mut Settings)) -> LiveView {
        let mut settings = self.registry.settings.clone();
        f(&mut settings);
        LiveView::with(settings)
    }

    /// How many ended requests are kept per cause (10 by default; 0 keeps none).
    /// Configure the view before giving it to a layer: a changed view starts empty.
    pub fn recent_per_cause(self, n: usize) -> LiveView {
        self.set(|s| s.recent_per_cause = n)
    }

    /// How many routes get counters of their own (64 by default); requests on the routes
    /// past it count under `other`.
    pub fn max_routes(self, n: usize) -> LiveView {
        self.set(|s| s.max_routes = n)
    }

    /// How many requests in flight are listed, the oldest first (1,000 by default). The
    /// total is always given.
    pub fn max_rows(self, n: usize) -> LiveView {
        self.set(|s| s.max_rows = n)
    }

    /// Shows each request's path (without the query). Off by default: paths can carry
    /// ids and tokens. Costs a clone of the request's URI per request.
    pub fn show_path(self) -> LiveView {
        self.set(|s| s.show_path = true)
    }

    /// Shows each request's query string. Off by default: query strings carry tokens.
    pub fn show_query(self) -> LiveView {
        self.set(|s| s.show_query = true)
    }

    /// Shows the values of the header `name` (each call adds one). Off by default for
    /// every header, the request id's included.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_reqctx::live::LiveView;
    ///
    /// let view = LiveView::new().show_header(HeaderName::from_static("x-request-id"));
    /// # let _ = view;
    /// ```
    pub fn show_header(self, name: HeaderName) -> LiveView {
        self.set(|s| {
            if !s.headers.contains(&name) {
                s.headers.push(name);
            }
        })
    }

    /// What the view shows now.
    pub fn snapshot(&self) -> Snapshot {
        self.registry.snapshot()
    }

    /// [`snapshot`](Self::snapshot) as the page's JSON.
    pub fn json(&self) -> String {
        // Plain data, no maps with non-string keys: serialization cannot fail.
        serde_json::to_string(&self.snapshot()).unwrap_or_default()
    }

    /// The page: one HTML document, no external resources, that fetches its own URL with
    /// `?format=json` every second and renders it. Serve it yourself where
    /// [`router`](Self::router) does not fit.
    pub fn page() -> &'static str {
        include_str!("page.html")
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}
