//! `--serve` mode's access log: one line per request with its method, path, status, the
//! cause its context ended with, and the latency.
//!
//! The status and the cause arrive in either order, from two places:
//!
//! - the status, in `outer`, outside the `ContextLayer`, which sees every answer,
//!   including the layer's own 400 and 504 that the handler never makes;
//! - the cause, from `on_cancel` on the request's context, registered by `inner`, inside
//!   the layer (where the context exists). A plain response's context ends right after
//!   the status is known (its body has been sent); a deadline ends it before.
//!
//! The line is printed once both are known. A request the layer refused (a bad
//! `?timeout=`) never had a context: its line has no cause. A client that left before
//! the answer has no status: hyper dropped the response.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use crate::describe;

/// One request's line, filled from both ends.
#[derive(Debug)]
struct Line {
    method: String,
    path: String,
    start: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    status: Option<String>, // `-` when no answer went out
    cause: Option<String>,
    has_context: bool, // `inner` ran: a cause will come
    printed: bool,
}

impl Line {
    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap();
        f(&mut s);
        let done = s.status.is_some() && (s.cause.is_some() || !s.has_context);
        if done && !s.printed {
            s.printed = true;
            println!(
                "{:<6} {:<48} {:>6}  {:<28} {:>8}",
                self.method,
                self.path,
                s.status.as_deref().unwrap_or("-"),
                s.cause.as_deref().unwrap_or("- (no context: refused)"),
                crate::page::human_ms(self.start.elapsed().as_secs_f64() * 1e3),
            );
        }
    }
}

/// Sets the status to `-` if the answer never went out (the future was dropped).
struct NoAnswer(Arc<Line>);

impl Drop for NoAnswer {
    fn drop(&mut self) {
        self.0.update(|s| {
            s.status.get_or_insert_with(|| "-".to_owned());
        });
    }
}

/// Outside the `ContextLayer`: starts the line and records the status.
pub(crate) async fn outer(mut req: Request, next: Next) -> Response {
    let line = Arc::new(Line {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.to_string()),
        start: Instant::now(),
        state: Mutex::default(),
    });
    req.extensions_mut().insert(line.clone());
    let guard = NoAnswer(line.clone());
    let res = next.run(req).await;
    line.update(|s| s.status = Some(res.status().as_u16().to_string()));
    drop(guard);
    res
}

/// Inside the `ContextLayer`: waits for the request's context to end.
pub(crate) async fn inner(req: Request, next: Next) -> Response {
    let line = req.extensions().get::<Arc<Line>>().cloned();
    if let (Some(line), Some(ctx)) = (line, tower_reqctx::request_context()) {
        line.update(|s| s.has_context = true);
        ctx.on_cancel(move |cause| {
            line.update(|s| s.cause = Some(describe(Some(cause))));
        });
    }
    next.run(req).await
}
