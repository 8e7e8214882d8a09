//! Go's duration syntax, as read by Go's `time.ParseDuration`: `300ms`, `1.5s`, `2h45m`.
//!
//! This is how a client writes a `?timeout=` query parameter or a deadline header, so it is
//! parsed on every such request: the parser is one pass over at most [`MAX_INPUT_LEN`] bytes,
//! does not allocate, and never panics or overflows, whatever the input.
//!
//! The syntax is exactly Go's: an optional sign, then one or more `<number><unit>` pairs, where
//! a number is decimal (`1`, `1.5`, `.5` or `1.`, but not `.`) and a unit is one of `ns`, `us`,
//! `µs` (U+00B5), `μs` (U+03BC), `ms`, `s`, `m` or `h`. No whitespace is allowed anywhere. A bare
//! `0` is accepted without a unit, as in Go.
//!
//! Where a timeout differs from a Go `Duration`, the result differs from Go's:
//!
//! - A negative duration is an error, [`ParseDurationError::Negative`], even `-0s`. The syntax
//!   is checked first, so `-5x` is an unknown unit.
//! - A duration that sums to zero (`0`, `0s`, `0h0m`) is an error, [`ParseDurationError::Zero`]:
//!   a zero timeout is never what a client means.
//! - A duration too large for [`Duration`] saturates to [`Duration::MAX`] instead of failing,
//!   and anything up to that is exact (Go fails beyond 2⁶³ ns, about 292 years). The caller
//!   clamps by its own policy.
//! - Fractions are computed exactly and truncated to the nanosecond; Go truncates a `float64`
//!   product, so it can be a nanosecond off (`0.3333333333333333333h` is 20m there, 20m − 1ns
//!   here).
//! - Inputs longer than [`MAX_INPUT_LEN`] bytes are refused before they are scanned.
//!
//! ```
//! use std::time::Duration;
//! use tower_reqctx::duration::{parse_duration, ParseDurationError};
//!
//! assert_eq!(parse_duration("1m30.5s"), Ok(Duration::from_millis(90_500)));
//! assert_eq!(parse_duration("300"), Err(ParseDurationError::MissingUnit));
//! ```
//!
//! Why a parser of our own: the crates that read durations (`humantime`, `go-parse-duration`)
//! accept other syntaxes, allocate, or fail where Go saturates; a client's `?timeout=`
//! must mean what it means to a Go server, on every input, in bounded work.

use std::fmt;
use std::time::Duration;

use super::split_digits;

/// The longest input accepted, in bytes; a longer one is [`ParseDurationError::TooLong`].
///
/// Ample for any real duration (`2562047h47m16.854775807s` is 24 bytes), and it bounds the
/// work an untrusted parameter can cause.
pub const MAX_INPUT_LEN: usize = 64;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Parses a Go duration: `300ms`, `1.5s`, `2h45m`, `1m30.5s`, units ns us µs (U+00B5) μs (U+03BC) ms s m h.
///
/// Equivalent to `parse_duration_bytes(input.as_bytes())`. See the [module docs](self) for the
/// syntax and for where the result differs from Go's.
///
/// ```
/// use std::time::Duration;
/// use tower_reqctx::duration::parse_duration;
///
/// assert_eq!(parse_duration("2h45m"), Ok(Duration::from_secs(2 * 3600 + 45 * 60)));
/// assert_eq!(parse_duration("+.5s"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("99999999999999999h"), Ok(Duration::MAX));
/// ```
#[inline]
pub fn parse_duration(input: &str) -> Result<Duration, ParseDurationError> {
    parse_duration_bytes(input.as_bytes())
}

