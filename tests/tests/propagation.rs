//! Three services A → B → C over real sockets: a client hanging up on A stops C; a budget
//! set at A runs out at C first and comes back to each caller as its own deadline:
//! `DeadlineExceeded { origin: Header }` at B (A sent B its budget), `Query` at A (A's
//! client set it with `?timeout=`).

use std::time::{Duration, Instant};

use reqctx::{Cause, DeadlineOrigin};
use reqctx_tests::chain::{MARGIN, chain};
use reqctx_tests::{cause_of, http1, send};

#[tokio::test]
async fn a_client_hanging_up_on_a_stops_c() {
    let mut chain = chain().await;
    let s = send(chain.a, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let [pa, pb, pc] = &mut chain.probes;
    let (a, b, c) = (pa.started().await, pb.started().await, pc.started().await);
    // No hop has a deadline: nothing but the client leaving can end C's context.
    assert_eq!([a.deadline(), b.deadline(), c.deadline()], [None; 3]);
    drop(s);
    assert_eq!(cause_of(&c).await, Cause::ClientDisconnected);
    assert_eq!(cause_of(&b).await, Cause::ClientDisconnected);
    assert_eq!(cause_of(&a).await, Cause::ClientDisconnected);
    chain.shutdown().await;
}

#[tokio::test]
async fn a_budget_set_at_a_runs_out_at_c_first() {
    let mut chain = chain().await;
    let start = Instant::now();
    let (status, _) = http1(
        chain.a,
        "GET /?timeout=300ms HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answered = tokio::time::Instant::now();
    let took = start.elapsed();
    let [pa, pb, pc] = &mut chain.probes;
    let (a, b, c) = (pa.started().await, pb.started().await, pc.started().await);
    let header = Cause::DeadlineExceeded {
        origin: DeadlineOrigin::Header,
    };

    // The budget shrinks by a margin per hop, less the transit, which a relative budget
    // cannot see (a fraction of a millisecond here, more on a loaded machine): each hop's
    // deadline is at least 10 ms earlier than its caller's.
    let (da, db, dc) = (
        a.deadline().unwrap(),
        b.deadline().unwrap(),
        c.deadline().unwrap(),
    );
    assert!(
        db + MARGIN <= da + Duration::from_millis(40),
        "{:?}",
        da - db
    );
    assert!(
        dc + MARGIN <= db + Duration::from_millis(40),
        "{:?}",
        db - dc
    );

    let query = Cause::DeadlineExceeded {
        origin: DeadlineOrigin::Query,
    };

    // C's deadline is the earliest, so C ends first, by its own (header) deadline.
    assert_eq!(c.cause(), Some(header.clone()));
    // B's call to C fails because the budget B sent ran out: B's own deadline, which came
    // from A's header. B answers 504 at once.
    let [a_out, b_out] = &mut chain.outbound;
    assert_eq!(b_out.recv().await, Some(header.clone()));
    // A's call to B fails the same way, before A's own deadline, and A reads it as its own
    // deadline, set by its client's `?timeout=`: `Query`, not B's view (`Header`).
    assert_eq!(a_out.recv().await, Some(query.clone()));
    assert_eq!(status, 504);
    // Before A's own deadline (which the 300 ms set at A's receipt of the request, not at
    // our connect): the 504 is B's, passed on, not A's timer.
    assert!(
        answered < da,
        "A answered {:?} after its deadline",
        answered - da
    );
    assert!(took >= Duration::from_millis(300) - 2 * MARGIN - Duration::from_millis(10));
    // A and B answered with the cause (a handler's `Cancelled`): their own contexts end
    // with it, each with the origin of its own deadline.
    assert_eq!(cause_of(&b).await, header);
    assert_eq!(cause_of(&a).await, query);
    chain.shutdown().await;
}

#[tokio::test]
async fn a_spent_budget_is_answered_at_once_without_calling_c() {
    let mut chain = chain().await;
    let (status, body) = http1(
        chain.b,
        "GET / HTTP/1.1\r\nHost: b\r\ngrpc-timeout: 0n\r\nConnection: close\r\n\r\n",
    )
    .await;
    // At once: B's context was already over, B's call failed without reaching C (below),
    // and no hop has a timer of its own that could have answered instead.
    assert_eq!(status, 504, "{body}");
    let [_, b_out] = &mut chain.outbound;
    assert_eq!(
        b_out.recv().await,
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Header
        })
    );
    let [_, _, pc] = &mut chain.probes;
    assert!(!pc.any_started(), "C was never called");
    chain.shutdown().await;
}

#[tokio::test]
async fn a_garbage_deadline_header_is_a_400_naming_it() {
    let mut chain = chain().await;
    let (status, body) = http1(
        chain.b,
        "GET / HTTP/1.1\r\nHost: b\r\ngrpc-timeout: soon\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.starts_with("invalid `grpc-timeout` header"), "{body}");
    let [_, pb, _] = &mut chain.probes;
    assert!(!pb.any_started());
    chain.shutdown().await;
}
