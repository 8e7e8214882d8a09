//! Property tests for what parses untrusted input: the Go-duration parser against a
//! reference model, and the layer's `?timeout=` (and deadline header) path answering any
//! bytes. The header codecs' own properties are in `propagate.rs`.
#![cfg(feature = "axum")]

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::routing::get;
use proptest::prelude::*;
use tower::ServiceExt;
use tower_reqctx::ContextLayer;
use tower_reqctx::duration::{
    MAX_INPUT_LEN, ParseDurationError, parse_duration, parse_duration_bytes,
};
use tower_reqctx::header::DeadlineHeader;

const NS: u128 = 1;
const US: u128 = 1_000;
const MS: u128 = 1_000_000;
const S: u128 = 1_000_000_000;
const M: u128 = 60 * S;
const H: u128 = 60 * M;

/// Every spelling of every unit, with its length in nanoseconds.
const UNITS: &[(&str, u128)] = &[
    ("ns", NS),
    ("us", US),
    ("\u{b5}s", US),
    ("\u{3bc}s", US),
    ("ms", MS),
    ("s", S),
    ("m", M),
    ("h", H),
];

/// One `<number><unit>` pair: integer digits, fraction digits (`None`: no point), unit.
#[derive(Clone, Debug)]
struct Pair {
    int: String,
    frac: Option<String>,
    unit: usize,
}

impl Pair {
    fn text(&self) -> String {
        let mut s = self.int.clone();
        if let Some(f) = &self.frac {
            s.push('.');
            s.push_str(f);
        }
        s.push_str(UNITS[self.unit].0);
        s
    }

    /// `int * unit + floor(0.frac * unit)`, exactly: each pair truncates on its own.
    fn nanos(&self) -> u128 {
        let unit = UNITS[self.unit].1;
        let int: u128 = if self.int.is_empty() {
            0
        } else {
            self.int.parse().unwrap()
        };
        let frac = match &self.frac {
            Some(f) if !f.is_empty() => {
                let value: u128 = f.parse().unwrap();
                value * unit / 10u128.pow(f.len() as u32)
            }
            _ => 0,
        };
        int * unit + frac
    }
}

fn pair(digits: &'static str) -> impl Strategy<Value = Pair> {
    (
        proptest::string::string_regex(&format!("[{digits}]{{0,20}}")).unwrap(),
        proptest::option::of(
            proptest::string::string_regex(&format!("[{digits}]{{0,12}}")).unwrap(),
        ),
        0..UNITS.len(),
    )
        .prop_filter("a number needs a digit", |(int, frac, _)| {
            !int.is_empty() || frac.as_ref().is_some_and(|f| !f.is_empty())
        })
        .prop_map(|(int, frac, unit)| Pair { int, frac, unit })
}

/// A valid duration (sign, pairs) within the length cap.
fn valid(digits: &'static str) -> impl Strategy<Value = (&'static str, Vec<Pair>, String)> {
    (
        prop_oneof![Just(""), Just("+"), Just("-")],
        proptest::collection::vec(pair(digits), 1..5),
    )
        .prop_map(|(sign, pairs)| {
            let text = format!("{sign}{}", pairs.iter().map(Pair::text).collect::<String>());
            (sign, pairs, text)
        })
        .prop_filter("within MAX_INPUT_LEN", |(_, _, text)| {
            text.len() <= MAX_INPUT_LEN
        })
}

/// The model's answer: nanoseconds to a `Duration`, saturating at `Duration::MAX`.
fn model(sign: &str, pairs: &[Pair]) -> Result<Duration, ParseDurationError> {
    let total: u128 = pairs.iter().map(Pair::nanos).sum(); // below 10^34: no overflow
    if sign == "-" {
        return Err(ParseDurationError::Negative);
    }
    if total == 0 {
        return Err(ParseDurationError::Zero);
    }
    Ok(match u64::try_from(total / S) {
        Ok(secs) => Duration::new(secs, (total % S) as u32),
        Err(_) => Duration::MAX,
    })
}

