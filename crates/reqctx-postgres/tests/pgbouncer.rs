//! Behind PgBouncer (Debian's, started by the tests) with one server connection per pool,
//! so that clients share a backend.

use std::time::{Duration, Instant};

use reqctx::{Cause, Context};
use reqctx_pg_test_support::{self as support, bouncer, db, wait_active, wait_idle};
use reqctx_postgres::{ContextClient, Error, Options, TimeoutScope};

const STOPPED_WITHIN: Duration = Duration::from_secs(5);

async fn through(b: &support::Bouncer, pool: &str, options: Options) -> ContextClient {
    ContextClient::connect(&b.config(pool), options)
        .await
        .expect("connect through PgBouncer")
}

/// Client A's 200 ms budget never cuts client B's 1 s statement on the backend they share,
/// with the default settings; a session-level budget would (checked too, so the test
/// shows it shares a backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_never_outlives_its_transaction_behind_pgbouncer() {
    let Some(db) = db() else { return };
    let Some(b) = bouncer(db, "transaction") else {
        return;
    };
    let mut a = through(b, "a", Options::default()).await;
    let mut b_client = through(b, "a", Options::default()).await;
    assert!(
        !a.session_timeout(),
        "a connection through PgBouncer was taken for a direct one"
    );
    for round in 0..3 {
        let (ctx, _c) = Context::background().with_timeout(Duration::from_millis(200));
        a.query(&ctx, "SELECT 1", &[]).await.unwrap();
        // The budget also bounds A's statements inside its own transaction.
        a.batch_execute(&ctx, "BEGIN").await.unwrap();
        let inside: String = a
            .query(&ctx, "SELECT current_setting('statement_timeout')", &[])
            .await
            .unwrap()[0]
            .get(0);
        assert!(inside.ends_with("ms"), "round {round}: {inside}");
        a.batch_execute(&ctx, "COMMIT").await.unwrap();
        let started = Instant::now();
        let slow = b_client
            .query(&Context::background(), "SELECT pg_sleep(1)", &[])
            .await;
        assert!(slow.is_ok(), "round {round}: A's budget cut B: {slow:?}");
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    // The counter-check: a session-level budget stays on the shared backend.
    let mut leaky = through(
        b,
        "a",
        Options::default().timeout_scope(TimeoutScope::Session),
    )
    .await;
    let (ctx, _c) = Context::background().with_timeout(Duration::from_millis(200));
    leaky.query(&ctx, "SELECT 1", &[]).await.unwrap();
    let cut = b_client
        .query(&Context::background(), "SELECT pg_sleep(1)", &[])
        .await;
    match cut {
        Err(Error::Postgres(e)) => assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
        ),
        other => panic!("a session-level budget did not leak: {other:?}"),
    }
    // Clean the shared backend for whoever comes next.
    b_client
        .client()
        .batch_execute("SET statement_timeout TO DEFAULT")
        .await
        .unwrap();
}

fn median_p99(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e3
    };
    (at(0.5), at(0.99))
}

/// A context cancelled mid-`pg_sleep(30)` behind PgBouncer (what a client hang-up does):
/// the cancel goes through PgBouncer, which forwards it to the server; the statement
/// stops and the connection is kept. Prints the latency from the cancel to the backend
/// leaving `active`, in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_pgbouncer_stops_the_statement() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    for mode in ["session", "transaction"] {
        let Some(b) = bouncer(db, mode) else { return };
        let mut conn = through(b, "b", Options::default()).await;
        let mut latencies = Vec::new();
        for round in 0..20 {
            // Behind a transaction pooler the backend is the one of this statement.
            let (ctx, cancel) = Context::background().with_cancel();
            let pid: i32 = conn
                .query(&Context::background(), "SELECT pg_backend_pid()", &[])
                .await
                .unwrap()[0]
                .get(0);
            let mon = db.monitor().await;
            let watcher = tokio::spawn(async move {
                wait_active(&mon, pid).await;
                cancel.cancel_with(Cause::ClientDisconnected);
                let latency = wait_idle(&mon, pid, STOPPED_WITHIN).await;
                (latency, mon)
            });
            let err = conn
                .query(&ctx, "SELECT pg_sleep(30)", &[])
                .await
                .unwrap_err();
            assert_eq!(err.cause(), Some(&Cause::ClientDisconnected), "{err}");
            let (latency, _) = watcher.await.unwrap();
            let Some(latency) = latency else {
                panic!("{mode} round {round}: backend {pid} still active after {STOPPED_WITHIN:?}");
            };
            latencies.push(latency);
            assert!(
                conn.is_usable(),
                "{mode} round {round}: connection given up"
            );
        }
        let (median, p99) = median_p99(&mut latencies);
        eprintln!(
            "tokio-postgres behind PgBouncer ({mode} mode), cancel to not active (20 rounds): \
             median {median:.1} ms, p99 {p99:.1} ms"
        );
    }
    drop(monitor);
}
