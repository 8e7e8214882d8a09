//! Server-sent events bound to the request's context.
//!
//! `GET /ticks` sends an event every 100 ms until the request's context ends: when the
//! client goes away (`ClientDisconnected`) or when its deadline passes (`?timeout=350ms`
//! gives `DeadlineExceeded { origin: Query }`, and the client sees a truncated stream).
//! The server logs the cause either way.
//!
//! `cargo run -p example-streaming` starts the server, drives it over real sockets, prints
//! what happened and exits non-zero if a cause was not the expected one.
//! `cargo run -p example-streaming -- --serve 127.0.0.1:3000` keeps serving:
//!
//! ```sh
//! curl -N localhost:3000/ticks                   # stop it with Ctrl-C: ClientDisconnected
//! curl -N 'localhost:3000/ticks?timeout=350ms'   # DeadlineExceeded { origin: Query }
//! ```

use std::error::Error;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::{Router, routing::get};
use futures_util::stream::{self, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, interval_at, timeout};
use tower_reqctx::reqctx::{Cancelled, Cause, Context, DeadlineOrigin};
use tower_reqctx::{ContextLayer, ReqCtx, RouteTimeout};

type BoxError = Box<dyn Error + Send + Sync>;

const PERIOD: Duration = Duration::from_millis(100);

/// How a stream ended, sent by the server to whoever prints it.
#[derive(Debug)]
struct Stopped {
    ticks: u32,
    cause: Cause,
}

#[derive(Clone)]
struct AppState {
    stopped: mpsc::UnboundedSender<Stopped>,
}

fn app(stopped: mpsc::UnboundedSender<Stopped>) -> Router {
    Router::new()
        // An event stream has no server timeout: this route's layer removes the app's
        // 10 s. A client can still ask for one with ?timeout=.
        .route("/ticks", get(ticks).layer(RouteTimeout::none()))
        .with_state(AppState { stopped })
        .layer(ContextLayer::new().timeout(Duration::from_secs(10)))
}

/// One event every 100 ms, for as long as the request's context lives.
async fn ticks(
    State(state): State<AppState>,
    ctx: ReqCtx,
) -> Sse<impl Stream<Item = Result<Event, Cancelled>>> {
    let sent = Arc::new(AtomicU32::new(0));

    // The cause is logged from `on_cancel` (Go's AfterFunc), not from the stream: when the
    // context ends, the layer cuts the response body and hyper drops it, usually before
    // the stream is polled again, so the stream may never see its own end. `on_cancel`
    // runs once the context ends, whatever ended it.
    let count = sent.clone();
    ctx.on_cancel(move |cause| {
        let ticks = count.load(Ordering::Relaxed);
        let _ = state.stopped.send(Stopped {
            ticks,
            cause: cause.clone(),
        });
    });

    let ticker = Ticker {
        ctx: ctx.0,
        interval: interval_at(Instant::now() + PERIOD, PERIOD),
        sent,
    };
    Sse::new(stream::unfold(Some(ticker), |ticker| async move {
        let mut t = ticker?; // None: the stream has ended
        // `run` races the tick against the context. Without the layer's body (say, the
        // stream is forwarded through a channel) this is what stops the interval.
        match t.ctx.run(t.interval.tick()).await {
            Ok(_) => {
                let n = t.sent.fetch_add(1, Ordering::Relaxed) + 1;
                let event = Event::default().event("tick").data(n.to_string());
                Some((Ok(event), Some(t)))
            }
            // An error item fails the body: the client sees a truncated response, not a
            // clean end it could mistake for "no more events".
            Err(cancelled) => Some((Err(cancelled), None)),
        }
    }))
}

