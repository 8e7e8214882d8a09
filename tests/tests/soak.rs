//! The fault soak: a `serve`d app under a seeded mix of HTTP/1.1 and HTTP/2 clients that
//! behave, time out, send bad timeouts, or leave at random points (FIN or RST), then a
//! graceful shutdown. Every handler that started must see exactly one cause, the right one
//! for what its client did; afterwards no context, task or file descriptor is left, and RSS
//! is back near its start.
//!
//! `REQCTX_SOAK=200000` for a long run (default 20,000 requests); `REQCTX_SOAK_SEED=<u64>`
//! replays a run (the seed is printed). Alone in its file: the live-context counter and
//! the fd and task counts are process-wide.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::Uri;
use axum::routing::{get, post};
use bytes::Bytes;
use reqctx::{Cancelled, Cause, Context, DeadlineOrigin};
use reqctx_tests::{
    BOUND, Running, Server, connect, endless, h2_client, parse_response, reset, send,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tower_reqctx::header::DeadlineHeader;
use tower_reqctx::{ContextLayer, ReqCtx, RouteTimeout, live_request_contexts};

/// Requests in flight at once.
const IN_FLIGHT: usize = 32;
/// HTTP/2 connections shared by the multiplexed requests.
const H2_CONNS: usize = 4;
/// The route timeout of `/layer-wait`, in ms: a `Layer` deadline without waiting 10 s.
const ROUTE_TIMEOUT_MS: u64 = 15;
/// Requests waiting in their handlers when the shutdown signal comes.
const AT_SHUTDOWN: u64 = 40;
/// How far RSS may stay above its start after the soak (see the assertion).
const RSS_SLACK_KB: u64 = 16 * 1024;

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------
// A seeded PRNG (xorshift64*), so that a failing mix can be replayed.

#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed: never zero, and nearby seeds diverge at once.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi` (bias irrelevant here).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// The server side: handlers record their start and, through `on_cancel`, their cause.

#[derive(Debug, Default)]
struct Seen {
    starts: u32,
    causes: Vec<Cause>, // from on_cancel: must end up with exactly one
    changed: Option<(Cause, Cause)>, // a later read disagreed with the first
}

#[derive(Debug, Default)]
struct Shared {
    seen: Mutex<HashMap<u64, Seen>>,
    /// Clients waiting for their handler to start.
    waiting: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Recently ended contexts, read again when they leave the window and at the end.
    window: Mutex<VecDeque<(u64, Cause, Context)>>,
}

const WINDOW: usize = 1024;

impl Shared {
    fn begin(self: &Arc<Self>, ctx: &ReqCtx, uri: &Uri) {
        let id = request_id(uri);
        lock(&self.seen).entry(id).or_default().starts += 1;
        let shared = self.clone();
        let kept = ctx.0.clone();
        let _ = ctx.on_cancel(move |cause| shared.ended(id, cause.clone(), kept));
        if let Some(tx) = lock(&self.waiting).remove(&id) {
            let _ = tx.send(());
        }
    }

    fn ended(&self, id: u64, cause: Cause, ctx: Context) {
        self.check(id, &cause, &ctx);
        lock(&self.seen)
            .entry(id)
            .or_default()
            .causes
            .push(cause.clone());
        let evicted = {
            let mut w = lock(&self.window);
            w.push_back((id, cause, ctx));
            if w.len() > WINDOW {
                w.pop_front()
            } else {
                None
            }
        };
        if let Some((id, cause, ctx)) = evicted {
            self.check(id, &cause, &ctx);
        }
    }

    /// A context's cause never changes: compare a fresh read with the first one.
    fn check(&self, id: u64, first: &Cause, ctx: &Context) {
        let now = ctx.cause();
        if now.as_ref() != Some(first) {
            let now = now.unwrap_or(Cause::Cancelled);
            lock(&self.seen).entry(id).or_default().changed = Some((first.clone(), now));
        }
    }

    fn drain_window(&self) {
        let all: Vec<_> = lock(&self.window).drain(..).collect();
        for (id, cause, ctx) in all {
            self.check(id, &cause, &ctx);
        }
    }

    fn notify_on_start(&self, id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id, tx);
        rx
    }
}

fn request_id(uri: &Uri) -> u64 {
    uri.query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("id=")))
        .and_then(|v| v.parse().ok())
        .expect("every soak request carries ?id=")
}

