//! Statements bound to a context, against a real PostgreSQL (see `support`): each test
//! watches the server through `pg_stat_activity` from a separate connection.

use reqctx_pg_test_support as support;

use std::time::{Duration, Instant};

use reqctx::{Cause, Context, DeadlineOrigin};
use reqctx_postgres::pool::{Manager, Pool};
use reqctx_postgres::{CancelTarget, ContextClient, Error, Options, TimeoutScope};
use support::{db, state_of, wait_active, wait_idle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The slow statement every test stops: it would run for [`SLEEPS_FOR`] on its own.
const SLEEP: &str = "SELECT pg_sleep(10)";
/// How long [`SLEEP`] runs if nothing stops it.
const SLEEPS_FOR: Duration = Duration::from_secs(10);
/// The upper bound of "stopped": half of [`SLEEPS_FOR`]. A statement over by then was
/// stopped by what the test did, not finished, however loaded the machine; a bound on how
/// fast the stop travels over loopback (say a second) would assert the machine's speed.
const STOPPED_WITHIN: Duration = Duration::from_secs(SLEEPS_FOR.as_secs() / 2);

async fn connect(db: &support::Db) -> ContextClient {
    ContextClient::connect(&db.config(), Options::default())
        .await
        .expect("connect")
}

fn pool(db: &support::Db, size: usize) -> Pool {
    Pool::builder(Manager::new(db.config(), Options::default()).unwrap())
        .max_size(size)
        .build()
        .unwrap()
}

async fn timeout_setting(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_statement_on_the_server_and_keeps_the_connection() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let mut conn = connect(db).await;
    let pid = conn.backend_pid();
    let (ctx, cancel) = Context::background().with_cancel();
    let mon = db.monitor().await;
    let canceller = tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel_with(Cause::ClientDisconnected);
        Instant::now()
    });
    let err = conn.query(&ctx, SLEEP, &[]).await.unwrap_err();
    let returned = Instant::now();
    let cancelled_at = canceller.await.unwrap();
    assert_eq!(err.cause(), Some(&Cause::ClientDisconnected), "{err}");
    assert!(
        returned - cancelled_at < STOPPED_WITHIN,
        "took {:?}",
        returned - cancelled_at
    );
    // When the call returns, the statement is over on the server.
    assert_eq!(state_of(&monitor, pid).await.as_deref(), Some("idle"));
    // 57014 after our cancel: the connection is kept and works.
    assert!(conn.is_usable());
    let rows = conn
        .query(&Context::background(), "SELECT 1", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_rows_and_driver_errors_pass_through() {
    let Some(db) = db() else { return };
    let mut conn = connect(db).await;
    let bg = Context::background();
    let none: Option<String> = None;
    let rows = conn
        .query(
            &bg,
            "SELECT $1::int4 + 1, $2::text, $3::text IS NULL",
            &[&41_i32, &"x", &none],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    assert_eq!(rows[0].get::<_, String>(1), "x");
    assert!(rows[0].get::<_, bool>(2));
    // A prepared statement, and `execute`'s count.
    let stmt = conn
        .client()
        .prepare("SELECT generate_series(1, $1)")
        .await
        .unwrap();
    assert_eq!(conn.execute(&bg, &stmt, &[&3_i32]).await.unwrap(), 3);
    // Wrong type, wrong count, bad SQL: the driver's errors, and the connection stays.
    for result in [
        conn.query(&bg, "SELECT $1::int4", &[&"not a number"]).await,
        conn.query(&bg, "SELECT $1::int4", &[]).await,
        conn.query(&bg, "SELEC 1", &[]).await,
    ] {
        assert!(matches!(result, Err(Error::Postgres(_))), "{result:?}");
    }
    assert!(conn.is_usable());
    assert_eq!(conn.query(&bg, "SELECT 1", &[]).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_travels_as_statement_timeout_and_is_restored() {
    let Some(db) = db() else { return };
    let mut conn = connect(db).await;
    let sql = "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'";
    let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(10));
    let set: i64 = conn.query(&ctx, sql, &[]).await.unwrap()[0].get(0);
    assert!(
        (9_000..=10_000).contains(&set),
        "statement_timeout {set} for a 10 s budget"
    );
    // Within the tolerance: the cached value stays (no new SET).
    let again: i64 = conn.query(&ctx, sql, &[]).await.unwrap()[0].get(0);
    assert_eq!(again, set);
    // A shorter budget lowers it.
    let (short, _c2) = ctx.with_timeout(Duration::from_secs(2));
    let lower: i64 = conn.query(&short, sql, &[]).await.unwrap()[0].get(0);
    assert!((1_000..=2_000).contains(&lower), "{lower}");
    // No deadline: the session's default again, so nothing leaks to deadline-less work.
    let none: i64 = conn.query(&Context::background(), sql, &[]).await.unwrap()[0].get(0);
    assert_eq!(none, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_57014_we_did_not_cause_is_a_postgres_error() {
    let Some(db) = db() else { return };
    let mut conn = connect(db).await;
    let pid = conn.backend_pid();
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        mon.execute("SELECT pg_cancel_backend($1)", &[&pid])
            .await
            .unwrap();
    });
    let (ctx, _c) = Context::background().with_timeout(Duration::from_secs(30));
    let err = conn.query(&ctx, SLEEP, &[]).await.unwrap_err();
    match &err {
        Error::Postgres(e) => assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
        ),
        other => panic!("a DBA's cancel reported as {other:?}"),
    }
    assert!(conn.is_usable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_below_the_margin_is_not_sent() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    monitor
        .batch_execute("CREATE TABLE IF NOT EXISTS margin_probe (x int)")
        .await
        .unwrap();
    let mut conn = connect(db).await;
    let (ctx, _c) = Context::background().with_timeout(Duration::from_millis(2));
    let err = conn
        .execute(&ctx, "INSERT INTO margin_probe VALUES (1)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.cause(),
        Some(&Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Code
        })
    );
    let n: i64 = monitor
        .query_one("SELECT count(*) FROM margin_probe", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the statement was sent");
    assert!(conn.is_usable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_statement_is_cancelled_from_a_task_and_the_next_call_waits() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let mut conn = connect(db).await;
    let pid = conn.backend_pid();
    let ctx = Context::background(); // never cancelled: only the drop can stop it
    let mon = db.monitor().await;
    let active = async move { wait_active(&mon, pid).await };
    tokio::select! {
        _ = conn.query(&ctx, SLEEP, &[]) => panic!("the sleep finished"),
        () = active => {} // drops the statement's future
    }
    let dropped = Instant::now();
    let idle = wait_idle(&monitor, pid, STOPPED_WITHIN).await;
    assert!(
        idle.is_some(),
        "backend still active {STOPPED_WITHIN:?} after the drop"
    );
    // The next call waited for the cleanup, which confirmed the cancel: same backend.
    let rows = conn
        .query(&ctx, "SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), pid);
    assert!(
        dropped.elapsed() < STOPPED_WITHIN,
        "{:?}",
        dropped.elapsed()
    );
}

/// The statement ends at about the moment the cancel is sent, again and again: whatever
/// the outcome, no cancel may ever hit the statement after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_cancel_hits_the_next_statement() {
    let Some(db) = db() else { return };
    let mut conn = connect(db).await;
    let (mut kept, mut given_up, mut finished) = (0, 0, 0);
    for round in 0..300u64 {
        let (ctx, cancel) = Context::background().with_cancel();
        // The statement sleeps 2 ms; the cancel comes between 1 and 3 ms in.
        let delay = Duration::from_micros(1_000 + (round * 7_919) % 2_000);
        let t = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            cancel.cancel();
        });
        let result = conn.query(&ctx, "SELECT pg_sleep(0.002)", &[]).await;
        t.await.unwrap();
        match result {
            Ok(_) => finished += 1,
            Err(Error::Cancelled(_)) if conn.is_usable() => kept += 1,
            Err(Error::Cancelled(_)) => {
                given_up += 1;
                conn = connect(db).await;
                continue;
            }
            Err(e) => panic!("round {round}: {e}"),
        }
        // A late cancel would land here: a statement that checks for interrupts.
        let follow = conn
            .query(&Context::background(), "SELECT pg_sleep(0.005)", &[])
            .await;
        assert!(
            follow.is_ok(),
            "round {round}: stale cancel hit the next statement: {follow:?}"
        );
    }
    eprintln!(
        "stale-cancel race: {finished} finished first, {kept} cancelled and kept, {given_up} given up"
    );
    assert!(kept > 0, "the race never cancelled a running statement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_reuses_a_cancelled_connection_with_its_timeout_reset() {
    let Some(db) = db() else { return };
    let pool = pool(db, 1);
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    let (ctx, cancel) = Context::background().with_timeout(Duration::from_secs(20));
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel();
    });
    let err = conn.query(&ctx, SLEEP, &[]).await.unwrap_err();
    assert_eq!(err.cause(), Some(&Cause::Cancelled));
    assert!(
        timeout_setting(conn.client()).await > 0,
        "the budget was set"
    );
    drop(conn);
    let conn = pool.get().await.unwrap();
    assert_eq!(
        conn.backend_pid(),
        pid,
        "a confirmed cancel keeps the connection"
    );
    assert_eq!(
        timeout_setting(conn.client()).await,
        0,
        "the last user's timeout leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_inside_a_transaction_is_rolled_back_before_reuse() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    monitor
        .batch_execute("CREATE TABLE IF NOT EXISTS tx_probe (x int)")
        .await
        .unwrap();
    let pool = pool(db, 1);
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    let (ctx, cancel) = Context::background().with_cancel();
    conn.batch_execute(&ctx, "BEGIN").await.unwrap();
    conn.execute(&ctx, "INSERT INTO tx_probe VALUES (1)", &[])
        .await
        .unwrap();
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel();
    });
    let err = conn.query(&ctx, SLEEP, &[]).await.unwrap_err();
    assert!(err.cancelled().is_some(), "{err}");
    drop(conn);
    let mut conn = pool.get().await.unwrap();
    assert_eq!(conn.backend_pid(), pid);
    // Not in an aborted transaction (that would be 25P02), and the insert is gone.
    let bg = Context::background();
    let n: i64 = conn
        .query(&bg, "SELECT count(*) FROM tx_probe", &[])
        .await
        .unwrap()[0]
        .get(0);
    assert_eq!(n, 0);
    let state = state_of(&monitor, pid).await;
    assert_eq!(state.as_deref(), Some("idle"), "left in a transaction");
}

