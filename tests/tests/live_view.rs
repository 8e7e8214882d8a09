//! The live view (`tower_reqctx::live`) over real sockets: requests parked in handlers
//! appear with their route, age, budget and origin; a client that hangs up shows as
//! disconnected (under `serve` and `WatchedListener`) and then ends `client_disconnected`;
//! counts per cause match what was sent; the page and its JSON are served where mounted,
//! and never list themselves.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use reqctx_tests::{BOUND, Running, Server, http_get, probe, send};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tower_reqctx::header::DeadlineHeader;
use tower_reqctx::live::{LiveView, Row, Snapshot};
use tower_reqctx::{ContextLayer, ReqCtx, RouteTimeout};

/// Polls the view until `check` holds, failing after a generous bound with the last
/// snapshot.
async fn until(view: &LiveView, what: &str, check: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let give_up = Instant::now() + 6 * BOUND;
    loop {
        let snap = view.snapshot();
        if check(&snap) {
            return snap;
        }
        assert!(
            Instant::now() < give_up,
            "{what}: never seen; last: {snap:#?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn row<'a>(snap: &'a Snapshot, route: &str) -> &'a Row {
    snap.in_flight
        .rows
        .iter()
        .find(|r| r.route.as_deref() == Some(route))
        .unwrap_or_else(|| panic!("no row for {route}: {snap:#?}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Handlers that park until the gate opens, telling the probe when they start.
fn parking_app(view: &LiveView, gate: watch::Receiver<bool>, tx: reqctx_tests::ProbeTx) -> Router {
    let park = move |ctx: ReqCtx| {
        let (mut gate, tx) = (gate.clone(), tx.clone());
        async move {
            let _ = tx.send((*ctx).clone());
            let _ = gate.wait_for(|open| *open).await;
            "done"
        }
    };
    Router::new()
        .route("/query/{id}", get(park.clone()))
        .route("/header", get(park.clone()))
        .route("/layer", get(park.clone()))
        .route("/upload", axum::routing::post(park.clone()))
        .route(
            "/route",
            get(park).layer(RouteTimeout::new(Duration::from_secs(20))),
        )
        .nest("/debug/requests", view.router())
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_secs(60))
                .deadline_header(DeadlineHeader::grpc())
                .live_view(view),
        )
}

async fn parked_requests_show_route_age_budget_and_origin(server: Server) {
    let view = LiveView::new();
    let (open, gate) = watch::channel(false);
    let (tx, mut probe) = probe();
    let running = Running::start(server, parking_app(&view, gate, tx), Duration::ZERO).await;
    let addr = running.addr;

    // In order, each started before the next is sent: the oldest is the first.
    let sent = Instant::now();
    let mut clients = Vec::new();
    for (path, extra) in [
        ("/query/7?timeout=30s", ""),
        ("/header", "grpc-timeout: 40S\r\n"),
        ("/layer", ""),
        ("/route", ""),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n{extra}\r\n");
        clients.push(send(addr, req.as_bytes()).await);
        probe.started().await;
    }
    let started = Instant::now();

    let before = Instant::now();
    // A route's timeout shows once the handler's poll returns (the owner looks after each
    // call and poll): the last handler may still be in its first one.
    let snap = until(&view, "the route's deadline", |s| {
        s.in_flight.rows.iter().any(|r| r.origin == Some("route"))
    })
    .await;
    let after = Instant::now();
    assert_eq!(snap.in_flight.total, 4, "{snap:#?}");
    assert_eq!(snap.in_flight.shown, 4);
    let routes: Vec<_> = snap
        .in_flight
        .rows
        .iter()
        .map(|r| r.route.as_deref())
        .collect();
    assert_eq!(
        routes,
        [
            Some("/query/{id}"),
            Some("/header"),
            Some("/layer"),
            Some("/route")
        ],
        "oldest first"
    );
    let ids: Vec<u64> = snap.in_flight.rows.iter().map(|r| r.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] != w[1]),
        "distinct ids: {ids:?}"
    );
    for (route, origin, budget) in [
        ("/query/{id}", "query", 30_000.0),
        ("/header", "header", 40_000.0),
        ("/layer", "layer", 60_000.0),
        ("/route", "route", 20_000.0),
    ] {
        let r = row(&snap, route);
        assert_eq!(r.origin, Some(origin), "{r:#?}");
        assert_eq!(r.method, "GET");
        assert_eq!(r.state, "running");
        let left = r.budget_ms.expect("a deadline");
        // Set no earlier than `sent`, read no later than `after`.
        assert!(left <= budget, "{route}: {left} ms left of {budget}");
        assert!(
            left >= budget - ms(after - sent),
            "{route}: {left} ms left of {budget}"
        );
        // Arrived after `sent`, before its handler started; read between before and after.
        assert!(r.age_ms <= ms(after - sent), "{route}: age {}", r.age_ms);
        assert!(
            r.age_ms >= ms(before - started),
            "{route}: age {}",
            r.age_ms
        );
        // Nothing the user did not opt in to.
        assert_eq!((&r.path, &r.query), (&None, &None));
        assert!(r.headers.is_empty());
        let client = match server {
            Server::AxumPlain => None,
            _ => Some("connected"),
        };
        assert_eq!(r.client, client, "{route}");
    }

    // Older on a second look.
    let first_age = snap.in_flight.rows[0].age_ms;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(view.snapshot().in_flight.rows[0].age_ms >= first_age + 20.0);

    // The view's own JSON, over the socket: the same rows, and not itself.
    let (status, body) = http_get(addr, "/debug/requests?format=json").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["in_flight"]["total"], 4, "{body}");
    assert_eq!(json["in_flight"]["rows"][0]["route"], "/query/{id}");
    let (status, page) = http_get(addr, "/debug/requests").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") || page.contains("<!doctype"),
        "{page}"
    );

    open.send(true).unwrap();
    for mut c in clients {
        reqctx_tests::read_until(&mut c, "done").await;
    }
    let snap = until(&view, "four completed", |s| {
        s.in_flight.total == 0
            && s.recent
                .causes
                .iter()
                .any(|c| c.cause == "completed" && c.requests.len() == 4)
    })
    .await;
    let completed = &snap.recent.causes[0];
    assert!(completed.requests.iter().all(|e| e.status == Some(200)));
    // The page's own requests are in no table.
    let listed = |r: &Option<String>| r.as_deref().is_some_and(|r| r.starts_with("/debug"));
    assert!(
        !snap
            .recent
            .causes
            .iter()
            .flat_map(|c| &c.requests)
            .any(|e| listed(&e.route))
    );
    assert!(
        !snap
            .routes
            .rows
            .iter()
            .any(|r| r.route.starts_with("/debug")),
        "{snap:#?}"
    );
    assert_eq!(snap.routes.rows.len(), 4, "{snap:#?}");
    for r in &snap.routes.rows {
        assert_eq!(r.minute.total, 1, "{r:#?}");
        assert_eq!(r.minute.causes.get("completed"), Some(&1));
        assert_eq!(r.hour.total, 1);
    }
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_requests_show_route_age_budget_and_origin_under_serve() {
    parked_requests_show_route_age_budget_and_origin(Server::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_requests_show_route_age_budget_and_origin_under_watched_listener() {
    parked_requests_show_route_age_budget_and_origin(Server::AxumWatched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_requests_show_route_age_budget_and_origin_under_plain_axum_serve() {
    parked_requests_show_route_age_budget_and_origin(Server::AxumPlain).await;
}

async fn a_client_that_hangs_up_shows_as_disconnected_then_ends(server: Server) {
    let view = LiveView::new();
    let (open, gate) = watch::channel(false);
    let (tx, mut probe) = probe();
    let running = Running::start(server, parking_app(&view, gate, tx), Duration::ZERO).await;

    // An upload the handler never reads: hyper reads nothing more of the socket, only the
    // connection's watcher sees the client leave.
    let client = send(
        running.addr,
        b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\npartial",
    )
    .await;
    probe.started().await;
    let snap = view.snapshot();
    assert_eq!(row(&snap, "/upload").client, Some("connected"));
    drop(client); // a real close of the TCP connection

    // The handler does not look at its context: the request stays in flight, seen as
    // disconnected.
    let snap = until(&view, "the client disconnected", |s| {
        s.in_flight.rows.first().and_then(|r| r.client) == Some("disconnected")
    })
    .await;
    assert_eq!(snap.in_flight.total, 1);
    open.send(true).unwrap();
    let snap = until(&view, "ended client_disconnected", |s| {
        s.in_flight.total == 0
            && s.recent
                .causes
                .iter()
                .any(|c| c.cause == "client_disconnected")
    })
    .await;
    let ended = &snap.recent.causes[0];
    assert_eq!(ended.cause, "client_disconnected", "{snap:#?}");
    assert_eq!(ended.requests[0].route.as_deref(), Some("/upload"));
    assert_eq!(ended.requests[0].method, "POST");
    assert_eq!(snap.recent.causes.len(), 1, "no other cause: {snap:#?}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_shows_as_disconnected_then_ends_under_serve() {
    a_client_that_hangs_up_shows_as_disconnected_then_ends(Server::Serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_shows_as_disconnected_then_ends_under_watched_listener() {
    a_client_that_hangs_up_shows_as_disconnected_then_ends(Server::AxumWatched).await;
}

/// 200 mixed requests: 80 complete, 60 time out, 60 hang up. The counts per route and
/// cause are exactly those, and each cause's ring holds its last 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_per_cause_match_what_was_sent() {
    let view = LiveView::new();
    let (tx, mut probe) = probe();
    let hold = move |ctx: ReqCtx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((*ctx).clone());
            ctx.cancelled().await;
            "left"
        }
    };
    let app = Router::new()
        .route("/fast", get(|| async { "fast" }))
        .route(
            "/slow",
            get(|ctx: ReqCtx| async move { ctx.cancelled().await }),
        )
        .route("/hold", get(hold))
        .layer(ContextLayer::new().live_view(&view));
    let running = Running::start(Server::Serve, app, Duration::ZERO).await;
    let addr = running.addr;

    let mut tasks = Vec::new();
    for i in 0..80 {
        tasks.push(tokio::spawn(async move {
            let (status, _) = http_get(addr, &format!("/fast?n={i}")).await;
            assert_eq!(status, 200);
        }));
    }
    for _ in 0..60 {
        tasks.push(tokio::spawn(async move {
            let (status, _) = http_get(addr, "/slow?timeout=20ms").await;
            assert_eq!(status, 504);
        }));
    }
    // Each hangs up once its handler has started.
    for _ in 0..60 {
        let mut c = send(addr, b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n").await;
        probe.started().await;
        c.shutdown().await.unwrap();
        drop(c);
    }
    for t in tasks {
        t.await.unwrap();
    }

    let snap = until(&view, "200 ended", |s| {
        s.in_flight.total == 0 && s.routes.rows.iter().map(|r| r.minute.total).sum::<u64>() == 200
    })
    .await;
    let count = |route: &str, cause: &str| {
        let r = snap.routes.rows.iter().find(|r| r.route == route).unwrap();
        (
            r.minute.total,
            r.minute.causes.get(cause).copied(),
            r.hour.total,
        )
    };
    assert_eq!(count("/fast", "completed"), (80, Some(80), 80), "{snap:#?}");
    assert_eq!(
        count("/slow", "deadline_exceeded"),
        (60, Some(60), 60),
        "{snap:#?}"
    );
    assert_eq!(
        count("/hold", "client_disconnected"),
        (60, Some(60), 60),
        "{snap:#?}"
    );
    // The timed out ones took at least their 20 ms: all of them are above 10 ms.
    let slow = snap
        .routes
        .rows
        .iter()
        .find(|r| r.route == "/slow")
        .unwrap();
    assert_eq!(slow.minute.buckets[1], 60, "{slow:#?}");
    for c in &snap.recent.causes {
        assert_eq!(c.requests.len(), 10, "{c:#?}");
        let (route, status) = match c.cause {
            "completed" => ("/fast", Some(200)),
            "deadline_exceeded" => ("/slow", Some(504)),
            "client_disconnected" => ("/hold", None),
            other => panic!("unexpected cause {other}"),
        };
        for e in &c.requests {
            assert_eq!(e.route.as_deref(), Some(route));
            if c.cause != "client_disconnected" {
                assert_eq!(e.status, status, "{e:#?}");
            }
        }
        assert!(
            c.requests.windows(2).all(|w| w[0].ago_ms <= w[1].ago_ms),
            "newest first"
        );
    }
    assert_eq!(snap.recent.causes.len(), 3);
    running.shutdown().await.unwrap();
}

/// Paths, queries and headers appear only when asked for, field by field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_queries_and_headers_only_when_asked() {
    let (tx, mut probe) = probe();
    let gate = Arc::new(tokio::sync::Notify::new());
    let app = |view: &LiveView| {
        let (tx, gate) = (tx.clone(), gate.clone());
        Router::new()
            .route(
                "/item/{id}",
                get(move |ctx: ReqCtx| {
                    let (tx, gate) = (tx.clone(), gate.clone());
                    async move {
                        let _ = tx.send((*ctx).clone());
                        gate.notified().await;
                        "ok"
                    }
                }),
            )
            .layer(ContextLayer::new().live_view(view))
    };
    let request = b"GET /item/42?token=s3cret HTTP/1.1\r\nhost: x\r\nx-tenant: acme\r\nauthorization: Bearer s3cret\r\n\r\n";

    let hidden = LiveView::new();
    let running = Running::start(Server::Serve, app(&hidden), Duration::ZERO).await;
    let _c = send(running.addr, request).await;
    probe.started().await;
    let json = hidden.json();
    assert!(
        !json.contains("s3cret") && !json.contains("acme") && !json.contains("/item/42"),
        "{json}"
    );
    assert!(json.contains("/item/{id}"), "{json}");
    gate.notify_waiters();
    running.abort();

    let shown = LiveView::new()
        .show_path()
        .show_header(http::HeaderName::from_static("x-tenant"));
    let running = Running::start(Server::Serve, app(&shown), Duration::ZERO).await;
    let _c = send(running.addr, request).await;
    probe.started().await;
    let snap = shown.snapshot();
    let r = &snap.in_flight.rows[0];
    assert_eq!(r.path.as_deref(), Some("/item/42"));
    assert_eq!(r.query, None, "the query is its own opt-in");
    assert_eq!(r.headers, [("x-tenant".to_owned(), "acme".to_owned())]);
    assert!(!shown.json().contains("s3cret"));
    gate.notify_waiters();
    running.abort();
}

/// The real view in a real browser: headless Chromium loads the page of a server with
/// requests parked in handlers, the rows come from its DOM, and when one request ends
/// the page moves it to the ended ones without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_browser_shows_what_is_in_flight_and_follows_it() {
    use reqctx_tests::chromium::Chromium;

    let Some(chromium) = Chromium::launch().await else {
        return;
    };
    let view = LiveView::new();
    let (tx, mut probe) = probe();
    // One gate per route: each request is released on its own.
    let gates: Vec<_> = (0..3).map(|_| watch::channel(false)).collect();
    let park = |gate: watch::Receiver<bool>| {
        let tx = tx.clone();
        move |ctx: ReqCtx| {
            let (mut gate, tx) = (gate.clone(), tx.clone());
            async move {
                let _ = tx.send((*ctx).clone());
                let _ = gate.wait_for(|open| *open).await;
                "done"
            }
        }
    };
    let app = Router::new()
        .route("/search", get(park(gates[0].1.clone())))
        .route("/items/{id}", get(park(gates[1].1.clone())))
        .route("/report", get(park(gates[2].1.clone())))
        .nest("/debug/requests", view.router())
        .layer(ContextLayer::new().live_view(&view));
    let running = Running::start(Server::Serve, app, Duration::ZERO).await;
    let addr = running.addr;
    let mut clients = Vec::new();
    for path in ["/search?timeout=1h", "/items/42", "/report"] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        clients.push(send(addr, req.as_bytes()).await);
        probe.started().await;
    }

    let page = chromium
        .open(&format!("http://{addr}/debug/requests"))
        .await;
    page.wait_until(
        "document.querySelectorAll('#inflight tbody tr').length === 3",
        "three rows in flight",
    )
    .await;
    let rows = page
        .eval("[...document.querySelectorAll('#inflight tbody tr')].map(tr => tr.textContent)")
        .await;
    let rows: Vec<String> = serde_json::from_value(rows).unwrap();
    assert!(
        rows[0].contains("/search") && rows[0].contains("query"),
        "{rows:?}"
    );
    assert!(
        rows[1].contains("/items/{id}") && !rows[1].contains("42"),
        "{rows:?}"
    );
    assert!(rows[2].contains("/report"), "{rows:?}");
    let summary = page
        .eval("document.getElementById('inflight-summary').textContent")
        .await;
    assert!(
        summary.as_str().unwrap().contains("3 in flight"),
        "{summary}"
    );

    // The second request ends; the page follows without a reload.
    page.eval("window.__marker = 1").await;
    gates[1].0.send(true).unwrap();
    reqctx_tests::read_until(&mut clients[1], "done").await;
    page.wait_until(
        "document.querySelectorAll('#inflight tbody tr').length === 2 && \
         [...document.querySelectorAll('table[data-cause=completed] tbody tr')]\
           .some(tr => tr.textContent.includes('/items/{id}'))",
        "the ended request moved to the completed ones",
    )
    .await;
    assert_eq!(page.eval("window.__marker").await, 1, "the page reloaded");
    let rows = page
        .eval("[...document.querySelectorAll('#inflight tbody tr')].map(tr => tr.textContent)")
        .await;
    let rows: Vec<String> = serde_json::from_value(rows).unwrap();
    assert!(
        rows[0].contains("/search") && rows[1].contains("/report"),
        "{rows:?}"
    );

    for (open, _) in &gates {
        let _ = open.send(true);
    }
    running.shutdown().await.unwrap();
}

/// Sends `n` keep-alive requests on one connection, to `/item/{i % paths}` from `first`.
async fn keep_alive(addr: std::net::SocketAddr, first: usize, n: usize, paths: usize) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    for i in first..first + n {
        let req = format!("GET /item/{} HTTP/1.1\r\nhost: x\r\n\r\n", i % paths);
        write.write_all(req.as_bytes()).await.unwrap();
        let mut length = 0;
        loop {
            line.clear();
            read.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            assert!(!line.is_empty(), "the server closed the connection");
        }
        let mut body = vec![0; length];
        read.read_exact(&mut body).await.unwrap();
    }
}

/// 100,000 requests over 10,000 distinct paths under one route: the view's memory after
/// the first 10,000 (every path seen once) is all it ever holds, with paths shown or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_over_100k_requests_on_10k_paths() {
    const PATHS: usize = 10_000;
    const CONNECTIONS: usize = 8;
    for view in [LiveView::new(), LiveView::new().show_path().show_query()] {
        let app = Router::new()
            .route("/item/{id}", get(|| async { "ok" }))
            .layer(ContextLayer::new().live_view(&view));
        let running = Running::start(Server::Serve, app, Duration::ZERO).await;
        let addr = running.addr;
        let mut sizes = Vec::new();
        for round in 0..10 {
            let per = PATHS / CONNECTIONS;
            let tasks: Vec<_> = (0..CONNECTIONS)
                .map(|c| tokio::spawn(keep_alive(addr, round * PATHS + c * per, per, PATHS)))
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let snap = until(&view, "every request ended", |s| s.in_flight.total == 0).await;
            sizes.push(snap.memory_bytes);
        }
        let snap = view.snapshot();
        let r = &snap.routes.rows[0];
        assert_eq!(r.route, "/item/{id}");
        assert_eq!(r.hour.total, 100_000, "{r:#?}");
        assert_eq!(snap.routes.rows.len(), 1);
        eprintln!("live view memory after each 10,000 requests ({view:?}): {sizes:?} bytes");
        // Nothing grows with the requests or the paths after the first round.
        assert!(sizes.iter().all(|&s| s == sizes[0]), "{sizes:?}");
        assert!(sizes[0] < 64 * 1024, "{sizes:?}");
        running.shutdown().await.unwrap();
    }
}

