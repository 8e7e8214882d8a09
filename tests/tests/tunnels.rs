//! HTTP/2 tunnels (a WebSocket over HTTP/2: extended CONNECT) each end their context with
//! their own stream, and a connection that carries many never accumulates them. Its own
//! test binary: it counts the process's live request contexts.

use bytes::Bytes;
use reqctx::Cause;
use reqctx_tests::{BOUND, Running, Server, cause_of, h2_client, probe};
use tower_reqctx::live_request_contexts;

/// One masked WebSocket text frame "hi", and its unmasked echo.
const HI: &[u8] = &[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
const HI_ECHO: &[u8] = &[0x81, 2, b'h', b'i'];

/// Opens a WebSocket tunnel on `h2`: the request's stream and the response's body.
async fn open(
    h2: &mut h2::client::SendRequest<Bytes>,
    addr: std::net::SocketAddr,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    let mut req = http::Request::connect(format!("http://{addr}/ws"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let ready = h2.clone().ready().await.unwrap();
    *h2 = ready;
    let (res, send) = h2.send_request(req, false).unwrap();
    let res = tokio::time::timeout(BOUND, res).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    (send, res.into_body())
}

/// One test in this binary: it counts the process's live request contexts, which another
/// test running beside it would change.
#[tokio::test]
async fn http2_tunnels_end_with_their_streams_and_never_accumulate() {
    each_http2_tunnel_ends_its_context_with_its_stream().await;
    under_axum_serve_an_http2_tunnel_ends_at_its_answer().await;
}

async fn each_http2_tunnel_ends_its_context_with_its_stream() {
    let before = live_request_contexts();
    let (tx, mut probe) = probe();
    let running = Running::start(Server::Serve, reqctx_tests::ws_echo_app(tx), BOUND).await;
    let (mut h2, conn) = h2_client(running.addr).await;
    for i in 0..100 {
        let (mut send, mut body) = open(&mut h2, running.addr).await;
        let ctx = probe.started().await;
        send.send_data(Bytes::from_static(HI), false).unwrap();
        let echo = tokio::time::timeout(BOUND, body.data())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&echo[..], HI_ECHO);
        assert_eq!(ctx.cause(), None, "tunnel {i}: open, past the 200");
        if i % 2 == 0 {
            // The client ends its side: the WebSocket ends, so does its tunnel.
            send.send_data(Bytes::new(), true).unwrap();
        } else {
            // The client resets the tunnel's stream, the connection kept.
            send.send_reset(h2::Reason::CANCEL);
        }
        // The tunnel's stream ended, the connection did not: hyper does not say why a
        // tunnel's stream ended, so a reset reads Completed too (see the lifecycle docs).
        assert_eq!(cause_of(&ctx).await, Cause::Completed, "tunnel {i}");
        drop((send, body));
    }
    // The connection is still open and holds none of them.
    assert_eq!(
        live_request_contexts(),
        before,
        "the connection kept tunnels"
    );
    drop(h2);
    conn.abort();
    running.abort();
}

/// Under `axum::serve` + `WatchedListener` no task of ours holds an HTTP/2 tunnel: its
/// context ends at the 200, as under plain `axum::serve`, and never accumulates on the
/// connection.
async fn under_axum_serve_an_http2_tunnel_ends_at_its_answer() {
    let (tx, mut probe) = probe();
    let running = Running::start(Server::AxumWatched, reqctx_tests::ws_echo_app(tx), BOUND).await;
    let (mut h2, conn) = h2_client(running.addr).await;
    let mut tunnels = Vec::new();
    for _ in 0..10 {
        tunnels.push(open(&mut h2, running.addr).await);
        assert_eq!(cause_of(&probe.started().await).await, Cause::Completed);
    }
    drop((tunnels, h2));
    conn.abort();
    running.abort();
}