fn param_ms(uri: &Uri) -> u64 {
    uri.query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("ms=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn wait_for_cause(ctx: ReqCtx) -> Result<&'static str, Cancelled> {
    ctx.run(std::future::pending::<()>()).await?;
    Ok("unreachable")
}

fn app(shared: Arc<Shared>) -> Router {
    let (s1, s2, s3, s4, s5) = (
        shared.clone(),
        shared.clone(),
        shared.clone(),
        shared.clone(),
        shared,
    );
    Router::new()
        .route(
            "/work",
            get(move |ctx: ReqCtx, uri: Uri| async move {
                s1.begin(&ctx, &uri);
                let ms = param_ms(&uri);
                if ms > 0 {
                    ctx.run(tokio::time::sleep(Duration::from_millis(ms)))
                        .await?;
                }
                Ok::<_, Cancelled>("ok")
            }),
        )
        .route(
            "/wait",
            get(move |ctx: ReqCtx, uri: Uri| async move {
                s2.begin(&ctx, &uri);
                wait_for_cause(ctx).await
            }),
        )
        .route(
            "/layer-wait",
            get(move |ctx: ReqCtx, uri: Uri| async move {
                s3.begin(&ctx, &uri);
                wait_for_cause(ctx).await
            })
            .layer(RouteTimeout::new(Duration::from_millis(ROUTE_TIMEOUT_MS))),
        )
        .route(
            "/upload",
            post(move |ctx: ReqCtx, uri: Uri, _unread: Body| async move {
                s4.begin(&ctx, &uri);
                wait_for_cause(ctx).await
            }),
        )
        .route(
            "/stream",
            get(move |ctx: ReqCtx, uri: Uri| async move {
                s5.begin(&ctx, &uri);
                Body::from_stream(endless(b"tick\n", Duration::from_millis(1)))
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_secs(10))
                .max_timeout(Duration::from_secs(60))
                .deadline_header(DeadlineHeader::grpc()),
        )
}

// ---------------------------------------------------------------------------------------
// The clients.

/// What the handler of a request must see.
#[derive(Clone, Debug)]
enum Want {
    /// The handler starts and its context ends with this cause.
    Cause(Cause),
    /// If the handler started (the client may leave first), this cause.
    IfStarted(Cause),
    /// The handler never runs (rejected, or the request never arrived whole).
    NoHandler,
}

#[derive(Debug)]
struct Outcome {
    id: u64,
    scenario: &'static str,
    want: Want,
    expect_status: Option<u16>, // None: the client left, nothing to answer
    status: Option<u16>,
}

/// Bytes outside this set are percent-encoded in a query.
fn encode_query(value: &[u8]) -> String {
    let mut out = String::new();
    for &b in value {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A valid `?timeout=` for `ms` milliseconds, in one of several spellings.
fn query_for_ms(rng: &mut Rng, ms: u64) -> Vec<u8> {
    match rng.range(0, 4) {
        0 => format!("{ms}ms").into_bytes(),
        1 => format!("{}us", ms * 1000).into_bytes(),
        2 => format!("{}ns", ms * 1_000_000).into_bytes(),
        3 => format!("0.{ms:03}s").into_bytes(),
        _ => format!("{}\u{b5}s", ms * 1000).into_bytes(),
    }
}

/// A valid `grpc-timeout` for `ms` milliseconds.
fn grpc_for_ms(rng: &mut Rng, ms: u64) -> String {
    match rng.range(0, 2) {
        0 => format!("{ms}m"),
        1 => format!("{}u", ms * 1000),
        _ => format!("{}n", ms * 1_000_000),
    }
}

/// A valid `?timeout=` long enough never to fire in a soak (clamped to 60 s).
const LONG_QUERY: &[&str] = &[
    "10s",
    "1m",
    "1h",
    "+30s",
    "1m30.5s",
    "2h45m",
    "10000ms",
    "99999999999999999h",
    "30s0ms",
];
const LONG_GRPC: &[&str] = &["30S", "1M", "99999999H", "10000m", "60000000u"];

/// An invalid `?timeout=` (by construction, not by asking the parser).
fn bad_query(rng: &mut Rng) -> Vec<u8> {
    const FIXED: &[&str] = &[
        "",
        "0",
        "0s",
        "+0",
        "0h0m",
        "-1s",
        "-0",
        "5",
        "5x",
        "abc",
        "s",
        ".",
        ".s",
        "1.5",
        "%ZZ",
        "%",
        "%4",
        "5%s",
        "1d",
        "5S",
        "5..s",
        "%FF%FEs",
        "5s+3s",
        "0x10s",
        "-99999999999999999h",
    ];
    match rng.range(0, 5) {
        0 | 1 => rng.pick(FIXED).as_bytes().to_vec(),
        2 => {
            let mut v = b"-".to_vec();
            v.extend_from_slice(rng.pick(LONG_QUERY).trim_start_matches('+').as_bytes());
            v
        }
        3 => {
            // A valid value with a letter glued on: the unit becomes unknown.
            let mut v = rng.pick(LONG_QUERY).as_bytes().to_vec();
            v.push(*rng.pick(b"qzQ!~"));
            v
        }
        _ => {
            // Longer than the parser's cap: digits, or random bytes.
            let n = rng.range(65, 3000) as usize;
            (0..n)
                .map(|i| {
                    if i % 7 == 0 {
                        b'9'
                    } else {
                        (rng.next() & 0xff) as u8
                    }
                })
                .collect()
        }
    }
}

/// An invalid `grpc-timeout` (visible ASCII only, so it is a valid header value).
fn bad_grpc(rng: &mut Rng) -> String {
    const FIXED: &[&str] = &[
        "",
        "1",
        "1s",
        "1ms",
        "1h",
        "123456789S",
        "-1S",
        "+1S",
        "1.5S",
        "S",
        "1SS",
        "x",
        "1S1",
        "0000000001S",
    ];
    if rng.chance(70) {
        rng.pick(FIXED).to_string()
    } else {
        let digits = rng.range(9, 40) as usize;
        let mut s: String = (0..digits)
            .map(|_| char::from(b'0' + rng.range(0, 9) as u8))
            .collect();
        s.push(*rng.pick(&['S', 'm', 'H', 'n']));
        s
    }
}

/// A request's target and deadline header, and the handler's expected end.
struct Plan {
    target: String,
    grpc: Option<String>,
    want: Want,
    status: u16,
    name: &'static str,
}

/// Builds a request for one of the answered kinds: normal, deadline, invalid.
fn plan_answered(rng: &mut Rng, id: u64) -> Plan {
    match rng.range(0, 9) {
        // Normal: maybe with a long client timeout.
        0..=3 => {
            let mut target = format!("/work?id={id}&ms={}", rng.range(0, 3));
            let mut grpc = None;
            if rng.chance(40) {
                target.push_str("&timeout=");
                target.push_str(&encode_query(rng.pick(LONG_QUERY).as_bytes()));
            }
            if rng.chance(30) {
                grpc = Some(rng.pick(LONG_GRPC).to_string());
            }
            Plan {
                target,
                grpc,
                want: Want::Cause(Cause::Completed),
                status: 200,
                name: "normal",
            }
        }
        // A client deadline: query, header, or both (distinct: the earlier wins).
        4..=5 => {
            let q = rng.range(2, 25);
            let mut h = rng.range(2, 25);
            if h == q {
                h += 1;
            }
            let (use_q, use_h) = match rng.range(0, 2) {
                0 => (true, false),
                1 => (false, true),
                _ => (true, true),
            };
            // The earlier wins; they are never equal.
            let origin = if use_q && (!use_h || q < h) {
                DeadlineOrigin::Query
            } else {
                DeadlineOrigin::Header
            };
            let mut target = format!("/wait?id={id}");
            if use_q {
                target.push_str("&timeout=");
                target.push_str(&encode_query(&query_for_ms(rng, q)));
            }
            Plan {
                target,
                grpc: use_h.then(|| grpc_for_ms(rng, h)),
                want: Want::Cause(Cause::DeadlineExceeded { origin }),
                status: 504,
                name: "deadline",
            }
        }
        // The route's own timeout against the client's: distinct by at least 3 ms.
        6 => {
            let mut target = format!("/layer-wait?id={id}");
            let mut grpc = None;
            let mut origin = DeadlineOrigin::Layer;
            match rng.range(0, 3) {
                0 => {}
                1 => {
                    let q = rng.range(2, ROUTE_TIMEOUT_MS - 3);
                    target.push_str("&timeout=");
                    target.push_str(&encode_query(&query_for_ms(rng, q)));
                    origin = DeadlineOrigin::Query;
                }
                2 => {
                    let h = rng.range(2, ROUTE_TIMEOUT_MS - 3);
                    grpc = Some(grpc_for_ms(rng, h));
                    origin = DeadlineOrigin::Header;
                }
                _ => {
                    target.push_str("&timeout=");
                    target.push_str(&encode_query(rng.pick(LONG_QUERY).as_bytes()));
                    grpc = Some(rng.pick(LONG_GRPC).to_string());
                }
            }
            Plan {
                target,
                grpc,
                want: Want::Cause(Cause::DeadlineExceeded { origin }),
                status: 504,
                name: "route_deadline",
            }
        }
        // A spent budget: the context is born cancelled (the handler may not even run).
        7 if rng.chance(20) => Plan {
            target: format!("/wait?id={id}"),
            grpc: Some(rng.pick(&["0n", "0m", "00000000S"]).to_string()),
            want: Want::IfStarted(Cause::DeadlineExceeded {
                origin: DeadlineOrigin::Header,
            }),
            status: 504,
            name: "spent_budget",
        },
        // Invalid values: 400, and the handler never runs.
        _ => {
            let mut target = format!("/work?id={id}");
            let mut grpc = None;
            if rng.chance(60) {
                target.push_str("&timeout=");
                target.push_str(&encode_query(&bad_query(rng)));
                if rng.chance(30) {
                    grpc = Some(rng.pick(LONG_GRPC).to_string());
                }
            } else {
                grpc = Some(bad_grpc(rng));
                if rng.chance(30) {
                    target.push_str("&timeout=10s");
                }
            }
            Plan {
                target,
                grpc,
                want: Want::NoHandler,
                status: 400,
                name: "invalid",
            }
        }
    }
}

fn h1_head(method: &str, plan_target: &str, grpc: Option<&str>, extra: &str) -> String {
    let mut head = format!("{method} {plan_target} HTTP/1.1\r\nHost: soak\r\n");
    if let Some(g) = grpc {
        head.push_str(&format!("grpc-timeout: {g}\r\n"));
    }
    head.push_str(extra);
    head.push_str("\r\n");
    head
}

/// Closes with a FIN or, half the time, an RST.
fn leave(rng: &mut Rng, s: TcpStream) -> &'static str {
    if rng.chance(50) {
        reset(s);
        "rst"
    } else {
        drop(s);
        "fin"
    }
}

async fn started(rx: oneshot::Receiver<()>, what: &str) {
    tokio::time::timeout(BOUND, rx)
        .await
        .unwrap_or_else(|_| panic!("{what}: the handler should have started"))
        .expect("waiting map dropped");
}

struct Client {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    h2: Vec<h2::client::SendRequest<Bytes>>,
}

impl Client {
    async fn h1_answered(&self, rng: &mut Rng, id: u64) -> Outcome {
        let plan = plan_answered(rng, id);
        let head = h1_head(
            "GET",
            &plan.target,
            plan.grpc.as_deref(),
            "Connection: close\r\n",
        );
        let mut s = send(self.addr, head.as_bytes()).await;
        let mut raw = Vec::new();
        tokio::time::timeout(BOUND, s.read_to_end(&mut raw))
            .await
            .unwrap_or_else(|_| panic!("h1 {} {}: no answer", plan.name, plan.target))
            .unwrap();
        Outcome {
            id,
            scenario: plan.name,
            want: plan.want,
            expect_status: Some(plan.status),
            status: Some(parse_response(&raw).0),
        }
    }

    async fn h2_answered(&self, rng: &mut Rng, id: u64) -> Outcome {
        let plan = plan_answered(rng, id);
        let status = self
            .h2_request(rng, &plan.target, plan.grpc.as_deref())
            .await;
        Outcome {
            id,
            scenario: plan.name,
            want: plan.want,
            expect_status: Some(plan.status),
            status: Some(status),
        }
    }

    fn h2_req(&self, target: &str, grpc: Option<&str>) -> http::Request<()> {
        let mut req = http::Request::get(format!("http://{}{target}", self.addr));
        if let Some(g) = grpc {
            req = req.header("grpc-timeout", g);
        }
        req.body(()).unwrap()
    }

    async fn h2_send(&self, rng: &mut Rng) -> h2::client::SendRequest<Bytes> {
        let send = rng.pick(&self.h2).clone();
        tokio::time::timeout(BOUND, send.ready())
            .await
            .expect("h2 ready")
            .expect("h2 connection")
    }

    /// Sends a request and reads the whole answer: its status.
    async fn h2_request(&self, rng: &mut Rng, target: &str, grpc: Option<&str>) -> u16 {
        let mut send = self.h2_send(rng).await;
        let (resp, _stream) = send.send_request(self.h2_req(target, grpc), true).unwrap();
        let read = async {
            let resp = resp.await.expect("h2 response");
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("h2 body");
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            status
        };
        tokio::time::timeout(BOUND, read)
            .await
            .unwrap_or_else(|_| panic!("h2 {target}: no answer"))
    }

    /// One request of a random kind.
    async fn one(&self, seed: u64, id: u64) -> Outcome {
        let mut rng = Rng::new(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let gone = |scenario, want| Outcome {
            id,
            scenario,
            want,
            expect_status: None,
            status: None,
        };
        match rng.range(0, 99) {
            0..=29 => self.h1_answered(&mut rng, id).await,
            30..=59 => self.h2_answered(&mut rng, id).await,
            // HTTP/1.1, the client leaves before its headers are complete.
            60..=65 => {
                let head = h1_head("GET", &format!("/work?id={id}"), None, "");
                let cut = rng.range(1, head.len() as u64 - 3) as usize;
                let s = send(self.addr, &head.as_bytes()[..cut]).await;
                if rng.chance(50) {
                    tokio::time::sleep(Duration::from_millis(rng.range(0, 2))).await;
                }
                leave(&mut rng, s);
                gone("h1_mid_headers", Want::NoHandler)
            }
            // HTTP/1.1, the client leaves mid-body, before or after its handler started.
            66..=71 => {
                let len = 100;
                let head = h1_head(
                    "POST",
                    &format!("/upload?id={id}"),
                    None,
                    &format!("Content-Length: {len}\r\n"),
                );
                let wait = rng.chance(50);
                let rx = self.shared.notify_on_start(id);
                let mut s = send(self.addr, head.as_bytes()).await;
                let sent = rng.range(0, len - 1) as usize;
                s.write_all(&vec![b'x'; sent]).await.unwrap();
                if wait {
                    started(rx, "h1 mid-body").await;
                } else {
                    lock(&self.shared.waiting).remove(&id);
                }
                leave(&mut rng, s);
                let want = Cause::ClientDisconnected;
                gone(
                    "h1_mid_body",
                    if wait {
                        Want::Cause(want)
                    } else {
                        Want::IfStarted(want)
                    },
                )
            }
            // HTTP/1.1, the client leaves while its handler waits, or while it streams.
            72..=81 => {
                let stream = rng.chance(40);
                let path = if stream { "/stream" } else { "/wait" };
                let rx = self.shared.notify_on_start(id);
                let mut s = connect(self.addr).await;
                let head = h1_head("GET", &format!("{path}?id={id}"), None, "");
                s.write_all(head.as_bytes()).await.unwrap();
                started(rx, "h1 mid-handler").await;
                if stream {
                    // Read until the body has begun.
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(5).any(|w| w == b"tick\n") {
                        let n = tokio::time::timeout(BOUND, s.read(&mut buf))
                            .await
                            .expect("stream should flow")
                            .unwrap();
                        assert!(n > 0, "stream closed early");
                        got.extend_from_slice(&buf[..n]);
                    }
                } else if rng.chance(20) {
                    // A half-close: hyper treats it as the client leaving.
                    s.shutdown().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(rng.range(0, 3))).await;
                }
                leave(&mut rng, s);
                gone(
                    if stream {
                        "h1_mid_stream"
                    } else {
                        "h1_mid_handler"
                    },
                    Want::Cause(Cause::ClientDisconnected),
                )
            }
            // HTTP/2 stream reset while the handler waits or streams.
            82..=93 => {
                let stream = rng.chance(40);
                let path = if stream { "/stream" } else { "/wait" };
                let rx = self.shared.notify_on_start(id);
                // A stream on its own connection: h2 guards a connection against many
                // small unread DATA frames (`too_many_data_frames`), which would take the
                // shared ones down with it.
                let own = if stream {
                    Some(h2_client(self.addr).await)
                } else {
                    None
                };
                let mut send = match &own {
                    Some((send, _)) => send.clone().ready().await.expect("h2 ready"),
                    None => self.h2_send(&mut rng).await,
                };
                let (resp, mut tx) = send
                    .send_request(self.h2_req(&format!("{path}?id={id}"), None), true)
                    .unwrap();
                started(rx, "h2 reset").await;
                if stream {
                    let resp = tokio::time::timeout(BOUND, resp).await.unwrap().unwrap();
                    let mut body = resp.into_body();
                    let chunk = tokio::time::timeout(BOUND, body.data()).await.unwrap();
                    assert!(chunk.is_some(), "stream closed early");
                    if rng.chance(50) {
                        drop(body); // the h2 client resets an unfinished stream it drops
                    } else {
                        tx.send_reset(h2::Reason::CANCEL);
                    }
                } else {
                    tx.send_reset(*rng.pick(&[h2::Reason::CANCEL, h2::Reason::INTERNAL_ERROR]));
                }
                if let Some((send, conn)) = own {
                    // Seen the reset first or the close: either is ClientDisconnected.
                    drop(send);
                    conn.abort();
                    let _ = conn.await;
                }
                gone(
                    if stream {
                        "h2_reset_stream"
                    } else {
                        "h2_reset"
                    },
                    Want::Cause(Cause::ClientDisconnected),
                )
            }
            // HTTP/2, the whole connection goes away while the handler waits.
            _ => {
                let (mut send, conn) = h2_client(self.addr).await;
                let rx = self.shared.notify_on_start(id);
                let (_resp, _tx) = send
                    .send_request(self.h2_req(&format!("/wait?id={id}"), None), true)
                    .unwrap();
                started(rx, "h2 close").await;
                conn.abort();
                let _ = conn.await;
                gone("h2_conn_close", Want::Cause(Cause::ClientDisconnected))
            }
        }
    }
}

/// The checks, made as outcomes come in.
#[derive(Debug, Default)]
struct Tally {
    requests: usize,
    started: usize,
    by_cause: BTreeMap<String, u64>,
    by_scenario: BTreeMap<(&'static str, Option<u16>), u64>,
    failed: usize,
    failures: Vec<String>, // the first few
    /// Requests checked while their handler had not started; if it starts later, this.
    late: HashMap<u64, Cause>,
}

impl Tally {
    fn fail(&mut self, message: String) {
        self.failed += 1;
        if self.failures.len() < 20 {
            self.failures.push(message);
        }
    }

    /// Checks every pending outcome whose handler has ended (or never started).
    fn check_all(&mut self, pending: &mut VecDeque<Outcome>, shared: &Shared) {
        let mut seen = lock(&shared.seen);
        let mut keep = VecDeque::new();
        for o in pending.drain(..) {
            let ended = seen
                .get(&o.id)
                .is_none_or(|s| s.causes.len() as u32 >= s.starts);
            if ended {
                let s = seen.remove(&o.id);
                self.check(o, s);
            } else {
                keep.push_back(o);
            }
        }
        *pending = keep;
    }

    fn check(&mut self, o: Outcome, s: Option<Seen>) {
        self.requests += 1;
        *self.by_scenario.entry((o.scenario, o.status)).or_default() += 1;
        if let Some(want) = o.expect_status {
            if Some(want) != o.status {
                self.fail(format!(
                    "#{} {}: status {:?}, want {want}",
                    o.id, o.scenario, o.status
                ));
            }
        }
        if let Some(s) = &s {
            self.seen(o.id, o.scenario, s);
        }
        let got = s.as_ref().and_then(|s| s.causes.first());
        match (&o.want, got) {
            (Want::Cause(w), Some(g)) | (Want::IfStarted(w), Some(g)) if w == g => {}
            (Want::IfStarted(w), None) => {
                self.late.insert(o.id, w.clone());
            }
            (Want::NoHandler, None) => {}
            (want, got) => self.fail(format!(
                "#{} {}: handler saw {got:?}, want {want:?}",
                o.id, o.scenario
            )),
        }
    }

    /// One start, one cause, never changed.
    fn seen(&mut self, id: u64, scenario: &str, s: &Seen) {
        self.started += 1;
        if s.starts != 1 || s.causes.len() != 1 {
            self.fail(format!(
                "#{id} {scenario}: {} starts, causes {:?}",
                s.starts, s.causes
            ));
        }
        if let Some((first, later)) = &s.changed {
            self.fail(format!(
                "#{id} {scenario}: cause {first:?} became {later:?}"
            ));
        }
        if let Some(c) = s.causes.first() {
            let key = match c {
                Cause::DeadlineExceeded { origin } => format!("deadline_exceeded({origin:?})"),
                c => c.kind().to_owned(),
            };
            *self.by_cause.entry(key).or_default() += 1;
        }
    }

    /// Handlers that started after their outcome was checked.
    fn leftovers(&mut self, seen: HashMap<u64, Seen>) {
        for (id, s) in seen {
            match self.late.get(&id).cloned() {
                Some(want) => {
                    self.seen(id, "late start", &s);
                    if s.causes.first() != Some(&want) {
                        self.fail(format!(
                            "#{id} late start: saw {:?}, want {want:?}",
                            s.causes
                        ));
                    }
                }
                None => self.fail(format!("#{id}: a handler ran that should not have: {s:?}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Process figures.

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    fds: usize,
    tasks: usize,
    rss_kb: u64,
    live: usize,
}

fn figures() -> Figures {
    Figures {
        fds: fd_count(),
        tasks: alive_tasks(),
        rss_kb: status_kb("VmRSS:"),
        live: live_request_contexts(),
    }
}

/// Polls until `done` (drops and closes have no signal to wait on), for at most 10 s.
async fn settle(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            Instant::now() < give_up,
            "{what} did not settle: {:?}",
            figures()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The baseline: the first figures that hold still for `STILL` polls in a row, once the
/// warm-up's tasks and sockets have finished closing (nothing signals that). Fails if they
/// do not within `POLLS` polls.
async fn settled_figures() -> Figures {
    const STILL: usize = 5;
    const POLLS: usize = 500;
    let key = |f: &Figures| (f.fds, f.tasks, f.live);
    let mut last = figures();
    let mut still = 0;
    for _ in 0..POLLS {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = figures();
        still = if key(&now) == key(&last) {
            still + 1
        } else {
            0
        };
        if still == STILL {
            return now;
        }
        last = now;
    }
    panic!("the baseline did not hold still within {POLLS} polls: {last:?}");
}

// ---------------------------------------------------------------------------------------

/// Runs the server once with a few requests of each protocol and shuts it down, so that
/// what lives for the process (the connection watcher, lazily made statics) is counted in
/// the baseline.
async fn warm_up() {
    let shared = Arc::new(Shared::default());
    let srv = Running::start(
        Server::Serve,
        app(shared.clone()),
        Duration::from_millis(100),
    )
    .await;
    let (send, conn) = h2_client(srv.addr).await;
    let client = Client {
        addr: srv.addr,
        shared,
        h2: vec![send],
    };
    let mut rng = Rng::new(1);
    for id in 0..20 {
        let _ = client.one(7, id).await;
    }
    let _ = client.h2_request(&mut rng, "/work?id=99", None).await;
    drop(client);
    srv.shutdown().await.unwrap();
    let _ = conn.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_soak() {
    let total: u64 = std::env::var("REQCTX_SOAK")
        .ok()
        .map(|v| v.parse().expect("REQCTX_SOAK is a request count"))
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("REQCTX_SOAK_SEED")
        .ok()
        .map(|v| v.parse().expect("REQCTX_SOAK_SEED is a u64"))
        .unwrap_or(0x5EED_2026);
    let wall = Instant::now();
    // A panic anywhere (a handler, hyper's tasks, a client) is counted, not just printed.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        default_hook(info);
    }));

    warm_up().await;
    settle("warm-up", || live_request_contexts() == 0).await;
    let before = settled_figures().await;
    println!("soak: seed {seed}, {total} requests + {AT_SHUTDOWN} at shutdown; before: {before:?}");

    let shared = Arc::new(Shared::default());
    let srv = Running::start(
        Server::Serve,
        app(shared.clone()),
        Duration::from_millis(200),
    )
    .await;
    let mut h2_tasks = Vec::new();
    let mut h2 = Vec::new();
    for _ in 0..H2_CONNS {
        let (send, task) = h2_client(srv.addr).await;
        h2.push(send);
        h2_tasks.push(task);
    }
    let client = Arc::new(Client {
        addr: srv.addr,
        shared: shared.clone(),
        h2,
    });

    // The mix, IN_FLIGHT at a time.
    // Outcomes are checked as they come (once their handler's cause is in), so that the
    // test's own memory stays flat and RSS shows only the server's.
    let mut pending: VecDeque<Outcome> = VecDeque::new();
    let mut tally = Tally::default();
    let mut set = JoinSet::new();
    let mut rss_series = Vec::new(); // RSS at every tenth of the mix, to tell a leak (linear) from retention
    for id in 0..total {
        if id % (total / 10).max(1) == 0 {
            rss_series.push(status_kb("VmRSS:") / 1024);
        }
        while set.len() >= IN_FLIGHT {
            pending.push_back(set.join_next().await.unwrap().expect("client panicked"));
        }
        if id % 1024 == 0 {
            tally.check_all(&mut pending, &shared);
        }
        let client = client.clone();
        set.spawn(async move { client.one(seed, id).await });
    }
    while let Some(r) = set.join_next().await {
        pending.push_back(r.expect("client panicked"));
    }
    let mixed = wall.elapsed();

    // Requests waiting in their handlers when the server shuts down: they see Shutdown
    // after the drain period, and are answered 503.
    let mut waiters = JoinSet::new();
    for i in 0..AT_SHUTDOWN {
        let id = total + i;
        let client = client.clone();
        let rx = shared.notify_on_start(id);
        waiters.spawn(async move {
            let status = if i % 2 == 0 {
                let mut s = connect(client.addr).await;
                let head = h1_head("GET", &format!("/wait?id={id}"), None, "");
                s.write_all(head.as_bytes()).await.unwrap();
                let mut raw = Vec::new();
                tokio::time::timeout(BOUND, s.read_to_end(&mut raw))
                    .await
                    .expect("an answer at shutdown")
                    .unwrap();
                parse_response(&raw).0
            } else {
                let mut rng = Rng::new(id);
                client
                    .h2_request(&mut rng, &format!("/wait?id={id}"), None)
                    .await
            };
            Outcome {
                id,
                scenario: "shutdown",
                want: Want::Cause(Cause::Shutdown),
                expect_status: Some(503),
                status: Some(status),
            }
        });
        started(rx, "at shutdown").await;
    }
    srv.shutdown().await.expect("graceful shutdown");
    while let Some(r) = waiters.join_next().await {
        pending.push_back(r.expect("client panicked"));
    }
    drop(client);
    for t in h2_tasks {
        tokio::time::timeout(BOUND, t)
            .await
            .expect("h2 connections end after shutdown")
            .unwrap();
    }

    // Every handler: one start, one cause, never changed, the right one.
    shared.drain_window();
    let give_up = Instant::now() + Duration::from_secs(10);
    while !pending.is_empty() && Instant::now() < give_up {
        tally.check_all(&mut pending, &shared);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for o in pending.drain(..) {
        tally.fail(format!("#{} {}: on_cancel never ran", o.id, o.scenario));
    }
    tally.leftovers(std::mem::take(&mut *lock(&shared.seen)));
    let Tally {
        requests,
        started,
        by_cause,
        by_scenario,
        failures,
        failed,
        ..
    } = tally;

    // Nothing left behind.
    settle("live request contexts", || live_request_contexts() == 0).await;
    settle("tasks", || alive_tasks() <= before.tasks).await;
    settle("file descriptors", || fd_count() <= before.fds).await;
    let after = figures();
    let peak = status_kb("VmHWM:");

    println!(
        "soak: {requests} requests in {:.1?} ({:.1?} for the mix), {started} handlers started",
        wall.elapsed(),
        mixed
    );
    println!("soak: causes by kind: {by_cause:?}");
    println!("soak: RSS (MiB) at each tenth of the mix: {rss_series:?}");
    for ((scenario, status), n) in &by_scenario {
        println!("soak:   {scenario:>16} status {status:?}: {n}");
    }
    println!(
        "soak: fds {} -> {}, tasks {} -> {}, live contexts {} -> {}, RSS {} kB -> {} kB (peak {} kB)",
        before.fds,
        after.fds,
        before.tasks,
        after.tasks,
        before.live,
        after.live,
        before.rss_kb,
        after.rss_kb,
        peak
    );
    assert!(
        failed == 0,
        "{failed} failures, the first {}:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(requests as u64, total + AT_SHUTDOWN);
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "panics"
    );
    // RSS: the allocator keeps freed pages in its arenas (glibc, one per worker thread), so
    // "back to the start" means "within a fixed slack, whatever the request count". The
    // test's own records are dropped before this point and checked as they come, so
    // memory is flat during the mix (measured: 11-12 MiB from the first tenth on, 20k and
    // 200k alike); a leak of 100 bytes per request would exceed the slack in the long run.
    assert!(
        after.rss_kb <= before.rss_kb + RSS_SLACK_KB,
        "RSS grew from {} kB to {} kB",
        before.rss_kb,
        after.rss_kb
    );
}
