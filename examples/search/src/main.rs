//! The search server of the Go blog's "Context" article, ported to reqctx.
//!
//! `/search?q=golang&timeout=1s` gives the request a context with the client's timeout (the
//! server's own 2 s otherwise), stores the client's IP in it (Go's `userip`), calls a
//! search backend bound to it (Go's `httpDo`: the call is dropped when the context ends,
//! and its remaining budget travels in `grpc-timeout`), and renders the results with the
//! elapsed time and the timeout, as HTML or, with `format=json`, JSON.
//!
//! Run with no arguments, it drives itself: it starts the backend and the server, fires a
//! scripted set of requests over real sockets and prints what each saw, then exits non-zero
//! if any row is not what it should be. `--serve ADDR` keeps serving for curl and a browser.
//!
//! ```sh
//! cargo run -p example-search
//! cargo run -p example-search -- --serve 127.0.0.1:8080   # then open /search?q=golang
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower_reqctx::propagate::header::DeadlineHeader;
use tower_reqctx::propagate::{ClientError, ReqwestContextExt};
use tower_reqctx::reqctx::{Cause, Context};
use tower_reqctx::{ContextLayer, ReqCtx};

/// The results the backend searches, shipped with the example: title, url, snippet.
const DATA: &str = include_str!("../data/results.tsv");

/// The server's own timeout, which a client's `?timeout=` may shorten.
const SERVER_TIMEOUT: Duration = Duration::from_secs(2);
/// `/lucky` has a route timeout of its own.
const LUCKY_TIMEOUT: Duration = Duration::from_millis(100);

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

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Hit {
    title: String,
    url: String,
    snippet: String,
}

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
    trusted_proxy: Option<IpAddr>,
    seen: Arc<Seen>,
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
    #[serde(default)]
    latency_ms: u64,
    format: Option<String>,
    timeout: Option<String>, // read by the ContextLayer; echoed in the page
}

#[derive(Serialize)]
struct Page {
    query: String,
    user_ip: String,
    results: Vec<Hit>,
    elapsed_ms: f64,
    timeout: String,
}

/// The client's IP: the connection's peer, or `X-Forwarded-For` when the peer is the
/// trusted proxy (never otherwise: any client can send that header).
fn user_ip(app: &App, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if Some(peer.ip()) == app.trusted_proxy {
        let forwarded = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|ip| ip.trim().parse().ok());
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    peer.ip()
}

async fn search(
    State(app): State<App>,
    ctx: ReqCtx,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<SearchQuery>,
) -> Response {
    let start = Instant::now();
    let id = demo_id(&headers);
    app.seen.record(&ctx, |s| &s.server, id.clone());
    let Some(q) = query.q.filter(|q| !q.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "no query: add ?q=golang").into_response();
    };
    // Go's userip.NewContext: the IP travels with the context to everything below.
    let ctx = ctx.with_value(UserIp(user_ip(&app, peer, &headers)));

    // Go's httpDo: the call is bound to the context and carries its budget.
    let mut call = app.client.get(format!("{}/search", app.backend)).query(&[
        ("q", q.as_str()),
        ("latency_ms", &query.latency_ms.to_string()),
    ]);
    if let Some(id) = &id {
        call = call.header(DEMO_ID, id);
    }
    let results: Vec<Hit> = match call.context(&ctx).send().await {
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
            // Either this request's context ended (client gone, its deadline), or the
            // backend's share of the budget ran out first: DeadlineExceeded { Header }.
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
    };

    let page = Page {
        query: q,
        user_ip: ctx
            .value::<UserIp>()
            .map_or("unknown".into(), |ip| ip.0.to_string()),
        results,
        elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
        timeout: query
            .timeout
            .unwrap_or_else(|| format!("{SERVER_TIMEOUT:?} (server default)")),
    };
    if query.format.as_deref() == Some("json") {
        return Json(page).into_response();
    }
    Html(render(&page)).into_response()
}

