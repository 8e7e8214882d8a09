//! Disconnect-detection latency, from the client's close (or reset) to a task waiting on
//! the handler's context waking up; the cases of `reqctx_tests::detect` (which the probe,
//! `tests/src/bin/probe.rs`, runs too), with more trials and percentiles. In process, over
//! loopback.

use std::collections::BTreeSet;
use std::time::Duration;

use reqctx_benches::stats::percentile;
use reqctx_tests::Running;
use reqctx_tests::detect::{app, trial};
use tokio::sync::mpsc;

pub(crate) use reqctx_tests::detect::{CASES, SERVERS};

/// One row of the detection table.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) server: String,
    pub(crate) case: String,
    pub(crate) detected: usize,
    pub(crate) trials: usize,
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    pub(crate) max_us: Option<f64>,
    pub(crate) causes: String,
}

/// The subcommand: every case under every server, one tab-separated row each on stdout.
/// A trial waits `patience` for the context to end; a case seen in none of its first
/// `give_up_after` trials is not tried further.
pub(crate) fn main(trials: usize, patience: Duration, give_up_after: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        for (server, server_name) in SERVERS {
            let (tx, mut started) = mpsc::unbounded_channel();
            let srv = Running::start(server, app(tx), Duration::from_millis(50)).await;
            for (case, case_name) in CASES {
                let mut lat = Vec::new();
                let mut causes = BTreeSet::new();
                let mut tried = 0;
                for _ in 0..trials {
                    tried += 1;
                    if let Some((d, cause)) = trial(case, srv.addr, &mut started, patience).await {
                        lat.push(d.as_secs_f64() * 1e6);
                        causes.insert(format!("{cause:?}"));
                    }
                    while started.try_recv().is_ok() {} // a pipelined second request, if it ran
                    if lat.is_empty() && tried >= give_up_after {
                        break;
                    }
                }
                lat.sort_by(f64::total_cmp);
                let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
                println!(
                    "row\t{server_name}\t{case_name}\t{}\t{tried}\t{}\t{}\t{}\t{}",
                    lat.len(),
                    show(percentile(&lat, 50.0)),
                    show(percentile(&lat, 99.0)),
                    show(lat.last().copied()),
                    causes.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            srv.abort();
        }
    });
    Ok(())
}

/// Reads the subcommand's rows.
pub(crate) fn parse(out: &str) -> Vec<Row> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 9 || f[0] != "row" {
                return None;
            }
            let num = |s: &str| s.parse::<f64>().ok();
            Some(Row {
                server: f[1].to_owned(),
                case: f[2].to_owned(),
                detected: f[3].parse().ok()?,
                trials: f[4].parse().ok()?,
                p50_us: num(f[5]),
                p99_us: num(f[6]),
                max_us: num(f[7]),
                causes: f[8].to_owned(),
            })
        })
        .collect()
}
