//! Binding reqwest requests to a context (feature `reqwest`).

use ::reqwest::{RequestBuilder, Response};
use reqctx::{Cancelled, Context};

use super::error::{ClientError, cancelled, exceeded_downstream};
use super::propagation::{Plan, Propagation};

/// Binds a reqwest request to a [`Context`]: `.context(&ctx).send()`.
///
/// ```no_run
/// use tower_reqctx::propagate::{ClientError, ReqwestContextExt};
/// use tower_reqctx::reqctx::Context;
///
/// async fn stock(client: &reqwest::Client, ctx: &Context) -> Result<String, ClientError<reqwest::Error>> {
///     let res = client
///         .get("http://inventory.internal/stock")
///         .context(ctx)
///         .send()
///         .await?;
///     // reqwest's own timeout (the context's remaining time) bounds the body too.
///     res.text().await.map_err(ClientError::Inner)
/// }
/// # let _ = stock;
/// ```
pub trait ReqwestContextExt {
    /// Binds the request to `ctx`, with the default [`Propagation`].
    fn context(self, ctx: &Context) -> ContextRequestBuilder;
}

impl ReqwestContextExt for RequestBuilder {
    fn context(self, ctx: &Context) -> ContextRequestBuilder {
        ContextRequestBuilder {
            builder: self,
            ctx: ctx.clone(),
            propagation: Propagation::new(),
        }
    }
}

/// A reqwest request bound to a context, made by [`ReqwestContextExt::context`].
#[derive(Debug)]
#[must_use = "a request does nothing until it is sent"]
pub struct ContextRequestBuilder {
    builder: RequestBuilder,
    ctx: Context,
    propagation: Propagation,
}

impl ContextRequestBuilder {
    /// Propagates as `propagation` says instead of the default.
    pub fn propagation(mut self, propagation: Propagation) -> ContextRequestBuilder {
        self.propagation = propagation;
        self
    }

    /// Sends the request, bound to the context, as
    /// `ContextClient` does (see the [module docs](super)):
    ///
    /// - fails at once, sending nothing, when the context is cancelled or has no more than
    ///   the margin left;
    /// - sends the remaining budget minus the margin in the deadline header, replacing any
    ///   value of that header set on the builder;
    /// - sets reqwest's own [timeout](::reqwest::RequestBuilder::timeout) to the context's
    ///   remaining time (or keeps a shorter one set on the builder), which also bounds
    ///   reading the response body after `send` returns;
    /// - aborts the request when the context is cancelled in flight, with the context's
    ///   cause;
    /// - turns an answer that says the deadline passed downstream into
    ///   `Cancelled` with `DeadlineExceeded { origin }`, the origin of the context's own
    ///   deadline (the budget that ran out was the context's).
    ///
    /// # Cancellation safety
    ///
    /// Dropping the future aborts the request.
    pub async fn send(self) -> Result<Response, ClientError<::reqwest::Error>> {
        let ContextRequestBuilder {
            builder,
            ctx,
            propagation,
        } = self;
        let (header, remaining) = match propagation.plan(&ctx) {
            Plan::Cancelled(cause) => return Err(ClientError::Cancelled(Cancelled::new(cause))),
            Plan::Spent => {
                ctx.cancelled().await;
                return Err(ClientError::Cancelled(cancelled(&ctx)));
            }
            Plan::Send { header, remaining } => (header, remaining),
        };
        let (client, req) = builder.build_split();
        let mut req = req.map_err(ClientError::Inner)?;
        propagation.set_header(req.headers_mut(), header);
        if let Some(remaining) = remaining {
            let timeout = req.timeout_mut();
            *timeout = Some(timeout.map_or(remaining, |t| t.min(remaining)));
        }
        match ctx.run(client.execute(req)).await {
            Err(c) => Err(ClientError::Cancelled(c)),
            // reqwest's timer and the context's deadline are the same instant give or take
            // a few microseconds: whichever fired, the cause is the context's.
            Ok(Err(e)) if e.is_timeout() && ctx.is_cancelled() => {
                Err(ClientError::Cancelled(cancelled(&ctx)))
            }
            Ok(Err(e)) => Err(ClientError::Inner(e)),
            Ok(Ok(res)) if propagation.is_deadline_exceeded(res.status(), res.headers()) => {
                Err(ClientError::Cancelled(exceeded_downstream(&ctx)))
            }
            Ok(Ok(res)) => Ok(res),
        }
    }
}
