//! The `grpc-timeout` codec (`DeadlineHeader::grpc()`): never panics; what decodes re-encodes to a value no longer than it.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tower_reqctx::header::DeadlineHeader;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return; // http refuses it before any codec sees it
    };
    let grpc = DeadlineHeader::grpc();
    if let Ok(d) = grpc.decode(&value) {
        assert!(data.len() <= 9);
        let again = grpc.decode(&grpc.encode(d)).expect("own encoding decodes");
        assert!(again <= d, "{data:?}: {d:?} re-encoded as {again:?}");
    }
});
