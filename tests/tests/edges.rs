//! The edges of a request's life, over real sockets, each a stack a real service has: an
//! answer made in the grace period, an empty body that never reports its end, a deadline
//! at the end of the clock, a body replaced by middleware outside the layer, grpc-web.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use reqctx::{Cause, DeadlineOrigin};
use reqctx_tests::{BOUND, Running, Server, cause_of, http_get, http1, probe};
use tokio::time::Instant;
use tower_reqctx::{ContextLayer, ReqCtx};

const SERVERS: [Server; 3] = [Server::Serve, Server::AxumWatched, Server::AxumPlain];

/// A body of `frames`, pending between each two (a channel fed by another task, as a file
/// or a proxied upstream is).
fn pending_between(frames: &'static [&'static str]) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
    tokio::spawn(async move {
        for frame in frames {
            // The body is polled, finds nothing, and waits: yield until it has.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if tx
                .send(Ok(Bytes::from_static(frame.as_bytes())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Item 1: an answer made after the cancellation, whose body is pending between frames,
/// reaches the client whole, under every server (under `serve` the stall close used to
/// close the connection at once, and the body cut itself at its first `Pending`).
#[tokio::test]
async fn an_answer_made_in_the_grace_arrives_whole_though_its_body_waits() {
    let (tx, mut probe) = probe();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                ctx.cancelled().await;
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    pending_between(&["one,", "two,", "three"]),
                )
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_millis(20))
                .grace(Duration::from_secs(60)),
        );
    for server in SERVERS {
        let running = Running::start(server, app.clone(), BOUND).await;
        let (status, body) = http_get(running.addr, "/").await;
        assert_eq!(status, 503, "{server:?}");
        assert_eq!(
            body, "4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n",
            "{server:?}: the answer was cut"
        );
        assert_eq!(
            cause_of(&probe.started().await).await,
            Cause::DeadlineExceeded {
                origin: DeadlineOrigin::Layer
            },
            "{server:?}"
        );
        running.abort();
    }
}

/// Item 1, the bound: an answer made in the grace that never ends is cut at the end of the
/// grace (the client sees a truncated response), not at once and not never.
#[tokio::test]
async fn an_endless_answer_made_in_the_grace_is_cut_at_the_end_of_the_grace() {
    let grace = Duration::from_millis(300);
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                ctx.cancelled().await;
                let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
                let first = futures_util::stream::iter([Ok(Bytes::from_static(b"partial"))]);
                let rest = futures_util::stream::unfold((rx, _tx), |(mut rx, tx)| async move {
                    rx.recv().await.map(|item| (item, (rx, tx)))
                });
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Body::from_stream(futures_util::StreamExt::chain(first, rest)),
                )
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_millis(20))
                .grace(grace),
        );
    for server in SERVERS {
        let running = Running::start(server, app.clone(), BOUND).await;
        let start = Instant::now();
        let (status, body) = http_get(running.addr, "/").await;
        assert_eq!(status, 503, "{server:?}");
        assert!(body.starts_with("7\r\npartial\r\n"), "{server:?}: {body:?}");
        assert!(
            !body.ends_with("0\r\n\r\n"),
            "{server:?}: a cut answer must not look whole: {body:?}"
        );
        // Not before the grace's end (a lower bound only: the machine may be slow).
        assert!(
            start.elapsed() >= grace,
            "{server:?}: cut before the grace ended"
        );
        running.abort();
    }
}

/// Item 2: `Content-Length: 0` on a body that does not report its end (a proxy copying an
/// upstream's headers onto a stream) is a response with nothing to stream: `Completed`.
#[tokio::test]
async fn a_declared_empty_body_that_never_reports_its_end_is_completed() {
    let (tx, mut probe) = probe();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                let upstream = futures_util::stream::empty::<Result<Bytes, Infallible>>();
                let mut res = Body::from_stream(upstream).into_response();
                res.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                res
            }),
        )
        .layer(ContextLayer::new());
    for server in SERVERS {
        let running = Running::start(server, app.clone(), BOUND).await;
        let (status, body) = http_get(running.addr, "/").await;
        assert_eq!((status, body.as_str()), (200, ""), "{server:?}");
        assert_eq!(
            cause_of(&probe.started().await).await,
            Cause::Completed,
            "{server:?}"
        );
        running.abort();
    }
}

