//! Graceful shutdown with `tower_reqctx::serve`: in-flight requests get a drain period,
//! then their contexts are cancelled with `Shutdown`, and endless streams end.
//!
//! `cargo run -p example-shutdown` starts the server, puts three requests in flight, sends
//! the shutdown signal and prints what each request saw and how long shutting down took;
//! it exits non-zero if a request did not end as expected.
//! `cargo run -p example-shutdown -- --serve 127.0.0.1:3000` serves until Ctrl-C:
//!
//! ```sh
//! curl -N localhost:3000/events &   # an endless event stream
//! curl localhost:3000/export &      # 30 s of work
//! # now Ctrl-C the server: 500 ms later both end with Shutdown; /export answers 503
//! ```

use std::error::Error;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::{Router, routing::get};
use futures_util::stream::{self, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep};
use tower_reqctx::reqctx::{Cancelled, Cause};
use tower_reqctx::{ContextLayer, ReqCtx};

type BoxError = Box<dyn Error + Send + Sync>;

/// How long in-flight requests may run after the signal before they see `Shutdown`.
const DRAIN: Duration = Duration::from_millis(500);

/// What the server tells the demo: a handler started (`cause: None`), or a request's
/// context ended, and why.
#[derive(Debug)]
struct Note {
    route: &'static str,
    cause: Option<Cause>,
}

#[derive(Clone)]
struct AppState {
    notes: mpsc::UnboundedSender<Note>,
}

impl AppState {
    /// Notes that a handler started, and its cause once the request's context ends (after
    /// the response is sent, for a request that completes).
    fn track(&self, ctx: &ReqCtx, route: &'static str) {
        let _ = self.notes.send(Note { route, cause: None });
        let notes = self.notes.clone();
        ctx.on_cancel(move |cause| {
            let cause = Some(cause.clone());
            let _ = notes.send(Note { route, cause });
        });
    }
}

fn app(notes: mpsc::UnboundedSender<Note>) -> Router {
    Router::new()
        .route("/report", get(report))
        .route("/export", get(export))
        .route("/events", get(events))
        .with_state(AppState { notes })
        // No server timeout, so only the shutdown ends /export and /events.
        .layer(ContextLayer::new())
}

/// 300 ms of work: started before the signal, it finishes within the drain period.
async fn report(State(state): State<AppState>, ctx: ReqCtx) -> Result<&'static str, Cancelled> {
    state.track(&ctx, "GET /report");
    ctx.run(sleep(Duration::from_millis(300))).await?;
    Ok("report ready\n")
}

/// 30 s of work: the drain period runs out first. `run` then returns `Cancelled` with
/// `Shutdown`, and `?` turns it into a `503 Service Unavailable`.
async fn export(State(state): State<AppState>, ctx: ReqCtx) -> Result<&'static str, Cancelled> {
    state.track(&ctx, "GET /export");
    ctx.run(sleep(Duration::from_secs(30))).await?;
    Ok("export ready\n")
}

/// An event every 100 ms, forever: only its context ends it. At shutdown the layer ends
/// the body with an error, so the client sees a truncated stream, not a clean end.
async fn events(
    State(state): State<AppState>,
    ctx: ReqCtx,
) -> Sse<impl Stream<Item = Result<Event, Cancelled>>> {
    state.track(&ctx, "GET /events");
    let interval = tokio::time::interval(Duration::from_millis(100));
    Sse::new(stream::unfold(
        Some((ctx, interval, 0u32)),
        |state| async move {
            let (ctx, mut interval, n) = state?; // None: the stream has ended
            match ctx.run(interval.tick()).await {
                Ok(_) => {
                    let event = Event::default().data(n.to_string());
                    Some((Ok(event), Some((ctx, interval, n + 1))))
                }
                // The stream sees the shutdown too (often before the layer does). It ends with
                // an error item, never cleanly: a clean end would tell the client "that was
                // all", and a stream cut by a shutdown was not.
                Err(cancelled) => Some((Err(cancelled), None)),
            }
        },
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => demo().await,
        [flag, addr] if flag == "--serve" => serve_until_ctrl_c(addr).await,
        _ => {
            eprintln!("usage: example-shutdown [--serve ADDR]");
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

async fn serve_until_ctrl_c(addr: &str) -> Result<(), BoxError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Note>();
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("serving on http://{addr}; Ctrl-C shuts down (drain period {DRAIN:?})");
    println!("  curl -N {addr}/events    curl {addr}/export    curl {addr}/report");
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            match n.cause {
                None => println!("{}: started", n.route),
                Some(cause) => println!("{}: context ended: {cause:?}", n.route),
            }
        }
    });
    let signal = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("\nCtrl-C: no new connections; in-flight requests have {DRAIN:?}");
    };
    tower_reqctx::serve(listener, app(tx))
        .with_graceful_shutdown(signal)
        .drain_timeout(DRAIN)
        .await?;
    println!("serve returned");
    Ok(())
}