/// A handler that opened a transaction and returned early (a non-database error) gives
/// the connection back inside it: the pool rolls it back before anyone else gets it,
/// whether the `BEGIN` went through `ContextClient` or through the plain client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_rolls_back_a_transaction_left_open() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    monitor
        .batch_execute("CREATE TABLE IF NOT EXISTS left_open (x int)")
        .await
        .unwrap();
    let pool = pool(db, 1);
    let bg = Context::background();
    for raw in [false, true] {
        let mut conn = pool.get().await.unwrap();
        let pid = conn.backend_pid();
        if raw {
            let c = conn.client();
            c.batch_execute("BEGIN").await.unwrap();
            c.execute("INSERT INTO left_open VALUES (1)", &[])
                .await
                .unwrap();
        } else {
            conn.batch_execute(&bg, "BEGIN").await.unwrap();
            conn.execute(&bg, "INSERT INTO left_open VALUES (1)", &[])
                .await
                .unwrap();
        }
        assert_eq!(
            state_of(&monitor, pid).await.as_deref(),
            Some("idle in transaction")
        );
        drop(conn); // the handler returned early
        let conn = pool.get().await.unwrap();
        assert_eq!(conn.backend_pid(), pid, "raw={raw}: connection discarded");
        assert_eq!(
            state_of(&monitor, pid).await.as_deref(),
            Some("idle"),
            "raw={raw}: handed out inside a transaction"
        );
        let n: i64 = monitor
            .query_one("SELECT count(*) FROM left_open", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "raw={raw}: the insert was committed");
    }
}

