//! Disconnect detection for an upload the handler never reads, per upload size: the client
//! (this process) sends `POST /upload` with its whole body, waits for the handler to say it
//! started, closes (FIN), and times the handler's context ending from that close. The
//! server is a process of its own (the `upload` variant, one tokio worker), pinned to CPU 0;
//! the driver pins this client to CPU 1. Both sides stamp with the wall clock
//! (`CLOCK_REALTIME`, the one clock two processes share without `unsafe`).
//!
//! The driver runs it quiet and with a CPU load bounded in time: a spinning process
//! (`bench spin`) on the client's CPU, or on the server's.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use reqctx_benches::stats::percentile;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

/// The upload sizes, in KiB: all below loopback's default receive buffer (128 KiB), so the
/// client's FIN is not queued behind unread data.
pub(crate) const SIZES_KIB: [usize; 5] = [1, 8, 16, 64, 112];

/// The servers: (`--serve` of the server binary, how reports name it).
pub(crate) const SERVERS: [(&str, &str); 2] = [
    ("reqctx", "`tower_reqctx::serve`"),
    ("watched", "`axum::serve` + `WatchedListener`"),
];

/// The loads: (name, how reports name it, the CPU a spinner runs on).
pub(crate) const LOADS: [(&str, &str, Option<usize>); 3] = [
    ("quiet", "no load added", None),
    ("other-cpu", "a spinner on the client's CPU", Some(1)),
    ("same-cpu", "a spinner on the server's CPU", Some(0)),
];

/// A trial that saw the context end: µs from the close, the cause, and (the client's
/// port, the close and the end in ns since the epoch).
type Trial = (f64, String, (u16, i128, Option<i128>));

/// How long a trial waits for the handler to start.
const WAIT: Duration = Duration::from_secs(2);

/// One row: a server, a load, an upload size.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) server: String,
    pub(crate) load: String,
    pub(crate) kib: usize,
    pub(crate) seen: usize,
    pub(crate) trials: usize,
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    pub(crate) max_us: Option<f64>,
    pub(crate) causes: String,
}

/// What `bench upload-detect` runs: the server's binary and `--serve`, the label of the
/// rows, and, for the proxy checks (`benches/haproxy-check`), the server's port, the
/// address the client connects to instead of the server's, and the protocol.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) server_bin: PathBuf,
    pub(crate) serve: String,
    pub(crate) load: String,
    pub(crate) trials: usize,
    pub(crate) patience: Duration,
    pub(crate) sizes_kib: Vec<usize>,
    pub(crate) port: u16,
    pub(crate) connect: Option<String>,
    pub(crate) h2: bool,
    /// Over HTTP/2, close the whole connection (a new one per trial) instead of resetting
    /// the stream.
    pub(crate) h2_close: bool,
    /// Also print each trial: `trial SERVE KIB CLIENT_PORT CLOSED_NS END_NS` (END_NS `-`
    /// if not seen), to join with a packet trace.
    pub(crate) raw: bool,
}

/// The subcommand: starts `server --variant upload --serve SERVE` on CPU 0 and prints one
/// tab-separated row per upload size. Over HTTP/1.1 the client closes its connection; over
/// HTTP/2 (prior knowledge) it resets the stream (RST_STREAM, CANCEL) and keeps the
/// connection.
pub(crate) fn main(o: Options) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut cmd = if super::procs::cpus() > 1 {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", "0"]).arg(&o.server_bin);
            cmd
        } else {
            Command::new(&o.server_bin)
        };
        cmd.args(["--variant", "upload", "--serve", &o.serve, "--workers", "1"])
            .args(["--port", &o.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child: Child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let first = lines.next_line().await.map_err(|e| e.to_string())?;
        let addr = first
            .as_deref()
            .and_then(|l| l.strip_prefix("ready "))
            .ok_or_else(|| format!("the server said {first:?}, not `ready ADDR`"))?
            .to_owned();
        let addr = o.connect.clone().unwrap_or(addr);
        let sock: Option<std::net::SocketAddr> = addr.parse().ok();
        let mut h2 = None;
        if o.h2 && !o.h2_close {
            let sock = sock.ok_or_else(|| format!("not an address: {addr}"))?;
            h2 = Some(reqctx_tests::h2_client(sock).await.0);
        }
        for &kib in &o.sizes_kib {
            let mut lat = Vec::new();
            let mut causes = BTreeSet::new();
            for _ in 0..o.trials {
                let seen = match (&mut h2, sock) {
                    (Some(send), _) => {
                        h2_trial(send, kib * 1024, &mut lines, o.patience, None).await?
                    }
                    (None, Some(sock)) if o.h2_close => {
                        let (mut send, conn) = reqctx_tests::h2_client(sock).await;
                        let size = kib * 1024;
                        h2_trial(&mut send, size, &mut lines, o.patience, Some(conn)).await?
                    }
                    _ => trial(&addr, kib * 1024, &mut lines, o.patience).await?,
                };
                if o.raw {
                    let (port, closed, end) = seen.as_ref().map_or((0, 0, None), |t| t.2);
                    println!(
                        "trial\t{}\t{kib}\t{port}\t{closed}\t{}",
                        o.serve,
                        end.map_or("-".to_owned(), |e: i128| e.to_string())
                    );
                }
                let seen = seen.map(|(us, cause, _)| (us, cause));
                if let Some((us, cause)) = seen {
                    lat.push(us);
                    causes.insert(cause);
                }
            }
            lat.sort_by(f64::total_cmp);
            let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
            println!(
                "upload\t{}\t{}\t{kib}\t{}\t{}\t{}\t{}\t{}\t{}",
                o.serve,
                o.load,
                lat.len(),
                o.trials,
                show(percentile(&lat, 50.0)),
                show(percentile(&lat, 99.0)),
                show(lat.last().copied()),
                causes.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
        Ok(())
    })
}

/// Waits for the handler's `start`, skipping the late `end` of an earlier trial's handler
/// (one not seen within its patience: that trial already counts as not seen).
async fn started(lines: &mut Lines<BufReader<ChildStdout>>) -> Result<(), String> {
    loop {
        match tokio::time::timeout(WAIT, lines.next_line()).await {
            Ok(Ok(Some(l))) if l == "start" => return Ok(()),
            Ok(Ok(Some(l))) if l.starts_with("end ") => {}
            other => return Err(format!("expected `start` from the server, got {other:?}")),
        }
    }
}

/// µs from `closed` (ns since the epoch) to the handler's `end` line, and its cause;
/// `None` if none came within `patience`.
async fn ended(
    closed: i128,
    lines: &mut Lines<BufReader<ChildStdout>>,
    patience: Duration,
) -> Result<Option<(f64, String, i128)>, String> {
    let line = match tokio::time::timeout(patience, lines.next_line()).await {
        Err(_) => return Ok(None),
        Ok(line) => line
            .map_err(|e| e.to_string())?
            .ok_or("the server exited")?,
    };
    let mut f = line.split(' ');
    if f.next() != Some("end") {
        return Err(format!("expected `end NANOS CAUSE`, got {line:?}"));
    }
    let at: i128 = f
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("bad line {line:?}"))?;
    let cause = f.next().unwrap_or("").to_owned();
    Ok(Some(((at - closed) as f64 / 1e3, cause, at)))
}

