//! `IntoResponse` for [`Cancelled`] (feature `axum`).

use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderValue};

use crate::cause::{Cancelled, Cause};

/// nginx's "client closed request": nobody reads it, but logs and metrics do.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// `x-reqctx-deadline: exceeded` on a 504 for a deadline (tower-reqctx's
/// `header::X_REQCTX_DEADLINE`, spelled here: this crate does not depend on it).
const DEADLINE_MARKER: http::HeaderName = http::HeaderName::from_static("x-reqctx-deadline");

impl Cancelled {
    /// The status [`IntoResponse`] answers with: 504 for a deadline, 503 for a shutdown,
    /// 499 for a client that is gone, 500 otherwise.
    pub fn status(&self) -> StatusCode {
        match self.cause() {
            Cause::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            Cause::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            Cause::ClientDisconnected => StatusCode::from_u16(CLIENT_CLOSED_REQUEST)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A one-line plain-text answer naming the cause, with [`Cancelled::status`]; a deadline's
/// 504 also carries `x-reqctx-deadline: exceeded`, so a caller can tell it from a gateway's.
///
/// A custom cause's text is the application's own and is not shown to the client: the
/// body then says only `request cancelled`. The response's extensions carry the
/// `Cancelled`, so tower-reqctx's layer ends the request's context with its cause.
impl IntoResponse for Cancelled {
    fn into_response(self) -> Response {
        let mut res = (self.status(), self.answer_text()).into_response();
        let headers = res.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(self.cause(), Cause::DeadlineExceeded { .. }) {
            // tower-reqctx's outbound clients read this as "the budget ran out downstream",
            // as opposed to some gateway's own timeout.
            headers.insert(DEADLINE_MARKER, HeaderValue::from_static("exceeded"));
        }
        // tower-reqctx's layer ends the request's context with this cause, not `Completed`.
        res.extensions_mut().insert(self);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeadlineOrigin;

    #[test]
    fn statuses() {
        let s = |c: Cause| Cancelled::new(c).into_response().status().as_u16();
        assert_eq!(
            s(Cause::DeadlineExceeded {
                origin: DeadlineOrigin::Query
            }),
            504
        );
        assert_eq!(s(Cause::Shutdown), 503);
        let res = Cancelled::new(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Header,
        })
        .into_response();
        assert_eq!(res.headers()["x-reqctx-deadline"], "exceeded");
        let res = Cancelled::new(Cause::Shutdown).into_response();
        assert!(res.headers().get("x-reqctx-deadline").is_none());
        assert_eq!(s(Cause::ClientDisconnected), 499);
        assert_eq!(s(Cause::Completed), 500);
        assert_eq!(s(Cause::Cancelled), 500);
    }
}
