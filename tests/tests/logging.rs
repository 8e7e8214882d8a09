//! An app that logs through the `log` crate (env_logger and the like) and installs no
//! tracing subscriber sees every request's cause: the completion of a 200 at `trace`, the
//! client's `?timeout=` and a client that hung up at `debug`, under every server.
//!
//! This file is its own process, and nothing in it installs a tracing subscriber: tracing
//! forwards to `log` only while none was ever installed (`tests/spans.rs` has one).

use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use reqctx::Cancelled;
use reqctx_tests::{BOUND, Probe, ProbeTx, Running, Server, cause_of, http_get, send};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tower_reqctx::{ContextLayer, ReqCtx};

/// A `log` logger that keeps every record of target `tower_reqctx`.
struct Captured {
    lines: Mutex<Vec<(log::Level, String)>>,
    added: Notify,
}

impl log::Log for Captured {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.target() == "tower_reqctx"
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = record.args().to_string();
            self.lines.lock().unwrap().push((record.level(), line));
            self.added.notify_waiters();
        }
    }

    fn flush(&self) {}
}

static LOGGER: Captured = Captured {
    lines: Mutex::new(Vec::new()),
    added: Notify::const_new(),
};

impl Captured {
    /// Waits (within [`BOUND`]) for a line at `level` containing `needle`, and takes every
    /// line so far, so that the next wait sees only what comes after.
    async fn take_line(&self, level: log::Level, needle: &str) -> String {
        let found = tokio::time::timeout(BOUND, async {
            loop {
                let added = self.added.notified();
                tokio::pin!(added);
                added.as_mut().enable();
                {
                    let mut lines = self.lines.lock().unwrap();
                    if let Some((_, line)) = lines
                        .iter()
                        .find(|(l, line)| *l == level && line.contains(needle))
                    {
                        let line = line.clone();
                        lines.clear();
                        return line;
                    }
                }
                added.await;
            }
        })
        .await;
        let seen = self.lines.lock().unwrap().clone();
        found.unwrap_or_else(|_| panic!("no {level} line with {needle:?} in {seen:?}"))
    }
}

fn app(tx: ProbeTx) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/wait",
            get(move |ctx: ReqCtx| async move {
                tx.send(ctx.0.clone()).unwrap();
                ctx.run(std::future::pending::<()>()).await?;
                Ok::<_, Cancelled>("never")
            }),
        )
        .layer(ContextLayer::new().timeout(Duration::from_secs(30)))
}

async fn hang_up(addr: std::net::SocketAddr, probe: &mut Probe) {
    let mut s = send(addr, b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let ctx = probe.started().await;
    s.shutdown().await.unwrap();
    drop(s);
    let cause = cause_of(&ctx).await;
    assert_eq!(cause, reqctx::Cause::ClientDisconnected);
}

#[tokio::test]
async fn every_cause_reaches_a_log_logger_without_a_tracing_subscriber() {
    log::set_logger(&LOGGER).unwrap();
    log::set_max_level(log::LevelFilter::Trace);

    for server in [Server::Serve, Server::AxumWatched, Server::AxumPlain] {
        let (tx, mut probe) = reqctx_tests::probe();
        let running = Running::start(server, app(tx), BOUND).await;

        let (status, _) = http_get(running.addr, "/").await;
        assert_eq!(status, 200, "{server:?}");
        LOGGER
            .take_line(log::Level::Trace, "request context completed")
            .await;

        let (status, _) = http_get(running.addr, "/wait?timeout=20ms").await;
        assert_eq!(status, 504, "{server:?}");
        probe.started().await;
        let line = LOGGER
            .take_line(log::Level::Debug, "request context cancelled")
            .await;
        assert!(
            line.contains("kind=deadline_exceeded"),
            "{server:?}: {line}"
        );
        assert!(line.contains("query"), "{server:?}: {line}");

        hang_up(running.addr, &mut probe).await;
        let line = LOGGER
            .take_line(log::Level::Debug, "request context cancelled")
            .await;
        assert_eq!(
            line, "request context cancelled cause=client disconnected kind=client_disconnected",
            "{server:?}"
        );
        running.abort();
    }
    // The point of this file: tracing forwarded to `log` because nobody installed a
    // subscriber.
    assert!(!tracing::dispatcher::has_been_set());
}
