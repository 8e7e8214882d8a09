//! `serve` at scale, with the server in a process of its own (`src/bin/serve_child.rs`,
//! started under `ulimit -n`) and the clients here, so the server's file descriptors can be
//! counted in `/proc`. Linux only. The load tests run one at a time, so that each one's
//! 1-second bound for the normal client is measured without the others' load.
#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::timeout;

/// How long a test waits for something that should happen soon before it fails; generous,
/// as the server is under load.
const BOUND: Duration = Duration::from_secs(30);

/// The bound for a normal client's answer while the server is under load.
const ANSWER_BOUND: Duration = Duration::from_secs(1);

/// One test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The server process; killed when dropped.
struct Child {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Child {
    /// Starts the server under `ulimit -n nofile`.
    fn start(nofile: u32, args: &[&str]) -> Child {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_serve_child"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        Child { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's open file descriptor numbers.
    fn fds(&self) -> BTreeSet<u32> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// How many sockets the connection watcher's epoll set holds: its entries are the only
    /// ones registered for `EPOLLRDHUP | EPOLLET` without `EPOLLIN` (tokio's ask for reads
    /// and writes too; the kernel adds `EPOLLERR | EPOLLHUP` to every one).
    fn watched(&self) -> usize {
        let mut watched = 0;
        for fd in self.fds() {
            let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", self.pid()));
            if !link.is_ok_and(|link| link.to_string_lossy().contains("eventpoll")) {
                continue;
            }
            let Ok(info) = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", self.pid()))
            else {
                continue;
            };
            watched += info
                .lines()
                .filter(|line| line.starts_with("tfd:"))
                .filter(|line| {
                    let events = line
                        .split_whitespace()
                        .skip_while(|w| *w != "events:")
                        .nth(1);
                    events
                        .and_then(|e| u32::from_str_radix(e, 16).ok())
                        .is_some_and(|e| e & !0x18 == 0x8000_2000)
                })
                .count();
        }
        watched
    }

    /// Waits until `f` holds for the server's state, checking every 20 ms.
    async fn until(&self, what: &str, f: impl Fn(&Child) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(start.elapsed() < BOUND, "{what}: not within {BOUND:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one request on a keep-alive connection and reads its response: (status line,
/// body). The response must have a `content-length`.
async fn request<S>(stream: &mut S, request: &str) -> (String, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .expect("no content-length");
            if raw.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + length]).to_string();
                let status = head.lines().next().unwrap().to_owned();
                return (status, body);
            }
        }
        let n = timeout(BOUND, stream.read(&mut buf))
            .await
            .expect("no response within the bound")
            .unwrap();
        assert_ne!(n, 0, "closed before the response ended: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
    }
}

async fn get(stream: &mut TcpStream, path: &str) -> String {
    let (status, body) = request(stream, &format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n")).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    body
}

/// 900 idle keep-alive connections that each finished a request, with the server limited
/// to 1,024 file descriptors: all held, all in the watcher's epoll set, and every client's
/// close is seen. With a duplicate fd per watch, the server ran out of descriptors at about
/// 500 and served the rest unwatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_hundred_idle_connections_under_ulimit_1024_are_held_and_watched() {
    const N: usize = 900;
    let _one = ONE_AT_A_TIME.lock().await;
    let server = Child::start(1024, &[]);
    let mut control = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(get(&mut control, "/hello").await, "hello");

    let mut clients = Vec::with_capacity(N);
    for _ in 0..N / 50 {
        let batch = (0..50).map(|_| async {
            let mut client = TcpStream::connect(server.addr).await.unwrap();
            assert_eq!(get(&mut client, "/watch").await, "watching");
            client
        });
        clients.extend(futures_util::future::join_all(batch).await);
    }
    // Every connection, the control one included, is watched, and within the limit.
    assert_eq!(server.watched(), N + 1);
    let fds = server.fds().len();
    assert!((N + 1..=1024).contains(&fds), "{fds} fds");
    eprintln!("{N} idle connections + 1: the server holds {fds} fds");

    // A client closing any of them is seen: all of them, here.
    drop(clients);
    let count = get(&mut control, &format!("/ended-count/{N}")).await;
    assert_eq!(count, N.to_string());
    // And each left the epoll set with its socket.
    server
        .until("connections deregistered", |s| s.watched() == 1)
        .await;
    server
        .until("sockets closed", |s| s.fds().len() <= fds - N)
        .await;
}

/// Connection A is closed by the server; connection B gets A's fd number and is still
/// watched: it is seen leaving while its request body sits unread, which only the watcher
/// can see.
#[tokio::test]
async fn a_reused_fd_number_is_still_watched() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = Child::start(1024, &[]);
    let mut control = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(get(&mut control, "/hello").await, "hello");
    server.until("control accepted", |s| s.watched() == 1).await;
    let before = server.fds();