/// A statement cancelled inside a transaction: the transaction is rolled back right
/// after the cancel, while the handler still holds the connection (not left "idle in
/// transaction (aborted)" until the pool takes it back); statements that would have run
/// in it are refused, and its `ROLLBACK` is answered here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_inside_a_transaction_rolls_it_back_at_once() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let mut conn = connect(db).await;
    let pid = conn.backend_pid();
    let bg = Context::background();
    // Through the plain client: seen too.
    conn.client().batch_execute("BEGIN").await.unwrap();
    let (ctx, cancel) = Context::background().with_cancel();
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel();
    });
    let err = conn.query(&ctx, SLEEP, &[]).await.unwrap_err();
    assert!(err.cancelled().is_some(), "{err}");
    assert_eq!(state_of(&monitor, pid).await.as_deref(), Some("idle"));
    assert!(conn.is_usable());
    // Outside the transaction now: refused rather than run in autocommit.
    assert!(matches!(
        conn.execute(&bg, "SELECT 1", &[]).await,
        Err(Error::RolledBack)
    ));
    conn.batch_execute(&bg, "ROLLBACK").await.unwrap();
    assert_eq!(conn.query(&bg, "SELECT 1", &[]).await.unwrap().len(), 1);
    // Outside a transaction nothing is rolled back or refused.
    let (ctx, cancel) = Context::background().with_cancel();
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel();
    });
    assert!(conn.query(&ctx, SLEEP, &[]).await.is_err());
    assert_eq!(conn.query(&bg, "SELECT 1", &[]).await.unwrap().len(), 1);
}

