//! The search server of the Go blog's "Context" article, ported to reqctx.
//!
//! `/search?q=golang&timeout=1s` gives the request a context with the client's timeout (the
//! server's own 2 s otherwise, `/lucky`'s 100 ms there), stores the client's IP in it (Go's
//! `userip`, read from `X-Forwarded-For` only through trusted proxies), calls a search
//! backend bound to it (Go's `httpDo`: the call is dropped when the context ends, and its
//! remaining budget travels in `grpc-timeout`), and renders the results with the elapsed
//! time and the deadline the context has, and who set it, as HTML or, with `format=json`,
//! JSON.
//!
//! Run with no arguments, it drives itself: it starts the backend and the server, fires a
//! scripted set of requests over real sockets and prints, for each, how the server's own
//! request context ended, then exits non-zero if any row is not what it should be.
//! `--serve ADDR` keeps serving for curl and a browser, and prints one line per request:
//! method, path, status, cause, latency.
//!
//! ```sh
//! cargo run -p example-search
//! cargo run -p example-search -- --serve 127.0.0.1:8080   # then open /search?q=golang
//! cargo run -p example-search -- --serve 127.0.0.1:8080 --trust-proxy 127.0.0.1 --trust-proxy 10.0.0.0/8
//! ```

mod access_log;
mod client_ip;
mod page;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower_reqctx::header::DeadlineHeader;
use tower_reqctx::live::LiveView;
use tower_reqctx::propagate::{ClientError, ReqwestContextExt};
use tower_reqctx::reqctx::{Cause, Context};
use tower_reqctx::{ContextLayer, ReqCtx, RouteTimeout};

use crate::client_ip::TrustedProxies;
use crate::page::{Deadline, Hit, Page, render};

/// The results the backend searches, shipped with the example: title, url, snippet.
const DATA: &str = include_str!("../data/results.tsv");

/// The server's own timeout, which a client's `?timeout=` may shorten.
const SERVER_TIMEOUT: Duration = Duration::from_secs(2);
/// `/lucky` has a route timeout of its own.
const LUCKY_TIMEOUT: Duration = Duration::from_millis(100);
/// The most a client's `?timeout=` may ask for; more is clamped to it.
const MAX_TIMEOUT: Duration = Duration::from_secs(10);

/// Demo requests carry an id so that the driver can find what the server and the backend
/// saw for each. (A real service would use a request-id middleware.)
const DEMO_ID: &str = "x-demo-id";

/// The client's IP, stored in the request's context (Go's `userip` package).
#[derive(Clone, Copy, Debug)]
struct UserIp(IpAddr);

/// What the handlers saw, by demo id: the cause each context ended with.
#[derive(Default)]
struct Seen {
    server: Mutex<HashMap<String, Cause>>,
    call: Mutex<HashMap<String, Cause>>, // why the server's backend call failed, if it did
    backend: Mutex<HashMap<String, Cause>>,
    started: Mutex<Vec<String>>,
    changed: Notify,
}

impl Seen {
    fn record(
        self: &Arc<Self>,
        ctx: &Context,
        which: fn(&Seen) -> &Mutex<HashMap<String, Cause>>,
        id: Option<String>,
    ) {
        let Some(id) = id else { return };
        let seen = self.clone();
        // The cause is known once the response has gone out, after the handler returned.
        ctx.on_cancel(move |cause| {
            which(&seen).lock().unwrap().insert(id, cause.clone());
            seen.changed.notify_waiters();
        });
    }

    async fn wait(
        &self,
        which: fn(&Seen) -> &Mutex<HashMap<String, Cause>>,
        id: &str,
    ) -> Option<Cause> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let changed = self.changed.notified();
            if let Some(c) = which(self).lock().unwrap().get(id) {
                return Some(c.clone());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }
}

fn demo_id(headers: &HeaderMap) -> Option<String> {
    headers.get(DEMO_ID)?.to_str().ok().map(str::to_owned)
}