    let mut a = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(get(&mut a, "/watch").await, "watching");
    let a_fds: Vec<u32> = server.fds().difference(&before).copied().collect();
    assert_eq!(a_fds.len(), 1, "{a_fds:?}");
    let a_port = a.local_addr().unwrap().port();
    let (_, body) = request(
        &mut a,
        "GET /hello HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(body, "hello");
    // The server closed A: its connection context says so.
    assert_eq!(
        get(&mut control, &format!("/ended/{a_port}")).await,
        "ServerClosed"
    );
    server
        .until("A's socket closed", |s| s.fds() == before)
        .await;

    let mut b = TcpStream::connect(server.addr).await.unwrap();
    b.write_all(b"POST /hold HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nxxxxxxxxxx")
        .await
        .unwrap();
    server
        .until("B accepted and watched", |s| s.watched() == 2)
        .await;
    let b_fds: Vec<u32> = server.fds().difference(&before).copied().collect();
    assert_eq!(b_fds, a_fds, "B did not get A's fd number");
    let b_port = b.local_addr().unwrap().port();
    drop(b);
    assert_eq!(
        get(&mut control, &format!("/ended/{b_port}")).await,
        "ClientDisconnected"
    );
    drop(a);
}

/// Sends `bytes` one a second on `stream` until the bytes or the `window` run out.
async fn dribble(mut stream: TcpStream, bytes: &[u8], window: Duration) -> TcpStream {
    let start = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    for byte in bytes {
        ticks.tick().await;
        if start.elapsed() > window || stream.write_all(&[*byte]).await.is_err() {
            break;
        }
    }
    stream
}

/// A normal client under load: a new connection and a request every 100 ms during
/// `window`, each answered within the bound. Returns the slowest answer and the
/// most fds the server had open meanwhile.
async fn normal_client(server: &Child, window: Duration) -> (Duration, usize) {
    let addr = server.addr;
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut peak = 0;
    let mut answers = 0;
    while start.elapsed() < window {
        let asked = Instant::now();
        let answer = timeout(ANSWER_BOUND, async {
            let mut client = TcpStream::connect(addr).await.unwrap();
            get(&mut client, "/hello").await
        })
        .await
        .unwrap_or_else(|_| panic!("no answer within {ANSWER_BOUND:?} under load"));
        assert_eq!(answer, "hello");
        slowest = slowest.max(asked.elapsed());
        peak = peak.max(server.fds().len());
        answers += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answers > 0);
    (slowest, peak)
}

/// 1,000 slowloris HTTP/1.1 connections (one header byte a second), 50 idle HTTP/2
/// connections and 50 sending a HEADERS frame one byte a second: a normal client still gets
/// its answers within 1 s, and the server holds every connection within its fd limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_slow_http2_do_not_starve_a_normal_client() {
    const SLOWLORIS: usize = 1000;
    const H2: usize = 50;
    const NOFILE: usize = 4096;
    let window = Duration::from_secs(8);
    let _one = ONE_AT_A_TIME.lock().await;
    let server = Child::start(NOFILE as u32, &[]);
    let addr = server.addr;

