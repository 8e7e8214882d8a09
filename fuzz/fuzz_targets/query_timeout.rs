//! The layer answering a request whose query and deadline headers are the fuzz input, in
//! process: never panics, answers 200, 400 or 504 only, and a 400's body never echoes the
//! input. Two layers: one that clamps at 60 s, and one with no maximum, so that any budget
//! (up to the end of the clock) reaches the timers.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, Uri};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use tower_reqctx::header::{DeadlineHeader, REQUEST_TIMEOUT_MS};
use tower_reqctx::{ContextLayer, ReqCtx};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true) // a deadline passes at once instead of in real time
            .build()
            .unwrap()
    })
}

fn fixed_lines() -> &'static [String] {
    static LINES: OnceLock<Vec<String>> = OnceLock::new();
    LINES.get_or_init(|| {
        use tower_reqctx::duration::ParseDurationError as P;
        use tower_reqctx::header::HeaderError as H;
        let query = [
            P::Empty,
            P::Negative,
            P::Zero,
            P::MissingUnit,
            P::UnknownUnit,
            P::Invalid,
            P::TooLong,
        ]
        .iter()
        .map(ToString::to_string)
        .chain(["above the maximum of 60s".to_owned()])
        .map(|m| format!("invalid `timeout` query parameter: {m}"));
        let header = [
            H::Empty,
            H::TooLong,
            H::NotDigits,
            H::MissingUnit,
            H::UnknownUnit,
        ]
        .iter()
        .map(ToString::to_string)
        .chain(["above the maximum of 60s".to_owned()])
        .collect::<Vec<_>>();
        let names = [
            http::HeaderName::from_static("grpc-timeout"),
            REQUEST_TIMEOUT_MS,
        ];
        let header = names.into_iter().flat_map(|name| {
            header
                .iter()
                .map(move |m| format!("invalid `{name}` header: {m}"))
        });
        query.chain(header).collect()
    })
}

fn app(unclamped: bool) -> Router {
    let layer = ContextLayer::new()
        .timeout(Duration::from_secs(2))
        .deadline_header(DeadlineHeader::grpc())
        .deadline_header(DeadlineHeader::millis(REQUEST_TIMEOUT_MS))
        .grace(Duration::from_millis(500));
    let layer = match unclamped {
        true => layer,
        false => layer.max_timeout(Duration::from_secs(60)),
    };
    Router::new()
        .route(
            "/",
            get(|ctx: ReqCtx| async move {
                // Pending: the layer arms its timer; the context arms its own for `run`.
                ctx.run(tokio::time::sleep(Duration::from_secs(1)))
                    .await
                    .map(|()| "ok")
            }),
        )
        .layer(layer)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the layer (its high bit) and the header (the next one), and
    // splits the rest between the query and that header.
    let (first, rest) = match data.split_first() {
        Some((&s, rest)) => (s, rest),
        None => (0, data),
    };
    let unclamped = first & 0x80 != 0;
    let name = match first & 0x40 {
        0 => http::HeaderName::from_static("grpc-timeout"),
        _ => REQUEST_TIMEOUT_MS,
    };
    let split = usize::from(first & 0x3f) % (rest.len() + 1);
    let (query, header) = rest.split_at(split);
    let mut pq = b"/?timeout=".to_vec();
    pq.extend_from_slice(query);
    let Ok(uri) = Uri::try_from(pq) else {
        return; // not a request target hyper would hand us
    };
    let mut req = Request::builder().uri(uri);
    if let Ok(v) = http::HeaderValue::from_bytes(header) {
        req = req.header(name, v);
    }
    let req = req.body(Body::empty()).unwrap();
    let res = runtime().block_on(app(unclamped).oneshot(req)).unwrap();
    let status = res.status().as_u16();
    assert!(matches!(status, 200 | 400 | 504), "status {status}");
    if status == 400 {
        let body = runtime()
            .block_on(axum::body::to_bytes(res.into_body(), 4096))
            .unwrap();
        // One of a fixed set of lines, so it can never echo the input. (A substring check
        // is not enough: the fuzzer learns to send the messages' own words.)
        assert!(
            fixed_lines().iter().any(|l| l.as_bytes() == &body[..]),
            "unexpected 400 body: {body:?}"
        );
    }
});