/// A deadline set by a route's timeout is the route's, in flight and once ended; one the
/// client set on that route stays the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_is_named_as_the_routes() {
    let view = LiveView::new();
    let app = Router::new()
        .route(
            "/lucky",
            get(|ctx: ReqCtx| async move { ctx.cancelled().await })
                .layer(RouteTimeout::new(Duration::from_millis(20))),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_secs(60))
                .live_view(&view),
        );
    let running = Running::start(Server::Serve, app, Duration::ZERO).await;
    assert_eq!(http_get(running.addr, "/lucky").await.0, 504);
    assert_eq!(http_get(running.addr, "/lucky?timeout=10ms").await.0, 504);
    let snap = until(&view, "two ended", |s| {
        s.recent
            .causes
            .first()
            .is_some_and(|c| c.requests.len() == 2)
    })
    .await;
    let ended = &snap.recent.causes[0];
    assert_eq!(ended.cause, "deadline_exceeded");
    assert_eq!(
        ended.requests[1].detail,
        "deadline exceeded (set by the route's timeout)"
    );
    assert!(ended.requests[0].detail.contains("query"), "{ended:#?}");
    running.shutdown().await.unwrap();
}

/// More in flight than the view lists: the oldest `max_rows`, and the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_in_flight_than_listed_gives_the_oldest_and_the_total() {
    let view = LiveView::new().max_rows(5).show_path();
    let (open, gate) = watch::channel(false);
    let (tx, mut probe) = probe();
    let running = Running::start(Server::Serve, parking_app(&view, gate, tx), Duration::ZERO).await;
    let mut clients = Vec::new();
    for i in 0..8 {
        let req = format!("GET /query/{i}?timeout=1h HTTP/1.1\r\nhost: x\r\n\r\n");
        clients.push(send(running.addr, req.as_bytes()).await);
        probe.started().await;
    }
    let first = view.snapshot();
    let (status, body) = http_get(running.addr, "/debug/requests?format=json").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let snap = first;
    assert_eq!(
        (
            snap.in_flight.total,
            snap.in_flight.shown,
            snap.in_flight.limit
        ),
        (8, 5, 5)
    );
    assert_eq!(json["in_flight"]["total"], 8);
    assert_eq!(json["in_flight"]["rows"].as_array().unwrap().len(), 5);
    // The five oldest, oldest first: ages never increase down the list.
    let ages: Vec<f64> = snap.in_flight.rows.iter().map(|r| r.age_ms).collect();
    assert!(ages.windows(2).all(|w| w[0] >= w[1]), "{ages:?}");
    let ids: Vec<u64> = snap.in_flight.rows.iter().map(|r| r.id).collect();
    let all = LiveView::snapshot(&view);
    assert_eq!(
        all.in_flight.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids
    );
    open.send(true).unwrap();
    running.shutdown().await.unwrap();
}

