//! The guide's next step after the first hour: each request's cause in its span, a client's
//! own deadline that is not an `ERROR`, the layers' order, and an app error type.

// [guide:app-error]
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tower_reqctx::{ReqCtx, reqctx::Cancelled};

/// The app's error type. A `Cancelled` answers for itself: its status, its
/// `x-reqctx-deadline` header, and the cause that the layer and the classifier read.
enum AppError {
    Cancelled(Cancelled),
    NotFound,
}

impl From<Cancelled> for AppError {
    fn from(cancelled: Cancelled) -> AppError {
        AppError::Cancelled(cancelled)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Cancelled(cancelled) => cancelled.into_response(),
            AppError::NotFound => (StatusCode::NOT_FOUND, "no such report\n").into_response(),
        }
    }
}

/// Three seconds of slow work; `?` turns a `Cancelled` into an `AppError`.
async fn report(ctx: ReqCtx, Path(id): Path<u32>) -> Result<String, AppError> {
    if id == 0 {
        return Err(AppError::NotFound);
    }
    tracing::info!("building report {id}");
    ctx.run(tokio::time::sleep(std::time::Duration::from_secs(3)))
        .await?;
    Ok(format!("report {id}\n"))
}
// [/guide:app-error]

// [guide:layers]
use std::time::Duration;

use axum::http::Request;
use axum::{Router, routing::get};
use tower::ServiceBuilder;
use tower_http::trace::TraceLayer;
use tower_reqctx::{ContextLayer, ServerErrorsExceptClientDeadlines};

fn app() -> Router {
    // The request's span declares `cause`: the ContextLayer fills it when the context ends.
    // The classifier keeps a client's own `?timeout=` (or deadline header) from being an ERROR.
    let trace = TraceLayer::new(ServerErrorsExceptClientDeadlines::make_classifier())
        .make_span_with(|req: &Request<_>| {
            tracing::info_span!(
                "request",
                method = %req.method(),
                uri = %req.uri(),
                cause = tracing::field::Empty,
            )
        });
    let context = ContextLayer::new()
        .timeout(Duration::from_secs(10))
        .grace(Duration::from_millis(50)); // the handler answers for itself (AppError)

    Router::new()
        .route("/reports/{id}", get(report))
        // ServiceBuilder: the first layer is the outermost. TraceLayer, then ContextLayer.
        .layer(ServiceBuilder::new().layer(trace).layer(context))
    // The same with Router::layer, where the last call is the outermost:
    //     .layer(context)
    //     .layer(trace)
}
// [/guide:layers]

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // [guide:logger]
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::format::FmtSpan;

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=debug,tower_reqctx=debug"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::CLOSE) // a line when each request's span closes, with its cause
        .init();
    // [/guide:logger]

    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    tower_reqctx::serve(listener, app()).await
}