/// The page, with everything the user typed escaped.
fn render(page: &Page) -> String {
    let mut html = format!(
        "<!doctype html><title>{q} - search</title>\n<h1>Results for “{q}”</h1>\n\
         <p>{n} results in {ms:.1} ms (timeout {t}) for {ip}</p>\n<ol>\n",
        q = escape(&page.query),
        n = page.results.len(),
        ms = page.elapsed_ms,
        t = escape(&page.timeout),
        ip = escape(&page.user_ip),
    );
    for hit in &page.results {
        html.push_str(&format!(
            "<li><a href=\"{}\">{}</a><br>{}</li>\n",
            escape(&hit.url),
            escape(&hit.title),
            escape(&hit.snippet)
        ));
    }
    html.push_str("</ol>\n");
    html
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn server(app: App) -> Router {
    Router::new()
        .route("/search", get(search))
        // "I'm feeling lucky" must be quick: its own timeout replaces the server's.
        .route(
            "/lucky",
            get(search).layer(ContextLayer::new().timeout(LUCKY_TIMEOUT)),
        )
        .with_state(app)
        .layer(
            ContextLayer::new()
                .timeout(SERVER_TIMEOUT)
                .max_timeout(Duration::from_secs(10)),
        )
}

// --- start both, and the scripted demo ---------------------------------------------------------

async fn start(
    listen: &str,
    trusted_proxy: Option<IpAddr>,
) -> std::io::Result<(SocketAddr, Arc<Seen>)> {
    let seen = Arc::new(Seen::default());
    let backend_listener = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend_listener.local_addr()?;
    tokio::spawn(tower_reqctx::serve(backend_listener, backend(seen.clone())).into_future());

    let app = App {
        backend: format!("http://{backend_addr}"),
        client: reqwest::Client::new(),
        trusted_proxy,
        seen: seen.clone(),
    };
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(tower_reqctx::serve(listener, server(app)).into_future());
    Ok((addr, seen))
}

use std::future::IntoFuture;

struct Row {
    request: &'static str,
    status: String,
    call: String,
    context: String,
    latency: Duration,
    backend: String,
    ok: bool,
}

fn describe(cause: Option<&Cause>) -> String {
    match cause {
        None => "-".into(),
        Some(Cause::DeadlineExceeded { origin }) => format!("DeadlineExceeded({origin:?})"),
        Some(c) => format!("{c:?}"),
    }
}

/// Sends one request over a raw connection; with `hang_up`, closes it once the handler
/// has started instead of reading the answer.
async fn fire(
    addr: SocketAddr,
    seen: &Seen,
    id: &str,
    path: &str,
    hang_up: bool,
) -> (String, Duration) {
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
        return ("(client hung up)".into(), start.elapsed());
    }
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
    let took = start.elapsed();
    let head = String::from_utf8_lossy(&raw);
    let status = head.get(9..12).unwrap_or("???").to_owned();
    (status, took)
}

/// What a scripted request must show.
struct Expect {
    status: &'static str,
    call: &'static [Cause], // why the server's call to the backend may fail (empty: any)
    context: &'static [Cause], // how the server's request context may end (empty: never ran)
    backend: Option<bool>,  // the backend call: Some(true) stopped early, Some(false) finished
}