/// One HTTP/1.1 trial: µs from the client's close to the context's end, and the cause;
/// `None` if the context did not end within `patience` (the connection is closed either
/// way).
async fn trial(
    addr: &str,
    size: usize,
    lines: &mut Lines<BufReader<ChildStdout>>,
    patience: Duration,
) -> Result<Option<Trial>, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let port = s.local_addr().map_or(0, |a| a.port());
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let head = format!("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n");
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(&vec![b'a'; size])
        .await
        .map_err(|e| e.to_string())?;
    started(lines).await?;
    let closed = now_ns();
    drop(s);
    let seen = ended(closed, lines, patience).await?;
    Ok(seen.map(|(us, cause, at)| (us, cause, (port, closed, Some(at)))))
}

/// One HTTP/2 trial: the request and its whole body, then, once the handler started,
/// RST_STREAM(CANCEL) on the kept connection, or, given the connection's task, the
/// whole connection closed.
async fn h2_trial(
    send: &mut h2::client::SendRequest<Bytes>,
    size: usize,
    lines: &mut Lines<BufReader<ChildStdout>>,
    patience: Duration,
    close: Option<tokio::task::JoinHandle<()>>,
) -> Result<Option<Trial>, String> {
    let req = http::Request::post("http://t/upload")
        .body(())
        .map_err(|e| e.to_string())?;
    let ready = std::future::poll_fn(|cx| send.poll_ready(cx));
    ready.await.map_err(|e| e.to_string())?;
    let (_resp, mut stream) = send.send_request(req, false).map_err(|e| e.to_string())?;
    // The whole body, ending the request (a proxy cannot forward an unfinished HTTP/1.1
    // request and keep its upstream connection, so an unfinished one would tell nothing
    // about how it passes on a reset). Within the default 64 KiB stream window; not
    // waited for, as a client that gives up does not wait either.
    let data = Bytes::from(vec![b'a'; size.min(65_535)]);
    stream.send_data(data, true).map_err(|e| e.to_string())?;
    started(lines).await?;
    let closed = now_ns();
    match close {
        // Dropping the connection's task closes its socket.
        Some(conn) => conn.abort(),
        None => stream.send_reset(h2::Reason::CANCEL),
    }
    let seen = ended(closed, lines, patience).await?;
    Ok(seen.map(|(us, cause, at)| (us, cause, (0, closed, Some(at)))))
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// The load generator: spins on whatever CPU it was started on for `seconds`, then exits.
pub(crate) fn spin(seconds: u64) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut x = 1u64;
    while Instant::now() < until {
        for _ in 0..100_000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
    Ok(())
}

/// Reads the subcommand's rows.
pub(crate) fn parse(out: &str) -> Vec<Row> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 10 || f[0] != "upload" {
                return None;
            }
            let num = |s: &str| s.parse::<f64>().ok();
            Some(Row {
                server: f[1].to_owned(),
                load: f[2].to_owned(),
                kib: f[3].parse().ok()?,
                seen: f[4].parse().ok()?,
                trials: f[5].parse().ok()?,
                p50_us: num(f[6]),
                p99_us: num(f[7]),
                max_us: num(f[8]),
                causes: f[9].to_owned(),
            })
        })
        .collect()
}