/// Every message an error may show: a fixed set, so no input is ever echoed.
fn messages() -> Vec<String> {
    use ParseDurationError::*;
    [
        Empty,
        Negative,
        Zero,
        MissingUnit,
        UnknownUnit,
        Invalid,
        TooLong,
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn valid_durations_match_the_model((sign, pairs, text) in valid("0-9")) {
        let expected = model(sign, &pairs);
        prop_assert_eq!(parse_duration(&text), expected.clone(), "{:?}", text);
        prop_assert_eq!(parse_duration_bytes(text.as_bytes()), expected);
    }

    #[test]
    fn zero_and_negative_are_classified((sign, pairs, text) in valid("0")) {
        // Only zero digits: zero, or negative with a `-`, never a duration.
        let expected = if sign == "-" {
            ParseDurationError::Negative
        } else {
            ParseDurationError::Zero
        };
        prop_assert_eq!(parse_duration(&text), Err(expected.clone()));
        prop_assert_eq!(model(sign, &pairs), Err(expected));
    }

    #[test]
    fn a_minus_makes_any_valid_duration_negative((_sign, pairs, _) in valid("0-9")) {
        let text = format!("-{}", pairs.iter().map(Pair::text).collect::<String>());
        prop_assume!(text.len() <= MAX_INPUT_LEN);
        prop_assert_eq!(parse_duration(&text), Err(ParseDurationError::Negative));
    }

    #[test]
    fn huge_values_saturate(int in "[1-9][0-9]{29,55}", frac in "[0-9]{0,2}", unit in 0..UNITS.len()) {
        // At least 10^29 ns, above Duration::MAX (about 1.8 * 10^28 ns) whatever the
        // unit: Duration::MAX, never an overflow.
        let text = format!("{int}.{frac}{}", UNITS[unit].0);
        prop_assert!(text.len() <= MAX_INPUT_LEN);
        prop_assert_eq!(parse_duration(&text), Ok(Duration::MAX));
    }

    #[test]
    fn any_bytes_are_ok_or_a_clear_error(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            proptest::collection::vec(
                prop_oneof![
                    Just(b'0'), Just(b'1'), Just(b'9'), Just(b'.'), Just(b'+'), Just(b'-'),
                    Just(b'n'), Just(b'u'), Just(b'm'), Just(b's'), Just(b'h'), Just(0xc2),
                    Just(0xb5), Just(0xce), Just(0xbc), any::<u8>(),
                ],
                0..80,
            ),
        ]
    ) {
        let result = parse_duration_bytes(&bytes);
        match &result {
            Ok(d) => {
                prop_assert!(!d.is_zero());
                prop_assert!(bytes.len() <= MAX_INPUT_LEN);
                prop_assert_ne!(bytes.first(), Some(&b'-'));
            }
            Err(e) => {
                prop_assert!(messages().contains(&e.to_string()), "{}", e);
                prop_assert_eq!(
                    *e == ParseDurationError::TooLong,
                    bytes.len() > MAX_INPUT_LEN
                );
                prop_assert_eq!(*e == ParseDurationError::Empty, bytes.is_empty());
            }
        }
        if let Ok(s) = std::str::from_utf8(&bytes) {
            prop_assert_eq!(parse_duration(s), result);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The query path, in process.

/// One paused-clock runtime for every case: a deadline passes without waiting.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    })
}

/// The handler works 1 s; the server gives 2 s, clients may ask for up to 60 s.
fn app() -> Router {
    Router::new()
        .route(
            "/",
            get(|ctx: tower_reqctx::ReqCtx| async move {
                ctx.run(tokio::time::sleep(Duration::from_secs(1))).await?;
                Ok::<_, tower_reqctx::reqctx::Cancelled>("ok")
            }),
        )
        .layer(
            ContextLayer::new()
                .timeout(Duration::from_secs(2))
                .max_timeout(Duration::from_secs(60))
                .deadline_header(DeadlineHeader::grpc()),
        )
}

/// How one byte of the value is written in the query.
#[derive(Clone, Debug)]
enum Spelling {
    Raw,
    Escaped { upper: bool },
}

/// Writes `value` into a query: bytes a URI allows may stay raw, the rest are `%XX`.
fn write_query(value: &[u8], spellings: &[Spelling]) -> String {
    let mut out = String::new();
    for (i, &b) in value.iter().enumerate() {
        let raw_ok = b.is_ascii_alphanumeric() || b".-_~+".contains(&b);
        match spellings.get(i).unwrap_or(&Spelling::Raw) {
            Spelling::Raw if raw_ok => out.push(b as char),
            Spelling::Escaped { upper: false } => out.push_str(&format!("%{b:02x}")),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Any bytes in `?timeout=` (and any `grpc-timeout`): never a panic, only 200, 400 or
    /// 504, each exactly when the parsers say, and a 400's body is one of a fixed set of
    /// lines (so it never echoes the input).
    #[test]
    fn any_timeout_bytes_get_200_400_or_504(
        value in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..90),
            "[0-9]{0,4}(\\.[0-9]{0,3})?(ns|us|ms|s|m|h|µs|x|)".prop_map(String::into_bytes),
        ],
        spellings in proptest::collection::vec(
            prop_oneof![Just(Spelling::Raw), any::<bool>().prop_map(|upper| Spelling::Escaped { upper })],
            0..90,
        ),
        broken_escape in proptest::option::of("%[0-9a-zA-Z%]{0,2}"),
        header in proptest::option::of(prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..12),
            "[0-9]{1,9}[HMSmun]?".prop_map(String::into_bytes),
        ]),
    ) {
        let mut query = write_query(&value, &spellings);
        if let Some(b) = &broken_escape {
            query.push_str(b);
        }
        let header = header.and_then(|h| HeaderValue::from_bytes(&h).ok());

        // The oracle: percent-decode as the layer documents, then the parsers.
        let decoded = percent_decode(query.as_bytes());
        let from_query = match &decoded {
            Some(bytes) => parse_duration_bytes(bytes).map_err(|_| ()),
            None => Err(()),
        };
        let from_header = header.as_ref().map(|v| DeadlineHeader::grpc().decode(v));
        let expected = match (&from_query, &from_header) {
            (Err(()), _) | (_, Some(Err(_))) => Some(StatusCode::BAD_REQUEST),
            (Ok(q), h) => {
                let mut budget = (*q).min(Duration::from_secs(2));
                if let Some(Ok(h)) = h {
                    budget = budget.min(*h);
                }
                match budget.cmp(&Duration::from_secs(1)) {
                    std::cmp::Ordering::Less => Some(StatusCode::GATEWAY_TIMEOUT),
                    std::cmp::Ordering::Greater => Some(StatusCode::OK),
                    std::cmp::Ordering::Equal => None, // a tie: either
                }
            }
        };

        let mut req = Request::get(format!("/?timeout={query}"));
        if let Some(h) = &header {
            req = req.header("grpc-timeout", h.clone());
        }
        let req = req.body(Body::empty()).unwrap();
        let (status, body) = runtime().block_on(async {
            let res = app().oneshot(req).await.unwrap();
            let status = res.status();
            let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
            (status, String::from_utf8(body.to_vec()).unwrap())
        });
        prop_assert!(
            [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::GATEWAY_TIMEOUT].contains(&status),
            "{}", status
        );
        if let Some(expected) = expected {
            prop_assert_eq!(status, expected, "query {:?}, header {:?}: {}", query, header, body);
        }
        if status == StatusCode::BAD_REQUEST {
            let fixed = messages()
                .into_iter()
                .map(|m| format!("invalid `timeout` query parameter: {m}"))
                .any(|line| body.trim_end() == line)
                || body.starts_with("invalid `grpc-timeout` header: ") && body.len() < 100;
            prop_assert!(fixed, "an unexpected 400 body: {:?}", body);
        }
    }
}

