//! Deadline headers: a remaining budget as a relative duration, in gRPC's `grpc-timeout`
//! syntax or as plain milliseconds.
//!
//! A budget is always relative ("100 ms from when you read this"), never a wall-clock time,
//! so the two machines' clocks never need to agree.
//!
//! Encoding rounds down, never up: a budget is never lengthened on its way downstream.
//! Decoding is strict, bounded in length, and never panics or overflows, whatever the input.
//!
//! A server that hears from more than one kind of caller (gRPC clients sending
//! `grpc-timeout`, Envoy sending [`x-envoy-expected-rq-timeout-ms`](ENVOY_EXPECTED_RQ_TIMEOUT_MS))
//! reads them all (one [`ContextLayer::deadline_header`](crate::ContextLayer::deadline_header)
//! each): the earliest budget wins.
//!
//! ```
//! use std::time::Duration;
//! use http::HeaderValue;
//! use tower_reqctx::header::DeadlineHeader;
//!
//! let grpc = DeadlineHeader::grpc();
//! let value = grpc.encode(Duration::from_millis(1500));
//! assert_eq!(value, "1500000u");
//! assert_eq!(grpc.decode(&value), Ok(Duration::from_millis(1500)));
//! assert!(grpc.decode(&HeaderValue::from_static("1.5S")).is_err());
//! ```
//!
//! Why a codec of our own: no maintained crate encodes `grpc-timeout` apart from a whole
//! gRPC stack (tonic keeps its codec private), and the server side needs a decoder that is
//! bounded in length and total on every input, which the fuzz targets check.

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::split_digits;

/// `x-reqctx-deadline`: with the value [`EXCEEDED`], marks a 504 as "my deadline passed",
/// which the layer sends and the [`propagate`](crate::propagate) clients read.
pub const X_REQCTX_DEADLINE: HeaderName = HeaderName::from_static("x-reqctx-deadline");

/// `exceeded`, the value of [`X_REQCTX_DEADLINE`] on a 504 that a deadline caused.
pub const EXCEEDED: HeaderValue = HeaderValue::from_static("exceeded");

/// `grpc-timeout`, the header gRPC (and so tonic) reads a deadline from.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `x-request-timeout-ms`, the default name of the milliseconds header.
///
/// There is no standard name for it; this one says what it holds and belongs to no
/// product. To speak with a proxy or service that has its own, name it:
/// `DeadlineHeader::millis(HeaderName::from_static("x-envoy-expected-rq-timeout-ms"))`.
pub const REQUEST_TIMEOUT_MS: HeaderName = HeaderName::from_static("x-request-timeout-ms");

/// `x-envoy-expected-rq-timeout-ms`, where Envoy (and so Istio) tells the service it routes
/// to how long it will wait, in whole milliseconds: read it with
/// `DeadlineHeader::millis(ENVOY_EXPECTED_RQ_TIMEOUT_MS)`.
///
/// Envoy sends it only when the route has a timeout; with retries configured it is the
/// per-try timeout, not the whole; Istio sets no route timeout by default, so there it is
/// absent unless a `VirtualService` sets one.
pub const ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");

/// The most digits a `grpc-timeout` value may have (gRPC's HTTP/2 protocol spec).
pub(crate) const GRPC_MAX_DIGITS: usize = 8;

/// The most digits a milliseconds value may have: 19, enough for any `u64` of 19 digits
/// (about 317 million years), so a value that passes the length check cannot overflow.
pub(crate) const MILLIS_MAX_DIGITS: usize = 19;

/// The largest value of 8 digits.
const GRPC_MAX_VALUE: u128 = 99_999_999;

/// The largest value of 19 digits, where [`encode_millis`] saturates.
const MILLIS_MAX_VALUE: u128 = 9_999_999_999_999_999_999;

/// gRPC's units from the finest up, with their length in nanoseconds.
const GRPC_UNITS: [(u8, u128); 6] = [
    (b'n', 1),
    (b'u', 1_000),
    (b'm', 1_000_000),
    (b'S', 1_000_000_000),
    (b'M', 60_000_000_000),
    (b'H', 3_600_000_000_000),
];

