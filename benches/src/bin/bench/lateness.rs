//! Deadline lateness: how long after its deadline a request's context is seen cancelled
//! by the handler waiting on it, with N requests in flight over loopback. The server is the
//! `lateness` variant in its own process (or `lateness-tokio`, the same wait in a plain
//! `tokio::time::sleep_until` with no layer: the timer wheel's own share); this client (another process) holds N requests
//! open, a spread-out sample of them with deadlines over a one-second window, the rest with
//! deadlines long after it, so all N stay in flight (and in the timer wheel) throughout.

use std::sync::Arc;
use std::time::Duration;

use reqctx_benches::stats::percentile;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

/// Connects made at once: pacing, so the accept queue never overflows.
const CONNECTING: usize = 128;

/// What one run measured.
#[derive(Clone, Debug)]
pub(crate) struct Lateness {
    pub(crate) serve: &'static str, // "reqctx" or "axum"
    /// `lateness` (the context) or `lateness-tokio` (a plain tokio timer, no layer).
    pub(crate) variant: &'static str,
    pub(crate) in_flight: usize,
    pub(crate) probes: usize,
    pub(crate) answered: usize,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) max_us: f64,
    pub(crate) margin_ms: f64, // from the last request sent to the first deadline
}

/// The client subcommand; prints one tab-separated line.
pub(crate) fn client(
    addr: std::net::SocketAddr,
    n: usize,
    probes: usize,
    lead: Duration,
    window: Duration,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let start = Instant::now();
        let first = start + lead;
        let stride = (n / probes.max(1)).max(1);
        let connecting = Arc::new(Semaphore::new(CONNECTING));
        let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Result<Instant, String>>();
        let (late_tx, mut late_rx) = mpsc::unbounded_channel::<Option<u64>>();
        let mut probe_count = 0;
        for i in 0..n {
            let probe = i % stride == 0 && probe_count < probes;
            let deadline = if probe {
                probe_count += 1;
                first + window.mul_f64((probe_count - 1) as f64 / probes as f64)
            } else {
                first + window + Duration::from_secs(600)
            };
            let (connecting, sent_tx, late_tx) =
                (connecting.clone(), sent_tx.clone(), late_tx.clone());
            tokio::spawn(async move {
                let permit = connecting.acquire_owned().await;
                let mut s = match TcpStream::connect(addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = sent_tx.send(Err(format!("connect: {e}")));
                        return;
                    }
                };
                let _ = s.set_nodelay(true);
                let timeout = deadline.saturating_duration_since(Instant::now());
                let req = format!(
                    "GET /late?timeout={}us HTTP/1.1\r\nHost: b\r\n\r\n",
                    timeout.as_micros().max(1)
                );
                if let Err(e) = s.write_all(req.as_bytes()).await {
                    let _ = sent_tx.send(Err(format!("write: {e}")));
                    return;
                }
                drop(permit);
                let _ = sent_tx.send(Ok(Instant::now()));
                let body = read_response(&mut s).await;
                // A reset leaves no TIME_WAIT behind on either side, so a later run's
                // connects never meet one (a SYN that does can wait a second).
                let _ = s.set_zero_linger();
                if probe {
                    let late = body
                        .as_deref()
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .and_then(|b| b.trim().parse().ok());
                    let _ = late_tx.send(late);
                }
            });
        }
        drop(late_tx);
        let mut last_sent = start;
        for i in 0..n {
            match tokio::time::timeout_at(first + window, sent_rx.recv()).await {
                Ok(Some(Ok(at))) => last_sent = last_sent.max(at),
                Ok(Some(Err(e))) => return Err(e),
                _ => {
                    return Err(format!(
                        "only {i} of {n} requests were sent before the last deadline"
                    ));
                }
            }
        }
        let mut late = Vec::new();
        let mut answered = 0;
        let patience = first + window + Duration::from_secs(10);
        while answered < probe_count {
            match tokio::time::timeout_at(patience, late_rx.recv()).await {
                Ok(Some(v)) => {
                    answered += 1;
                    late.extend(v);
                }
                _ => break,
            }
        }
        late.sort_unstable();
        let pct = |p| percentile(&late, p).map_or(f64::NAN, |v| v as f64);
        let margin = if first >= last_sent {
            (first - last_sent).as_secs_f64() * 1e3
        } else {
            -(last_sent - first).as_secs_f64() * 1e3
        };
        println!(
            "lateness\t{n}\t{probe_count}\t{}\t{}\t{}\t{}\t{margin:.0}",
            late.len(),
            pct(50.0),
            pct(99.0),
            late.last().map_or(f64::NAN, |v| *v as f64),
        );
        Ok(())
    })?;
    // Leaves the other requests' sockets to the exit.
    std::process::exit(0)
}

/// The body of one keep-alive HTTP/1.1 response with a `content-length`.
async fn read_response(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut raw = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&raw[..end]).ok()?.to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))?
            .trim()
            .parse()
            .ok()?;
        if raw.len() >= end + 4 + len {
            return Some(raw[end + 4..end + 4 + len].to_vec());
        }
    }
}

/// Reads the client's line.
pub(crate) fn parse(out: &str, serve: &'static str, variant: &'static str) -> Option<Lateness> {
    let line = out.lines().find(|l| l.starts_with("lateness\t"))?;
    let f: Vec<&str> = line.split('\t').collect();
    Some(Lateness {
        serve,
        variant,
        in_flight: f.get(1)?.parse().ok()?,
        probes: f.get(2)?.parse().ok()?,
        answered: f.get(3)?.parse().ok()?,
        p50_us: f.get(4)?.parse().ok()?,
        p99_us: f.get(5)?.parse().ok()?,
        max_us: f.get(6)?.parse().ok()?,
        margin_ms: f.get(7)?.parse().ok()?,
    })
}