/// Any failed statement leaves its transaction aborted, as a cancel does: the case where
/// the server's `statement_timeout` fires a moment before our cancel is sent ends this
/// way too. Before reuse the pool rolls back; a timeout reset sent into the aborted
/// transaction would fail and cost the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_inside_a_transaction_is_rolled_back_before_reuse() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let pool = pool(db, 1);
    for deadline in [None, Some(Duration::from_secs(30))] {
        let mut conn = pool.get().await.unwrap();
        let pid = conn.backend_pid();
        let (ctx, _cancel) = match deadline {
            Some(d) => Context::background().with_timeout(d),
            None => Context::background().with_cancel(),
        };
        conn.batch_execute(&ctx, "BEGIN").await.unwrap();
        let err = conn.query(&ctx, "SELECT 1 / 0", &[]).await.unwrap_err();
        assert!(err.cancelled().is_none(), "{err}");
        drop(conn);
        let conn = pool.get().await.unwrap();
        assert_eq!(
            conn.backend_pid(),
            pid,
            "{deadline:?}: connection discarded"
        );
        assert_eq!(timeout_setting(conn.client()).await, 0, "{deadline:?}");
        let state = state_of(&monitor, pid).await;
        assert_eq!(
            state.as_deref(),
            Some("idle"),
            "{deadline:?}: left in a transaction"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_waits_for_a_dropped_statements_cleanup() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let pool = pool(db, 1);
    let mut conn = pool.get().await.unwrap();
    let pid = conn.backend_pid();
    let task = tokio::spawn(async move { conn.query(&Context::background(), SLEEP, &[]).await });
    wait_active(&monitor, pid).await;
    task.abort(); // the handler is dropped; the connection goes back to the pool at once
    assert!(task.await.unwrap_err().is_cancelled());
    let conn = pool.get().await.unwrap();
    // Handed out only once the statement had ended on the server.
    assert_eq!(state_of(&monitor, pid).await.as_deref(), Some("idle"));
    assert_eq!(conn.backend_pid(), pid);
    conn.client().simple_query("SELECT 1").await.unwrap();
}

/// A host name is looked up once, when connecting: the cancels go to the address that
/// answered, not to a new lookup (which, with several addresses, may reach another server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_goes_to_the_address_the_connection_reached() {
    let Some(db) = db() else { return };
    if db.dir.is_none() {
        return; // a DATABASE_URL server: its addresses are not known here
    }
    let mut config = db.config();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    config.host("localhost"); // ::1 (refused: the server listens on 127.0.0.1), 127.0.0.1
    let mut conn = ContextClient::connect(&config, Options::default())
        .await
        .expect("one of localhost's addresses answers");
    assert_eq!(
        conn.cancel_target(),
        &CancelTarget::Addr(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    );
    // And the cancel sent there stops the statement.
    let pid = conn.backend_pid();
    let (ctx, cancel) = Context::background().with_cancel();
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel();
    });
    assert!(
        conn.query(&ctx, SLEEP, &[])
            .await
            .unwrap_err()
            .cancelled()
            .is_some()
    );
    assert!(conn.is_usable());
}