async fn demo(addr: SocketAddr, seen: Arc<Seen>) -> bool {
    use tower_reqctx::reqctx::DeadlineOrigin::{Header, Query};
    const HEADER: Cause = Cause::DeadlineExceeded { origin: Header };
    const QUERY: Cause = Cause::DeadlineExceeded { origin: Query };
    const DONE: &[Cause] = &[Cause::Completed];
    let script = [
        (
            "normal search",
            "/search?q=golang",
            false,
            Expect {
                status: "200",
                call: &[],
                context: DONE,
                backend: Some(false),
            },
        ),
        (
            "JSON form",
            "/search?q=context&format=json",
            false,
            Expect {
                status: "200",
                call: &[],
                context: DONE,
                backend: Some(false),
            },
        ),
        // The backend gets the budget minus a 5 ms margin, so its deadline passes first and
        // its 504 comes back as DeadlineExceeded { Header }: the server answers 504 before
        // its own deadline, and its context ends Completed. If that answer takes longer
        // than the margin, the server's own deadline (Query) fires first: also a 504.
        (
            "timeout=50ms, slow backend",
            "/search?q=golang&timeout=50ms&latency_ms=2000",
            false,
            Expect {
                status: "504",
                call: &[HEADER, QUERY],
                context: &[Cause::Completed, QUERY],
                backend: Some(true),
            },
        ),
        (
            "client hangs up mid-request",
            "/search?q=golang&latency_ms=2000",
            true,
            Expect {
                status: "(client hung up)",
                call: &[],
                context: &[Cause::ClientDisconnected],
                backend: Some(true),
            },
        ),
        (
            "/lucky: route timeout 100ms",
            "/lucky?q=rust&latency_ms=2000",
            false,
            Expect {
                status: "504",
                call: &[
                    HEADER,
                    Cause::DeadlineExceeded {
                        origin: tower_reqctx::reqctx::DeadlineOrigin::Layer,
                    },
                ],
                context: &[
                    Cause::Completed,
                    Cause::DeadlineExceeded {
                        origin: tower_reqctx::reqctx::DeadlineOrigin::Layer,
                    },
                ],
                backend: Some(true),
            },
        ),
        (
            "garbage timeout=soon",
            "/search?q=golang&timeout=soon",
            false,
            Expect {
                status: "400",
                call: &[],
                context: &[],
                backend: None,
            },
        ),
    ];
    let mut rows = Vec::new();
    for (i, (label, path, hang_up, want)) in script.into_iter().enumerate() {
        let id = format!("demo-{i}");
        let (status, latency) = fire(addr, &seen, &id, path, hang_up).await;
        let context = match want.context {
            [] => None, // the handler must never run: wait for nothing
            _ => seen.wait(|s| &s.server, &id).await,
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
        // A hung-up request's call fails with ClientDisconnected unless hyper dropped the
        // handler first; either is right, so only a listed call cause is checked.
        let call_ok = want.call.is_empty() || call.as_ref().is_some_and(|c| want.call.contains(c));
        let context_ok = match &context {
            None => want.context.is_empty(),
            Some(c) => want.context.contains(c),
        };
        let ok = status == want.status && context_ok && backend_ok && call_ok;
        rows.push(Row {
            request: label,
            status,
            call: match &call {
                Some(c) => format!("failed: {}", describe(Some(c))),
                None if want.context.is_empty() => "(handler never ran)".into(),
                None => "-".into(),
            },
            context: describe(context.as_ref()),
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
        "\n{:<29} {:<17} {:<32} {:<26} {:>9}  {:<36} ok",
        "request",
        "status",
        "handler's backend call",
        "handler's context ended",
        "latency",
        "backend's side",
    );
    for r in &rows {
        println!(
            "{:<29} {:<17} {:<32} {:<26} {:>6.1} ms  {:<36} {}",
            r.request,
            r.status,
            r.call,
            r.context,
            r.latency.as_secs_f64() * 1e3,
            r.backend,
            if r.ok { "yes" } else { "NO" }
        );
    }
    rows.iter().all(|r| r.ok)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let trusted_proxy = flag("--trust-proxy").and_then(|ip| ip.parse().ok());
    if let Some(listen) = flag("--serve") {
        let (addr, _) = start(&listen, trusted_proxy).await.expect("start");
        println!(
            "serving on http://{addr}/search?q=golang (try &timeout=50ms&latency_ms=500, /lucky, &format=json)"
        );
        let _ = tokio::signal::ctrl_c().await;
        return;
    }
    let (addr, seen) = start("127.0.0.1:0", trusted_proxy).await.expect("start");
    println!(
        "server on {addr}: its own timeout {SERVER_TIMEOUT:?}, /lucky {LUCKY_TIMEOUT:?}; backend bound to each request's context"
    );
    if !demo(addr, seen).await {
        eprintln!("\nsome requests did not end as expected");
        std::process::exit(1);
    }
    println!("\nevery request ended with the expected status and cause");
}