struct Ticker {
    ctx: Context,
    interval: Interval,
    sent: Arc<AtomicU32>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => demo().await,
        [flag, addr] if flag == "--serve" => serve_forever(addr).await,
        _ => {
            eprintln!("usage: example-streaming [--serve ADDR]");
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
    let (tx, mut rx) = mpsc::unbounded_channel::<Stopped>();
    let listener = TcpListener::bind(addr).await?;
    println!("serving on http://{}", listener.local_addr()?);
    println!("  curl -N {}/ticks", listener.local_addr()?);
    tokio::spawn(async move {
        while let Some(s) = rx.recv().await {
            println!("stream stopped after {} ticks: {:?}", s.ticks, s.cause);
        }
    });
    tower_reqctx::serve(listener, app(tx)).await?;
    Ok(())
}

/// Starts the server on an ephemeral port and plays both cases against it.
async fn demo() -> Result<(), BoxError> {
    let (tx, mut stopped) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // `serve` watches each connection, so a client that hangs up is seen at once, even
    // while hyper is not reading from the socket.
    tokio::spawn(tower_reqctx::serve(listener, app(tx)).into_future());
    println!("serving on {addr}: GET /ticks sends an event every 100 ms\n");

    let mut failures = Vec::new();
    let wait = Duration::from_secs(3);

    println!("1. GET /ticks; the client reads 3 ticks, then hangs up");
    let mut conn = TcpStream::connect(addr).await?;
    conn.write_all(b"GET /ticks HTTP/1.1\r\nHost: demo\r\n\r\n")
        .await?;
    let text = timeout(wait, read_ticks(&mut conn, 3)).await??;
    println!(
        "  client: got ticks {}; closing",
        data_lines(&text).join(", ")
    );
    drop(conn);
    let stop = timeout(wait, stopped.recv()).await.ok().flatten();
    expect(&mut failures, "hang-up", stop, Cause::ClientDisconnected);

    println!("\n2. GET /ticks?timeout=350ms; the client reads until the server stops");
    let started = Instant::now();
    let text = timeout(wait, get_all(addr, "/ticks?timeout=350ms")).await??;
    // A chunked body that ends normally ends with the last chunk, `0\r\n\r\n`.
    let clean = text.ends_with("\r\n0\r\n\r\n");
    println!(
        "  client: got ticks {}, then after {} ms the connection closed {}",
        data_lines(&text).join(", "),
        started.elapsed().as_millis(),
        if clean {
            "with a clean end"
        } else {
            "without the last chunk: a truncated stream"
        }
    );
    if clean {
        failures.push("timeout: the stream ended cleanly, expected a truncated one".into());
    }
    let stop = timeout(wait, stopped.recv()).await.ok().flatten();
    expect(
        &mut failures,
        "timeout",
        stop,
        Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Query,
        },
    );

    if failures.is_empty() {
        println!("\nok: every stream stopped with the expected cause");
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}

/// Prints the server's side of a case and notes a cause that is not `want`.
fn expect(failures: &mut Vec<String>, case: &str, stop: Option<Stopped>, want: Cause) {
    match stop {
        Some(s) => {
            println!(
                "  server: stream stopped after {} ticks: {:?} ({})",
                s.ticks, s.cause, s.cause
            );
            if s.cause != want {
                failures.push(format!("{case}: cause {:?}, expected {want:?}", s.cause));
            }
        }
        None => failures.push(format!("{case}: the stream never stopped")),
    }
}

/// Reads the response until `n` events have arrived; returns what was read.
async fn read_ticks(conn: &mut TcpStream, n: usize) -> Result<String, BoxError> {
    let mut buf = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&buf);
        if data_lines(&text).len() >= n {
            return Ok(text.into_owned());
        }
        if conn.read_buf(&mut buf).await? == 0 {
            return Err("the server closed the stream early".into());
        }
    }
}

/// Sends a GET and reads until the server closes the connection (or resets it).
async fn get_all(addr: SocketAddr, path: &str) -> Result<String, BoxError> {
    let mut conn = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    // An aborted response may end with a reset instead of a close: keep what arrived.
    while let Ok(1..) = conn.read_buf(&mut buf).await {}
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The `data:` lines of an event stream.
fn data_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}
