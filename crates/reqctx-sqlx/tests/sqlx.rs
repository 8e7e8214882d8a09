//! sqlx statements bound to a context, against a real PostgreSQL 15 (the throwaway
//! cluster of `reqctx-pg-test-support`), watched through `pg_stat_activity`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use reqctx::{Cause, Context, DeadlineOrigin};
use reqctx_pg_test_support::{Db, db, wait_active, wait_idle};
use reqctx_sqlx::{ContextPool, Options};
use sqlx::postgres::PgPoolOptions;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tower_reqctx::{ContextLayer, ReqCtx};

const SLEEP: &str = "SELECT pg_sleep(30)";
/// Generous failure bound for "stopped" (the statement would run 30 s).
const STOPPED_WITHIN: Duration = Duration::from_secs(5);

async fn pool(db: &Db, size: u32) -> ContextPool {
    ContextPool::connect_with(
        db.url.parse().unwrap(),
        PgPoolOptions::new().max_connections(size),
        Options::default(),
    )
    .await
    .expect("open the pool")
}

fn median_p99(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e3
    };
    (at(0.5), at(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_sets_the_check_interval_on_its_connections() {
    let Some(db) = db() else { return };
    let pool = pool(db, 1).await;
    let (every,): (String,) = sqlx::query_as("SHOW client_connection_check_interval")
        .fetch_one(pool.bind(&Context::background()))
        .await
        .unwrap();
    assert_eq!(every, "100ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_statement_stops_on_the_server_and_its_error_carries_the_cause() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let pool = pool(db, 1).await;
    let bg = Context::background();
    let mut conn = pool.acquire(&bg).await.unwrap();
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(conn.bind(&bg))
        .await
        .unwrap();
    let (ctx, cancel) = Context::background().with_cancel();
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel_with(Cause::ClientDisconnected);
    });
    let err = sqlx::query(SLEEP)
        .execute(conn.bind(&ctx))
        .await
        .unwrap_err();
    assert_eq!(
        reqctx_sqlx::cause(&err),
        Some(&Cause::ClientDisconnected),
        "{err}"
    );
    assert!(
        !conn.is_open(),
        "a cut statement's connection must be closed"
    );
    assert!(
        wait_idle(&monitor, pid, STOPPED_WITHIN).await.is_some(),
        "backend {pid} still active {STOPPED_WITHIN:?} after its connection closed"
    );
    // The closed connection refuses more statements; the pool opens a new one.
    assert!(
        sqlx::query("SELECT 1")
            .execute(conn.bind(&bg))
            .await
            .is_err()
    );
    drop(conn);
    let (other,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(pool.bind(&bg))
        .await
        .unwrap();
    assert_ne!(other, pid);
}

/// A statement future dropped mid-statement (a handler dropped when its client left)
/// closes its connection from `Drop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_statement_closes_its_connection() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let pool = pool(db, 1).await;
    let bg = Context::background(); // never cancelled: only the drop can stop it
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(pool.bind(&bg))
        .await
        .unwrap();
    let mon = db.monitor().await;
    tokio::select! {
        _ = sqlx::query(SLEEP).execute(pool.bind(&bg)) => panic!("the sleep finished"),
        () = wait_active(&mon, pid) => {} // drops the statement's future
    }
    assert!(
        wait_idle(&monitor, pid, STOPPED_WITHIN).await.is_some(),
        "the dropped statement runs on"
    );
    let (n,): (i32,) = sqlx::query_as("SELECT 1")
        .fetch_one(pool.bind(&bg))
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_bounds_the_statement_on_the_server_too() {
    let Some(db) = db() else { return };
    let pool = pool(db, 1).await;
    let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(10));
    let (set,): (String,) = sqlx::query_as("SELECT current_setting('statement_timeout')")
        .fetch_one(pool.bind(&ctx))
        .await
        .unwrap();
    let ms: u64 = set.trim_end_matches("ms").parse().unwrap_or(0);
    assert!(
        set.ends_with('s') && (9_000..=10_000).contains(&ms) || set == "10s",
        "statement_timeout {set} for a 10 s budget"
    );
    // On a held connection, the next statement without a deadline runs without it.
    let mut conn = pool.acquire(&ctx).await.unwrap();
    let (short, _c2) = ctx.with_timeout(Duration::from_secs(2));
    sqlx::query("SELECT 1")
        .execute(conn.bind(&short))
        .await
        .unwrap();
    let (now,): (String,) = sqlx::query_as("SHOW statement_timeout")
        .fetch_one(conn.bind(&Context::background()))
        .await
        .unwrap();
    assert_eq!(now, "0", "a held connection kept the last budget");
    drop(conn);
    // Reset before the connection goes back: a statement without a deadline has none.
    let started = Instant::now();
    loop {
        let (now,): (String,) = sqlx::query_as("SHOW statement_timeout")
            .fetch_one(pool.inner())
            .await
            .unwrap();
        if now == "0" {
            break;
        }
        assert!(
            started.elapsed() < STOPPED_WITHIN,
            "the budget leaked: {now}"
        );
        tokio::task::yield_now().await;
    }
}

#[derive(Clone)]
struct App {
    pool: ContextPool,
    seen: mpsc::UnboundedSender<(Context, i32)>,
    /// The cause each handler read from its statement's error.
    causes: mpsc::UnboundedSender<Option<Cause>>,
}

/// The pool has one connection per test server below when `pid` matters: the pid query
/// and the sleep run on the same one.
async fn sleep(
    ReqCtx(ctx): ReqCtx,
    State(app): State<App>,
) -> Result<&'static str, (StatusCode, String)> {
    let mut conn = app
        .pool
        .acquire(&ctx)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(conn.bind(&ctx))
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let _ = app.seen.send((ctx.clone(), pid));
    match sqlx::query(SLEEP).execute(conn.bind(&ctx)).await {
        Ok(_) => Ok("slept"),
        Err(e) => {
            let _ = app.causes.send(reqctx_sqlx::cause(&e).cloned());
            match reqctx_sqlx::cause(&e) {
                Some(cause) => Err((StatusCode::GATEWAY_TIMEOUT, format!("{cause:?}"))),
                None => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            }
        }
    }
}

