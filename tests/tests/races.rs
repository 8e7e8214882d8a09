//! The first cause wins exactly once: deadline, client disconnect, completion and shutdown
//! fired at the same moment from four threads, over and over, on the tree the server
//! builds (root → connection → request, the request's deadline driven by its owner as
//! `ContextLayer` drives it).
//!
//! A stress test, not a model check: loom cannot see inside tokio-util's lock or tokio's
//! clock, so it would prove less than it seems. `REQCTX_RACES=<n>` changes the count.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::time::Duration;

use reqctx::{Canceller, Cause, Context, DeadlineDriver, DeadlineOrigin};
use tokio::time::Instant;

/// One round: the tree and what each thread did to it.
struct Round {
    root: Context,
    conn: Context,
    req: Context,
    shutdown: Canceller,
    disconnect: Canceller,
    driver: DeadlineDriver,
    deadline: Instant,
}

#[derive(Default)]
struct Fired {
    shutdown: bool,
    disconnect: bool,
    completed: Option<(bool, Instant)>, // returned, and when the call started
    expired: Option<Cause>,
    reads: Vec<Option<Cause>>, // the request's cause as each thread saw it right after firing
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A tiny xorshift for the deadline's offset.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn first_cause_wins_exactly_once() {
    let rounds: usize = std::env::var("REQCTX_RACES")
        .ok()
        .map(|v| v.parse().expect("REQCTX_RACES is a count"))
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();

    let slot: Arc<Mutex<Option<Arc<Round>>>> = Arc::default();
    let fired: Arc<Mutex<Fired>> = Arc::default();
    let go = Arc::new(Barrier::new(5)); // four firing threads and this one
    let done = Arc::new(Barrier::new(5));

    // The four causes, each on its own thread of the runtime's blocking pool.
    let mut threads = Vec::new();
    for who in 0..4 {
        let (slot, fired, go, done) = (slot.clone(), fired.clone(), go.clone(), done.clone());
        threads.push(rt.spawn_blocking(move || {
            loop {
                go.wait();
                let Some(round) = lock(&slot).clone() else {
                    return; // no more rounds
                };
                match who {
                    0 => {
                        let won = round.shutdown.cancel_with(Cause::Shutdown);
                        lock(&fired).shutdown = won;
                    }
                    1 => {
                        let won = round.disconnect.cancel_with(Cause::ClientDisconnected);
                        lock(&fired).disconnect = won;
                    }
                    2 => {
                        let at = Instant::now();
                        let won = round.driver.cancel_with(Cause::Completed);
                        lock(&fired).completed = Some((won, at));
                    }
                    _ => {
                        // The layer's timer: fires at the deadline, never before.
                        while Instant::now() < round.deadline {
                            std::hint::spin_loop();
                        }
                        let cause = round.driver.expire();
                        lock(&fired).expired = cause;
                    }
                }
                let read = round.req.cause();
                lock(&fired).reads.push(read);
                drop(round);
                done.wait();
            }
        }));
    }

    let mut wins: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut span_ns: u64 = 20_000;
    let mut previous: Option<(Arc<Round>, Cause)> = None;
    for i in 0..rounds {
        let (root, shutdown) = Context::background().with_cancel();
        let (conn, disconnect) = root.with_cancel();
        // The deadline lands within the window in which the other three fire. That window
        // moves with the load (how fast the barrier wakes the threads), so its width adapts:
        // wider after the deadline wins, narrower after it loses, settling near a third.
        let deadline = Instant::now() + Duration::from_nanos(xorshift(&mut seed) % span_ns);
        let (req, driver) = conn.with_driven_deadline(Some((deadline, DeadlineOrigin::Layer)));
        let round = Arc::new(Round {
            root,
            conn,
            req,
            shutdown,
            disconnect,
            driver,
            deadline,
        });
        // A waiter, as a handler awaiting its context: must wake with the same cause.
        let waiter = {
            let req = round.req.clone();
            rt.spawn(async move {
                req.cancelled().await;
                req.cause()
            })
        };
        *lock(&fired) = Fired::default();
        *lock(&slot) = Some(round.clone());
        go.wait();
        done.wait();
        *lock(&slot) = None;

        let f = std::mem::take(&mut *lock(&fired));
        let cause = round
            .req
            .cause()
            .expect("four causes fired: the request has one");
        let (completed, completed_at) = f.completed.expect("the completion fired");
        let conn_cause = round.conn.cause().expect("the connection was cancelled");
        assert_eq!(round.root.cause(), Some(Cause::Shutdown), "round {i}");
        assert!(
            f.shutdown,
            "round {i}: the root has one canceller; it must win"
        );
        // The connection: its disconnect wins unless the shutdown reached it first.
        assert_eq!(
            conn_cause,
            if f.disconnect {
                Cause::ClientDisconnected
            } else {
                Cause::Shutdown
            },
            "round {i}"
        );
        // The request: exactly one winner, and it is what everyone reads.
        let kind = match &cause {
            Cause::Completed => {
                assert!(completed, "round {i}: Completed, but its cancel_with lost");
                assert!(
                    completed_at < deadline,
                    "round {i}: completed after the deadline"
                );
                "completed"
            }
            Cause::DeadlineExceeded { origin } => {
                assert_eq!(*origin, DeadlineOrigin::Layer, "round {i}");
                assert!(!completed, "round {i}: two winners");
                assert!(Instant::now() >= deadline, "round {i}");
                "deadline"
            }
            Cause::ClientDisconnected | Cause::Shutdown => {
                assert!(!completed, "round {i}: two winners");
                assert_eq!(
                    cause, conn_cause,
                    "round {i}: inherited from the connection"
                );
                if cause == Cause::Shutdown {
                    "shutdown"
                } else {
                    "disconnect"
                }
            }
            other => panic!("round {i}: unexpected cause {other:?}"),
        };
        *wins.entry(kind).or_default() += 1;
        span_ns = if kind == "deadline" {
            span_ns + span_ns / 50 + 1
        } else {
            span_ns - span_ns / 100
        }
        .clamp(1_000, 50_000_000);
        assert_eq!(
            f.expired.as_ref(),
            Some(&cause),
            "round {i}: expire() read another cause"
        );
        for read in &f.reads {
            assert_eq!(
                read.as_ref(),
                Some(&cause),
                "round {i}: a thread read another cause"
            );
        }
        let woke = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), waiter).await })
            .expect("the waiter should wake")
            .unwrap();
        assert_eq!(
            woke.as_ref(),
            Some(&cause),
            "round {i}: the waiter read another cause"
        );
        // Forever after: read the previous round's cause again, after a whole other round.
        if let Some((prev, prev_cause)) = previous.take() {
            assert_eq!(prev.req.cause(), Some(prev_cause), "round {}", i - 1);
        }
        previous = Some((round, cause));
    }
    *lock(&slot) = None;
    go.wait(); // releases the threads into their exit
    for t in threads {
        rt.block_on(t).unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "races: {rounds} rounds in {elapsed:.1?}; winners {wins:?}; deadline window {span_ns} ns"
    );
    for kind in ["completed", "deadline", "disconnect", "shutdown"] {
        assert!(
            wins.get(kind).copied().unwrap_or(0) > 0,
            "{kind} never won in {rounds} rounds: the race is not exercised ({wins:?})"
        );
    }
}
