//! A client's own deadline is not a server failure: [`is_client_deadline`] for any
//! middleware that counts failures, and [`ServerErrorsExceptClientDeadlines`] for
//! tower-http's `TraceLayer` (feature `trace`).
//!
//! Both read the [`Cancelled`] in the response's extensions: the layer puts it on the
//! `504` it answers at the deadline, and `Cancelled`'s `IntoResponse` puts it on the
//! answer of a handler that returned it (directly, or through an app error type that
//! delegates to `Cancelled`'s `into_response`).

use http::Response;
use reqctx::{Cancelled, Cause, DeadlineOrigin};

/// Whether `res` answers a deadline the client chose (its `?timeout=`, or a caller's
/// deadline header, `DeadlineExceeded { origin: Query | Header }`), not one of the
/// server's: a `504` the client asked for, which a log or a metric should not count as a
/// server failure.
///
/// True for the layer's own `504` at such a deadline and for a handler's
/// [`Cancelled`] answer with such a cause. An answer the application built itself
/// without delegating to `Cancelled`'s `IntoResponse` carries no cause, and is `false`.
///
/// ```
/// use axum::{Router, middleware::{self, Next}, extract::Request, response::Response};
/// use tower_reqctx::ContextLayer;
///
/// // A middleware outside the ContextLayer that counts server failures.
/// async fn count_failures(req: Request, next: Next) -> Response {
///     let res = next.run(req).await;
///     if res.status().is_server_error() && !tower_reqctx::is_client_deadline(&res) {
///         // count a server failure
///     }
///     res
/// }
///
/// let app: Router = Router::new()
///     .layer(ContextLayer::new())
///     .layer(middleware::from_fn(count_failures));
/// # let _ = app;
/// ```
pub fn is_client_deadline<B>(res: &Response<B>) -> bool {
    res.extensions().get::<Cancelled>().is_some_and(|c| {
        matches!(
            c.cause(),
            Cause::DeadlineExceeded {
                origin: DeadlineOrigin::Query | DeadlineOrigin::Header
            }
        )
    })
}

#[cfg(feature = "trace")]
pub use self::trace::ServerErrorsExceptClientDeadlines;

#[cfg(feature = "trace")]
mod trace {
    use std::fmt;

    use http::Response;
    use tower_http::classify::{
        ClassifiedResponse, ClassifyResponse, NeverClassifyEos, ServerErrorsAsFailures,
        ServerErrorsFailureClass, SharedClassifier,
    };

    /// tower-http's [`ServerErrorsAsFailures`] (a `5xx` is a failure), except for a
    /// response that answers the client's own deadline ([`is_client_deadline`](crate::is_client_deadline)):
    /// that one is a success, so tower-http's `TraceLayer` logs it with its other
    /// responses (`on_response`, at `DEBUG` by default) and not as `ERROR ... response
    /// failed`. The server's own timeout (`origin: Layer`) stays a failure. Feature `trace`.
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tower_http::trace::TraceLayer;
    /// use tower_reqctx::{ContextLayer, ServerErrorsExceptClientDeadlines};
    ///
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "ok" }))
    ///     .layer(ContextLayer::new())
    ///     // In place of TraceLayer::new_for_http():
    ///     .layer(TraceLayer::new(ServerErrorsExceptClientDeadlines::make_classifier()));
    /// # let _ = app;
    /// ```
    #[derive(Clone, Debug, Default)]
    pub struct ServerErrorsExceptClientDeadlines {
        _priv: (),
    }

    impl ServerErrorsExceptClientDeadlines {
        /// The classifier.
        pub fn new() -> ServerErrorsExceptClientDeadlines {
            ServerErrorsExceptClientDeadlines::default()
        }

        /// The classifier as a [`MakeClassifier`](tower_http::classify::MakeClassifier),
        /// for `TraceLayer::new`.
        pub fn make_classifier() -> SharedClassifier<ServerErrorsExceptClientDeadlines> {
            SharedClassifier::new(ServerErrorsExceptClientDeadlines::new())
        }
    }

    impl ClassifyResponse for ServerErrorsExceptClientDeadlines {
        type FailureClass = ServerErrorsFailureClass;
        type ClassifyEos = NeverClassifyEos<ServerErrorsFailureClass>;

        fn classify_response<B>(
            self,
            res: &Response<B>,
        ) -> ClassifiedResponse<Self::FailureClass, Self::ClassifyEos> {
            if crate::is_client_deadline(res) {
                return ClassifiedResponse::Ready(Ok(()));
            }
            ServerErrorsAsFailures::new().classify_response(res)
        }

        fn classify_error<E>(self, error: &E) -> Self::FailureClass
        where
            E: fmt::Display + 'static,
        {
            ServerErrorsAsFailures::new().classify_error(error)
        }
    }
}