#[tokio::test]
async fn bad_configuration_is_a_clear_error() {
    for bad in [
        "postgres://[::1",
        "host=a,b user=x target_session_attrs=read-write",
        "user=x port=1,2 host=h",
    ] {
        let err = reqctx_postgres::connect(bad).await.unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{bad}: {err:?}");
        assert!(!err.to_string().is_empty());
    }
}

/// A closed port stands for a server that refuses the cancel connection.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

async fn with_refused_cancel(db: &support::Db, options: Options) -> ContextClient {
    let (client, connection) = db.config().connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let target = CancelTarget::Tcp {
        host: "127.0.0.1".into(),
        port: closed_port().await,
    };
    ContextClient::new(client, target, options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_cancel_gives_the_connection_up_at_once() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    let mut conn = with_refused_cancel(db, Options::default().statement_timeout(false)).await;
    let pid = conn.backend_pid();
    let (ctx, cancel) = Context::background().with_cancel();
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel();
    });
    let err = conn.query(&ctx, SLEEP, &[]).await.unwrap_err();
    assert_eq!(err.cause(), Some(&Cause::Cancelled));
    assert!(!conn.is_usable());
    assert!(matches!(
        conn.query(&ctx, "SELECT 1", &[]).await,
        Err(Error::Unusable)
    ));
    // Without a deadline there is no backstop: the statement runs on (documented).
    assert_eq!(state_of(&monitor, pid).await.as_deref(), Some("active"));
    monitor
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_cancel_cannot_reach_the_server_the_budget_still_stops_the_statement() {
    let Some(db) = db() else { return };
    let monitor = db.monitor().await;
    // A connection opened by the user: the budget travels per session only if told so.
    let mut conn =
        with_refused_cancel(db, Options::default().timeout_scope(TimeoutScope::Session)).await;
    let pid = conn.backend_pid();
    let started = Instant::now();
    let (ctx, _c) = Context::background().with_timeout(Duration::from_millis(300));
    let err = conn.query(&ctx, SLEEP, &[]).await.unwrap_err();
    // Our timer or the server's statement_timeout, whichever fired first: the cause is ours.
    assert_eq!(
        err.cause(),
        Some(&Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Code
        })
    );
    assert!(
        started.elapsed() < STOPPED_WITHIN,
        "hung for {:?}",
        started.elapsed()
    );
    assert!(
        wait_idle(&monitor, pid, STOPPED_WITHIN).await.is_some(),
        "the backstop did not fire"
    );
    let ended = started.elapsed();
    assert!(
        ended >= Duration::from_millis(300) && ended < STOPPED_WITHIN,
        "{ended:?}"
    );
}