/// A WebSocket is listed as upgraded, with no deadline (the request's timeout does not cut
/// it short), until the client closes it: then it ends `client_disconnected`, status 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_listed_as_upgraded_until_it_ends() {
    use axum::extract::ws::WebSocketUpgrade;
    let view = LiveView::new();
    let app = Router::new()
        .route(
            "/ws",
            get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if socket.send(msg).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_secs(30))
                .live_view(&view),
        );
    let running = Running::start(Server::Serve, app, Duration::ZERO).await;
    let tcp = reqctx_tests::connect(running.addr).await;
    let (mut ws, res) = tokio_tungstenite::client_async(format!("ws://{}/ws", running.addr), tcp)
        .await
        .unwrap();
    assert_eq!(res.status(), 101);
    let snap = until(&view, "the upgraded request", |s| {
        s.in_flight
            .rows
            .first()
            .is_some_and(|r| r.state == "upgraded")
    })
    .await;
    let r = &snap.in_flight.rows[0];
    assert_eq!(
        (r.route.as_deref(), r.budget_ms, r.origin),
        (Some("/ws"), None, None)
    );
    assert_eq!(r.client, Some("connected"));
    ws.close(None).await.unwrap();
    drop(ws);
    let snap = until(&view, "the WebSocket ended", |s| {
        s.in_flight.total == 0 && !s.recent.causes.is_empty()
    })
    .await;
    let ended = &snap.recent.causes[0].requests[0];
    assert_eq!(ended.status, Some(101), "{snap:#?}");
    assert!(
        ["completed", "client_disconnected"].contains(&ended.cause),
        "{snap:#?}"
    );
    running.shutdown().await.unwrap();
}