    let mut load = tokio::task::JoinSet::new();
    for _ in 0..SLOWLORIS {
        let stream = TcpStream::connect(addr).await.unwrap();
        load.spawn(async move {
            let mut stream = stream;
            stream.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
            drop(dribble(stream, &[b'x'; 64], window).await);
        });
    }
    let mut idle_h2 = Vec::new();
    for _ in 0..H2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        load.spawn(async move {
            let _ = timeout(window, conn).await;
        });
        idle_h2.push(send);
    }
    // Preface, an empty SETTINGS frame, then a HEADERS frame (GET / for authority "a",
    // END_STREAM | END_HEADERS, stream 1) one byte a second.
    const HEADERS: [u8; 15] = [
        0, 0, 6, 1, 5, 0, 0, 0, 1, 0x82, 0x86, 0x84, 0x41, 0x01, b'a',
    ];
    for _ in 0..H2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        load.spawn(async move {
            stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await
                .unwrap();
            drop(dribble(stream, &HEADERS, window).await);
        });
    }
    let held = SLOWLORIS + 2 * H2;
    server
        .until("every load connection accepted", |s| s.watched() >= held)
        .await;

    let (slowest, fds) = normal_client(&server, window).await;
    eprintln!(
        "{SLOWLORIS} slowloris + {} slow HTTP/2 connections: slowest normal answer {slowest:?}, \
         server fds {fds} at the peak (limit {NOFILE})",
        2 * H2
    );
    assert!((held..=NOFILE).contains(&fds), "{fds} fds");
    load.shutdown().await;
    drop(idle_h2);
}

/// A TLS handshake flood: 600 clients that connect and say nothing, and 50 that handshake
/// and leave, over and over, against 128 handshake slots. A client with an established TLS connection still gets its
/// answers within 1 s, and the server never holds more than `max_handshakes` handshakes'
/// descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_flood_does_not_starve_a_normal_client() {
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};

    const SILENT: usize = 600;
    const HANDSHAKERS: usize = 50;
    const MAX_HANDSHAKES: usize = 128;
    let window = Duration::from_secs(6);
    let _one = ONE_AT_A_TIME.lock().await;
    // A 1 s handshake timeout, so the silent clients' slots turn over within the window.
    let server = Child::start(
        1024,
        &[
            "--tls",
            "--max-handshakes",
            &MAX_HANDSHAKES.to_string(),
            "--handshake-timeout-ms",
            "1000",
        ],
    );
    let addr = server.addr;
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(reqctx_tests::TEST_CERT).unwrap())
        .unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut normal = connector.connect(name.clone(), tcp).await.unwrap();
    let hello = "GET /hello HTTP/1.1\r\nhost: t\r\n\r\n";
    assert_eq!(request(&mut normal, hello).await.1, "hello");
    let base = server.fds().len();

    // The silent ones first: they take every handshake slot, and the rest wait in the
    // listen backlog ahead of the handshaking clients.
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut flood = tokio::task::JoinSet::new();
    let handshakes = Arc::new(AtomicUsize::new(0));
    for _ in 0..HANDSHAKERS {
        let (connector, name, handshakes) = (connector.clone(), name.clone(), handshakes.clone());
        flood.spawn(async move {
            loop {
                let Ok(tcp) = TcpStream::connect(addr).await else {
                    continue;
                };
                if connector.connect(name.clone(), tcp).await.is_ok() {
                    handshakes.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut peak = 0;
    while start.elapsed() < window {
        let asked = Instant::now();
        let (_, body) = timeout(ANSWER_BOUND, request(&mut normal, hello))
            .await
            .unwrap_or_else(|_| panic!("no answer within {ANSWER_BOUND:?} under the flood"));
        assert_eq!(body, "hello");
        slowest = slowest.max(asked.elapsed());
        peak = peak.max(server.fds().len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    flood.shutdown().await;
    let handshakes = handshakes.load(Ordering::Relaxed);
    eprintln!(
        "TLS flood ({SILENT} silent, {HANDSHAKERS} handshaking in a loop, {handshakes} \
         handshakes done): slowest normal answer {slowest:?}, server fds {base} before, \
         {peak} at the peak (max_handshakes {MAX_HANDSHAKES})"
    );
    // The handshakes in progress, and connections whose handshake just finished and whose
    // client is leaving.
    assert!(
        peak <= base + MAX_HANDSHAKES + HANDSHAKERS,
        "{peak} fds at the peak, {base} before"
    );
    drop(silent);
}
