//! Requests per second and latency: every server up at once, pinned to CPU 0 on a
//! current-thread runtime (the Go peer with `GOMAXPROCS=1`), the load generator on CPU 1;
//! rounds of one run per server in random order; ratios taken within a round.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::procs::{Bins, Rng, Spawned, pinned, run};

/// One server in the wall-clock comparison.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) label: &'static str,   // unique within a run
    pub(crate) variant: &'static str, // "go" for the Go peer
    pub(crate) serve: &'static str,   // the server's `--serve`
    pub(crate) path: &'static str,
}

/// One load run's figures.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

/// Every round's samples, by label.
#[derive(Clone, Debug, Default)]
pub(crate) struct Rounds {
    pub(crate) entries: Vec<Entry>,
    pub(crate) rounds: Vec<HashMap<&'static str, Sample>>,
}

impl Rounds {
    /// `label`'s rps over `base`'s, one value per round.
    pub(crate) fn ratios(&self, label: &str, base: &str) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| Some(r.get(label)?.rps / r.get(base)?.rps))
            .collect()
    }

    /// One figure of `label` over every round.
    pub(crate) fn values(&self, label: &str, f: impl Fn(&Sample) -> f64) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| r.get(label).map(&f))
            .collect()
    }
}

/// HTTP/1.1 with wrk, or HTTP/2 (h2c prior knowledge) with h2load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Load {
    Wrk,
    H2load,
}

/// Starts every entry's server, runs `rounds` rounds of `seconds` each.
pub(crate) fn measure(
    bins: &Bins,
    dir: &Path,
    entries: &[Entry],
    load: Load,
    rounds: usize,
    seconds: u64,
    warm_up: bool,
) -> Result<Rounds, String> {
    let mut servers = HashMap::new();
    for e in entries {
        let cmd = if e.variant == "go" {
            let go = bins.go_peer.as_ref().ok_or("no Go peer")?;
            let mut cmd = pinned(0, go);
            cmd.env("GOMAXPROCS", "1");
            cmd
        } else {
            let mut cmd = pinned(0, &bins.server);
            cmd.args(["--variant", e.variant, "--serve", e.serve])
                .args(["--runtime", "current-thread", "--port", "0"]);
            cmd
        };
        let log = dir.join(format!("wallclock-{}-{:?}.log", e.label, load));
        servers.insert(e.label, Spawned::start(cmd, Some(log))?);
    }
    let url = |e: &Entry| format!("http://{}{}", servers[e.label].addr, e.path);
    if warm_up {
        for e in entries {
            one(dir, load, &url(e), 1)?;
        }
    }
    let mut rng = Rng::from_clock();
    let mut all = Vec::new();
    for _ in 0..rounds {
        let mut order: Vec<Entry> = entries.to_vec();
        rng.shuffle(&mut order);
        let mut round = HashMap::new();
        for e in &order {
            round.insert(e.label, one(dir, load, &url(e), seconds)?);
        }
        all.push(round);
    }
    for (_, s) in servers {
        let _ = s.terminate(Duration::from_secs(5));
    }
    Ok(Rounds {
        entries: entries.to_vec(),
        rounds: all,
    })
}

fn one(dir: &Path, load: Load, url: &str, seconds: u64) -> Result<Sample, String> {
    let client = |program: &str| pinned(1, Path::new(program));
    match load {
        Load::Wrk => {
            let out = run(client("wrk")
                .args(["-t1", "-c8", &format!("-d{seconds}s"), "--latency"])
                .arg(url))?;
            parse_wrk(&out).ok_or_else(|| format!("cannot read wrk's report: {out}"))
        }
        Load::H2load => {
            let log = dir.join("h2load-requests.tsv");
            let out = run(client("h2load")
                .args(["-c", "8", "-t", "1", "-m", "1", "-D", &seconds.to_string()])
                .arg(format!("--log-file={}", log.display()))
                .arg(url))?;
            let rps = out
                .lines()
                .find_map(|l| l.strip_prefix("finished in "))
                .and_then(|l| l.split(", ").nth(1))
                .and_then(|r| r.strip_suffix(" req/s"))
                .and_then(|r| r.trim().parse().ok())
                .ok_or_else(|| format!("cannot read h2load's report: {out}"))?;
            let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
            let mut lat: Vec<u64> = text
                .lines()
                .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
                .collect();
            lat.sort_unstable();
            let pct = |p| reqctx_benches::stats::percentile(&lat, p).unwrap_or(0) as f64;
            Ok(Sample {
                rps,
                p50_us: pct(50.0),
                p99_us: pct(99.0),
            })
        }
    }
}

/// Requests/sec and the 50% and 99% lines of `wrk --latency`.
fn parse_wrk(out: &str) -> Option<Sample> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let pct = |p: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(|v| to_us(v.trim()))
    };
    Some(Sample {
        rps,
        p50_us: pct("50%")?,
        p99_us: pct("99%")?,
    })
}

/// `123.45us`, `1.23ms`, `2.00s` in microseconds.
fn to_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num,
        "ms" => num * 1e3,
        "s" => num * 1e6,
        "m" => num * 60e6,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk() {
        let out = "Running 1s test @ http://127.0.0.1:1/\n  Latency Distribution\n     50%  147.00us\n     75%  170.00us\n     90%  191.00us\n     99%    1.20ms\n  1234 requests in 1.00s, 1.00MB read\nRequests/sec:  12345.67\nTransfer/sec:      1.00MB\n";
        let s = parse_wrk(out).unwrap();
        assert_eq!(s.rps, 12345.67);
        assert_eq!(s.p50_us, 147.0);
        assert_eq!(s.p99_us, 1200.0);
    }
}