async fn quick(ReqCtx(ctx): ReqCtx, State(app): State<App>) -> Result<String, String> {
    let (n,): (i32,) = sqlx::query_as("SELECT 1")
        .fetch_one(app.pool.bind(&ctx))
        .await
        .map_err(|e| e.to_string())?;
    Ok(n.to_string())
}

type Served = (
    SocketAddr,
    mpsc::UnboundedReceiver<(Context, i32)>,
    mpsc::UnboundedReceiver<Option<Cause>>,
);

async fn serve(db: &Db, size: u32) -> Served {
    let (seen, rx) = mpsc::unbounded_channel();
    let (causes, causes_rx) = mpsc::unbounded_channel();
    let app = App {
        pool: pool(db, size).await,
        seen,
        causes,
    };
    let router = Router::new()
        .route("/sleep", get(sleep))
        .route("/quick", get(quick))
        .layer(ContextLayer::new())
        .with_state(app);
    let (addr, _) =
        reqctx_test_support::spawn_server(|l| tower_reqctx::serve(l, router).into_future()).await;
    (addr, rx, causes_rx)
}

async fn request(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    reqctx_test_support::send(addr, req.as_bytes()).await
}

/// 50 client hang-ups mid-`pg_sleep(30)`, one after another: each stops the statement on
/// the server (its connection closed, the check interval 100 ms). Prints the latency from
/// the hang-up to the backend leaving `active` (polled every ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_ups_stop_the_statement_on_the_server() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let (addr, mut seen, _) = serve(db, 1).await;
    let mut latencies = Vec::new();
    for round in 0..50 {
        let stream = request(addr, "/sleep").await;
        let (ctx, pid) = seen.recv().await.unwrap();
        wait_active(&monitor, pid).await;
        drop(stream);
        let Some(latency) = wait_idle(&monitor, pid, STOPPED_WITHIN).await else {
            panic!(
                "round {round}: backend {pid} still active {STOPPED_WITHIN:?} after the hang-up"
            );
        };
        latencies.push(latency);
        tokio::time::timeout(STOPPED_WITHIN, ctx.cancelled())
            .await
            .unwrap();
        assert_eq!(ctx.cause(), Some(Cause::ClientDisconnected));
    }
    let (median, p99) = median_p99(&mut latencies);
    eprintln!("sqlx, hang-up to not active (50 rounds): median {median:.1} ms, p99 {p99:.1} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_timeout_ends_the_statement_and_the_error_carries_the_query_origin() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let (addr, mut seen, mut causes) = serve(db, 1).await;
    let sent = Instant::now();
    let mut stream = request(addr, "/sleep?timeout=200ms").await;
    let (ctx, pid) = seen.recv().await.unwrap();
    wait_active(&monitor, pid).await;
    assert!(wait_idle(&monitor, pid, STOPPED_WITHIN).await.is_some());
    let ended = sent.elapsed();
    assert!(ended >= Duration::from_millis(200), "ended after {ended:?}");
    eprintln!("sqlx, ?timeout=200ms: not active after {ended:?}");
    let expected = Cause::DeadlineExceeded {
        origin: DeadlineOrigin::Query,
    };
    assert_eq!(ctx.cause(), Some(expected.clone()));
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 504");
    let seen_by_handler = tokio::time::timeout(STOPPED_WITHIN, causes.recv())
        .await
        .expect("the handler saw no error")
        .unwrap();
    assert_eq!(seen_by_handler, Some(expected));
}

