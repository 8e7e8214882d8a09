//! A tour of `reqctx`: one simulated request, its deadline, values, spawned work and the
//! cause every piece of work reads when it stops.
//!
//! `cargo run -p example-basics`

use std::time::Duration;

use reqctx::{Cause, Context};
use tokio::time::{Instant, sleep};

#[derive(Debug)]
struct RequestId(u32);

/// A "database" that answers after `latency`, unless the context ends first.
async fn query(ctx: &Context, latency: Duration) -> Result<&'static str, reqctx::Cancelled> {
    ctx.run(async move {
        sleep(latency).await;
        "rows"
    })
    .await
}

fn row(what: &str, outcome: &str, start: Instant) {
    println!(
        "{what:<46} {outcome:<52} {:>6.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let start = Instant::now();
    println!("{:<46} {:<52} {:>9}", "step", "outcome", "at");

    // The server's root; cancelling it is a shutdown.
    let (server, shutdown) = Context::background().with_cancel();

    // One request with a 200 ms budget and a request id.
    let (request, finish) = server.with_timeout(Duration::from_millis(200));
    let request = request.with_value(RequestId(7));
    row(
        "request: budget 200 ms, value RequestId(7)",
        &format!("remaining {:?}", request.remaining().unwrap_or_default()),
        start,
    );

    // A fast query inside the budget.
    let r = query(&request, Duration::from_millis(20)).await;
    row("query with 20 ms latency", &format!("{r:?}"), start);

    // A sub-step with a tighter budget of its own.
    let (step, _cancel_step) = request.with_timeout(Duration::from_millis(30));
    let r = query(&step, Duration::from_millis(500)).await;
    row(
        "sub-step: 30 ms budget, 500 ms query",
        &format!("{:?}", r.map_err(|e| e.into_cause())),
        start,
    );
    row(
        "  ...the request itself",
        &format!("cancelled: {}", request.is_cancelled()),
        start,
    );

    // Background work bound to the request, and work detached from it.
    let bound = request.spawn(sleep(Duration::from_secs(5)));
    let detached = request.detached();
    let audit = tokio::spawn(async move {
        sleep(Duration::from_millis(300)).await;
        (
            detached.is_cancelled(),
            detached.value::<RequestId>().map(|r| r.0),
        )
    });
    let logged = request.on_cancel(|cause| println!("{:<46} {cause}", "  on_cancel hook ran:"));

    // The request outlives its budget: everything bound to it stops with the same cause.
    let r = query(&request, Duration::from_secs(1)).await;
    row(
        "query with 1 s latency",
        &format!("{:?}", r.map_err(|e| e.into_cause())),
        start,
    );
    let b = bound.await.expect("task");
    row(
        "spawned 5 s task",
        &format!("{:?}", b.map_err(|e| e.into_cause())),
        start,
    );
    let (cancelled, id) = audit.await.expect("task");
    row(
        "detached audit task (300 ms)",
        &format!("finished; cancelled: {cancelled}, id: {id:?}"),
        start,
    );
    let _ = logged;

    // The first cause wins: finishing afterwards changes nothing.
    finish.cancel_with(Cause::Completed);
    row(
        "cause after cancel_with(Completed)",
        &format!("{:?}", request.cause()),
        start,
    );

    // A second request, then a shutdown.
    let (second, _finish2) = server.with_cancel();
    shutdown.cancel_with(Cause::Shutdown);
    row(
        "second request after shutdown",
        &format!("{:?}", second.cause()),
        start,
    );
}
