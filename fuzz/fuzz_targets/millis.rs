//! `decode_millis`: never panics; what decodes re-encodes to exactly the same value.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tower_reqctx::propagate::header::{decode_millis, encode_millis};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    if let Ok(d) = decode_millis(&value) {
        assert!(data.len() <= 19 && data.iter().all(u8::is_ascii_digit));
        assert_eq!(decode_millis(&encode_millis(d)), Ok(d));
    }
});
