//! A raw HTTP/1.1 test client over real sockets, in the spirit of axum's `TestClient`:
//! start a server on 127.0.0.1, connect to it, send requests written by hand, read the
//! answer.
//!
//! It depends on tokio alone, and on none of the workspace's crates, so that every test of
//! the workspace can use it: `tower-reqctx`'s and `reqctx-postgres`'s as a
//! dev-dependency, `reqctx-tests` as a dependency. (A support crate that depended on
//! `tower-reqctx` could not be a dev-dependency of `tower-reqctx`: its tests would see
//! two copies of the crate's types.) Servers are started by each test's own code, with
//! [`spawn_server`].

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long a test waits for something that should happen at once before it fails.
pub const BOUND: Duration = Duration::from_secs(5);

/// Binds a free port on 127.0.0.1 and spawns `server` over it, such as
/// `|l| tower_reqctx::serve(l, app).into_future()`: the address and the server's task.
pub async fn spawn_server<F>(
    server: impl FnOnce(TcpListener) -> F,
) -> (SocketAddr, JoinHandle<F::Output>)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(server(listener)))
}

/// A raw connection, for requests written by hand.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A new connection that has sent `request` (any bytes: a request, part of one, several).
pub async fn send(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut s = connect(addr).await;
    s.write_all(request).await.unwrap();
    s
}

/// Reads `s` to its end (the server closes it, as after `Connection: close`), failing
/// after [`BOUND`].
pub async fn read_to_end(s: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut raw))
        .await
        .expect("the server should answer and close")
        .unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

/// Reads `s` until what it has read contains `needle`, failing after [`BOUND`] or if the
/// server closes first. Returns all that was read.
pub async fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0; 4096];
    tokio::time::timeout(BOUND, async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} within the bound"));
    String::from_utf8_lossy(&seen).into_owned()
}

/// Sends `request` on a new connection with `Connection: close` semantics and reads the
/// whole answer: (status, body).
pub async fn http1(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = send(addr, request.as_bytes()).await;
    parse_response(read_to_end(&mut s).await.as_bytes())
}

/// `GET path` with `Connection: close`: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http1(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// (status, body) of a raw HTTP/1.1 response; chunked bodies are returned as sent.
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Closes `s` with an RST instead of a FIN.
pub fn reset(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

/// The TCP state of the IPv4 loopback socket from port `local` to port `remote`, as
/// `/proc/net/tcp` lists it (`0x01` ESTABLISHED, `0x04` FIN_WAIT1, `0x08` CLOSE_WAIT);
/// `None` where there is no such socket (or no `/proc`).
pub fn tcp_state(local: u16, remote: u16) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (l, r) = (format!(":{local:04X}"), format!(":{remote:04X}"));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 3 && f[1].ends_with(&l) && f[2].ends_with(&r))
            .then(|| u8::from_str_radix(f[3], 16).ok())
            .flatten()
    })
}