/// The largest budget that `Instant::now()` can still be moved by, found by bisection.
fn budget_to_the_end_of_the_clock() -> Duration {
    let now = Instant::now();
    let (mut lo, mut hi) = (0u128, u128::from(u64::MAX) * 1_000_000_000);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let d = Duration::new((mid / 1_000_000_000) as u64, (mid % 1_000_000_000) as u32);
        if now.checked_add(d).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Duration::new((lo / 1_000_000_000) as u64, (lo % 1_000_000_000) as u32)
}

/// Item 4: a client's `?timeout=` that puts the deadline within a millisecond of the end
/// of the clock does not panic the connection: the handler runs and answers. The
/// requests step the deadline across the last 30 ms of the clock, 100 µs apart, so that
/// some of them land within its last millisecond, however late the server reads its clock.
#[tokio::test]
async fn no_deadline_overflows_the_clock() {
    let app = Router::new()
        .route(
            "/",
            get(|ctx: ReqCtx| async move {
                // Pending once: the layer arms its timer for the deadline.
                tokio::task::yield_now().await;
                ctx.run(async { "ok" }).await
            }),
        )
        .layer(ContextLayer::new().grace(Duration::from_secs(1)));
    for server in [Server::Serve, Server::AxumPlain] {
        let running = Running::start(server, app.clone(), BOUND).await;
        for step in 0..300u32 {
            // Read afresh per request: the server reads its clock a little later.
            let budget =
                budget_to_the_end_of_the_clock().saturating_sub(Duration::from_micros(100) * step);
            let path = format!("/?timeout={}s{}ns", budget.as_secs(), budget.subsec_nanos());
            let (status, body) = http1(
                running.addr,
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert_eq!((status, body.as_str()), (200, "ok"), "{server:?} {path}");
        }
        running.abort();
    }
}

/// A handler whose 404 carries a streaming body (as axum's own fallback answers with a
/// body), under a layer stack built by `wrap`, probed.
fn replaced_app(tx: reqctx_tests::ProbeTx, wrap: fn(Router) -> Router) -> Router {
    let inner = Router::new()
        .route(
            "/",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                let frames = ["not ", "found"].map(|s| Ok::<_, Infallible>(Bytes::from(s)));
                (
                    StatusCode::NOT_FOUND,
                    Body::from_stream(futures_util::stream::iter(frames)),
                )
            }),
        )
        .layer(ContextLayer::new());
    wrap(inner)
}

