//! `ServeExecutor`: tokio's `spawn` for the tasks hyper starts (one per HTTP/2 stream and
//! per HTTP/2 tunnel), carrying each HTTP/2 tunnel's request owner in the tunnel's task.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use pin_project_lite::pin_project;

use crate::connection::{ConnectionContext, Held, serving, tunnel};

/// The executor [`serve`](crate::serve()) gives hyper: `tokio::spawn`, plus what lets an
/// HTTP/2 tunnel's request context (a WebSocket over HTTP/2, a CONNECT) end with the
/// tunnel's stream rather than with the whole connection. It is the type parameter of the
/// builder that [`Serve::http_builder`](crate::Serve::http_builder) hands you; you need not
/// name it otherwise.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct ServeExecutor;

impl<F> hyper::rt::Executor<F> for ServeExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        // Spawned from the poll of the stream whose answer opened a tunnel: this task is
        // the tunnel's, and carries its owner until it ends.
        let held = tunnel::take();
        // Spawned from the connection's poll: an HTTP/2 stream's task serves a request of
        // that connection, which finds it as the current one.
        let conn = ConnectionContext::current();
        tokio::spawn(Carry { fut, held, conn });
    }
}

pin_project! {
    /// A task of hyper's, and the tunnel owner it carries (dropped when the task ends).
    struct Carry<F> {
        #[pin]
        fut: F,
        held: Option<Held>,
        conn: Option<ConnectionContext>,
    }
}

impl<F: Future> Future for Carry<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let fut = this.fut;
        let out = serving(this.conn, || tunnel::polling(|| fut.poll(cx)));
        if out.is_ready() {
            // The tunnel's stream ended: its owner records the end.
            *this.held = None;
        }
        out
    }
}