// --- the backend ------------------------------------------------------------------------

#[derive(Deserialize)]
struct BackendQuery {
    q: String,
    #[serde(default)]
    latency_ms: u64,
}

/// Searches the shipped data, taking `latency_ms` first (a slow index), unless the
/// caller's budget or connection ends before.
async fn backend_search(
    State(seen): State<Arc<Seen>>,
    ctx: ReqCtx,
    headers: HeaderMap,
    Query(query): Query<BackendQuery>,
) -> Result<Json<Vec<Hit>>, tower_reqctx::reqctx::Cancelled> {
    let id = demo_id(&headers);
    if let Some(id) = &id {
        seen.started.lock().unwrap().push(format!("backend:{id}"));
        seen.changed.notify_waiters();
    }
    seen.record(&ctx, |s| &s.backend, id);
    ctx.run(tokio::time::sleep(Duration::from_millis(query.latency_ms)))
        .await?;
    let q = query.q.to_lowercase();
    let hits = DATA
        .lines()
        .filter_map(|line| {
            let mut f = line.splitn(3, '\t');
            let (title, url, snippet) = (f.next()?, f.next()?, f.next()?);
            let matched = title.to_lowercase().contains(&q) || snippet.to_lowercase().contains(&q);
            matched.then(|| Hit {
                title: title.into(),
                url: url.into(),
                snippet: snippet.into(),
            })
        })
        .collect();
    Ok(Json(hits))
}

fn backend(seen: Arc<Seen>) -> Router {
    Router::new()
        .route("/search", get(backend_search))
        .with_state(seen)
        // The backend trusts its caller's budget.
        .layer(ContextLayer::new().deadline_header(DeadlineHeader::grpc()))
}

// --- the server -------------------------------------------------------------------------

#[derive(Clone)]
struct App {
    backend: String,
    client: reqwest::Client,
    trusted: TrustedProxies,
    seen: Arc<Seen>,
    live_view: bool,
}

/// The first value of each parameter, as the `ContextLayer` reads `timeout`: a strict
/// `Query<Struct>` would reject `?timeout=300ms&timeout=1ms` ("duplicate field") that the
/// layer has already accepted.
struct Params(Vec<(String, String)>);

