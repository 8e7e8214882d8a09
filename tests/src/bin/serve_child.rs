//! A `tower_reqctx::serve` server in a process of its own, for the tests that count its file
//! descriptors with the clients in another process (`tests/tests/scale.rs`).
//!
//! `serve_child [--tls [--max-handshakes N] [--handshake-timeout-ms MS]]`: prints `listening <addr>` on stdout, then
//! serves until killed (or until stdin closes). Routes:
//! - `GET /hello`: `hello`.
//! - `GET /watch`, `POST /hold`: records the connection's end (its remote port and the
//!   connection context's cause) when it comes; `/hold` keeps the request body unread until
//!   then, so only the connection watcher can see the client leave.
//! - `GET /ended/{port}`: waits until the connection from that port ended, answers its cause.
//! - `GET /ended-count/{n}`: waits until `n` connections ended with `ClientDisconnected`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::routing::{get, post};
use reqctx::Cause;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use tower_reqctx::{ConnectionContext, ServerClosed, serve};

#[derive(Clone, Default)]
struct Ended {
    causes: Arc<Mutex<HashMap<u16, String>>>, // by the client's port
    changed: Arc<Notify>,
}

impl Ended {
    fn record(&self, conn: &ConnectionContext) {
        let port = conn.remote_addr().map_or(0, |addr| addr.port());
        let ctx = conn.context().clone();
        let this = self.clone();
        tokio::spawn(async move {
            ctx.cancelled().await;
            let cause = ctx
                .cause()
                .map_or("none".to_owned(), |cause| describe(&cause));
            this.causes.lock().unwrap().insert(port, cause);
            this.changed.notify_waiters();
        });
    }

    /// Waits until `done` holds for the recorded causes.
    async fn until<T>(&self, done: impl Fn(&HashMap<u16, String>) -> Option<T>) -> T {
        loop {
            let changed = self.changed.notified();
            if let Some(value) = done(&self.causes.lock().unwrap()) {
                return value;
            }
            changed.await;
        }
    }
}

fn describe(cause: &Cause) -> String {
    if cause.downcast_ref::<ServerClosed>().is_some() {
        "ServerClosed".to_owned()
    } else {
        format!("{cause:?}")
    }
}

fn connection() -> ConnectionContext {
    ConnectionContext::current().expect("served by tower_reqctx::serve")
}

async fn watch(State(ended): State<Ended>) -> &'static str {
    ended.record(&connection());
    "watching"
}

async fn hold(State(ended): State<Ended>, req: Request) -> &'static str {
    let conn = connection();
    ended.record(&conn);
    conn.context().cancelled().await;
    drop(req);
    "ended"
}

async fn ended(State(ended): State<Ended>, Path(port): Path<u16>) -> String {
    ended.until(|causes| causes.get(&port).cloned()).await
}

async fn ended_count(State(ended): State<Ended>, Path(n): Path<usize>) -> String {
    ended
        .until(|causes| {
            let count = causes
                .values()
                .filter(|cause| *cause == "ClientDisconnected")
                .count();
            (count >= n).then_some(count.to_string())
        })
        .await
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tls = args.iter().any(|arg| arg == "--tls");
    let max_handshakes = args
        .iter()
        .position(|arg| arg == "--max-handshakes")
        .map(|i| args[i + 1].parse::<usize>().unwrap());
    let handshake_timeout = args
        .iter()
        .position(|arg| arg == "--handshake-timeout-ms")
        .map(|i| std::time::Duration::from_millis(args[i + 1].parse().unwrap()));

    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/watch", get(watch))
        .route("/hold", post(hold))
        .route("/ended/{port}", get(ended))
        .route("/ended-count/{n}", get(ended_count))
        .with_state(Ended::default());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", tcp.local_addr()?);

    // Ends with the test process: stdin closes when it exits.
    let parent_gone = async {
        let mut buf = [0; 1];
        let _ = tokio::io::stdin().read(&mut buf).await;
    };
    if tls {
        let mut listener = tower_reqctx::TlsListener::new(tcp, tls_config());
        if let Some(max) = max_handshakes {
            listener = listener.max_handshakes(max);
        }
        if let Some(limit) = handshake_timeout {
            listener = listener.handshake_timeout(limit);
        }
        serve(listener, app)
            .with_graceful_shutdown(parent_gone)
            .await
    } else {
        serve(tcp, app).with_graceful_shutdown(parent_gone).await
    }
}

fn tls_config() -> Arc<tokio_rustls::rustls::ServerConfig> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{ServerConfig, crypto::ring};

    let cert = CertificateDer::from_pem_slice(reqctx_tests::TEST_CERT).unwrap();
    let key = PrivateKeyDer::from_pem_slice(reqctx_tests::TEST_KEY).unwrap();
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    Arc::new(config)
}