/// 50 clients hang up at once, through a pool of 10: no statement is left running, and
/// the pool (its cut connections replaced) serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_hang_ups_through_a_pool_of_ten() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let (addr, mut seen, _) = serve(db, 10).await;
    let mut streams = Vec::new();
    for _ in 0..50 {
        streams.push(request(addr, "/sleep").await);
    }
    for _ in 0..10 {
        let (_, pid) = seen.recv().await.unwrap();
        wait_active(&monitor, pid).await;
    }
    drop(streams);
    let started = Instant::now();
    let left_running = loop {
        let running: i64 = monitor
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                &[&SLEEP],
            )
            .await
            .unwrap()
            .get(0);
        if running == 0 || started.elapsed() > Duration::from_secs(10) {
            break running;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(left_running, 0, "statements still running after 10 s");
    eprintln!(
        "sqlx, 50 hang-ups through a pool of 10: none running after {:?}",
        started.elapsed()
    );
    for _ in 0..20 {
        let (status, body) = reqctx_test_support::http_get(addr, "/quick").await;
        assert_eq!((status, body.as_str()), (200, "1"));
    }
}

/// A proxy in front of the server that announces `server_version` 13.9, as a
/// PostgreSQL 13 would (sqlx reads the version from that startup message).
async fn proxy_claiming_13(upstream: u16) -> u16 {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Ok(n) = sr.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        let _ = cw.shutdown().await;
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let mut out = Vec::new();
                    while buf.len() >= 5 {
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        if buf.len() < 1 + len {
                            break;
                        }
                        let msg: Vec<u8> = buf.drain(..1 + len).collect();
                        if msg[0] == b'S' && msg[5..].starts_with(b"server_version\0") {
                            let body = b"server_version\x0013.9\0";
                            out.push(b'S');
                            out.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
                            out.extend_from_slice(body);
                        } else {
                            out.extend_from_slice(&msg);
                        }
                    }
                    if cw.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Below PostgreSQL 14 there is no `client_connection_check_interval`: a closed
/// connection would not stop its statement, so the pool refuses to open, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_before_14_is_refused_at_connect() {
    let Some(db) = db() else { return };
    let upstream = db.config().get_ports().first().copied().unwrap_or(5432);
    let port = proxy_claiming_13(upstream).await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let err = ContextPool::connect(&url).await.unwrap_err();
    match &err {
        sqlx::Error::Configuration(why) => {
            assert!(why.to_string().contains("PostgreSQL 14"), "{why}");
        }
        other => panic!("a PostgreSQL 13 was accepted or failed otherwise: {other:?}"),
    }
}
