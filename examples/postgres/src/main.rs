//! A slow report endpoint whose query dies with the request.
//!
//! `GET /report` runs a five-second statement through `reqctx-postgres` (tokio-postgres),
//! `GET /report-sqlx` the same through `reqctx-sqlx`. When the client hangs up, or its
//! `?timeout=` passes, the statement stops **on the server**: tokio-postgres's is
//! cancelled, sqlx's has its connection closed (the server notices within
//! `client_connection_check_interval`, 100 ms). The backend is free again instead of
//! sleeping on for a client that is gone.
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
use reqctx_sqlx::ContextPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_reqctx::{ContextLayer, ReqCtx};

/// The report: slow on purpose. Any statement works the same way.
const REPORT: &str = "SELECT pg_sleep(5), count(*) FROM generate_series(1, 1000)";

#[derive(Clone)]
struct Pools {
    postgres: Pool,
    sqlx: Option<ContextPool>,
}

async fn report(
    ReqCtx(ctx): ReqCtx,
    State(Pools { postgres: pool, .. }): State<Pools>,
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

/// The same report through sqlx.
async fn report_sqlx(
    ReqCtx(ctx): ReqCtx,
    State(pools): State<Pools>,
) -> Result<String, (StatusCode, String)> {
    let Some(pool) = pools.sqlx else {
        return Err((StatusCode::NOT_FOUND, "no sqlx pool\n".into()));
    };
    let row: Result<(i64,), sqlx::Error> = sqlx::query_as(REPORT_SQLX)
        .fetch_one(pool.bind(&ctx)) // waiting for a connection is bound too
        .await;
    match row {
        Ok((n,)) => Ok(format!("report: {n} rows counted\n")),
        // Stopped on the server already (its connection closed); as above for the answer.
        Err(e) => match reqctx_sqlx::cause(&e) {
            Some(cause) => Err((StatusCode::GATEWAY_TIMEOUT, format!("report: {cause}\n"))),
            None => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))),
        },
    }
}

/// The same work, with `pg_sleep` in `FROM` (sqlx does not decode its `void` result).
const REPORT_SQLX: &str = "SELECT count(*) FROM generate_series(1, 1000), pg_sleep(5)";

fn app(pools: Pools) -> Router {
    Router::new()
        .route("/report", get(report))
        .route("/report-sqlx", get(report_sqlx))
        .layer(ContextLayer::new().timeout(Duration::from_secs(30)))
        .with_state(pools)
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
    // PostgreSQL 14 or later: reqctx-sqlx refuses older servers (and says why).
    let sqlx = match ContextPool::connect(&url).await {
        Ok(p) => Some(p),
        Err(e) => {
            println!("example-postgres: no sqlx route ({e})");
            None
        }
    };
    let pools = Pools {
        postgres: pool.clone(),
        sqlx,
    };

    if std::env::args().any(|a| a == "--serve") {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:3000")
            .await
            .expect("bind :3000");
        println!("serving on http://127.0.0.1:3000/report (try ?timeout=300ms, or Ctrl-C curl)");
        tower_reqctx::serve(listener, app(pools.clone()))
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
    let sqlx_route = pools.sqlx.is_some();
    tokio::spawn(tower_reqctx::serve(listener, app(pools)).into_future());
    demo(addr, monitor, "/report", REPORT).await;
    if sqlx_route {
        demo(addr, monitor, "/report-sqlx", REPORT_SQLX).await;
    }
}

/// The client's deadline, then a hang-up, on `path` (whose statement is `sql`).
async fn demo(addr: std::net::SocketAddr, monitor: &tokio_postgres::Client, path: &str, sql: &str) {
    println!("{path}:");

    // 1. The client's deadline: 300 ms for a five-second report.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req =
        format!("GET {path}?timeout=300ms HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let answered = started.elapsed();
    let idle = wait_until_stopped(monitor, sql).await;
    println!(
        "  ?timeout=300ms  -> {status} after {:.0} ms; the statement stopped on the server {:.0} ms after the request",
        answered.as_secs_f64() * 1e3,
        (idle - started).as_secs_f64() * 1e3
    );

    // 2. The client hangs up mid-report.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: demo\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while running_reports(monitor, sql).await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let closed = Instant::now();
    drop(s);
    let idle = wait_until_stopped(monitor, sql).await;
    println!(
        "  client hangs up -> the statement stopped on the server {:.1} ms after the close",
        (idle - closed).as_secs_f64() * 1e3
    );
}

/// Polls until no report runs; exits 1 if one still runs after a second.
async fn wait_until_stopped(monitor: &tokio_postgres::Client, sql: &str) -> Instant {
    let since = Instant::now();
    while running_reports(monitor, sql).await != 0 {
        if since.elapsed() > Duration::from_secs(1) {
            eprintln!("example-postgres: a report statement outlived its request by over a second");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Instant::now()
}

/// How many backends are running the report right now.
async fn running_reports(monitor: &tokio_postgres::Client, sql: &str) -> i64 {
    monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
            &[&sql],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(-1)
}
