//! A slow report endpoint whose query dies with the request.
//!
//! `GET /report` runs a five-second statement through `reqctx-postgres`. When the client
//! hangs up, or its `?timeout=` passes, the statement is cancelled **on the server**: the
//! backend is idle again at once, instead of sleeping on for a client that is gone.
//!
//! ```text
//! DATABASE_URL=postgres://user@localhost/db cargo run -p example-postgres            # self-driving
//! DATABASE_URL=postgres://user@localhost/db cargo run -p example-postgres -- --serve  # 127.0.0.1:3000
//! curl 'localhost:3000/report?timeout=300ms'
//! ```
//!
//! Without `DATABASE_URL`, or with a server that cannot be reached, it says so and exits 0.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use reqctx_postgres::pool::{Manager, Pool};
use reqctx_postgres::{Error, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_reqctx::{ContextLayer, ReqCtx};

/// The report: slow on purpose. Any statement works the same way.
const REPORT: &str = "SELECT pg_sleep(5), count(*) FROM generate_series(1, 1000)";

async fn report(
    ReqCtx(ctx): ReqCtx,
    State(pool): State<Pool>,
) -> Result<String, (StatusCode, String)> {
    // Waiting for a connection is bound to the request too.
    let mut db = match ctx.run(pool.get()).await {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no connection: {e}\n"),
            ));
        }
        Err(cancelled) => return Err((StatusCode::GATEWAY_TIMEOUT, format!("{cancelled}\n"))),
    };
    match db.query(&ctx, REPORT, &[]).await {
        Ok(rows) => Ok(format!(
            "report: {} rows counted\n",
            rows[0].get::<_, i64>(1)
        )),
        // The statement has already stopped on the server; the layer answers 504 itself
        // for a deadline, and nobody reads the answer of a client that left.
        Err(Error::Cancelled(c)) => Err((StatusCode::GATEWAY_TIMEOUT, format!("report {c}\n"))),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))),
    }
}

fn app(pool: Pool) -> Router {
    Router::new()
        .route("/report", get(report))
        .layer(ContextLayer::new().timeout(Duration::from_secs(30)))
        .with_state(pool)
}

#[tokio::main]
async fn main() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!(
            "example-postgres: DATABASE_URL is not set; nothing to show (set it to a PostgreSQL you may use)."
        );
        return;
    };
    let config: tokio_postgres::Config = match url.parse() {
        Ok(c) => c,
        Err(e) => {
            println!("example-postgres: DATABASE_URL does not parse ({e}); nothing to show.");
            return;
        }
    };
    let manager = match Manager::new(config, Options::default()) {
        Ok(m) => m,
        Err(e) => {
            println!("example-postgres: {e}; nothing to show.");
            return;
        }
    };
    let pool = Pool::builder(manager).max_size(4).build().expect("pool");
    let probe = match pool.get().await {
        Ok(conn) => conn,
        Err(e) => {
            println!("example-postgres: cannot reach the database ({e}); nothing to show.");
            return;
        }
    };
    let monitor = probe.client();

    if std::env::args().any(|a| a == "--serve") {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:3000")
            .await
            .expect("bind :3000");
        println!("serving on http://127.0.0.1:3000/report (try ?timeout=300ms, or Ctrl-C curl)");
        tower_reqctx::serve(listener, app(pool.clone()))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .expect("serve");
        return;
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(tower_reqctx::serve(listener, app(pool.clone())).into_future());

    // 1. The client's deadline: 300 ms for a five-second report.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /report?timeout=300ms HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let answered = started.elapsed();
    let idle = wait_until_stopped(monitor).await;
    println!(
        "?timeout=300ms  -> {status} after {:.0} ms; the statement stopped on the server {:.0} ms after the request",
        answered.as_secs_f64() * 1e3,
        (idle - started).as_secs_f64() * 1e3
    );

    // 2. The client hangs up mid-report.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /report HTTP/1.1\r\nHost: demo\r\n\r\n")
        .await
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while running_reports(monitor).await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let closed = Instant::now();
    drop(s);
    let idle = wait_until_stopped(monitor).await;
    println!(
        "client hangs up -> the statement stopped on the server {:.1} ms after the close",
        (idle - closed).as_secs_f64() * 1e3
    );
}

/// Polls until no report runs; exits 1 if one still runs after a second.
async fn wait_until_stopped(monitor: &tokio_postgres::Client) -> Instant {
    let since = Instant::now();
    while running_reports(monitor).await != 0 {
        if since.elapsed() > Duration::from_secs(1) {
            eprintln!("example-postgres: a report statement outlived its request by over a second");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Instant::now()
}

/// How many backends are running the report right now.
async fn running_reports(monitor: &tokio_postgres::Client) -> i64 {
    monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
            &[&REPORT],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(-1)
}