impl Params {
    fn first(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn search(
    State(app): State<App>,
    ctx: ReqCtx,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let start = Instant::now();
    // What the context says, not what the query string asked for: the layer clamps,
    // a route replaces the server's timeout, and only the first `timeout` counts.
    let budget = ctx.remaining();
    let origin = ctx.deadline_origin();
    let id = demo_id(&headers);
    app.seen.record(&ctx, |s| &s.server, id.clone());
    let params = Params(params);
    let q = params.first("q").unwrap_or_default().to_owned();
    let json = params.first("format") == Some("json");
    let Ok(latency_ms) = params.first("latency_ms").unwrap_or("0").parse::<u64>() else {
        return (
            StatusCode::BAD_REQUEST,
            "invalid `latency_ms`: a whole number of milliseconds",
        )
            .into_response();
    };
    // Go's userip.NewContext: the IP travels with the context to everything below.
    let ctx = ctx.with_value(UserIp(app.trusted.client_ip(peer.ip(), &headers)));

    let results: Vec<Hit> = if q.is_empty() {
        Vec::new() // the empty page: a search box
    } else {
        // Go's httpDo: the call is bound to the context and carries its budget.
        let mut call = app
            .client
            .get(format!("{}/search", app.backend))
            .query(&[("q", q.as_str()), ("latency_ms", &latency_ms.to_string())]);
        if let Some(id) = &id {
            call = call.header(DEMO_ID, id);
        }
        match call.context(&ctx).send().await {
            Ok(res) if res.status().is_success() => match ctx.run(res.bytes()).await {
                Ok(Ok(body)) => serde_json::from_slice(&body).unwrap_or_default(),
                Ok(Err(e)) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
                Err(cancelled) => return cancelled.into_response(),
            },
            Ok(res) => {
                return (
                    StatusCode::BAD_GATEWAY,
                    format!("backend: {}", res.status()),
                )
                    .into_response();
            }
            Err(ClientError::Cancelled(cancelled)) => {
                // This request's context ended (client gone, its deadline), or the budget
                // it sent the backend ran out there first. Either way the cause is this
                // request's: a deadline reads with the origin of this request's deadline.
                if let Some(id) = id {
                    app.seen
                        .call
                        .lock()
                        .unwrap()
                        .insert(id, cancelled.cause().clone());
                }
                return cancelled.into_response();
            }
            Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        }
    };

    let page = Page {
        query: q,
        user_ip: ctx
            .value::<UserIp>()
            .map_or("unknown".into(), |ip| ip.0.to_string()),
        results,
        elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
        deadline: budget.zip(origin).map(|(budget, origin)| {
            Deadline::new(budget, ctx.remaining().unwrap_or_default(), origin)
        }),
        live_view: app.live_view,
    };
    if json {
        return Json(page).into_response();
    }
    Html(render(&page)).into_response()
}

fn server(app: App, log: bool, view: Option<&LiveView>) -> Router {
    let router = Router::new()
        .route("/search", get(search))
        // "I'm feeling lucky" must be quick: its own timeout replaces the server's.
        .route(
            "/lucky",
            get(search).layer(RouteTimeout::new(LUCKY_TIMEOUT)),
        )
        .with_state(app);
    let router = match log {
        // Inside the ContextLayer: the request's context exists there.
        true => router.layer(axum::middleware::from_fn(access_log::inner)),
        false => router,
    };
    let layer = ContextLayer::new()
        .timeout(SERVER_TIMEOUT)
        .max_timeout(MAX_TIMEOUT)
        // At the deadline the handler's backend call fails at once with the cause; a
        // short grace lets the handler answer with it, whoever saw the deadline first.
        .grace(Duration::from_millis(100));
    let router = router.layer(match view {
        Some(view) => layer.live_view(view),
        None => layer,
    });
    let router = match log {
        // Outside it: every answer passes here, the layer's own 400 and 504 too.
        true => router.layer(axum::middleware::from_fn(access_log::outer)),
        false => router,
    };
    // The live view, on the demo's own router (a demo on a local address; a real service
    // mounts it on an internal listener or behind its authentication: see the guide).
    // Nested after the layers, so that its own polling is neither logged nor listed.
    match view {
        Some(view) => router.nest("/debug/requests", view.router()),
        None => router,
    }
}

// --- start both, and the scripted demo ---------------------------------------------------------

async fn start(
    listen: &str,
    trusted: TrustedProxies,
    log: bool,
    view: Option<&LiveView>,
) -> std::io::Result<(SocketAddr, Arc<Seen>)> {
    let seen = Arc::new(Seen::default());
    let backend_listener = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend_listener.local_addr()?;
    tokio::spawn(tower_reqctx::serve(backend_listener, backend(seen.clone())).into_future());

    let app = App {
        backend: format!("http://{backend_addr}"),
        client: reqwest::Client::new(),
        trusted,
        seen: seen.clone(),
        live_view: view.is_some(),
    };
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tower_reqctx::serve(listener, server(app, log, view))
            .connect_info(true) // the access log's peer address, through axum's extractor
            .into_future(),
    );
    Ok((addr, seen))
}

struct Row {
    request: &'static str,
    status: String,
    context: String,
    call: String,
    latency: Duration,
    backend: String,
    ok: bool,
}

/// A cause as the table and the access log show it: `DeadlineExceeded(Query)`.
fn describe(cause: Option<&Cause>) -> String {
    match cause {
        None => "-".into(),
        Some(Cause::DeadlineExceeded { origin }) => format!("DeadlineExceeded({origin:?})"),
        Some(c) => format!("{c:?}"),
    }
}

/// Sends one request over a raw connection and returns the status and the whole answer;
/// with `hang_up`, closes the connection once the backend call is in flight instead.
async fn fire(
    addr: SocketAddr,
    seen: &Seen,
    id: &str,
    path: &str,
    hang_up: bool,
) -> (String, String, Duration) {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: demo\r\n{DEMO_ID}: {id}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    if hang_up {
        let started = async {
            loop {
                let changed = seen.changed.notified();
                // Hang up once the server's call to the backend is in flight.
                let backend = format!("backend:{id}");
                if seen.started.lock().unwrap().contains(&backend) {
                    return;
                }
                changed.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), started).await;
        drop(s);
        return ("hung up".into(), String::new(), start.elapsed());
    }
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
    let took = start.elapsed();
    let answer = String::from_utf8_lossy(&raw).into_owned();
    let status = answer.get(9..12).unwrap_or("???").to_owned();
    (status, answer, took)
}

/// What a scripted request must show.
struct Expect {
    status: &'static str,
    context: Option<Cause>, // how the server's own request context ends (None: never made)
    call: Option<Cause>,    // why the server's call to the backend fails (None: it does not)
    backend: Option<bool>,  // the backend call: Some(true) stopped early, Some(false) finished
    body: String,           // in the answer
}

async fn demo(addr: SocketAddr, seen: Arc<Seen>) -> bool {
    use tower_reqctx::reqctx::DeadlineOrigin;
    let done = |body: &str| Expect {
        status: "200",
        context: Some(Cause::Completed),
        call: None,
        backend: Some(false),
        body: body.to_owned(),
    };
    // The deadline rows: the backend gets this request's budget minus a 5 ms margin, so
    // its deadline passes first and its 504 comes back; the server reads it as its own
    // deadline with its own origin, answers 504, and its context ends with that cause. If
    // the server's own deadline fires first instead, the cause is the same.
    // The 504's body names who set the deadline: "the client's query parameter", ...
    let deadline = |origin: DeadlineOrigin| Expect {
        status: "504",
        context: Some(Cause::DeadlineExceeded { origin }),
        call: Some(Cause::DeadlineExceeded { origin }),
        backend: Some(true),
        body: origin.to_string(),
    };
    let script = [
        (
            "normal search",
            "/search?q=golang",
            false,
            done("for “golang”"),
        ),
        (
            "JSON form",
            "/search?q=context&format=json",
            false,
            done(r#""origin":"layer""#),
        ),
        (
            "timeout given twice: first wins",
            "/search?q=golang&timeout=300ms&timeout=1ms&format=json",
            false,
            done(r#""origin":"query""#),
        ),
        (
            "timeout=99999999999h: 2 s apply",
            "/search?q=golang&timeout=99999999999h&format=json",
            false,
            done(r#""origin":"layer""#),
        ),
        (
            "timeout=50ms, slow backend",
            "/search?q=golang&timeout=50ms&latency_ms=2000",
            false,
            deadline(DeadlineOrigin::Query),
        ),
        (
            "/lucky: route timeout 100ms",
            "/lucky?q=rust&latency_ms=2000",
            false,
            deadline(DeadlineOrigin::Layer),
        ),
        (
            "server default 2s, slow backend",
            "/search?q=golang&latency_ms=5000",
            false,
            deadline(DeadlineOrigin::Layer),
        ),
        (
            "client hangs up mid-request",
            "/search?q=golang&latency_ms=2000",
            true,
            Expect {
                status: "hung up",
                context: Some(Cause::ClientDisconnected),
                call: None, // ClientDisconnected, unless hyper dropped the handler first
                backend: Some(true),
                body: String::new(),
            },
        ),
        (
            "garbage timeout=soon",
            "/search?q=golang&timeout=soon",
            false,
            Expect {
                status: "400",
                context: None,
                call: None,
                backend: None,
                body: "invalid `timeout` query parameter".to_owned(),
            },
        ),
    ];
    let mut rows = Vec::new();
    for (i, (label, path, hang_up, want)) in script.into_iter().enumerate() {
        let id = format!("demo-{i}");
        let (status, answer, latency) = fire(addr, &seen, &id, path, hang_up).await;
        let context = match want.context {
            None => None, // the handler must never run: wait for nothing
            Some(_) => seen.wait(|s| &s.server, &id).await,
        };
        let backend = match want.backend {
            Some(_) => seen.wait(|s| &s.backend, &id).await,
            None => seen.backend.lock().unwrap().get(&id).cloned(),
        };
        let call = seen.call.lock().unwrap().get(&id).cloned();
        let backend_ok = match want.backend {
            None => backend.is_none(),
            Some(stops) => backend
                .as_ref()
                .is_some_and(|c| (*c != Cause::Completed) == stops),
        };
        let call_ok = match (&want.call, hang_up) {
            (_, true) => call
                .as_ref()
                .is_none_or(|c| *c == Cause::ClientDisconnected),
            (want, false) => call == *want,
        };
        let ok = status == want.status
            && context == want.context
            && call_ok
            && backend_ok
            && answer.contains(&want.body);
        rows.push(Row {
            request: label,
            status,
            context: match &context {
                None if want.context.is_none() => "none: refused".into(),
                c => describe(c.as_ref()),
            },
            call: match &call {
                Some(c) => format!("failed: {}", describe(Some(c))),
                None if want.context.is_none() => "not made".into(),
                None => "-".into(),
            },
            latency,
            backend: match &backend {
                None => "not called".to_owned(),
                Some(Cause::Completed) => "finished".to_owned(),
                Some(c) => format!("cancelled: {}", describe(Some(c))),
            },
            ok,
        });
    }
    println!(
        "\n{:<33} {:<8} {:<28} {:<33} {:>9}  {:<36} ok",
        "request",
        "status",
        "server's context ended",
        "its backend call",
        "latency",
        "backend's context",
    );
    for r in &rows {
        println!(
            "{:<33} {:<8} {:<28} {:<33} {:>6.1} ms  {:<36} {}",
            r.request,
            r.status,
            r.context,
            r.call,
            r.latency.as_secs_f64() * 1e3,
            r.backend,
            if r.ok { "yes" } else { "NO" }
        );
    }
    rows.iter().all(|r| r.ok)
}

fn usage() -> ! {
    eprintln!("usage: example-search [--serve ADDR] [--trust-proxy IP_OR_CIDR]...");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let mut serve = None;
    let mut trusted = TrustedProxies::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--serve" => serve = Some(args.next().unwrap_or_else(|| usage())),
            "--trust-proxy" => {
                let value = args.next().unwrap_or_else(|| usage());
                match value.parse() {
                    Ok(cidr) => trusted.0.push(cidr),
                    Err(err) => {
                        eprintln!("--trust-proxy: {err}");
                        std::process::exit(2);
                    }
                }
            }
            _ => usage(),
        }
    }
    if let Some(listen) = serve {
        let view = LiveView::new();
        let (addr, _) = start(&listen, trusted, true, Some(&view))
            .await
            .expect("start");
        println!("serving on http://{addr}/search?q=golang");
        println!(
            "  the requests in flight, and how the last ones ended: http://{addr}/debug/requests"
        );
        println!("  try &timeout=50ms&latency_ms=500, /lucky?q=rust&latency_ms=500, &format=json");
        println!(
            "\n{:<6} {:<48} {:>6}  {:<28} {:>8}",
            "method", "path", "status", "cause", "latency"
        );
        let _ = tokio::signal::ctrl_c().await;
        return;
    }
    let (addr, seen) = start("127.0.0.1:0", trusted, false, None)
        .await
        .expect("start");
    println!(
        "server on {addr}: its own timeout {SERVER_TIMEOUT:?}, /lucky {LUCKY_TIMEOUT:?}; backend bound to each request's context"
    );
    if !demo(addr, seen).await {
        eprintln!("\nsome requests did not end as expected");
        std::process::exit(1);
    }
    println!("\nevery request ended with the expected status and cause");
}