/// Same from raw bytes (query strings may hold non-UTF-8 bytes after percent-decoding).
///
/// Bytes that are not part of the syntax make the input invalid; they are never decoded.
///
/// ```
/// use tower_reqctx::duration::{parse_duration_bytes, ParseDurationError};
///
/// assert_eq!(parse_duration_bytes(b"5\xffs"), Err(ParseDurationError::UnknownUnit));
/// ```
pub fn parse_duration_bytes(input: &[u8]) -> Result<Duration, ParseDurationError> {
    use ParseDurationError::*;

    // First, so that an oversized parameter costs nothing.
    if input.len() > MAX_INPUT_LEN {
        return Err(TooLong);
    }
    let (negative, mut rest) = match input {
        [] => return Err(Empty),
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, input),
    };
    // Go's one unitless form.
    if rest == b"0" {
        return Err(if negative { Negative } else { Zero });
    }
    if rest.is_empty() {
        return Err(Invalid);
    }

    // Total in nanoseconds. Every step saturates at u128::MAX (about 3.4e38), ten orders of
    // magnitude above `Duration::MAX` (about 1.8e28 ns), so a saturated total still converts to
    // exactly `Duration::MAX` and anything smaller is exact.
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (int_digits, after) = split_digits(rest);
        let (frac_digits, after) = match after {
            [b'.', after @ ..] => split_digits(after),
            _ => (&after[..0], after),
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            // No number at all: `s`, `.s`, `.`, or a second sign.
            return Err(Invalid);
        }
        // As in Go, the unit is everything up to the next number, so `5s 3m` has the unit `s `.
        let unit_len = after
            .iter()
            .position(|&b| b == b'.' || b.is_ascii_digit())
            .unwrap_or(after.len());
        if unit_len == 0 {
            return Err(MissingUnit);
        }
        let (unit, after) = after.split_at(unit_len);
        let unit = unit_nanos(unit).ok_or(UnknownUnit)?;
        rest = after;

        let int = int_digits.iter().fold(0u128, |acc, &b| {
            acc.saturating_mul(10).saturating_add(u128::from(b - b'0'))
        });
        total = total
            .saturating_add(int.saturating_mul(u128::from(unit)))
            .saturating_add(u128::from(fraction_nanos(frac_digits, unit)));
    }

    if negative {
        return Err(Negative);
    }
    if total == 0 {
        return Err(Zero);
    }
    let nanos = (total % NANOS_PER_SEC) as u32; // below 10⁹
    Ok(match u64::try_from(total / NANOS_PER_SEC) {
        Ok(secs) => Duration::new(secs, nanos),
        Err(_) => Duration::MAX,
    })
}

/// Nanoseconds in one unit, or `None` for an unknown unit.
#[inline]
fn unit_nanos(unit: &[u8]) -> Option<u64> {
    Some(match unit {
        b"ns" => 1,
        // `us`, `µs` (U+00B5 MICRO SIGN) and `μs` (U+03BC GREEK SMALL LETTER MU) in UTF-8.
        b"us" | b"\xc2\xb5s" | b"\xce\xbcs" => 1_000,
        b"ms" => 1_000_000,
        b"s" => 1_000_000_000,
        b"m" => 60_000_000_000,
        b"h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// `floor(0.<digits> * unit)`, exactly.
///
/// Long multiplication from the last digit: each step keeps only the carry into the next
/// digit up, which is below `unit`, so `9 * unit + carry` fits in a `u64` for every unit and
/// the last carry is the integer part of the product.
#[inline]
fn fraction_nanos(digits: &[u8], unit: u64) -> u64 {
    digits.iter().rev().fold(0u64, |carry, &b| {
        u64::from(b - b'0')
            .saturating_mul(unit)
            .saturating_add(carry)
            / 10
    })
}

/// Why a duration was refused.
///
/// Its [`Display`](fmt::Display) is a short lower-case phrase that can follow
/// "invalid `timeout`: " in a 400 response. It never repeats the input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseDurationError {
    /// The input is empty.
    Empty,
    /// The input starts with `-` and is otherwise valid, even if its value is zero.
    Negative,
    /// The value is zero (`0`, `0s`, `0h0m`, or a fraction below a nanosecond).
    Zero,
    /// A number is not followed by a unit, as in `300` or `5m5`.
    MissingUnit,
    /// A unit is not one of `ns`, `us`, `µs`, `μs`, `ms`, `s`, `m` or `h`.
    UnknownUnit,
    /// Not a duration: a unit without a number (`s`, `.s`) or a sign alone.
    Invalid,
    /// The input is longer than [`MAX_INPUT_LEN`] bytes.
    TooLong,
}

impl fmt::Display for ParseDurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty duration (write 300ms, 1.5s or 1m30s)",
            Self::Negative => "negative duration",
            Self::Zero => "zero duration",
            Self::MissingUnit => "missing unit (write 300ms, 1.5s or 1m30s)",
            Self::UnknownUnit => "unknown unit (use ns, us, ms, s, m or h)",
            Self::Invalid => "not a duration (write 300ms, 1.5s or 1m30s)",
            Self::TooLong => "duration too long (at most 64 bytes)",
        })
    }
}

