//! Resident memory per in-flight request: the server (its own process, one worker)
//! holding N slow requests, each on its own connection, from this client (another
//! process); connects are paced so the accept queue never overflows.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::procs::rss_kb;

/// Connects made at once.
const CONNECTING: usize = 64;

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    pub(crate) n: usize,
    pub(crate) rss0_kb: u64,
    pub(crate) rss1_kb: u64,
}

impl Held {
    /// Bytes of RSS per in-flight request (and its connection).
    pub(crate) fn per_request(&self) -> f64 {
        (self.rss1_kb as f64 - self.rss0_kb as f64) * 1024.0 / self.n as f64
    }
}

/// The server's count of waiting handlers, or `None` if it does not answer within 2 s.
async fn in_flight(addr: std::net::SocketAddr) -> Option<usize> {
    tokio::time::timeout(Duration::from_secs(2), in_flight_now(addr))
        .await
        .ok()
        .flatten()
}

async fn in_flight_now(addr: std::net::SocketAddr) -> Option<usize> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /inflight HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    std::str::from_utf8(reqctx_benches::response_body(&raw)?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The client subcommand; prints one tab-separated line.
/// `settle`: how long to wait before each reading of the server's RSS.
pub(crate) fn client(
    addr: std::net::SocketAddr,
    n: usize,
    pid: u32,
    settle: Duration,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        in_flight(addr).await.ok_or("the server does not answer")?;
        tokio::time::sleep(settle).await;
        let rss0 = rss_kb(pid).ok_or("no RSS for the server")?;
        let connecting = Arc::new(Semaphore::new(CONNECTING));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let connecting = connecting.clone();
            tasks.spawn(async move {
                let _permit = connecting.acquire_owned().await;
                let mut s = TcpStream::connect(addr).await.ok()?;
                s.write_all(b"GET /slow HTTP/1.1\r\nHost: b\r\n\r\n")
                    .await
                    .ok()?;
                Some(s)
            });
        }
        let mut held = Vec::with_capacity(n);
        let opening = tokio::time::Instant::now() + Duration::from_secs(120);
        while let Ok(Some(joined)) = tokio::time::timeout_at(opening, tasks.join_next()).await {
            if let Ok(Some(s)) = joined {
                held.push(s);
            }
        }
        if held.len() != n {
            return Err(format!("only {} of {n} connections opened", held.len()));
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if in_flight(addr).await == Some(n) {
                break;
            }
            if tokio::time::Instant::now() > until {
                return Err(format!(
                    "the server never had {n} requests in flight (last count: {:?})",
                    in_flight(addr).await
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(settle).await;
        let rss1 = rss_kb(pid).ok_or("no RSS for the server")?;
        println!("held\t{n}\t{rss0}\t{rss1}");
        // Resets, so no TIME_WAIT is left for the next run's ports.
        for s in held {
            let _ = s.set_zero_linger();
        }
        Ok(())
    })
}

/// Reads the client's line.
pub(crate) fn parse(out: &str) -> Option<Held> {
    let line = out.lines().find(|l| l.starts_with("held\t"))?;
    let f: Vec<&str> = line.split('\t').collect();
    Some(Held {
        n: f.get(1)?.parse().ok()?,
        rss0_kb: f.get(2)?.parse().ok()?,
        rss1_kb: f.get(3)?.parse().ok()?,
    })
}
