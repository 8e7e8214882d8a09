//! `parse_duration_bytes`: never panics, answers within its bounds, and agrees with the
//! `&str` entry point.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_reqctx::duration::{
    MAX_INPUT_LEN, ParseDurationError, parse_duration, parse_duration_bytes,
};

fuzz_target!(|data: &[u8]| {
    let result = parse_duration_bytes(data);
    match &result {
        Ok(d) => {
            assert!(!d.is_zero(), "Ok(0) for {data:?}");
            assert!(data.len() <= MAX_INPUT_LEN);
            assert_ne!(
                data.first(),
                Some(&b'-'),
                "a negative input parsed: {data:?}"
            );
        }
        Err(ParseDurationError::TooLong) => assert!(data.len() > MAX_INPUT_LEN),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if data.len() > MAX_INPUT_LEN {
        assert_eq!(result, Err(ParseDurationError::TooLong));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        assert_eq!(parse_duration(s), result);
    }
    // A leading `-` on a valid positive duration is `Negative`, never anything else.
    if result.is_ok() && data.first() != Some(&b'+') && data.len() < MAX_INPUT_LEN {
        let mut neg = Vec::with_capacity(data.len() + 1);
        neg.push(b'-');
        neg.extend_from_slice(data);
        assert_eq!(
            parse_duration_bytes(&neg),
            Err(ParseDurationError::Negative)
        );
    }
});