impl std::error::Error for ParseDurationError {}

#[cfg(test)]
mod tests {
    use super::ParseDurationError::*;
    use super::*;

    const NS: u128 = 1;
    const US: u128 = 1_000;
    const MS: u128 = 1_000_000;
    const S: u128 = 1_000_000_000;
    const M: u128 = 60 * S;
    const H: u128 = 60 * M;

    /// The reference conversion, saturating like the parser.
    fn from_nanos(nanos: u128) -> Duration {
        match u64::try_from(nanos / S) {
            Ok(secs) => Duration::new(secs, (nanos % S) as u32),
            Err(_) => Duration::MAX,
        }
    }

    #[test]
    fn go_valid_cases() {
        // The valid cases of Go's `parseDurationTests`, less the negative and zero ones
        // (see `go_zero_and_negative_cases`).
        let cases: &[(&str, u128)] = &[
            // simple
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            // sign
            ("+5s", 5 * S),
            // decimal
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            (".5s", 500 * MS),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            // different units
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12µs", 12 * US),
            ("12μs", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * S),
            ("15m", 15 * M),
            ("16h", 16 * H),
            // composite durations
            ("3h30m", 3 * H + 30 * M),
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            (
                "1h2m3s4ms5us6ns",
                H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
            ),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            // large value
            ("52763797000ns", 52763797000 * NS),
            // more than 9 digits after the decimal point; Go's float64 gives exactly 20m
            ("0.3333333333333333333h", 20 * M - 1),
            // 1<<53 + 1 cannot be stored exactly in a float64
            ("9007199254740993ns", (1 << 53) + 1),
            // the largest Go duration
            ("9223372036854775807ns", (1 << 63) - 1),
            ("9223372036854775.807us", (1 << 63) - 1),
            ("9223372036s854ms775us807ns", (1 << 63) - 1),
            ("2562047h47m16.854775807s", (1 << 63) - 1),
            // huge string, Go issue 15011
            ("0.100000000000000000000h", 6 * M),
            // the first overflow check of Go's leadingFraction
            ("0.830103483285477580700h", 49 * M + 48 * S + 372539827 * NS),
            // overflows in Go, exact here
            ("9223372036854775808ns", 1 << 63),
            ("9223372036854775810ns", (1 << 63) + 2),
            ("9223372036854776us", 9223372036854776 * US),
            ("9223372036854775.808us", 1 << 63),
            ("9223372036854ms775us808ns", 1 << 63),
            ("3000000h", 3000000 * H),
            // ours
            ("300ms", 300 * MS),
            ("1.5s", 1500 * MS),
            ("2h45m", 2 * H + 45 * M),
            ("1m30.5s", 90 * S + 500 * MS),
            ("1.h", H),
            ("+.5s", 500 * MS),
            ("00005s", 5 * S),
            ("1s1s1s", 3 * S),
            ("1.0000000001s", S),
            ("1.9999999999s", 2 * S - 1),
            ("0.5ns1.5ns", 1), // each pair truncates on its own, as in Go
            ("1.5µs", 1500),
            ("1.5μs", 1500),
            ("18446744073709551615s", u128::from(u64::MAX) * S),
            (
                "18446744073709551615.999999999s",
                u128::from(u64::MAX) * S + S - 1,
            ),
        ];
        for &(input, nanos) in cases {
            assert_eq!(parse_duration(input), Ok(from_nanos(nanos)), "{input:?}");
            assert_eq!(
                parse_duration_bytes(input.as_bytes()),
                Ok(from_nanos(nanos))
            );
        }
    }

    #[test]
    fn go_zero_and_negative_cases() {
        let cases: &[(&str, ParseDurationError)] = &[
            ("0", Zero),
            ("+0", Zero),
            ("0s", Zero),
            ("0h0m", Zero),
            ("0.0s", Zero),
            ("000ns", Zero),
            ("0.0000000009s", Zero), // truncated to 0ns
            ("-0", Negative),
            ("-0s", Negative),
            ("-5s", Negative),
            ("-2m3.4s", Negative),
            ("-9223372036854775808ns", Negative),
            ("-9223372036s854ms775us808ns", Negative),
            ("-2562047h47m16.854775808s", Negative),
            ("-99999999999999999h", Negative),
        ];
        for &(input, ref err) in cases {
            assert_eq!(parse_duration(input).as_ref(), Err(err), "{input:?}");
        }
    }