/// Item 5: a body replaced by middleware outside the layer was never sent, and the client
/// never left: `ResponseDiscarded`, not `ClientDisconnected`. Wrappers that keep the body
/// and poll it through (a header setter, compression) leave `Completed`.
#[tokio::test]
async fn a_body_replaced_outside_the_layer_is_discarded_not_a_disconnect() {
    use tower_http::compression::CompressionLayer;
    use tower_http::set_header::SetResponseHeaderLayer;
    use tower_reqctx::ResponseDiscarded;

    async fn error_page(res: Response) -> Response {
        match res.status() {
            StatusCode::NOT_FOUND => (StatusCode::NOT_FOUND, "our own 404 page").into_response(),
            _ => res,
        }
    }
    type Case = (&'static str, fn(Router) -> Router, &'static str);
    let cases: [Case; 3] = [
        (
            "map_response",
            |r| r.layer(axum::middleware::map_response(error_page)),
            "our own 404 page",
        ),
        (
            "SetResponseHeader",
            |r| {
                r.layer(SetResponseHeaderLayer::overriding(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("no-store"),
                ))
            },
            "9\r\nnot found\r\n0\r\n\r\n",
        ),
        (
            "CompressionLayer (not asked to compress)",
            |r| r.layer(CompressionLayer::new()),
            "4\r\nnot \r\n5\r\nfound\r\n0\r\n\r\n",
        ),
    ];
    for server in SERVERS {
        for (name, wrap, expected) in cases {
            let (tx, mut probe) = probe();
            let running = Running::start(server, replaced_app(tx, wrap), BOUND).await;
            let (status, body) = http_get(running.addr, "/").await;
            assert_eq!(status, 404, "{server:?} {name}");
            let cause = cause_of(&probe.started().await).await;
            if name == "map_response" {
                assert_eq!(body, expected, "{server:?} {name}");
                assert!(
                    cause.downcast_ref::<ResponseDiscarded>().is_some(),
                    "{server:?} {name}: {cause:?}"
                );
            } else {
                // hyper may write the two frames as one chunk or two.
                let text: String = body.split("\r\n").skip(1).step_by(2).collect();
                assert_eq!(
                    text, "not found",
                    "{server:?} {name}: {body:?} (expected like {expected:?})"
                );
                assert_eq!(cause, Cause::Completed, "{server:?} {name}");
            }
            running.abort();
        }
    }
}

/// Item 5, with compression on: the compressed body is read through ours, to its end.
#[tokio::test]
async fn an_outer_compression_layer_that_compresses_completes() {
    use tower_http::compression::CompressionLayer;
    for server in SERVERS {
        let (tx, mut probe) = probe();
        let app = replaced_app(tx, |r| r.layer(CompressionLayer::new()));
        let running = Running::start(server, app, BOUND).await;
        let (status, body) = http1(
            running.addr,
            "GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 404, "{server:?}");
        assert!(
            !body.contains("not found"),
            "{server:?}: not compressed: {body:?}"
        );
        assert_eq!(
            cause_of(&probe.started().await).await,
            Cause::Completed,
            "{server:?}"
        );
        running.abort();
    }
}

/// Item 1, the bound, against a client that stops reading: an endless answer made in the
/// grace stalls hyper (nothing of the layer's is polled), and on a watched HTTP/1
/// connection the end of the grace closes it; never before.
#[tokio::test]
async fn a_stalled_answer_made_in_the_grace_is_closed_at_the_end_of_the_grace() {
    static CHUNK: [u8; 65536] = [b'x'; 65536];
    let grace = Duration::from_millis(300);
    let app = Router::new()
        .route(
            "/",
            get(|ctx: ReqCtx| async move {
                ctx.cancelled().await;
                let chunks = futures_util::stream::repeat_with(|| {
                    Ok::<_, Infallible>(Bytes::from_static(&CHUNK))
                });
                (StatusCode::SERVICE_UNAVAILABLE, Body::from_stream(chunks))
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_millis(20))
                .grace(grace),
        );
    for server in [Server::Serve, Server::AxumWatched] {
        let running = Running::start(server, app.clone(), BOUND).await;
        let start = Instant::now();
        // The client keeps the socket open and reads nothing: hyper stalls on its full
        // window, and only the server can end the connection.
        let s = reqctx_tests::send(running.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let client_port = s.local_addr().unwrap().port();
        let closed = tokio::time::timeout(BOUND, async {
            // The server's side leaves ESTABLISHED (FIN_WAIT1: its FIN waits behind the
            // data the client does not read) when the connection is closed.
            while reqctx_tests::tcp_state(running.addr.port(), client_port) == Some(0x01) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{server:?}: the stalled grace answer was never closed"
        );
        assert!(
            start.elapsed() >= grace,
            "{server:?}: closed before the grace ended"
        );
        drop(s);
        running.abort();
    }
}
