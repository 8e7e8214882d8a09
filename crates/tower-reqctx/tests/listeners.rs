//! `serve` over a Unix domain socket and over TLS: a client that leaves mid-handler ends the
//! handler's request context with `ClientDisconnected`, seen by the connection watcher (the
//! handler never reads the request body, so hyper does not read the connection).
#![cfg(all(feature = "axum", unix))]

use std::future::IntoFuture;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::routing::post;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower_reqctx::reqctx::Cause;
use tower_reqctx::{ConnectionContext, ContextLayer, ReqCtx, serve};

use reqctx_test_support::BOUND;

/// What the handler saw: whether the request had a `ConnectInfo<SocketAddr>` and a remote
/// address; then, from a task of its own, its context's cause.
#[derive(Debug)]
enum Report {
    Started { connect_info: bool, remote: bool },
    Cause(Option<Cause>),
}

/// An app whose `/wait` handler reports, then waits for its request context, holding the
/// request body unread.
fn app() -> (Router, mpsc::UnboundedReceiver<Report>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = move |ctx: ReqCtx, req: Request| {
        let tx = tx.clone();
        async move {
            let ext = req.extensions();
            // `serve` makes it current; `WatchedListener` under `axum::serve` puts it in
            // `ConnectInfo`.
            let remote = ConnectionContext::current()
                .or_else(|| {
                    ext.get::<ConnectInfo<ConnectionContext>>()
                        .map(|c| c.0.clone())
                })
                .expect("no ConnectionContext")
                .remote_addr()
                .is_some();
            let connect_info = ext.get::<ConnectInfo<std::net::SocketAddr>>().is_some();
            let ctx = ctx.0;
            let cause_tx = tx.clone();
            let waiter = ctx.clone();
            tokio::spawn(async move {
                waiter.cancelled().await;
                let _ = cause_tx.send(Report::Cause(waiter.cause()));
            });
            let _ = tx.send(Report::Started {
                connect_info,
                remote,
            });
            ctx.cancelled().await;
            drop(req);
            "cancelled"
        }
    };
    let router = Router::new()
        .route("/wait", post(handler))
        .layer(ContextLayer::new().timeout(Duration::from_secs(60)));
    (router, rx)
}

async fn next(reports: &mut mpsc::UnboundedReceiver<Report>) -> Report {
    timeout(BOUND, reports.recv())
        .await
        .expect("no report within the bound")
        .expect("the app is gone")
}

/// Sends a POST to `/wait` on `io` that announces 100,000 body bytes and sends 1,000, waits
/// for the handler, drops the connection, and returns what the handler reported.
async fn disconnect_mid_handler<I>(
    mut io: I,
    reports: &mut mpsc::UnboundedReceiver<Report>,
) -> (bool, bool, Option<Cause>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(b"POST /wait HTTP/1.1\r\nhost: test\r\ncontent-length: 100000\r\n\r\n")
        .await
        .unwrap();
    io.write_all(&[b'x'; 1000]).await.unwrap();
    io.flush().await.unwrap();
    let Report::Started {
        connect_info,
        remote,
    } = next(reports).await
    else {
        panic!("expected the handler to start");
    };
    drop(io);
    let Report::Cause(cause) = next(reports).await else {
        panic!("expected a cause");
    };
    (connect_info, remote, cause)
}

#[tokio::test]
async fn unix_socket_client_leaving_is_client_disconnected() {
    let dir = std::env::temp_dir().join(format!("tower-reqctx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("unix.sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (router, mut reports) = app();
    let server = serve(listener, router).connect_info(true); // asked for, but none to give
    assert_eq!(
        server.local_addr().unwrap().as_pathname(),
        Some(path.as_path())
    );
    let task = tokio::spawn(server.into_future());

    let client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (connect_info, remote, cause) = disconnect_mid_handler(client, &mut reports).await;
    assert!(
        !connect_info,
        "a Unix socket has no ConnectInfo<SocketAddr>"
    );
    assert!(!remote, "a Unix socket has no remote SocketAddr");
    assert_eq!(cause, Some(Cause::ClientDisconnected));

    task.abort();
    let _ = std::fs::remove_file(&path);
}

#[cfg(feature = "tls")]
mod tls {
    use std::sync::Arc;

    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
    use tokio_rustls::{TlsConnector, rustls::crypto::ring};
    use tower_reqctx::TlsListener;

    use super::*;

    const CERT: &[u8] = include_bytes!("data/cert.pem");
    const KEY: &[u8] = include_bytes!("data/key.pem");

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(ring::default_provider())
    }

    fn server_config() -> Arc<ServerConfig> {
        let cert = CertificateDer::from_pem_slice(CERT).unwrap();
        let key = PrivateKeyDer::from_pem_slice(KEY).unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    fn connector() -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CERT).unwrap())
            .unwrap();
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    #[tokio::test]
    async fn tls_client_leaving_is_client_disconnected() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (router, mut reports) = app();
        let server = serve(TlsListener::new(tcp, server_config()), router).connect_info(true);
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.into_future());

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = connector().connect(name, tcp).await.unwrap();
        let (connect_info, remote, cause) = disconnect_mid_handler(client, &mut reports).await;
        assert!(connect_info, "TLS over TCP has ConnectInfo<SocketAddr>");
        assert!(remote);
        assert_eq!(cause, Some(Cause::ClientDisconnected));

        task.abort();
    }

    /// `TlsListener` is an `axum::serve` listener too; under `WatchedListener` the watcher
    /// sees the TLS client leave while the handler holds the body unread.
    #[tokio::test]
    async fn axum_serve_over_a_watched_tls_listener_sees_the_client_leave() {
        use tower_reqctx::WatchedListener;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (router, mut reports) = app();
        let listener = WatchedListener::new(TlsListener::new(tcp, server_config()));
        let task = tokio::spawn(
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<ConnectionContext>(),
            )
            .into_future(),
        );

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = connector().connect(name, tcp).await.unwrap();
        let (_, remote, cause) = disconnect_mid_handler(client, &mut reports).await;
        assert!(
            remote,
            "the peer's address reaches the connection's context"
        );
        assert_eq!(cause, Some(Cause::ClientDisconnected));

        task.abort();
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_the_handshakes_of_others() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (router, mut reports) = app();
        let server = serve(TlsListener::new(tcp, server_config()), router);
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.into_future());

        // Connects and never says a word.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = timeout(BOUND, connector().connect(name, tcp))
            .await
            .expect("the handshake was held up")
            .unwrap();
        let (_, _, cause) = disconnect_mid_handler(client, &mut reports).await;
        assert_eq!(cause, Some(Cause::ClientDisconnected));

        task.abort();
    }
}
