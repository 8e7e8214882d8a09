//! `decode_grpc_timeout`: never panics; what decodes re-encodes to a value no longer than it.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tower_reqctx::propagate::header::{decode_grpc_timeout, encode_grpc_timeout};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return; // http refuses it before any codec sees it
    };
    if let Ok(d) = decode_grpc_timeout(&value) {
        assert!(data.len() <= 9);
        let again = decode_grpc_timeout(&encode_grpc_timeout(d)).expect("own encoding decodes");
        assert!(again <= d, "{data:?}: {d:?} re-encoded as {again:?}");
    }
});
