//! The live view's page (`crates/tower-reqctx/src/live/page.html`) in a real headless
//! Chromium, against canned JSON that the test changes while the page polls it.
//!
//! Without `chromium` on the `PATH` each test says that it skipped, unless
//! `REQCTX_CHROMIUM_REQUIRED=1` (CI), which makes that a failure.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use reqctx_tests::chromium::{Chromium, Page};
use serde_json::{Value, json};

const PAGE: &str = include_str!("../../crates/tower-reqctx/src/live/page.html");

/// What `?format=json` answers; `null` makes it a 500.
type Canned = Arc<Mutex<Value>>;

async fn requests(State(canned): State<Canned>, uri: Uri) -> Response {
    if uri.query() != Some("format=json") {
        return Html(PAGE).into_response();
    }
    let doc = canned.lock().unwrap().clone();
    if doc.is_null() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no data").into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_string(),
    )
        .into_response()
}

/// Serves the page at `/debug/requests`; returns its URL and the canned JSON.
async fn serve(doc: Value) -> (String, Canned) {
    let canned = Arc::new(Mutex::new(doc));
    let app = Router::new()
        .route("/debug/requests", get(requests))
        .with_state(canned.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/debug/requests"), canned)
}

/// Opens the page and waits for its first render.
async fn open(chromium: &Chromium, url: &str) -> Page {
    let page = chromium.open(url).await;
    page.wait_until(
        "Number(document.body.dataset.updates) >= 1",
        "the first render",
    )
    .await;
    page
}

/// An in-flight row.
fn running(id: u64, route: Value, budget_ms: Value, origin: Value) -> Value {
    json!({
        "id": id, "method": "GET", "route": route, "path": null, "query": null,
        "headers": [], "age_ms": 1234.5, "budget_ms": budget_ms, "origin": origin,
        "client": "connected", "state": "running",
    })
}

/// A recently ended request.
fn ended(id: u64, route: &str, cause: &str, detail: &str) -> Value {
    json!({
        "id": id, "method": "GET", "route": route, "path": null, "query": null,
        "headers": [], "duration_ms": 12.3, "status": null, "cause": cause,
        "detail": detail, "ago_ms": 5400.0,
    })
}

/// A route's minute and hour.
fn route(route: &str) -> Value {
    let window = json!({
        "total": 42,
        "causes": { "completed": 40, "deadline_exceeded": 2 },
        "buckets": [42, 10, 2, 0, 0],
    });
    json!({ "route": route, "minute": window, "hour": window })
}

/// The whole document: `total` in flight of which `rows` are shown.
fn document(total: usize, rows: Vec<Value>, causes: Vec<Value>, routes: Vec<Value>) -> Value {
    json!({
        "uptime_ms": 123456,
        "in_flight": { "total": total, "shown": rows.len(), "limit": 1000, "rows": rows },
        "recent": { "per_cause": 10, "causes": causes },
        "routes": { "max": 64, "rows": routes },
        "buckets": ["all", ">10ms", ">100ms", ">1s", ">10s"],
    })
}

/// Three in flight (a route with a budget left, none with one passed, one without a
/// deadline), one ended by its deadline, one route.
fn three() -> Value {
    let mut with_path = running(42, json!("/a"), Value::Null, Value::Null);
    with_path["path"] = json!("/a/b");
    with_path["query"] = json!("q=x");
    with_path["headers"] = json!([["x-tenant", "acme"]]);
    document(
        3,
        vec![
            running(5, json!("/search/{id}"), json!(412.0), json!("query")),
            running(17, Value::Null, json!(-30.0), json!("layer")),
            with_path,
        ],
        vec![json!({
            "cause": "deadline_exceeded",
            "requests": [ended(3, "/search/{id}", "deadline_exceeded",
                "deadline exceeded (the client's query parameter)")],
        })],
        vec![route("/search")],
    )
}

/// The text of the cells in column `n` (1-based) of `#inflight`'s rows.
async fn column(page: &Page, n: usize) -> Value {
    page.eval(&format!(
        "[...document.querySelectorAll('#inflight tbody tr td:nth-child({n})')]\
         .map(td => td.textContent)"
    ))
    .await
}

#[tokio::test]
async fn the_rows_rendered_match_the_json() {
    let Some(chromium) = Chromium::launch().await else {
        return;
    };
    let (url, _canned) = serve(three()).await;
    let page = open(&chromium, &url).await;

    assert_eq!(
        page.eval("document.querySelectorAll('#inflight tbody tr').length")
            .await,
        json!(3)
    );
    assert_eq!(
        page.eval("[...document.querySelectorAll('#inflight tbody tr')].map(tr => tr.dataset.id)")
            .await,
        json!(["5", "17", "42"])
    );
    assert_eq!(
        page.eval("document.getElementById('inflight-summary').textContent")
            .await,
        json!("3 in flight")
    );
    let routes = column(&page, 3).await;
    assert_eq!(routes[0], json!("/search/{id}"));
    assert_eq!(routes[1], json!("(no route)"));
    // The opted-in path, query and headers follow the route.
    assert_eq!(routes[2], json!("/a/a/b?q=xx-tenant: acme"));
    assert_eq!(
        column(&page, 5).await,
        json!(["412 ms left (query)", "passed 30 ms ago (layer)", "none"])
    );
    assert_eq!(
        column(&page, 4).await,
        json!(["1.23 s", "1.23 s", "1.23 s"])
    );

    assert_eq!(
        page.eval(
            "[...document.querySelectorAll('#recent table[data-cause=deadline_exceeded] tbody tr')]\
             .map(tr => [tr.dataset.id, tr.textContent])"
        )
        .await,
        json!([[
            "3",
            "5.4 s agoGET/search/{id}12.3 msnonedeadline exceeded (the client's query parameter)"
        ]])
    );
    let search = page
        .eval("document.querySelector('#routes tr[data-route=\"/search\"]').textContent")
        .await;
    let search = search.as_str().unwrap();
    assert!(
        search.contains("completed\u{a0}40 · deadline_exceeded\u{a0}2"),
        "{search}"
    );
    // route, then per window: total, causes, and the buckets after "all".
    assert_eq!(
        page.eval(
            "[...document.querySelectorAll('#routes tr[data-route=\"/search\"] td')]\
             .map(td => td.textContent)"
        )
        .await,
        json!([
            "/search",
            "42",
            "completed\u{a0}40 · deadline_exceeded\u{a0}2",
            "10",
            "2",
            "0",
            "0",
            "42",
            "completed\u{a0}40 · deadline_exceeded\u{a0}2",
            "10",
            "2",
            "0",
            "0",
        ])
    );
}

#[tokio::test]
async fn the_page_updates_in_place_without_a_reload() {
    let Some(chromium) = Chromium::launch().await else {
        return;
    };
    let (url, canned) = serve(three()).await;
    let page = open(&chromium, &url).await;
    page.eval("window.__marker = 1").await;

    // Request 17 ends: its client went away.
    {
        let mut doc = canned.lock().unwrap();
        let rows = doc["in_flight"]["rows"].as_array_mut().unwrap();
        rows.remove(1);
        doc["in_flight"]["total"] = json!(2);
        doc["in_flight"]["shown"] = json!(2);
        doc["recent"]["causes"].as_array_mut().unwrap().push(json!({
            "cause": "client_disconnected",
            "requests": [ended(17, "/search/{id}", "client_disconnected",
                "the client disconnected")],
        }));
    }
    page.wait_until(
        "!document.querySelector('#inflight tr[data-id=\"17\"]') && \
         !!document.querySelector('table[data-cause=client_disconnected] tr[data-id=\"17\"]')",
        "request 17 moved from in flight to client_disconnected",
    )
    .await;
    assert_eq!(
        page.eval("window.__marker").await,
        json!(1),
        "the page reloaded"
    );
    assert_eq!(
        page.eval("[...document.querySelectorAll('#inflight tbody tr')].map(tr => tr.dataset.id)")
            .await,
        json!(["5", "42"])
    );
    assert_eq!(
        page.eval("document.getElementById('inflight-summary').textContent")
            .await,
        json!("2 in flight")
    );
}

#[tokio::test]
async fn ten_thousand_in_flight_show_the_thousand_oldest() {
    let Some(chromium) = Chromium::launch().await else {
        return;
    };
    let rows = (1..=1000)
        .map(|id| running(id, json!("/slow"), Value::Null, Value::Null))
        .collect();
    let (url, _canned) = serve(document(10_000, rows, vec![], vec![route("/slow")])).await;
    let page = open(&chromium, &url).await;

    assert_eq!(
        page.eval("document.querySelectorAll('#inflight tr[data-id]').length")
            .await,
        json!(1000)
    );
    assert_eq!(
        page.eval("document.querySelectorAll('#inflight tbody tr').length")
            .await,
        json!(1000)
    );
    assert_eq!(
        page.eval("document.getElementById('inflight-summary').textContent")
            .await,
        json!("10,000 in flight, showing the 1,000 oldest")
    );
    // Later renders replace the rows, never add to them.
    let n = page.eval("Number(document.body.dataset.updates)").await;
    page.wait_until(
        &format!("Number(document.body.dataset.updates) > {n}"),
        "another render",
    )
    .await;
    assert_eq!(
        page.eval("document.querySelectorAll('#inflight tbody tr').length")
            .await,
        json!(1000)
    );
}

#[tokio::test]
async fn markup_in_the_data_renders_as_text() {
    let Some(chromium) = Chromium::launch().await else {
        return;
    };
    const EVIL: &str = "<img src=x onerror=\"window.__xss=1\">";
    let mut row = running(1, json!(EVIL), Value::Null, json!(EVIL));
    row["path"] = json!(EVIL);
    row["headers"] = json!([[EVIL, EVIL]]);
    row["method"] = json!(EVIL);
    let (url, _canned) = serve(document(
        1,
        vec![row],
        vec![json!({ "cause": EVIL, "requests": [ended(2, EVIL, EVIL, EVIL)] })],
        vec![route(EVIL)],
    ))
    .await;
    let page = open(&chromium, &url).await;

    assert_eq!(
        page.eval("document.querySelectorAll('img').length").await,
        json!(0)
    );
    assert_eq!(page.eval("window.__xss === undefined").await, json!(true));
    assert_eq!(
        column(&page, 3).await[0],
        json!(format!("{EVIL}{EVIL}{EVIL}: {EVIL}"))
    );
    assert_eq!(
        page.eval("document.querySelector('#routes tbody td').textContent")
            .await,
        json!(EVIL)
    );
}

#[tokio::test]
async fn a_failed_fetch_shows_an_error_and_keeps_the_last_data() {
    let Some(chromium) = Chromium::launch().await else {
        return;
    };
    let (url, canned) = serve(three()).await;
    let page = open(&chromium, &url).await;
    assert_eq!(
        page.eval("document.getElementById('error').hidden").await,
        json!(true)
    );
    let status = page
        .eval("document.getElementById('status').textContent")
        .await;
    assert!(status.as_str().unwrap().starts_with("updated "), "{status}");

    *canned.lock().unwrap() = Value::Null;
    page.wait_until("!document.getElementById('error').hidden", "the error line")
        .await;
    let error = page
        .eval("document.getElementById('error').textContent")
        .await;
    assert!(error.as_str().unwrap().contains("HTTP 500"), "{error}");
    assert_eq!(
        page.eval("document.querySelectorAll('#inflight tbody tr').length")
            .await,
        json!(3)
    );

    *canned.lock().unwrap() = three();
    page.wait_until(
        "document.getElementById('error').hidden",
        "the error line gone",
    )
    .await;
}

#[tokio::test]
async fn hidden_it_says_paused_and_visible_again_it_updates() {
    let Some(chromium) = Chromium::launch().await else {
        return;
    };
    let (url, canned) = serve(three()).await;
    let page = open(&chromium, &url).await;

    // What a browser does when the tab goes to the background, and back.
    page.eval(
        "Object.defineProperty(document, 'hidden', { value: true, configurable: true }); \
         document.dispatchEvent(new Event('visibilitychange'))",
    )
    .await;
    page.wait_until(
        "document.getElementById('status').textContent.endsWith('paused while hidden')",
        "the status line saying paused",
    )
    .await;
    {
        let mut doc = canned.lock().unwrap();
        doc["in_flight"]["rows"].as_array_mut().unwrap().truncate(1);
        doc["in_flight"]["total"] = json!(1);
        doc["in_flight"]["shown"] = json!(1);
    }
    page.eval("delete document.hidden; document.dispatchEvent(new Event('visibilitychange'))")
        .await;
    page.wait_until(
        "document.querySelectorAll('#inflight tbody tr').length === 1",
        "the render after the tab is visible again",
    )
    .await;
    let status = page
        .eval("document.getElementById('status').textContent")
        .await;
    assert!(!status.as_str().unwrap().contains("paused"), "{status}");
}

#[tokio::test]
async fn on_a_phone_the_tables_scroll_inside_the_page() {
    let Some(chromium) = Chromium::launch().await else {
        return;
    };
    // Long routes, paths and headers: the tables are wider than a phone.
    let long = "/api/v2/organisations/{organisation}/projects/{project}/environments/{env}";
    let rows = (1..=20)
        .map(|id| {
            let mut row = running(id, json!(long), json!(412.0), json!("header"));
            row["path"] = json!("/api/v2/organisations/acme/projects/search/environments/prod");
            row["headers"] = json!([["x-request-id", "0f8fad5b-d9cb-469f-a165-70867728950e"]]);
            row
        })
        .collect();
    let (url, _canned) = serve(document(
        20,
        rows,
        vec![json!({
            "cause": "deadline_exceeded",
            "requests": [ended(30, long, "deadline_exceeded",
                "deadline exceeded (the client's grpc-timeout header)")],
        })],
        vec![route(long)],
    ))
    .await;
    let page = chromium.open(&url).await;
    page.set_viewport(390, 844, true).await;
    // Loaded afresh at the phone's size.
    page.eval("window.__before = 1; location.reload()").await;
    page.wait_until(
        "window.__before === undefined && Number(document.body?.dataset.updates) >= 1",
        "the first render after the reload",
    )
    .await;

    // A page wider than the phone would not scroll sideways: the phone zooms out, widening
    // the layout viewport (`innerWidth`) to the content. Hence both checks.
    assert_eq!(page.eval("window.innerWidth").await, json!(390));
    let widths = page
        .eval("[document.documentElement.scrollWidth, window.innerWidth]")
        .await;
    assert!(
        widths[0].as_u64().unwrap() <= widths[1].as_u64().unwrap() + 1,
        "the page is wider than the phone: [scrollWidth, innerWidth] = {widths}"
    );
    // The tables are wider than the phone, and scroll inside their wrappers.
    for table in [
        "#inflight",
        "#routes",
        "table[data-cause=deadline_exceeded]",
    ] {
        let overflow = page
            .eval(&format!(
                "(w => [w.scrollWidth, w.clientWidth, getComputedStyle(w).overflowX])\
                 (document.querySelector('{table}').parentElement)"
            ))
            .await;
        assert!(
            overflow[0].as_u64() > overflow[1].as_u64() && overflow[2] == json!("auto"),
            "{table}'s wrapper [scrollWidth, clientWidth, overflow-x] = {overflow}"
        );
    }
}
