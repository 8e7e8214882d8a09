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
/// use tower_reqctx::RequestId;
///
/// let id = RequestId::parse(&http::HeaderValue::from_static("7f3a-01")).unwrap();
/// assert_eq!(id.as_str(), "7f3a-01");
/// assert!(RequestId::parse(&http::HeaderValue::from_static("two words")).is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The longest id accepted, in bytes (a UUID is 36, a ULID 26).
    pub const MAX_LEN: usize = 128;

    /// The id in `value`, if it is 1 to [`MAX_LEN`](RequestId::MAX_LEN) bytes of visible
    /// ASCII (`!` to `~`).
    pub fn parse(value: &HeaderValue) -> Option<RequestId> {
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
