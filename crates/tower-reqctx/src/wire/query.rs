//! The client's `?timeout=` query parameter: found by its exact key, percent-decoded
//! (with the `percent-encoding` crate) into a bounded buffer, and parsed in Go's duration
//! syntax.

use std::fmt;
use std::time::Duration;

use percent_encoding::percent_decode;

use super::ClampPolicy;
use super::duration::{MAX_INPUT_LEN, ParseDurationError, parse_duration_bytes};

/// The client's timeout from `query`'s first `name=` parameter, capped by `max` under
/// `policy`. `Err` is the 400's one line, which never repeats the client's input.
pub(crate) fn client_timeout(
    query: Option<&str>,
    name: &str,
    max: Option<Duration>,
    policy: ClampPolicy,
) -> Result<Option<Duration>, String> {
    let Some(raw) = find_param(query, name) else {
        return Ok(None);
    };
    let invalid = |e: ParseDurationError| format!("invalid `{name}` query parameter: {e}");
    let mut buf = [0u8; MAX_INPUT_LEN];
    let value = decode(raw.as_bytes(), &mut buf).map_err(invalid)?;
    let d = parse_duration_bytes(value).map_err(invalid)?;
    policy.apply(d, max).map(Some).map_err(|max| {
        format!(
            "invalid `{name}` query parameter: above the maximum of {}",
            DisplayDuration(max)
        )
    })
}

/// The raw value of the first `name=` pair. Keys are compared as written (not decoded).
fn find_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Decodes `%XX` escapes into `buf`: longer than `buf` is `TooLong`, whatever the input's
/// size, and nothing past that is read. A `%` not followed by two hex digits stays as it
/// is, and then fails the duration's syntax.
fn decode<'b>(raw: &[u8], buf: &'b mut [u8]) -> Result<&'b [u8], ParseDurationError> {
    let mut n = 0;
    for b in percent_decode(raw) {
        *buf.get_mut(n).ok_or(ParseDurationError::TooLong)? = b;
        n += 1;
    }
    Ok(&buf[..n])
}

/// `90s`, `1500ms`: for messages, without depending on the client's spelling.
pub(crate) struct DisplayDuration(pub(crate) Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else {
            write!(f, "{}ms", d.as_millis())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(q: &str) -> Result<Option<Duration>, String> {
        client_timeout(Some(q), "timeout", None, ClampPolicy::Clamp)
    }

    #[test]
    fn finds_the_first_exact_key() {
        assert_eq!(
            find_param(Some("a=1&timeout=2s&timeout=3s"), "timeout"),
            Some("2s")
        );
        assert_eq!(find_param(Some("timeouts=1s&xtimeout=2s"), "timeout"), None);
        assert_eq!(find_param(Some("timeout"), "timeout"), Some(""));
        assert_eq!(find_param(None, "timeout"), None);
    }

    #[test]
    fn client_timeouts() {
        assert_eq!(t("timeout=300ms"), Ok(Some(Duration::from_millis(300))));
        assert_eq!(t("timeout=1%2E5s"), Ok(Some(Duration::from_millis(1500))));
        assert_eq!(t("timeout=5%C2%B5s"), Ok(Some(Duration::from_micros(5))));
        assert_eq!(t("q=go"), Ok(None));
        for bad in [
            "timeout=",
            "timeout=-1s",
            "timeout=0",
            "timeout=abc",
            "timeout=%ZZ",
            "timeout=1%2",
            "timeout=%FF%FEs",
        ] {
            let err = t(bad).unwrap_err();
            assert!(
                err.starts_with("invalid `timeout` query parameter: "),
                "{bad}: {err}"
            );
        }
        let huge = format!("timeout={}", "9".repeat(10_000));
        assert!(t(&huge).unwrap_err().contains("too long"));
        let escaped = format!("timeout={}", "%39".repeat(MAX_INPUT_LEN + 1));
        assert!(t(&escaped).unwrap_err().contains("too long"));
        let fits = format!("timeout={}s", "%31".repeat(MAX_INPUT_LEN - 1));
        assert_eq!(
            t(&fits),
            Ok(Some(Duration::MAX)),
            "exactly the buffer's size"
        );
        assert_eq!(
            t("timeout=99999999999999999h"),
            Ok(Some(Duration::MAX)),
            "saturates; the deadline computation then means no practical deadline"
        );
    }

    #[test]
    fn error_messages_never_echo_input() {
        let err = t("timeout=<script>s").unwrap_err();
        assert!(!err.contains("<script>"), "{err}");
    }

    #[test]
    fn max_timeout_policy() {
        let max = Some(Duration::from_secs(60));
        let t = |q: &str, policy| client_timeout(Some(q), "timeout", max, policy);
        assert_eq!(
            t("timeout=2h", ClampPolicy::Clamp),
            Ok(Some(Duration::from_secs(60)))
        );
        assert_eq!(
            t("timeout=99999999999999999h", ClampPolicy::Clamp),
            Ok(Some(Duration::from_secs(60)))
        );
        assert_eq!(
            t("timeout=2h", ClampPolicy::Reject).unwrap_err(),
            "invalid `timeout` query parameter: above the maximum of 60s"
        );
        assert_eq!(
            t("timeout=59s", ClampPolicy::Reject),
            Ok(Some(Duration::from_secs(59)))
        );
    }
}
