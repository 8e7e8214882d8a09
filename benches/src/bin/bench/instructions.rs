//! Instructions per request: the server (current-thread runtime) under
//! `valgrind --tool=cachegrind --cache-sim=no`, two-point, `(Ir(N2) − Ir(N1)) / (N2 − N1)`
//! with `h2load -n N -c 8`, so start-up, connection set-up and shutdown cancel out.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::procs::{Bins, Spawned, run};

/// One server configuration measured under one protocol.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Case {
    pub(crate) label: &'static str,
    pub(crate) variant: &'static str,
    /// `axum` (plain `axum::serve`), `reqctx` (`tower_reqctx::serve` as it ships) or
    /// `reqctx-notimer` (the same with hyper's header-read timer off).
    pub(crate) serve: &'static str,
    pub(crate) path: &'static str,
    pub(crate) h2: bool,
    /// The row the Δ column is taken against (label, serve): the same handler without
    /// the layer. Every ratio is to `bare` under plain `axum::serve` instead.
    pub(crate) base: (&'static str, &'static str),
}

/// The report's rows, in order: (label, serve call, what it is). Every server runs on a
/// current-thread runtime.
pub(crate) const ROWS: [(&str, &str, &str); 18] = [
    (
        "bare",
        "axum",
        "axum hello world, no layer, plain `axum::serve`: **the denominator of every ratio**",
    ),
    ("noop", "axum", "a do-nothing `Router::layer`"),
    ("ctx", "axum", "`Router::layer(ContextLayer::new())`"),
    ("ctx-timeout", "axum", "`ContextLayer::new().timeout(30s)`"),
    ("tower-timeout", "axum", "tower-http `TimeoutLayer` 30 s"),
    (
        "ctx-live",
        "axum",
        "`ContextLayer::new().live_view(&view)`: every request recorded in a live view",
    ),
    (
        "bare-query",
        "axum",
        "no layer, every request with `?timeout=30s` (the base of `ctx-query`)",
    ),
    (
        "ctx-query",
        "axum",
        "`ContextLayer::new()`, every request with `?timeout=30s`",
    ),
    ("yield", "axum", "no layer, the handler yields once"),
    (
        "ctx-timeout-yield",
        "axum",
        "`ContextLayer::new().timeout(30s)`, the handler yields once",
    ),
    (
        "tower-timeout-yield",
        "axum",
        "tower-http `TimeoutLayer` 30 s, the handler yields once",
    ),
    (
        "ctx-run",
        "axum",
        "`ContextLayer::new().timeout(30s)`, the handler extracts `ReqCtx` and awaits `ctx.run(yield once)`",
    ),
    (
        "ctx-run-ready",
        "axum",
        "`ContextLayer::new().timeout(30s)`, the handler extracts `ReqCtx` and awaits `ctx.run` over work ready at once",
    ),
    (
        "ctx-reqctx",
        "axum",
        "`ContextLayer::new()`, the handler extracts `ReqCtx`",
    ),
    (
        "bare",
        "reqctx-notimer",
        "`tower_reqctx::serve` with hyper's header-read timer off (`http1().header_read_timeout(None)`), no layer",
    ),
    ("bare", "reqctx", "`tower_reqctx::serve` alone, no layer"),
    ("ctx", "reqctx", "`serve` + `ContextLayer::new()`"),
    (
        "ctx-reqctx",
        "reqctx",
        "`serve` + `ContextLayer::new()` + a handler extracting `ReqCtx`: the README's setup",
    ),
];

/// How the report names a row.
pub(crate) fn row_name(label: &str, serve: &str) -> String {
    match serve {
        "axum" => format!("`{label}`"),
        "reqctx" => format!("`serve` `{label}`"),
        _ => format!("`serve`, no header timer, `{label}`"),
    }
}

pub(crate) fn case(label: &'static str, serve: &'static str, h2: bool) -> Case {
    let (variant, path) = server_of(label);
    Case {
        label,
        variant,
        serve,
        path,
        h2,
        base: base_of(label, serve),
    }
}

/// The server variant and the request path of a label.
pub(crate) fn server_of(label: &'static str) -> (&'static str, &'static str) {
    match label {
        "bare-query" => ("bare", "/?timeout=30s"),
        "ctx-query" => ("ctx", "/?timeout=30s"),
        _ => (label, "/"),
    }
}