    #[test]
    fn errors() {
        let cases: &[(&[u8], ParseDurationError)] = &[
            // Go's `parseDurationErrorTests`
            (b"", Empty),
            (b"3", MissingUnit),
            (b"-", Invalid),
            (b"s", Invalid),
            (b".", Invalid),
            (b"-.", Invalid),
            (b".s", Invalid),
            (b"+.s", Invalid),
            (b"1d", UnknownUnit),
            (b"\x85\x85", Invalid),
            (b"\xffff", Invalid),
            (b"hello \xffff world", Invalid),
            ("\u{FFFD}".as_bytes(), Invalid),
            ("\u{FFFD} hello \u{FFFD} world".as_bytes(), Invalid),
            // ours
            (b"+", Invalid),
            (b"5", MissingUnit),
            (b"5.", MissingUnit),
            (b"5..s", MissingUnit),
            (b"5m5", MissingUnit),
            (b"5s.", Invalid),
            (b"5x", UnknownUnit),
            (b"5S", UnknownUnit),
            (b"5 s", UnknownUnit),
            (b"5s ", UnknownUnit),
            (b"5s+3s", UnknownUnit), // the unit runs to the next number: `s+`
            (b"5\xffs", UnknownUnit),
            (b"5\xb5s", UnknownUnit), // U+00B5's second byte alone
            (b"5\xc2\xb5", UnknownUnit),
            (b"5\xc2\xb5s\xff", UnknownUnit),
            (b"-5x", UnknownUnit), // syntax is checked before the sign
            (b" 5s", Invalid),
            (b"++5s", Invalid),
            (b"+-5s", Invalid),
            (b"\xc2\xb5s", Invalid),
            (b"0x10s", UnknownUnit),
        ];
        for &(input, ref err) in cases {
            assert_eq!(parse_duration_bytes(input).as_ref(), Err(err), "{input:?}");
        }
    }

    #[test]
    fn micro_signs() {
        // Spelled with escapes so the test does not depend on how the source is normalized.
        assert_eq!(parse_duration("7\u{b5}s"), Ok(Duration::from_micros(7)));
        assert_eq!(parse_duration("7\u{3bc}s"), Ok(Duration::from_micros(7)));
        assert_eq!(parse_duration("7us"), Ok(Duration::from_micros(7)));
    }

    #[test]
    fn saturation_and_length() {
        assert_eq!(parse_duration("99999999999999999h"), Ok(Duration::MAX));
        assert_eq!(parse_duration("18446744073709551616s"), Ok(Duration::MAX));
        assert_eq!(parse_duration("1h18446744073709551615s"), Ok(Duration::MAX));
        let sixty = "9".repeat(60);
        assert_eq!(parse_duration(&format!("{sixty}h")), Ok(Duration::MAX));
        assert_eq!(parse_duration(&format!("{sixty}ns")), Ok(Duration::MAX));
        assert_eq!(parse_duration(&format!("+{sixty}ns")), Ok(Duration::MAX));
        assert_eq!(
            parse_duration(&format!("0.{sixty}h")),
            Ok(Duration::from_secs(3600) - Duration::from_nanos(1))
        );

        // Exactly at the limit, and one byte over.
        let at_limit = format!("1{}s", "0".repeat(MAX_INPUT_LEN - 2));
        assert_eq!(at_limit.len(), MAX_INPUT_LEN);
        assert_eq!(parse_duration(&at_limit), Ok(Duration::MAX));
        let over = format!("1{}s", "0".repeat(MAX_INPUT_LEN - 1));
        assert_eq!(parse_duration(&over), Err(TooLong));

        // The length is checked before anything else.
        assert_eq!(parse_duration(&"1".repeat(1000)), Err(TooLong));
        assert_eq!(parse_duration(&"-".repeat(65)), Err(TooLong));
        assert_eq!(parse_duration_bytes(&[0xff; 10_000]), Err(TooLong));
    }

