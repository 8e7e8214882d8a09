//! The values the layer puts in a request's context.

use http::HeaderValue;

/// The request's id, a value of the request's context with
/// [`ContextLayer::request_id`](crate::ContextLayer::request_id): the request's id header,
/// when it holds an id the layer trusts in logs (1 to [`MAX_LEN`](RequestId::MAX_LEN)
/// bytes of visible ASCII, no spaces).
///
/// The layer makes no ids: a proxy in front, or tower-http's `SetRequestIdLayer` outside
/// the layer (with `MakeRequestUuid`), sets the header. A client's id that fails the check
/// is not put in the context.
///
/// ```
/// use tower_reqctx::{ReqCtx, RequestId};
///
/// async fn handler(ctx: ReqCtx) -> String {
///     let id = ctx.value::<RequestId>().map_or("-", RequestId::as_str);
///     format!("request {id}")
/// }
/// # let _ = handler;
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The longest id accepted, in bytes (a UUID is 36, a ULID 26).
    pub const MAX_LEN: usize = 128;

    /// The id in `value`, if it is 1 to [`MAX_LEN`](RequestId::MAX_LEN) bytes of visible
    /// ASCII (`!` to `~`).
    pub(crate) fn parse(value: &HeaderValue) -> Option<RequestId> {
        let bytes = value.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= RequestId::MAX_LEN
            && bytes.iter().all(|b| b.is_ascii_graphic());
        valid.then(|| RequestId(value.clone()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        // Checked by `parse`: visible ASCII only.
        self.0.to_str().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_visible_ascii_up_to_max_len_is_an_id() {
        let parse = |s: &str| RequestId::parse(&HeaderValue::from_str(s).unwrap());
        assert_eq!(parse("7f3a-01").unwrap().as_str(), "7f3a-01");
        assert!(parse("").is_none());
        assert!(parse("two words").is_none());
        assert!(parse("tab\there").is_none());
        assert!(parse(&"x".repeat(RequestId::MAX_LEN)).is_some());
        assert!(parse(&"x".repeat(RequestId::MAX_LEN + 1)).is_none());
        let latin1 = HeaderValue::from_bytes(b"caf\xe9").unwrap();
        assert!(RequestId::parse(&latin1).is_none());
    }
}