/// What a row's Δ is taken against: the same handler without the layer, under plain
/// `axum::serve`.
pub(crate) fn base_of(label: &str, serve: &str) -> (&'static str, &'static str) {
    match (label, serve) {
        ("ctx-query", _) => ("bare-query", "axum"),
        ("ctx-run" | "tower-timeout-yield" | "ctx-timeout-yield", _) => ("yield", "axum"),
        _ => ("bare", "axum"),
    }
}

/// Every case: each row over HTTP/1.1 and HTTP/2 (the header-read timer is HTTP/1's, so
/// `reqctx-notimer` over HTTP/1.1 only). `quick`: `bare`, `noop` and `ctx` under
/// `axum::serve` and `bare` under `serve` over HTTP/1.1, `bare` and `ctx` over HTTP/2.
pub(crate) fn cases(quick: bool) -> Vec<Case> {
    let mut all = Vec::new();
    for h2 in [false, true] {
        for (label, serve, _) in ROWS {
            if h2 && serve == "reqctx-notimer" {
                continue;
            }
            if quick {
                let keep = match (serve, h2) {
                    ("axum", false) => ["bare", "noop", "ctx"].contains(&label),
                    ("axum", true) => ["bare", "ctx"].contains(&label),
                    ("reqctx", false) => label == "bare",
                    _ => false,
                };
                if !keep {
                    continue;
                }
            }
            all.push(case(label, serve, h2));
        }
    }
    all
}

/// What one case measured.
#[derive(Clone, Debug)]
pub(crate) struct CaseResult {
    pub(crate) case: Case,
    pub(crate) per_request: Vec<f64>,           // one per repeat
    pub(crate) functions: HashMap<String, f64>, // self instructions per request, first repeat
}

impl CaseResult {
    /// The mean over repeats.
    pub(crate) fn mean(&self) -> f64 {
        self.per_request.iter().sum::<f64>() / self.per_request.len().max(1) as f64
    }

    /// (max − min) / mean over repeats, in percent; `None` with fewer than two.
    pub(crate) fn spread_percent(&self) -> Option<f64> {
        if self.per_request.len() < 2 {
            return None;
        }
        let max = self.per_request.iter().copied().fold(f64::MIN, f64::max);
        let min = self.per_request.iter().copied().fold(f64::MAX, f64::min);
        Some((max - min) / self.mean() * 100.0)
    }
}

/// One two-point measurement: instructions per request, in all and by function (self).
#[derive(Debug)]
struct Point {
    per_request: f64,
    functions: HashMap<String, f64>,
}

/// The settings of a run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub(crate) n1: u64,
    pub(crate) n2: u64,
    pub(crate) repeats: usize,
    pub(crate) jobs: usize,
    pub(crate) quick: bool,
}

/// Measures every case, `jobs` valgrind runs at a time.
pub(crate) fn measure(
    bins: &Bins,
    dir: &Path,
    settings: Settings,
) -> Result<Vec<CaseResult>, String> {
    let cases = cases(settings.quick);
    let work: Vec<(usize, usize)> = (0..settings.repeats)
        .flat_map(|r| (0..cases.len()).map(move |c| (r, c)))
        .collect();
    let queue = Mutex::new(work.into_iter());
    let results: Mutex<HashMap<(usize, usize), Point>> = Mutex::new(HashMap::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..settings.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let next = queue.lock().map(|mut q| q.next()).ok().flatten();
                    let Some((r, c)) = next else { break };
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        break;
                    }
                    match two_point(bins, dir, &cases[c], settings, r) {
                        Ok(found) => {
                            if let Ok(mut all) = results.lock() {
                                all.insert((r, c), found);
                            }
                        }
                        Err(err) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(err);
                            }
                        }
                    }
                }
            });
        }
    });
    if let Some(err) = failure.into_inner().ok().flatten() {
        return Err(err);
    }
    let mut results = results.into_inner().map_err(|e| e.to_string())?;
    Ok(cases
        .iter()
        .enumerate()
        .map(|(c, case)| {
            let mut per_request = Vec::new();
            let mut functions = HashMap::new();
            for r in 0..settings.repeats {
                if let Some(point) = results.remove(&(r, c)) {
                    per_request.push(point.per_request);
                    if r == 0 {
                        functions = point.functions;
                    }
                }
            }
            CaseResult {
                case: *case,
                per_request,
                functions,
            }
        })
        .collect())
}