/// HTTP/2: two streams on one connection; a real `RST_STREAM` on the first ends it
/// `client_disconnected` in the view while the second stays in flight, its client still
/// connected (the reset was one stream's, not the connection's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_reset_ends_that_request_only() {
    for server in [Server::Serve, Server::AxumWatched] {
        let view = LiveView::new();
        let (open, gate) = watch::channel(false);
        let (tx, mut probe) = probe();
        let running = Running::start(server, parking_app(&view, gate, tx), Duration::ZERO).await;
        let (mut send, conn) = reqctx_tests::h2_client(running.addr).await;
        let get = |path: &str| {
            http::Request::get(format!("http://{}{path}", running.addr))
                .body(())
                .unwrap()
        };
        let (_first, mut first) = send.send_request(get("/query/1"), true).unwrap();
        probe.started().await;
        let mut send = send.ready().await.unwrap();
        let (_second, _stream) = send.send_request(get("/layer"), true).unwrap();
        probe.started().await;
        assert_eq!(view.snapshot().in_flight.total, 2);

        first.send_reset(h2::Reason::CANCEL);
        let snap = until(&view, "the reset stream ended", |s| {
            s.in_flight.total == 1 && !s.recent.causes.is_empty()
        })
        .await;
        let ended = &snap.recent.causes[0];
        assert_eq!(ended.cause, "client_disconnected", "{server:?}: {snap:#?}");
        assert_eq!(ended.requests[0].route.as_deref(), Some("/query/{id}"));
        let row = &snap.in_flight.rows[0];
        assert_eq!(row.route.as_deref(), Some("/layer"), "{server:?}");
        assert_eq!(row.client, Some("connected"), "{server:?}");
        assert_eq!(row.state, "running");

        open.send(true).unwrap();
        conn.abort();
        running.shutdown().await.unwrap();
    }
}

