//! Before/after middleware that logs each request's method, path, cause and duration, and a
//! handler with background work bound to the request next to work that outlives it.
//!
//! The cause is known only once the request's context ends: when the response body has
//! been sent (`Completed`), the client left, or the deadline passed. That is after the
//! handler returned, and when the layer answers a deadline itself, the middleware's
//! "after" part never runs at all. So the access log is written from `ctx.on_cancel`, not
//! right after `next.run(req)`.
//!
//! `cargo run -p example-middleware` starts the server, sends a normal request and one with
//! `?timeout=50ms` to a slow handler, prints the log and exits non-zero if a line is
//! missing. `cargo run -p example-middleware -- --serve 127.0.0.1:3000` keeps serving:
//!
//! ```sh
//! curl localhost:3000/work
//! curl 'localhost:3000/slow?timeout=50ms'
//! ```

use std::error::Error;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Router, routing::get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep};
use tower_reqctx::reqctx::Cancelled;
use tower_reqctx::{ContextLayer, ReqCtx};

type BoxError = Box<dyn Error + Send + Sync>;

/// The log: each line is printed at once with the time since start, and kept for the
/// demo's checks (`lines` is `None` when serving: nothing to check, nothing to keep).
#[derive(Clone)]
struct Log {
    start: Instant,
    lines: Option<Arc<Mutex<Vec<String>>>>,
}

impl Log {
    fn new(keep: bool) -> Log {
        Log {
            start: Instant::now(),
            lines: keep.then(Arc::default),
        }
    }

    fn line(&self, line: String) {
        println!("{:>5} ms  {line}", self.start.elapsed().as_millis());
        if let Some(lines) = &self.lines {
            lines.lock().unwrap().push(line);
        }
    }

    fn has(&self, needle: &str) -> bool {
        let lines = self.lines.as_ref().map(|l| l.lock().unwrap());
        lines.is_some_and(|l| l.iter().any(|l| l.contains(needle)))
    }
}

fn app(log: Log) -> Router {
    Router::new()
        .route("/work", get(work))
        .route("/slow", get(slow))
        // `Router::layer` wraps what is above it: the access log runs inside the
        // ContextLayer, so the request it sees already carries its context.
        .layer(middleware::from_fn_with_state(log.clone(), access_log))
        .layer(ContextLayer::new().timeout(Duration::from_secs(10)))
        .with_state(log)
}

/// The before/after middleware.
async fn access_log(State(log): State<Log>, req: Request, next: Next) -> Response {
    // Before: the request as it arrives.
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    log.line(format!("--> {method} {path}"));

    // The end of the request, whatever ends it: `on_cancel` is Go's AfterFunc. Outside an
    // axum handler, `request_context` finds the context the layer made.
    if let Some(ctx) = tower_reqctx::request_context() {
        let (log, method, path) = (log.clone(), method.clone(), path.clone());
        ctx.on_cancel(move |cause| {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            log.line(format!("<-- {method} {path} {cause:?} in {ms:.1} ms"));
        });
    }

    let res = next.run(req).await;
    // After: the handler has returned, but the body has not been sent yet, so the cause
    // is not known. (When the layer answers a deadline itself, this never runs.)
    log.line(format!(
        "    {method} {path}: handler returned {}",
        res.status()
    ));
    res
}

/// Who the request acts for; a real app would set it in an auth step.
#[derive(Debug)]
struct Actor(&'static str);

/// Answers after 30 ms of work, with background work bound to the request and an audit
/// write that is not.
async fn work(State(log): State<Log>, ctx: ReqCtx) -> Result<&'static str, Cancelled> {
    let ctx = ctx.with_value(Actor("alice"));

    // Bound to the request: it stops, with the request's cause, when the request ends.
    // Here that is `Completed`, right after the response body has been sent.
    let prefetch = ctx.spawn(async {
        for _ in 0..50 {
            sleep(Duration::from_millis(20)).await; // warm a cache, one item at a time
        }
    });
    let l = log.clone();
    tokio::spawn(async move {
        match prefetch.await {
            Ok(Ok(())) => l.line("    prefetch: finished".into()),
            Ok(Err(cancelled)) => l.line(format!("    prefetch: stopped, {:?}", cancelled.cause())),
            Err(join) => l.line(format!("    prefetch: {join}")),
        }
    });

    // Detached: the same values, no cancellation, no deadline. The audit write outlives
    // the response.
    let audit = ctx.detached();
    tokio::spawn(async move {
        sleep(Duration::from_millis(100)).await; // a slow write
        let actor = audit.value::<Actor>().map_or("?", |a| a.0);
        log.line(format!(
            "    audit: {actor} did GET /work (written after the response; detached context cancelled: {})",
            audit.is_cancelled()
        ));
    });

    ctx.run(sleep(Duration::from_millis(30))).await?;
    Ok("done\n")
}

/// Two seconds of work that never looks at its context: a `?timeout=50ms` request ends long
/// before, and the layer answers `504` for it and drops the handler. (A handler that
/// awaited `ctx.run(..)` would see the same deadline at the same instant and could answer
/// its own `504` first; then the middleware's "after" part does run.)
async fn slow() -> &'static str {
    sleep(Duration::from_secs(2)).await;
    "slow, but done\n"
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => demo().await,
        [flag, addr] if flag == "--serve" => serve_forever(addr).await,
        _ => {
            eprintln!("usage: example-middleware [--serve ADDR]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_forever(addr: &str) -> Result<(), BoxError> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("serving on http://{addr}");
    println!("  curl {addr}/work    curl '{addr}/slow?timeout=50ms'");
    tower_reqctx::serve(listener, app(Log::new(false))).await?;
    Ok(())
}

async fn demo() -> Result<(), BoxError> {
    let log = Log::new(true);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(tower_reqctx::serve(listener, app(log.clone())).into_future());
    println!("serving on {addr}\n");

    let mut failures = Vec::new();
    for (path, want) in [("/work", "200"), ("/slow?timeout=50ms", "504")] {
        log.line(format!("client: GET {path}"));
        let status = fetch(addr, path).await?;
        log.line(format!("client: GET {path} -> {status}"));
        if !status.starts_with(want) {
            failures.push(format!("GET {path}: {status}, expected {want}"));
        }
        sleep(Duration::from_millis(150)).await; // let the audit write land, for a tidy log
    }

    // `on_cancel` callbacks and the spawned tasks run on tasks of their own: give them a
    // moment to land.
    let expected = [
        "<-- GET /work Completed",
        "prefetch: stopped, Completed",
        "audit: alice did GET /work",
        "detached context cancelled: false",
        "<-- GET /slow DeadlineExceeded { origin: Query }",
    ];
    let deadline = Instant::now() + Duration::from_secs(2);
    while !expected.iter().all(|e| log.has(e)) && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    failures.extend(
        expected
            .iter()
            .filter(|e| !log.has(e))
            .map(|e| format!("no log line with {e:?}")),
    );
    if log.has("GET /slow: handler returned") {
        failures.push("the slow handler returned; the layer should have answered".into());
    }

    if failures.is_empty() {
        println!("\nok: every request was logged with its cause");
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}

/// A raw HTTP/1.1 GET; returns the status code and reason.
async fn fetch(addr: SocketAddr, path: &str) -> Result<String, BoxError> {
    let mut conn = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    let status = answer.lines().next().and_then(|l| l.split_once(' '));
    Ok(status.map_or("no answer", |(_, s)| s).to_owned())
}