/// Encodes `budget` as a `grpc-timeout` value: at most 8 digits and one unit of `H M S m u
/// n`.
///
/// The unit is the finest whose value fits in 8 digits, and the value is rounded down, so
/// the encoded budget is never longer than `budget` and loses as little as it can: under
/// 100 ms it is exact to the nanosecond. A budget beyond 99,999,999 hours (11,000 years)
/// encodes as `99999999H`. Zero encodes as `0n`.
///
/// ```
/// use std::time::Duration;
/// use tower_reqctx::header::DeadlineHeader;
///
/// let encode_grpc_timeout = |d| DeadlineHeader::grpc().encode(d);
/// assert_eq!(encode_grpc_timeout(Duration::from_nanos(99_999_999)), "99999999n");
/// assert_eq!(encode_grpc_timeout(Duration::from_millis(250)), "250000u");
/// // 100,000,000.9 s does not fit in 8 digits of seconds: 1,666,666 whole minutes.
/// assert_eq!(encode_grpc_timeout(Duration::from_millis(100_000_000_900)), "1666666M");
/// assert_eq!(encode_grpc_timeout(Duration::MAX), "99999999H");
/// assert_eq!(encode_grpc_timeout(Duration::ZERO), "0n");
/// ```
pub(crate) fn encode_grpc_timeout(budget: Duration) -> HeaderValue {
    let nanos = budget.as_nanos();
    let (value, unit) = GRPC_UNITS
        .iter()
        .map(|&(unit, len)| (nanos / len, unit))
        .find(|&(value, _)| value <= GRPC_MAX_VALUE)
        .unwrap_or((GRPC_MAX_VALUE, b'H'));

    // At most 8 digits and the unit: written backwards into a buffer on the stack.
    let mut buf = [0u8; GRPC_MAX_DIGITS + 1];
    let mut start = buf.len() - 1;
    buf[start] = unit;
    let mut rest = value;
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8; // a digit
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&buf[start..]).expect("digits and a letter are a valid header value")
}

/// Decodes a `grpc-timeout` value: 1 to 8 ASCII digits, then exactly one unit of `H` (hours),
/// `M` (minutes), `S` (seconds), `m` (milliseconds), `u` (microseconds) or `n` (nanoseconds).
///
/// Anything else is an error: a sign, a space, a decimal point, a ninth digit, a missing
/// or second unit. `0n` (any zero) decodes to [`Duration::ZERO`], a budget already spent.
///
/// ```
/// use std::time::Duration;
/// use http::HeaderValue;
/// use tower_reqctx::header::{DeadlineHeader, HeaderError};
///
/// let decode = |s: &'static str| DeadlineHeader::grpc().decode(&HeaderValue::from_static(s));
/// assert_eq!(decode("2H"), Ok(Duration::from_secs(7200)));
/// assert_eq!(decode("007m"), Ok(Duration::from_millis(7)));
/// assert_eq!(decode("100"), Err(HeaderError::MissingUnit));
/// assert_eq!(decode("100ms"), Err(HeaderError::UnknownUnit));
/// assert_eq!(decode("123456789n"), Err(HeaderError::TooLong));
/// assert_eq!(decode("-1S"), Err(HeaderError::NotDigits));
/// ```
pub(crate) fn decode_grpc_timeout(value: &HeaderValue) -> Result<Duration, HeaderError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(HeaderError::Empty);
    }
    // First, so that an oversized value costs nothing.
    if bytes.len() > GRPC_MAX_DIGITS + 1 {
        return Err(HeaderError::TooLong);
    }
    let (digits, unit) = split_digits(bytes);
    if digits.is_empty() {
        return Err(HeaderError::NotDigits);
    }
    if digits.len() > GRPC_MAX_DIGITS {
        return Err(HeaderError::TooLong);
    }
    let value = parse_digits(digits); // below 10⁸
    // 10⁸ hours is 3.6 × 10¹¹ seconds: no product below can overflow a u64.
    Ok(match unit {
        b"H" => Duration::from_secs(value * 3600),
        b"M" => Duration::from_secs(value * 60),
        b"S" => Duration::from_secs(value),
        b"m" => Duration::from_millis(value),
        b"u" => Duration::from_micros(value),
        b"n" => Duration::from_nanos(value),
        [] => return Err(HeaderError::MissingUnit),
        _ => return Err(HeaderError::UnknownUnit),
    })
}

