//! The view's page and JSON, as an axum router.

use std::sync::Arc;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::HeaderValue;
use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY};

use super::{LiveView, Registry};

/// The page runs its own inline script and style and talks to its own origin only.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

impl LiveView {
    /// The page at the router's root, and its data with `?format=json`. Mount it with
    /// [`Router::nest`](axum::Router::nest) (at `/debug/requests`, say) on a router only
    /// operators reach, or behind an authentication layer: see the
    /// [module docs](super).
    ///
    /// Both answers are `no-store`; the page sets a content security policy that lets it
    /// talk to its own origin only. The view's own requests are not listed.
    ///
    /// ```
    /// use axum::Router;
    /// use tower_reqctx::{ContextLayer, live::LiveView};
    ///
    /// let view = LiveView::new();
    /// // The app on one listener, the view on an internal one.
    /// let app: Router = Router::new().layer(ContextLayer::new().live_view(&view));
    /// let admin: Router = Router::new().nest("/debug/requests", view.router());
    /// # let _ = (app, admin);
    /// ```
    pub fn router<S>(&self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let registry = self.registry().clone();
        Router::new().route(
            "/",
            get(move |req: Request| {
                let registry = registry.clone();
                async move { answer(&registry, &req) }
            }),
        )
    }
}

fn answer(registry: &Arc<Registry>, req: &Request) -> Response {
    if let Some(route) = req.extensions().get::<MatchedPath>() {
        registry.hide(route.as_str());
    }
    let json = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair == "format=json"));
    let mut res = if json {
        let body = serde_json::to_string(&registry.snapshot()).unwrap_or_default();
        ([(CONTENT_TYPE, "application/json")], body).into_response()
    } else {
        let mut res = (
            [(CONTENT_TYPE, "text/html; charset=utf-8")],
            LiveView::page(),
        )
            .into_response();
        let h = res.headers_mut();
        h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        res
    };
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
