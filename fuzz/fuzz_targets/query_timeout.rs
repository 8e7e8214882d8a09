//! The layer answering a request whose query is the fuzz input, in process: never panics,
//! answers 200, 400 or 504 only, and a 400's body never echoes the input.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, Uri};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use tower_reqctx::ContextLayer;
use tower_reqctx::header::DeadlineHeader;

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
        .map(|m| format!("invalid `grpc-timeout` header: {m}"));
        query.chain(header).collect()
    })
}

fn app() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                "ok"
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_secs(2))
                .max_timeout(Duration::from_secs(60))
                .deadline_header(DeadlineHeader::grpc()),
        )
}

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input between the query and the grpc-timeout header.
    let (split, rest) = match data.split_first() {
        Some((&s, rest)) => (usize::from(s) % (rest.len() + 1), rest),
        None => (0, data),
    };
    let (query, header) = rest.split_at(split);
    let mut pq = b"/?timeout=".to_vec();
    pq.extend_from_slice(query);
    let Ok(uri) = Uri::try_from(pq) else {
        return; // not a request target hyper would hand us
    };
    let mut req = Request::builder().uri(uri);
    if let Ok(v) = http::HeaderValue::from_bytes(header) {
        req = req.header("grpc-timeout", v);
    }
    let req = req.body(Body::empty()).unwrap();
    let res = runtime().block_on(app().oneshot(req)).unwrap();
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