/// Encodes `budget` as whole milliseconds, rounded down: 1.9 ms is `1`, under 1 ms is `0`.
///
/// A budget beyond 19 digits of milliseconds (about 317 million years) saturates at
/// `9999999999999999999`, the largest value [`decode_millis`] accepts.
///
/// ```
/// use std::time::Duration;
/// use tower_reqctx::header::{DeadlineHeader, REQUEST_TIMEOUT_MS};
///
/// let encode_millis = |d| DeadlineHeader::millis(REQUEST_TIMEOUT_MS).encode(d);
/// assert_eq!(encode_millis(Duration::from_micros(1999)), "1");
/// assert_eq!(encode_millis(Duration::MAX), "9999999999999999999");
/// ```
pub(crate) fn encode_millis(budget: Duration) -> HeaderValue {
    let millis = budget.as_millis().min(MILLIS_MAX_VALUE);
    // At most 19 digits: below u64::MAX.
    HeaderValue::from(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// Decodes a milliseconds value: 1 to 19 ASCII digits, nothing else (no sign, no space, no
/// unit). `0` decodes to [`Duration::ZERO`], a budget already spent.
///
/// ```
/// use std::time::Duration;
/// use http::HeaderValue;
/// use tower_reqctx::header::{DeadlineHeader, HeaderError, REQUEST_TIMEOUT_MS};
///
/// let millis = DeadlineHeader::millis(REQUEST_TIMEOUT_MS);
/// let decode = |s: &'static str| millis.decode(&HeaderValue::from_static(s));
/// assert_eq!(decode("250"), Ok(Duration::from_millis(250)));
/// assert_eq!(decode("+250"), Err(HeaderError::NotDigits));
/// assert_eq!(decode("250ms"), Err(HeaderError::NotDigits));
/// assert_eq!(decode("12345678901234567890"), Err(HeaderError::TooLong));
/// ```
pub(crate) fn decode_millis(value: &HeaderValue) -> Result<Duration, HeaderError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(HeaderError::Empty);
    }
    if bytes.len() > MILLIS_MAX_DIGITS {
        return Err(HeaderError::TooLong);
    }
    if !bytes.iter().all(u8::is_ascii_digit) {
        return Err(HeaderError::NotDigits);
    }
    Ok(Duration::from_millis(parse_digits(bytes)))
}

/// The value of at most 19 ASCII digits (below 10¹⁹, so below `u64::MAX`).
#[inline]
fn parse_digits(digits: &[u8]) -> u64 {
    digits
        .iter()
        .fold(0u64, |acc, &b| acc * 10 + u64::from(b - b'0'))
}

/// A deadline header: its name and format.
///
/// [`grpc()`](DeadlineHeader::grpc), the default, interoperates with gRPC servers (tonic
/// reads `grpc-timeout`) and is exact to the nanosecond under 100 ms;
/// [`millis(name)`](DeadlineHeader::millis) is plain whole milliseconds under a name of your
/// choice.
///
/// ```
/// use std::time::Duration;
/// use tower_reqctx::header::DeadlineHeader;
/// use tower_reqctx::header::REQUEST_TIMEOUT_MS;
///
/// let header = DeadlineHeader::millis(REQUEST_TIMEOUT_MS);
/// assert_eq!(header.name(), "x-request-timeout-ms");
/// let value = header.encode(Duration::from_micros(2500));
/// assert_eq!(value, "2");
/// assert_eq!(header.decode(&value), Ok(Duration::from_millis(2)));
/// assert_eq!(DeadlineHeader::default(), DeadlineHeader::grpc());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadlineHeader {
    /// `grpc-timeout`, in gRPC's syntax: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`,
    /// `n`). Encoding takes the finest unit whose value fits, rounded down, so it is exact
    /// to the nanosecond under 100 ms and never longer than the budget.
    #[default]
    GrpcTimeout,
    /// Whole milliseconds under the given name: 1 to 19 digits, nothing else, rounded down.
    Millis(HeaderName),
}

