//! The milliseconds codec (`DeadlineHeader::millis`): never panics; what decodes re-encodes to exactly the same value.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tower_reqctx::header::{DeadlineHeader, REQUEST_TIMEOUT_MS};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let millis = DeadlineHeader::millis(REQUEST_TIMEOUT_MS);
    if let Ok(d) = millis.decode(&value) {
        assert!(data.len() <= 19 && data.iter().all(u8::is_ascii_digit));
        assert_eq!(millis.decode(&millis.encode(d)), Ok(d));
    }
});