/// The view in the stacks users build, under `serve` and plain `axum::serve`: a static
/// file through `CompressionLayer` ends `completed` with its 200; a panic caught by
/// `CatchPanicLayer` outside the layer ends `handler_panicked` with no status of ours; an
/// erroring tower layer inside, turned into a 408 by `HandleErrorLayer` outside, ends
/// `service_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_real_stacks_each_request_ends_with_its_cause() {
    use axum::error_handling::HandleErrorLayer;
    use tower::ServiceBuilder;
    use tower_http::catch_panic::CatchPanicLayer;
    use tower_http::compression::CompressionLayer;
    use tower_http::services::ServeDir;

    let dir = std::env::temp_dir().join(format!("reqctx-live-stack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("file.txt"), "x".repeat(100_000)).unwrap();
    for server in [Server::Serve, Server::AxumPlain] {
        let view = LiveView::new();
        let slow = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
        let failing = ServiceBuilder::new()
            .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                http::StatusCode::REQUEST_TIMEOUT
            }))
            .layer(ContextLayer::new().live_view(&view))
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(20)));
        let app = Router::new()
            .route(
                "/panic",
                get(|| async {
                    tokio::task::yield_now().await;
                    if std::hint::black_box(true) {
                        panic!("on purpose");
                    }
                    "unreachable"
                }),
            )
            .nest_service("/static", ServeDir::new(&dir))
            .layer(ContextLayer::new().live_view(&view))
            .layer(CompressionLayer::new())
            .layer(CatchPanicLayer::new())
            .merge(slow.layer(failing));
        let running = Running::start(server, app, BOUND).await;
        let mut file = send(
            running.addr,
            b"GET /static/file.txt HTTP/1.1\r\nhost: x\r\naccept-encoding: gzip\r\nconnection: close\r\n\r\n",
        )
        .await;
        let head = reqctx_tests::read_to_end(&mut file).await;
        assert!(head.contains("content-encoding: gzip"), "{head}");
        assert_eq!(http_get(running.addr, "/panic").await.0, 500);
        assert_eq!(http_get(running.addr, "/slow").await.0, 408);

        let snap = until(&view, "three ended", |s| {
            s.in_flight.total == 0
                && s.recent
                    .causes
                    .iter()
                    .map(|c| c.requests.len())
                    .sum::<usize>()
                    == 3
        })
        .await;
        let ended = |cause: &str| {
            let ring = snap.recent.causes.iter().find(|c| c.cause == cause);
            ring.unwrap_or_else(|| panic!("{server:?}: no {cause}: {snap:#?}"))
                .requests[0]
                .clone()
        };
        assert_eq!(ended("completed").status, Some(200), "{server:?}");
        assert_eq!(ended("handler_panicked").route.as_deref(), Some("/panic"));
        assert_eq!(ended("handler_panicked").status, None, "{server:?}");
        assert_eq!(ended("service_failed").route.as_deref(), Some("/slow"));
        running.abort();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