/// Starts the server, puts three requests in flight, signals shutdown and checks the end.
async fn demo() -> Result<(), BoxError> {
    let start = Instant::now();
    let at = move || format!("{:>5} ms", start.elapsed().as_millis());

    let (tx, mut notes) = mpsc::unbounded_channel::<Note>();
    let (stop, stopped) = oneshot::channel::<()>();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tower_reqctx::serve(listener, app(tx))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .drain_timeout(DRAIN)
            .into_future(),
    );
    println!("serving on {addr}, drain period {DRAIN:?}\n");

    let requests = [
        ("/events", "an endless event stream"),
        ("/report", "300 ms of work"),
        ("/export", "30 s of work"),
    ];
    let mut clients = Vec::new();
    for (path, what) in requests {
        println!("{}  GET {path:<8} started ({what})", at());
        clients.push((path, tokio::spawn(fetch(addr, path))));
    }

    // Signal once every handler runs (a fixed sleep could lose the race on a busy machine).
    let mut running = 0;
    while running < requests.len() {
        match tokio::time::timeout(Duration::from_secs(5), notes.recv()).await {
            Ok(Some(Note { cause: None, .. })) => running += 1,
            Ok(Some(n)) => return Err(format!("{} ended early: {:?}", n.route, n.cause).into()),
            _ => return Err("the requests did not all start within 5 s".into()),
        }
    }
    println!(
        "{}  shutdown signal: stop accepting; in-flight requests have {DRAIN:?}",
        at()
    );
    let signalled = Instant::now();
    let _ = stop.send(());

    // Print each request's cause as its context ends, until the server returns.
    let mut causes = Vec::new();
    let mut server = server;
    let served = loop {
        tokio::select! {
            Some(Note { route, cause: Some(cause) }) = notes.recv() => {
                println!("{}  {route:<12} context ended: {cause:?}", at());
                causes.push((route, cause));
            }
            served = &mut server => break served,
            () = sleep(Duration::from_secs(5)) => return Err("serve did not return within 5 s".into()),
        }
    };
    served??;
    let took = signalled.elapsed();
    println!(
        "{}  serve returned, {} ms after the signal",
        at(),
        took.as_millis()
    );
    // `on_cancel` callbacks run on tasks of their own: one may still be on its way.
    while causes.len() < requests.len() {
        match tokio::time::timeout(Duration::from_secs(1), notes.recv()).await {
            Ok(Some(Note {
                route,
                cause: Some(cause),
            })) => {
                println!("{}  {route:<12} context ended: {cause:?}", at());
                causes.push((route, cause));
            }
            _ => break,
        }
    }

    println!("\nwhat the clients saw:");
    let mut failures = Vec::new();
    for (path, client) in clients {
        let answer = client.await??;
        let route = format!("GET {path}");
        let cause = causes.iter().find(|(r, _)| *r == route).map(|(_, c)| c);
        let (want_status, want_cause) = match path {
            "/report" => ("200", Cause::Completed),
            "/export" => ("503", Cause::Shutdown),
            _ => ("200", Cause::Shutdown),
        };
        if path == "/events" {
            let events = answer
                .body
                .lines()
                .filter(|l| l.starts_with("data:"))
                .count();
            println!(
                "  {route:<12} {}, {events} events, then {}",
                answer.status,
                if answer.clean_end {
                    "a clean end"
                } else {
                    "the connection closed mid-stream (truncated)"
                }
            );
            if answer.clean_end {
                failures.push(format!("{route}: the stream ended cleanly"));
            }
        } else {
            println!(
                "  {route:<12} {}, body {:?}",
                answer.status,
                answer.body.trim_end()
            );
        }
        if !answer.status.starts_with(want_status) {
            failures.push(format!(
                "{route}: status {}, expected {want_status}",
                answer.status
            ));
        }
        if cause != Some(&want_cause) {
            failures.push(format!("{route}: cause {cause:?}, expected {want_cause:?}"));
        }
    }
    // The drain period, then a few milliseconds for the cancelled requests to answer.
    if took < DRAIN || took > DRAIN + Duration::from_secs(1) {
        failures.push(format!(
            "shutdown took {took:?}, expected a little over {DRAIN:?}"
        ));
    }

    if failures.is_empty() {
        println!("\nok: each request ended as expected, and serve returned");
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}

/// What a client read: the status line's code and reason, the body, and whether a chunked
/// body ended with its last chunk.
struct Answer {
    status: String,
    body: String,
    clean_end: bool,
}

/// A raw HTTP/1.1 GET over a fresh connection, read until the server closes it.
async fn fetch(addr: SocketAddr, path: &'static str) -> Result<Answer, BoxError> {
    let mut conn = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    // A response cut short may end with a reset instead of a close: keep what arrived.
    while let Ok(1..) = conn.read_buf(&mut buf).await {}
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_once(' '))
        .map_or("no answer", |(_, s)| s)
        .to_owned();
    Ok(Answer {
        status,
        body: body.to_owned(),
        clean_end: !head.contains("chunked") || body.ends_with("\r\n0\r\n\r\n"),
    })
}