impl DeadlineHeader {
    /// [`DeadlineHeader::GrpcTimeout`].
    pub fn grpc() -> DeadlineHeader {
        DeadlineHeader::GrpcTimeout
    }

    /// [`DeadlineHeader::Millis`] under `name`; [`REQUEST_TIMEOUT_MS`] is the usual one.
    pub fn millis(name: HeaderName) -> DeadlineHeader {
        DeadlineHeader::Millis(name)
    }

    /// The header's name.
    pub fn name(&self) -> HeaderName {
        match self {
            DeadlineHeader::GrpcTimeout => GRPC_TIMEOUT,
            DeadlineHeader::Millis(name) => name.clone(),
        }
    }

    /// Encodes a budget, rounding down.
    pub fn encode(&self, budget: Duration) -> HeaderValue {
        match self {
            DeadlineHeader::GrpcTimeout => encode_grpc_timeout(budget),
            DeadlineHeader::Millis(_) => encode_millis(budget),
        }
    }

    /// Decodes a value, strictly.
    pub fn decode(&self, value: &HeaderValue) -> Result<Duration, HeaderError> {
        match self {
            DeadlineHeader::GrpcTimeout => decode_grpc_timeout(value),
            DeadlineHeader::Millis(_) => decode_millis(value),
        }
    }

    /// The smallest budget this format can carry: a budget below it encodes as zero.
    pub(crate) fn resolution(&self) -> Duration {
        match self {
            DeadlineHeader::GrpcTimeout => Duration::from_nanos(1),
            DeadlineHeader::Millis(_) => Duration::from_millis(1),
        }
    }
}

/// The earliest budget that any of `readers` finds in `headers`, and the header that set
/// it: how a server reads more than one deadline header (say `grpc-timeout` from gRPC
/// callers and Envoy's [`x-envoy-expected-rq-timeout-ms`](ENVOY_EXPECTED_RQ_TIMEOUT_MS)).
///
/// - Every value of every header named by `readers` counts, and the shortest budget wins:
///   a budget can only be shortened by another header, or by a second value of the same
///   one, never lengthened. On a tie, the reader listed first is named.
/// - `Ok(None)` when none of the headers is present.
/// - Any value that does not decode is an error naming its header, even if another header
///   holds a valid budget: a caller that sends garbage gets told, not silently ignored.
///   Its [`Display`](fmt::Display) is the one line of a 400 answer:
///   ``invalid `grpc-timeout` header: too many digits``.
///
/// It reads nothing else: capping by a maximum, and where the budget counts from, are the
/// caller's business. The work is one lookup per reader, and decoding is bounded.
///
pub(crate) fn earliest_budget<'r>(
    headers: &HeaderMap,
    readers: &'r [DeadlineHeader],
) -> Result<Option<(Duration, &'r DeadlineHeader)>, InvalidDeadlineHeader> {
    let mut earliest: Option<(Duration, &'r DeadlineHeader)> = None;
    for reader in readers {
        let name = reader.name();
        for value in headers.get_all(&name) {
            let budget = reader
                .decode(value)
                .map_err(|error| InvalidDeadlineHeader {
                    name: name.clone(),
                    error,
                })?;
            if earliest.is_none_or(|(best, _)| budget < best) {
                earliest = Some((budget, reader));
            }
        }
    }
    Ok(earliest)
}

/// A deadline header whose value was refused, from [`earliest_budget`]: the header's name
/// and why.
///
/// Its [`Display`](fmt::Display) is one line, ``invalid `NAME` header: REASON``, that
/// never repeats the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InvalidDeadlineHeader {
    name: HeaderName,
    error: HeaderError,
}