/// A proxy that drops BackendKeyData ('K') from the server's messages, as some poolers
/// effectively do: the client's cancel key is then zero.
async fn proxy_without_key_data(upstream: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
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
                        if msg[0] != b'K' {
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

/// The close route: a connection opened by this crate whose cancel names no backend is
/// given up and closed, and the server (with `client_connection_check_interval`, set at
/// connect) ends the statement whose client is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_key_data_gives_the_connection_up_and_closes_it() {
    let Some(db) = db() else { return };
    let upstream = db.config().get_ports().first().copied().unwrap_or(5432);
    let proxy = proxy_without_key_data(upstream).await;
    let config: tokio_postgres::Config = format!("postgres://postgres@127.0.0.1:{proxy}/postgres")
        .parse()
        .unwrap();
    // No budget, so only our cancel could stop it.
    let options = Options::default()
        .cancel_wait(Duration::from_millis(500))
        .statement_timeout(false);
    let mut conn = ContextClient::connect(&config, options).await.unwrap();
    let pid = conn.backend_pid();
    let monitor = db.monitor().await;
    let (ctx, cancel) = Context::background().with_cancel();
    let mon = db.monitor().await;
    tokio::spawn(async move {
        wait_active(&mon, pid).await;
        cancel.cancel();
    });
    let started = Instant::now();
    let err = conn.query(&ctx, SLEEP, &[]).await.unwrap_err();
    assert_eq!(err.cause(), Some(&Cause::Cancelled));
    assert!(
        started.elapsed() < STOPPED_WITHIN,
        "hung for {:?}",
        started.elapsed()
    );
    // The cancel named no backend: no 57014 came, so the connection is given up, and
    // closed: the statement does not run on for want of a cancel.
    assert!(!conn.is_usable());
    assert!(
        wait_gone(&monitor, pid, STOPPED_WITHIN).await,
        "backend {pid} still there {STOPPED_WITHIN:?} after its connection was closed"
    );
}

/// Polls until backend `pid` has left `pg_stat_activity` (or is no longer active).
async fn wait_gone(monitor: &tokio_postgres::Client, pid: i32, limit: Duration) -> bool {
    wait_idle(monitor, pid, limit).await.is_some()
}

mod http {
    //! The same over real sockets: an axum handler under `tower_reqctx::serve`.

    use super::*;
    use axum::Router;
    use axum::extract::{Request, State};
    use axum::http::StatusCode;
    use axum::middleware::{self, Next};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use reqctx_test_support::http_get;
    use std::sync::Arc;
    use tokio::sync::{Notify, mpsc};
    use tower_reqctx::{ContextLayer, ReqCtx};

    #[derive(Clone)]
    struct App {
        pool: Pool,
        seen: mpsc::UnboundedSender<(Context, i32)>,
        drop_now: Arc<Notify>,
    }

    async fn sleep(
        ReqCtx(ctx): ReqCtx,
        State(app): State<App>,
    ) -> Result<&'static str, (StatusCode, String)> {
        let mut db = app
            .pool
            .get()
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let _ = app.seen.send((ctx.clone(), db.backend_pid()));
        match db.query(&ctx, SLEEP, &[]).await {
            Ok(_) => Ok("slept"),
            Err(e) => Err((StatusCode::GATEWAY_TIMEOUT, e.to_string())),
        }
    }

    /// A transaction whose last statement is slow.
    async fn tx(
        ReqCtx(ctx): ReqCtx,
        State(app): State<App>,
    ) -> Result<&'static str, (StatusCode, String)> {
        let mut db = app
            .pool
            .get()
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let _ = app.seen.send((ctx.clone(), db.backend_pid()));
        let err = |e: Error| (StatusCode::GATEWAY_TIMEOUT, e.to_string());
        db.batch_execute(&ctx, "BEGIN").await.map_err(err)?;
        db.execute(&ctx, "INSERT INTO http_tx VALUES (1)", &[])
            .await
            .map_err(err)?;
        db.query(&ctx, SLEEP, &[]).await.map_err(err)?;
        db.batch_execute(&ctx, "COMMIT").await.map_err(err)?;
        Ok("committed")
    }

    /// What the next user of a pooled connection finds.
    async fn probe(State(app): State<App>) -> String {
        let db = app.pool.get().await.unwrap();
        let c = db.client();
        let timeout = super::timeout_setting(c).await;
        let rows: i64 = c
            .query_one("SELECT count(*) FROM http_tx", &[])
            .await
            .unwrap()
            .get(0);
        format!("pid={} timeout={timeout} rows={rows}", db.backend_pid())
    }

    /// Drops the handler's future when told to, as hyper does when a client leaves.
    async fn droppable(State(app): State<App>, req: Request, next: Next) -> Response {
        tokio::select! {
            r = next.run(req) => r,
            () = app.drop_now.notified() => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }

    type Started = (
        std::net::SocketAddr,
        App,
        mpsc::UnboundedReceiver<(Context, i32)>,
    );

    async fn start(db: &support::Db) -> Started {
        start_with(db, 2).await
    }

    async fn start_with(db: &support::Db, pool_size: usize) -> Started {
        let (seen, rx) = mpsc::unbounded_channel();
        let app = App {
            pool: pool(db, pool_size),
            seen,
            drop_now: Arc::new(Notify::new()),
        };
        let router = Router::new()
            .route("/sleep", get(sleep))
            .route("/tx", get(tx))
            .route("/probe", get(probe))
            .route(
                "/drop",
                get(sleep).layer(middleware::from_fn_with_state(app.clone(), droppable)),
            )
            .layer(ContextLayer::new())
            .with_state(app.clone());
        let (addr, _) =
            reqctx_test_support::spawn_server(|l| tower_reqctx::serve(l, router).into_future())
                .await;
        (addr, app, rx)
    }

    async fn request(addr: std::net::SocketAddr, path: &str) -> TcpStream {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        reqctx_test_support::send(addr, req.as_bytes()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_hangs_up_stops_the_query_on_the_server() {
        let Some(db) = db() else { return };
        let monitor = db.monitor().await;
        let (addr, _app, mut seen) = start(db).await;
        let stream = request(addr, "/sleep").await;
        let (ctx, pid) = seen.recv().await.unwrap();
        wait_active(&monitor, pid).await;
        drop(stream);
        let latency = wait_idle(&monitor, pid, STOPPED_WITHIN).await;
        assert!(
            latency.is_some(),
            "backend {pid} still running {STOPPED_WITHIN:?} after the client left"
        );
        assert_eq!(state_of(&monitor, pid).await.as_deref(), Some("idle"));
        tokio::time::timeout(STOPPED_WITHIN, ctx.cancelled())
            .await
            .unwrap();
        assert_eq!(ctx.cause(), Some(Cause::ClientDisconnected));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_timeout_ends_the_statement_with_the_query_origin() {
        let Some(db) = db() else { return };
        let monitor = db.monitor().await;
        let (addr, _app, mut seen) = start(db).await;
        let sent = Instant::now();
        let mut stream = request(addr, "/sleep?timeout=200ms").await;
        let (ctx, pid) = seen.recv().await.unwrap();
        wait_active(&monitor, pid).await;
        // Idle well before the statement's own end: the deadline stopped it, and not early.
        assert!(wait_idle(&monitor, pid, STOPPED_WITHIN).await.is_some());
        let ended = sent.elapsed();
        assert!(
            ended >= Duration::from_millis(200),
            "ended after {ended:?}, before the deadline"
        );
        assert_eq!(
            ctx.cause(),
            Some(Cause::DeadlineExceeded {
                origin: DeadlineOrigin::Query
            })
        );
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 504");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_dropped_mid_statement_stops_it_and_the_pool_waits() {
        let Some(db) = db() else { return };
        let monitor = db.monitor().await;
        let (addr, app, mut seen) = start(db).await;
        let mut stream = request(addr, "/drop").await;
        let (ctx, pid) = seen.recv().await.unwrap();
        wait_active(&monitor, pid).await;
        app.drop_now.notify_one();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 503");
        assert!(
            wait_idle(&monitor, pid, STOPPED_WITHIN).await.is_some(),
            "the dropped statement runs on"
        );
        // The request ended normally as far as its context knows; the statement still stopped.
        assert!(!matches!(ctx.cause(), Some(Cause::ClientDisconnected)));
        // Both pool slots: the cleaned-up connection comes back and works.
        let mut pids = Vec::new();
        let (a, b) = (app.pool.get().await.unwrap(), app.pool.get().await.unwrap());
        for c in [&a, &b] {
            c.client().simple_query("SELECT 1").await.unwrap();
            pids.push(c.backend_pid());
        }
        assert!(
            pids.contains(&pid),
            "the connection was discarded: {pids:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_cut_by_the_deadline_is_rolled_back_and_its_connection_reused() {
        let Some(db) = db() else { return };
        let monitor = db.monitor().await;
        monitor
            .batch_execute("CREATE TABLE IF NOT EXISTS http_tx (x int)")
            .await
            .unwrap();
        let (addr, _app, mut seen) = start_with(db, 1).await;
        let mut stream = request(addr, "/tx?timeout=300ms").await;
        let (ctx, pid) = seen.recv().await.unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 504");
        assert_eq!(
            ctx.cause(),
            Some(Cause::DeadlineExceeded {
                origin: DeadlineOrigin::Query
            })
        );
        // The only connection: the same backend, out of the transaction, its insert undone,
        // and the request's statement_timeout gone.
        let (status, body) = http_get(addr, "/probe").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, format!("pid={pid} timeout=0 rows=0"));
    }
}