/// `%XX` decoding, strictly: a `%` not followed by two hex digits is an error.
fn percent_decode(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None; // from_str_radix would take a sign
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// Safe defaults the properties above do not already pin down.

/// The deadline the handler's context got, relative to the request's arrival (the clock
/// is paused, so the handler sees the arrival instant as "now").
async fn handler_budget(layer: ContextLayer, req: Request<Body>) -> (StatusCode, Option<Duration>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let app = Router::new()
        .route(
            "/",
            get(move |ctx: tower_reqctx::ReqCtx| async move {
                let _ = tx.send(ctx.remaining());
                "ok"
            }),
        )
        .layer(layer);
    let status = app.oneshot(req).await.unwrap().status();
    (status, rx.try_recv().ok().flatten())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Client values (query or header) only shorten the server's deadline, and never go
    /// past `max_timeout`: the handler's budget is exactly the smallest of the three.
    #[test]
    fn client_values_only_shorten(
        server_ms in 1u64..100_000,
        max_ms in 1u64..100_000,
        query_ns in proptest::option::of(1u64..u64::MAX),
        header_ms in proptest::option::of(0u64..99_999_999),
    ) {
        let layer = ContextLayer::new()
            .timeout(Duration::from_millis(server_ms))
            .max_timeout(Duration::from_millis(max_ms))
            .deadline_header(DeadlineHeader::grpc());
        let uri = match query_ns {
            Some(ns) => format!("/?timeout={ns}ns"),
            None => "/".to_owned(),
        };
        let mut req = Request::get(uri);
        if let Some(ms) = header_ms {
            req = req.header("grpc-timeout", format!("{ms}m"));
        }
        let (status, budget) = runtime().block_on(handler_budget(layer, req.body(Body::empty()).unwrap()));
        let max = Duration::from_millis(max_ms);
        let mut expected = Duration::from_millis(server_ms);
        if let Some(ns) = query_ns {
            expected = expected.min(Duration::from_nanos(ns).min(max));
        }
        if let Some(ms) = header_ms {
            expected = expected.min(Duration::from_millis(ms).min(max));
        }
        if expected.is_zero() {
            // A spent budget: born cancelled, answered 504 whatever the handler did.
            prop_assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        } else {
            prop_assert_eq!(status, StatusCode::OK);
            prop_assert_eq!(budget, Some(expected));
            prop_assert!(expected <= Duration::from_millis(server_ms));
        }
    }
}

/// Deadline headers are ignored unless enabled: not read, not validated (garbage is not a
/// 400), and no deadline comes from them.
#[test]
fn deadline_headers_are_ignored_unless_enabled() {
    for (name, value) in [
        ("grpc-timeout", "1n"),
        ("grpc-timeout", "<script>"),
        ("grpc-timeout", "0n"),
        ("x-request-timeout-ms", "1"),
        ("x-request-timeout-ms", "garbage"),
    ] {
        let req = Request::get("/")
            .header(name, value)
            .body(Body::empty())
            .unwrap();
        let (status, budget) = runtime().block_on(handler_budget(ContextLayer::new(), req));
        assert_eq!((status, budget), (StatusCode::OK, None), "{name}: {value}");

        // With a server timeout, that is the deadline, untouched by the header.
        let req = Request::get("/")
            .header(name, value)
            .body(Body::empty())
            .unwrap();
        let layer = ContextLayer::new().timeout(Duration::from_secs(3));
        let (status, budget) = runtime().block_on(handler_budget(layer, req));
        assert_eq!(
            (status, budget),
            (StatusCode::OK, Some(Duration::from_secs(3))),
            "{name}: {value}"
        );
    }
}

/// Parsing is bounded: a value of tens of kilobytes (as large as `http` lets a URI be),
/// raw or percent-encoded, and a huge header, are refused as too long. The decoder writes
/// into a fixed 64-byte buffer and stops at its end, and both parsers check the length
/// before they look at a byte, so the value's size never drives the work past that cap.
#[test]
fn huge_values_are_refused_as_too_long() {
    let layer = || {
        ContextLayer::new()
            .max_timeout(Duration::from_secs(60))
            .deadline_header(DeadlineHeader::grpc())
    };
    let raw = "9".repeat(60_000);
    let escaped = "%39".repeat(20_000);
    for value in [&raw, &escaped] {
        let req = Request::get(format!("/?timeout={value}"))
            .body(Body::empty())
            .unwrap();
        let (status, body) = runtime().block_on(async {
            let res = app_with(layer()).oneshot(req).await.unwrap();
            let status = res.status();
            let body = axum::body::to_bytes(res.into_body(), 1 << 16)
                .await
                .unwrap();
            (status, body)
        });
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            &body[..],
            b"invalid `timeout` query parameter: duration too long (at most 64 bytes)"
        );
    }
    let req = Request::get("/")
        .header("grpc-timeout", "9".repeat(60_000))
        .body(Body::empty())
        .unwrap();
    let (status, body) = runtime().block_on(async {
        let res = app_with(layer()).oneshot(req).await.unwrap();
        let status = res.status();
        (
            status,
            axum::body::to_bytes(res.into_body(), 1 << 16)
                .await
                .unwrap(),
        )
    });
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(&body[..], b"invalid `grpc-timeout` header: too many digits");
}

fn app_with(layer: ContextLayer) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer)
}