impl fmt::Display for InvalidDeadlineHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}` header: {}", self.name, self.error)
    }
}

impl std::error::Error for InvalidDeadlineHeader {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Why a deadline header's value was refused.
///
/// Its [`Display`](fmt::Display) is a short lower-case phrase that can follow "invalid
/// `grpc-timeout`: " in a 400 response. It never repeats the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    /// The value is empty.
    Empty,
    /// More digits than the format allows: 8 for `grpc-timeout`, 19 for milliseconds.
    TooLong,
    /// The value does not start with a digit, or (milliseconds) holds something other
    /// than digits: a sign, a space, a decimal point, a unit.
    NotDigits,
    /// `grpc-timeout` digits with no unit after them.
    MissingUnit,
    /// What follows the `grpc-timeout` digits is not one of `H M S m u n`.
    UnknownUnit,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeaderError::Empty => "empty value",
            HeaderError::TooLong => "too many digits",
            HeaderError::NotDigits => "not a whole number",
            HeaderError::MissingUnit => "missing unit (H, M, S, m, u or n)",
            HeaderError::UnknownUnit => "unknown unit (use one of H, M, S, m, u or n)",
        })
    }
}

impl std::error::Error for HeaderError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_budget_of_every_header_wins() {
        let readers = [
            DeadlineHeader::grpc(),
            DeadlineHeader::millis(ENVOY_EXPECTED_RQ_TIMEOUT_MS),
        ];
        let mut headers = HeaderMap::new();
        assert_eq!(earliest_budget(&headers, &readers), Ok(None));

        headers.insert("grpc-timeout", HeaderValue::from_static("2S"));
        headers.insert(
            "x-envoy-expected-rq-timeout-ms",
            HeaderValue::from_static("1500"),
        );
        let (budget, from) = earliest_budget(&headers, &readers).unwrap().unwrap();
        assert_eq!(budget, Duration::from_millis(1500));
        assert_eq!(from.name(), "x-envoy-expected-rq-timeout-ms");

        headers.insert("grpc-timeout", HeaderValue::from_static("soon"));
        let err = earliest_budget(&headers, &readers).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `grpc-timeout` header: not a whole number"
        );
    }

    fn grpc(s: &'static str) -> Result<Duration, HeaderError> {
        decode_grpc_timeout(&HeaderValue::from_static(s))
    }

    fn millis(s: &'static str) -> Result<Duration, HeaderError> {
        decode_millis(&HeaderValue::from_static(s))
    }

    #[test]
    fn grpc_units() {
        assert_eq!(grpc("1H"), Ok(Duration::from_secs(3600)));
        assert_eq!(grpc("1M"), Ok(Duration::from_secs(60)));
        assert_eq!(grpc("1S"), Ok(Duration::from_secs(1)));
        assert_eq!(grpc("1m"), Ok(Duration::from_millis(1)));
        assert_eq!(grpc("1u"), Ok(Duration::from_micros(1)));
        assert_eq!(grpc("1n"), Ok(Duration::from_nanos(1)));
        assert_eq!(grpc("0n"), Ok(Duration::ZERO));
        assert_eq!(grpc("00000000H"), Ok(Duration::ZERO));
        assert_eq!(
            grpc("99999999H"),
            Ok(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn grpc_rejects() {
        use HeaderError::*;
        let cases: &[(&[u8], HeaderError)] = &[
            (b"", Empty),
            (b"1", MissingUnit),
            (b"12345678", MissingUnit),
            (b"123456789", TooLong),
            (b"123456789S", TooLong),
            (b"0000000001S", TooLong),
            (b"1h", UnknownUnit),
            (b"1s", UnknownUnit),
            (b"1ms", UnknownUnit),
            (b"1SS", UnknownUnit),
            (b"1S ", UnknownUnit),
            (b"1 S", UnknownUnit),
            (b"1S1", UnknownUnit),
            (b"1.5S", UnknownUnit),
            (b"1\xffS", UnknownUnit),
            (b"S", NotDigits),
            (b" 1S", NotDigits),
            (b"+1S", NotDigits),
            (b"-1S", NotDigits),
            (b"\xff", NotDigits),
        ];
        for &(input, err) in cases {
            let value = HeaderValue::from_bytes(input).unwrap();
            assert_eq!(decode_grpc_timeout(&value), Err(err), "{input:?}");
        }
    }

    #[test]
    fn grpc_encoding_picks_the_finest_unit_and_rounds_down() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(1), "1n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_nanos(100_000_000), "100000u"),
            (Duration::from_nanos(100_000_999), "100000u"),
            (Duration::from_secs(99), "99000000u"),
            (Duration::from_secs(100), "100000m"),
            (Duration::from_secs(99_999), "99999000m"),
            (Duration::from_millis(99_999_999), "99999999m"),
            (Duration::from_millis(100_000_000), "100000S"),
            (Duration::from_secs(99_999_999), "99999999S"),
            (Duration::from_secs(100_000_000), "1666666M"),
            (Duration::from_secs(99_999_999 * 60 + 59), "99999999M"),
            (Duration::from_secs(100_000_000 * 60), "1666666H"),
            (Duration::from_secs(99_999_999 * 3600), "99999999H"),
            (Duration::from_secs(100_000_000 * 3600), "99999999H"),
            (Duration::MAX, "99999999H"),
        ];
        for &(budget, expected) in cases {
            assert_eq!(encode_grpc_timeout(budget), expected, "{budget:?}");
        }
    }

    #[test]
    fn millis_codec() {
        use HeaderError::*;
        assert_eq!(millis("0"), Ok(Duration::ZERO));
        assert_eq!(millis("0001"), Ok(Duration::from_millis(1)));
        assert_eq!(
            millis("9999999999999999999"),
            Ok(Duration::from_millis(9_999_999_999_999_999_999))
        );
        assert_eq!(millis(""), Err(Empty));
        assert_eq!(millis("10000000000000000000"), Err(TooLong));
        assert_eq!(millis("1ms"), Err(NotDigits));
        assert_eq!(millis("-1"), Err(NotDigits));
        assert_eq!(millis(" 1"), Err(NotDigits));
        assert_eq!(millis("1.5"), Err(NotDigits));
        assert_eq!(encode_millis(Duration::ZERO), "0");
        assert_eq!(encode_millis(Duration::from_nanos(999_999)), "0");
        assert_eq!(
            encode_millis(Duration::from_millis(u64::MAX)),
            "9999999999999999999"
        );
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for &(name, value) in pairs {
            headers.append(name, HeaderValue::from_static(value));
        }
        headers
    }

    fn both() -> [DeadlineHeader; 2] {
        [
            DeadlineHeader::grpc(),
            DeadlineHeader::millis(ENVOY_EXPECTED_RQ_TIMEOUT_MS),
        ]
    }

    /// The budget and the name of the header that set it.
    fn earliest(
        pairs: &[(&'static str, &'static str)],
    ) -> Result<Option<(Duration, HeaderName)>, InvalidDeadlineHeader> {
        let readers = both();
        earliest_budget(&map(pairs), &readers).map(|b| b.map(|(d, h)| (d, h.name())))
    }

    const ENVOY: &str = "x-envoy-expected-rq-timeout-ms";

    #[test]
    fn the_earliest_header_wins() {
        let ms = Duration::from_millis;
        assert_eq!(earliest(&[]), Ok(None));
        assert_eq!(earliest(&[("x-other", "1")]), Ok(None));
        assert_eq!(
            earliest(&[("grpc-timeout", "300m")]),
            Ok(Some((ms(300), GRPC_TIMEOUT)))
        );
        assert_eq!(
            earliest(&[(ENVOY, "250")]),
            Ok(Some((ms(250), ENVOY_EXPECTED_RQ_TIMEOUT_MS)))
        );
        assert_eq!(
            earliest(&[("grpc-timeout", "300m"), (ENVOY, "250")]),
            Ok(Some((ms(250), ENVOY_EXPECTED_RQ_TIMEOUT_MS)))
        );
        assert_eq!(
            earliest(&[("grpc-timeout", "200000u"), (ENVOY, "250")]),
            Ok(Some((ms(200), GRPC_TIMEOUT)))
        );
        // A tie names the reader listed first.
        assert_eq!(
            earliest(&[(ENVOY, "250"), ("grpc-timeout", "250m")]),
            Ok(Some((ms(250), GRPC_TIMEOUT)))
        );
        // A spent budget is a budget.
        assert_eq!(
            earliest(&[("grpc-timeout", "1S"), (ENVOY, "0")]),
            Ok(Some((Duration::ZERO, ENVOY_EXPECTED_RQ_TIMEOUT_MS)))
        );
    }

    #[test]
    fn a_second_value_can_only_shorten() {
        let ms = Duration::from_millis;
        assert_eq!(
            earliest(&[(ENVOY, "900"), (ENVOY, "100"), (ENVOY, "500")]),
            Ok(Some((ms(100), ENVOY_EXPECTED_RQ_TIMEOUT_MS)))
        );
        assert_eq!(
            earliest(&[("grpc-timeout", "1m"), ("grpc-timeout", "1H")]),
            Ok(Some((ms(1), GRPC_TIMEOUT)))
        );
    }

    #[test]
    fn any_bad_value_is_an_error_naming_its_header() {
        let err = earliest(&[("grpc-timeout", "1S"), (ENVOY, "1.5")]).unwrap_err();
        assert_eq!(err.name, ENVOY);
        assert_eq!(err.error, HeaderError::NotDigits);
        assert_eq!(
            err.to_string(),
            "invalid `x-envoy-expected-rq-timeout-ms` header: not a whole number"
        );
        let err = earliest(&[("grpc-timeout", "1S"), ("grpc-timeout", "")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `grpc-timeout` header: empty value"
        );
        // The value is never repeated.
        let err = earliest(&[(ENVOY, "<script>")]).unwrap_err();
        assert!(!err.to_string().contains("script"));
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn only_the_listed_headers_are_read() {
        let grpc_only = [DeadlineHeader::grpc()];
        let headers = map(&[("grpc-timeout", "2S"), (ENVOY, "garbage")]);
        assert_eq!(
            earliest_budget(&headers, &grpc_only).map(|b| b.map(|(d, _)| d)),
            Ok(Some(Duration::from_secs(2)))
        );
        assert_eq!(earliest_budget(&headers, &[]), Ok(None));
    }

    #[test]
    fn display_never_echoes_input() {
        use HeaderError::*;
        for err in [Empty, TooLong, NotDigits, MissingUnit, UnknownUnit] {
            let message = err.to_string();
            assert!(!message.is_empty());
            assert!(!message.ends_with('.'));
        }
        let err = grpc("5<script>").unwrap_err();
        assert!(!err.to_string().contains("script"));
    }

    mod props {
        use std::time::Duration;

        use http::HeaderValue;
        use proptest::prelude::*;

        use super::super::{DeadlineHeader, ENVOY_EXPECTED_RQ_TIMEOUT_MS, earliest_budget};

        fn durations() -> impl Strategy<Value = Duration> {
            prop_oneof![
                (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
                (0..1_000_000_000u64).prop_map(Duration::from_nanos),
                Just(Duration::ZERO),
                Just(Duration::MAX),
            ]
        }

        proptest! {
            /// Several deadline headers, each with several values: the result is the least of what
            /// each value decodes to, or the error of one that does not decode, never a panic.
            #[test]
            fn the_earliest_of_several_headers_is_the_least_budget(
                values in proptest::collection::vec(
                    (any::<bool>(), prop_oneof![
                        durations().prop_map(|d| (true, d)),
                        "[0-9a-zA-Z.]{0,10}".prop_map(|_| (false, Duration::ZERO)),
                    ], "[0-9a-zA-Z.]{0,10}"),
                    0..6,
                )
            ) {
                let readers = [DeadlineHeader::grpc(), DeadlineHeader::millis(ENVOY_EXPECTED_RQ_TIMEOUT_MS)];
                let mut headers = http::HeaderMap::new();
                let mut least: Option<Duration> = None;
                let mut bad = false;
                for (grpc, (valid, d), junk) in values {
                    let reader = &readers[usize::from(!grpc)];
                    let value = if valid {
                        reader.encode(d)
                    } else {
                        HeaderValue::from_str(&junk).unwrap()
                    };
                    match reader.decode(&value) {
                        Ok(d) => least = Some(least.map_or(d, |l| l.min(d))),
                        Err(_) => bad = true,
                    }
                    headers.append(reader.name(), value);
                }
                match earliest_budget(&headers, &readers) {
                    Ok(found) => {
                        prop_assert!(!bad);
                        prop_assert_eq!(found.map(|(d, _)| d), least);
                    }
                    Err(err) => {
                        prop_assert!(bad);
                        prop_assert!(readers.iter().any(|r| r.name() == err.name));
                    }
                }
            }
        }
    }
}
