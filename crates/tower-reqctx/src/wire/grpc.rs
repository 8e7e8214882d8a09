//! The gRPC statuses the layer answers with, how it tells a gRPC request, and how a status
//! is written on each of gRPC's wires (HTTP/2 trailers, or grpc-web's trailer frame).

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use reqctx::Cause;

/// `DEADLINE_EXCEEDED`.
pub(crate) const DEADLINE_EXCEEDED: u8 = 4;
/// `INVALID_ARGUMENT`: a `grpc-timeout` that does not decode.
pub(crate) const INVALID_ARGUMENT: u8 = 3;
/// `UNAVAILABLE`: the server is shutting down.
const UNAVAILABLE: u8 = 14;

/// The gRPC status of a cause the client can still be told about.
pub(crate) fn status(cause: &Cause) -> Option<(u8, &'static str)> {
    match cause {
        Cause::DeadlineExceeded { .. } => Some((DEADLINE_EXCEEDED, "deadline exceeded")),
        Cause::Shutdown => Some((UNAVAILABLE, "server shutting down")),
        _ => None,
    }
}

/// Which of gRPC's wires a message travels on: where its status goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    /// `application/grpc`: the status in HTTP trailers (HTTP/2).
    Grpc,
    /// `application/grpc-web`: the status in a trailer frame at the end of the body (flag
    /// `0x80`), since HTTP/1 drops trailers.
    Web,
    /// `application/grpc-web-text`: the same, base64-encoded.
    WebText,
}

impl Wire {
    /// The wire of a request or response, from its `content-type` (`application/grpc`,
    /// `application/grpc+proto`, `application/grpc-web-text+proto`, ...).
    pub(crate) fn of(content_type: Option<&HeaderValue>) -> Option<Wire> {
        let rest = content_type?.as_bytes().strip_prefix(b"application/grpc")?;
        let subtype_end = |r: &[u8]| r.is_empty() || r[0] == b'+' || r[0] == b';';
        if let Some(r) = rest.strip_prefix(b"-web-text") {
            return subtype_end(r).then_some(Wire::WebText);
        }
        if let Some(r) = rest.strip_prefix(b"-web") {
            return subtype_end(r).then_some(Wire::Web);
        }
        subtype_end(rest).then_some(Wire::Grpc)
    }

    /// The `content-type` of the layer's own answers on this wire.
    pub(crate) fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Wire::Grpc => "application/grpc",
            Wire::Web => "application/grpc-web+proto",
            Wire::WebText => "application/grpc-web-text+proto",
        })
    }
}

/// The status as HTTP trailers (or trailers-only headers).
pub(crate) fn trailers(code: u8, message: &'static str) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    trailers.insert("grpc-message", HeaderValue::from_static(message));
    trailers
}

/// The status as grpc-web's trailer frame: flag `0x80`, a 4-byte big-endian length, then
/// the trailers as HTTP/1 header lines; base64-encoded for `grpc-web-text`. `message` is
/// printable ASCII.
pub(crate) fn web_trailer_frame(wire: Wire, code: u8, message: &'static str) -> Bytes {
    let block = format!("grpc-status:{code}\r\ngrpc-message:{message}\r\n");
    let mut frame = BytesMut::with_capacity(5 + block.len());
    frame.put_u8(0x80);
    frame.put_u32(block.len() as u32);
    frame.put_slice(block.as_bytes());
    match wire {
        Wire::WebText => Bytes::from(base64(&frame)),
        _ => frame.freeze(),
    }
}

/// Standard base64 with padding (grpc-web-text's alphabet), for the few bytes of a
/// trailer frame.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wires_by_content_type() {
        let of = |s: &'static str| Wire::of(Some(&HeaderValue::from_static(s)));
        assert_eq!(of("application/grpc"), Some(Wire::Grpc));
        assert_eq!(of("application/grpc+proto"), Some(Wire::Grpc));
        assert_eq!(of("application/grpc-web"), Some(Wire::Web));
        assert_eq!(of("application/grpc-web+proto"), Some(Wire::Web));
        assert_eq!(of("application/grpc-web-text"), Some(Wire::WebText));
        assert_eq!(of("application/grpc-web-text+proto"), Some(Wire::WebText));
        assert_eq!(of("application/grpcx"), None);
        assert_eq!(of("application/json"), None);
        assert_eq!(Wire::of(None), None);
    }

    #[test]
    fn base64_matches_the_standard_vectors() {
        // RFC 4648, section 10.
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn a_web_trailer_frame() {
        let frame = web_trailer_frame(Wire::Web, 4, "deadline exceeded");
        let block = b"grpc-status:4\r\ngrpc-message:deadline exceeded\r\n";
        assert_eq!(frame[0], 0x80);
        assert_eq!(&frame[1..5], &(block.len() as u32).to_be_bytes());
        assert_eq!(&frame[5..], block);
        let text = web_trailer_frame(Wire::WebText, 4, "deadline exceeded");
        assert_eq!(&text[..], base64(&frame).as_bytes());
    }
}
