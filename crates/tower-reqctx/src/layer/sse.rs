//! [`sse()`]: server-sent events that end with the request's context.

use axum::response::sse::{Event, Sse};
use futures_core::Stream;
use reqctx::{Bound, Context};

/// A server-sent event response whose event stream ends when `ctx` is cancelled: the
/// client left (the connection watcher sees it even while the stream is idle, waiting for
/// its next event), the deadline passed, or the server shuts down. Feature `axum`.
///
/// It is [`Sse::new`] over [`ctx.bind(stream)`](Context::bind): the stream is not polled
/// again once the context is cancelled. Configure keep-alive comments on the result with
/// [`Sse::keep_alive`].
///
/// How the response ends:
/// - With a context of your own (not the request's), it ends cleanly when that context is
///   cancelled: the last chunk goes out, and an `EventSource` client reconnects as after
///   any end.
/// - Under [`ContextLayer`](crate::ContextLayer), with the request's context, a
///   cancellation while the stream is open cuts the body with an error, whatever the
///   cause: the deadline, and the server's shutdown too (`serve`'s drain period ended). The
///   client sees the stream cut, not ended (HTTP/1: no last chunk; HTTP/2: a stream reset);
///   an `EventSource` client reconnects after its retry delay either way. Give long-lived
///   event routes [`RouteTimeout::none`](crate::RouteTimeout::none), so that only the client
///   or a shutdown ends them.
///
/// ```
/// use std::convert::Infallible;
/// use axum::response::IntoResponse;
/// use axum::response::sse::{Event, KeepAlive};
/// use futures_core::Stream;
/// use tower_reqctx::ReqCtx;
///
/// # #[allow(dead_code)]
/// async fn events(ctx: ReqCtx) -> impl IntoResponse {
///     # let updates = tokio::sync::mpsc::unbounded_channel::<String>().1;
///     // `updates`: a channel of messages for this client.
///     let stream = Updates(updates);
///     tower_reqctx::sse(&ctx, stream).keep_alive(KeepAlive::default())
/// }
/// # struct Updates(tokio::sync::mpsc::UnboundedReceiver<String>);
/// # impl Stream for Updates {
/// #     type Item = Result<Event, Infallible>;
/// #     fn poll_next(
/// #         mut self: std::pin::Pin<&mut Self>,
/// #         cx: &mut std::task::Context<'_>,
/// #     ) -> std::task::Poll<Option<Self::Item>> {
/// #         self.0.poll_recv(cx).map(|m| m.map(|m| Ok(Event::default().data(m))))
/// #     }
/// # }
/// ```
pub fn sse<S, E>(ctx: &Context, stream: S) -> Sse<Bound<S>>
where
    S: Stream<Item = Result<Event, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Sse::new(ctx.bind(stream))
}