    #[test]
    fn display_never_echoes_input() {
        let all = [
            Empty,
            Negative,
            Zero,
            MissingUnit,
            UnknownUnit,
            Invalid,
            TooLong,
        ];
        for err in all {
            let message = err.to_string();
            assert!(!message.is_empty());
            assert_eq!(message, message.to_lowercase());
            assert!(!message.ends_with('.'));
        }
        let secret = "5<script>";
        let err = parse_duration(secret).unwrap_err();
        assert!(!err.to_string().contains("script"));
        assert_eq!(
            MissingUnit.to_string(),
            "missing unit (write 300ms, 1.5s or 1m30s)"
        );
        let _: &dyn std::error::Error = &Empty;
    }

    /// Xorshift64: deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn fuzz_no_panic_and_positive() {
        const ALPHABET: [&str; 21] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ".", "+", "-", "h", "m", "s", "u",
            "n", "\u{b5}", "\u{3bc}", "x",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut input = String::new();
        let mut oks = 0;
        for _ in 0..200_000 {
            input.clear();
            for _ in 0..rng.below(13) {
                input.push_str(ALPHABET[rng.below(ALPHABET.len() as u64) as usize]);
            }
            match parse_duration(&input) {
                Ok(d) => {
                    oks += 1;
                    assert!(d > Duration::ZERO, "{input:?}");
                    if !input.starts_with(['+', '-']) {
                        assert_eq!(parse_duration(&format!("+{input}")), Ok(d), "{input:?}");
                        let negated = parse_duration(&format!("-{input}"));
                        assert_eq!(negated, Err(Negative), "{input:?}");
                    }
                }
                Err(err) => assert_eq!(err == Empty, input.is_empty(), "{input:?}"),
            }
        }
        // The alphabet is rich enough that the success path is exercised too.
        assert!(oks > 1_000, "only {oks} valid inputs");

        // Raw bytes, including lone UTF-8 continuation and lead bytes.
        let mut bytes = Vec::new();
        for _ in 0..200_000 {
            bytes.clear();
            for _ in 0..rng.below(80) {
                let b = match rng.below(4) {
                    0 => rng.next() as u8,
                    1 => b"0123456789."[rng.below(11) as usize],
                    _ => b"hmsun\xc2\xb5\xce\xbc+-"[rng.below(11) as usize],
                };
                bytes.push(b);
            }
            match parse_duration_bytes(&bytes) {
                Ok(d) => assert!(d > Duration::ZERO, "{bytes:?}"),
                Err(TooLong) => assert!(bytes.len() > MAX_INPUT_LEN),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn matches_u128_reference() {
        const UNITS: [(&str, u128); 9] = [
            ("ns", NS),
            ("us", US),
            ("\u{b5}s", US),
            ("\u{3bc}s", US),
            ("ms", MS),
            ("s", S),
            ("m", M),
            ("h", H),
            ("h", H),
        ];
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let mut input = String::new();
        for round in 0..50_000 {
            input.clear();
            let mut nanos: u128 = 0;
            let fractions = round % 2 == 1;
            for _ in 0..=rng.below(4) {
                let (unit, unit_nanos) = UNITS[rng.below(UNITS.len() as u64) as usize];
                // At most 4 pairs of 13 + 3 or 6 + 1 + 6 + 3 bytes: never over the limit.
                let int_digits = 1 + rng.below(if fractions { 6 } else { 13 }) as u32;
                let int = u128::from(rng.next()) % 10u128.pow(int_digits);
                input.push_str(&int.to_string());
                nanos += int * unit_nanos;
                if fractions {
                    let frac_digits = rng.below(7) as u32;
                    let frac = u128::from(rng.next()) % 10u128.pow(frac_digits);
                    input.push('.');
                    input.push_str(&format!("{frac:0width$}", width = frac_digits as usize));
                    nanos += frac * unit_nanos / 10u128.pow(frac_digits);
                }
                input.push_str(unit);
            }
            assert!(input.len() <= MAX_INPUT_LEN);
            let expected = if nanos == 0 {
                Err(Zero)
            } else {
                Ok(from_nanos(nanos))
            };
            assert_eq!(parse_duration(&input), expected, "{input:?}");
        }
    }
}