fn two_point(
    bins: &Bins,
    dir: &Path,
    case: &Case,
    settings: Settings,
    repeat: usize,
) -> Result<Point, String> {
    let name = format!(
        "{}-{}-{}-r{repeat}",
        case.label,
        case.serve,
        if case.h2 { "h2" } else { "h1" }
    );
    let (total1, fns1) = one_point(bins, dir, case, settings.n1, &format!("{name}-n1"))?;
    let (total2, fns2) = one_point(bins, dir, case, settings.n2, &format!("{name}-n2"))?;
    let dn = (settings.n2 - settings.n1) as f64;
    let per_request = (total2 as f64 - total1 as f64) / dn;
    let mut functions = HashMap::new();
    for (f, ir2) in &fns2 {
        let ir1 = fns1.get(f).copied().unwrap_or(0);
        let delta = (*ir2 as f64 - ir1 as f64) / dn;
        if delta.abs() >= 0.5 {
            functions.insert(f.clone(), delta);
        }
    }
    Ok(Point {
        per_request,
        functions,
    })
}

/// Runs the server under cachegrind for `n` requests; the total and per-function counts.
fn one_point(
    bins: &Bins,
    dir: &Path,
    case: &Case,
    n: u64,
    name: &str,
) -> Result<(u64, HashMap<String, u64>), String> {
    let out = dir.join(format!("cachegrind.{name}"));
    let tool = [
        "--tool=cachegrind".to_owned(),
        "--cache-sim=no".to_owned(),
        format!("--cachegrind-out-file={}", out.display()),
    ];
    under_valgrind(bins, dir, case, n, name, &tool)?;
    parse_cachegrind(&out)
}

/// Serves `n` requests of `case` from `h2load` with the server under valgrind with
/// `tool`'s arguments, then stops it with SIGTERM so the profile is written.
pub(crate) fn under_valgrind(
    bins: &Bins,
    dir: &Path,
    case: &Case,
    n: u64,
    name: &str,
    tool: &[String],
) -> Result<(), String> {
    let mut cmd = Command::new("valgrind");
    cmd.args(tool)
        .arg(&bins.server)
        .args(["--variant", case.variant, "--serve", case.serve])
        .args(["--port", "0", "--runtime", "current-thread"]);
    let server = Spawned::start(cmd, Some(dir.join(format!("valgrind.{name}.log"))))?;
    let url = format!("http://{}{}", server.addr, case.path);
    let mut load = Command::new("h2load");
    if !case.h2 {
        load.arg("--h1");
    }
    load.args(["-n", &n.to_string(), "-c", "8", "-t", "1"])
        .arg(&url);
    let report = run(&mut load)?;
    let want = format!("{n} succeeded");
    if !report.contains(&want) {
        return Err(format!(
            "h2load {url}: not every request succeeded: {}",
            report
                .lines()
                .find(|l| l.starts_with("requests:"))
                .unwrap_or("")
        ));
    }
    let status = server.terminate(Duration::from_secs(60))?;
    if !status.success() {
        return Err(format!("server {name} exited with {status}"));
    }
    Ok(())
}

/// The `summary:` total and the instructions of each function (`fn=` lines; functions of
/// the same name in several files are added up).
pub(crate) fn parse_cachegrind(path: &Path) -> Result<(u64, HashMap<String, u64>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path:?}: {e}"))?;
    let mut total = None;
    let mut functions: HashMap<String, u64> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("fn=") {
            current = Some(name.to_owned());
        } else if let Some(sum) = line.strip_prefix("summary:") {
            total = sum.trim().parse().ok();
        } else if line.starts_with(|c: char| c.is_ascii_digit()) {
            let ir: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if let Some(f) = &current {
                *functions.entry(f.clone()).or_default() += ir;
            }
        }
    }
    let total = total.ok_or_else(|| format!("{path:?}: no summary line"))?;
    // Keep the profiles small on disk: the parsed counts are all the report needs.
    let _ = std::fs::remove_file(path);
    Ok((total, functions))
}
