//! The guide's first hour: a handler that takes the request's context, the layer, a logger.

use std::time::Duration;

use axum::{Router, routing::get};
use tower_reqctx::{ContextLayer, ReqCtx, reqctx::Cancelled};
use tracing_subscriber::EnvFilter;

/// Three seconds of slow work that stop at the request's deadline or when the client leaves.
async fn report(ctx: ReqCtx) -> Result<&'static str, Cancelled> {
    tracing::info!("building the report");
    ctx.run(tokio::time::sleep(Duration::from_secs(3))).await?;
    Ok("your report\n")
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // Each request's cause is logged at `debug` under `tower_reqctx` (`trace` for `completed`).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_reqctx=debug"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let app = Router::new()
        .route("/report", get(report))
        .layer(ContextLayer::new().timeout(Duration::from_secs(10)));

    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    tower_reqctx::serve(listener, app).await
}
