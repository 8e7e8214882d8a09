//! The benchmark suite's driver: `bench run [--quick]` runs every measurement and writes
//! the report; the other subcommands are the in-process measurements and load clients it
//! starts as processes of their own. `benches/run` is the way in.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use reqctx_benches::flag;

mod allocations;
mod callgrind;
mod detect;
mod fanout;
mod instructions;
mod lateness;
mod memory;
mod procs;
mod report;
mod uploads;
mod wallclock;

use procs::{Bins, Spawned, pinned, run};

/// The measurements `--only` may name.
const KINDS: [&str; 8] = [
    "instructions",
    "callgrind",
    "allocations",
    "wallclock",
    "detect",
    "lateness",
    "memory",
    "fanout",
];

const USAGE: &str = "usage:
  bench run [--quick] [--md PATH] [--svg PATH] [--template PATH] [--work DIR]
            [--go-peer PATH] [--only instructions,callgrind,allocations,wallclock,detect,lateness,memory,fanout]
            [--repeats N]
            (--only: the sections not named keep their text from --template;
             --repeats: two-point measurements per instruction case, 2 by default)
  bench detect --trials N [--patience-ms MS] [--give-up-after N]
  bench upload-detect --server-bin PATH --serve reqctx|watched --load LABEL --trials N
            [--patience-ms MS] [--sizes-kib 1,8,...] [--port P] [--connect ADDR] [--h2 | --h2-close] [--raw]
  bench spin --seconds S
  bench fanout --n N --reps R
  bench lateness-client --addr A --n N --probes P --lead-ms L --window-ms W
  bench hold-client --addr A --n N --pid PID [--settle-ms MS]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run_all(&args[1..]),
        Some("detect") => (|| {
            detect::main(
                flag(&args, "--trials")?.unwrap_or(50),
                Duration::from_millis(flag(&args, "--patience-ms")?.unwrap_or(1000)),
                flag(&args, "--give-up-after")?.unwrap_or(3),
            )
        })(),
        Some("upload-detect") => (|| {
            let sizes: String = flag(&args, "--sizes-kib")?
                .unwrap_or_else(|| uploads::SIZES_KIB.map(|k| k.to_string()).join(","));
            uploads::main(uploads::Options {
                server_bin: flag(&args, "--server-bin")?.ok_or("--server-bin is required")?,
                serve: flag(&args, "--serve")?.ok_or("--serve is required")?,
                load: flag(&args, "--load")?.unwrap_or_else(|| "quiet".to_owned()),
                trials: flag(&args, "--trials")?.unwrap_or(50),
                patience: Duration::from_millis(flag(&args, "--patience-ms")?.unwrap_or(1000)),
                sizes_kib: sizes
                    .split(',')
                    .map(|k| k.parse().map_err(|e| format!("--sizes-kib {k:?}: {e}")))
                    .collect::<Result<_, _>>()?,
                port: flag(&args, "--port")?.unwrap_or(0),
                connect: flag(&args, "--connect")?,
                h2: args.iter().any(|a| a == "--h2" || a == "--h2-close"),
                h2_close: args.iter().any(|a| a == "--h2-close"),
                raw: args.iter().any(|a| a == "--raw"),
            })
        })(),
        Some("spin") => (|| uploads::spin(flag(&args, "--seconds")?.unwrap_or(60)))(),
        Some("fanout") => (|| {
            let n = flag(&args, "--n")?.unwrap_or(100_000);
            fanout::main(n, flag(&args, "--reps")?.unwrap_or(5))
        })(),
        Some("lateness-client") => (|| {
            let ms = |name| -> Result<Duration, String> {
                Ok(Duration::from_millis(
                    flag(&args, name)?.ok_or(format!("{name} is required"))?,
                ))
            };
            lateness::client(
                flag(&args, "--addr")?.ok_or("--addr is required")?,
                flag(&args, "--n")?.ok_or("--n is required")?,
                flag(&args, "--probes")?.ok_or("--probes is required")?,
                ms("--lead-ms")?,
                ms("--window-ms")?,
            )
        })(),
        Some("hold-client") => (|| {
            memory::client(
                flag(&args, "--addr")?.ok_or("--addr is required")?,
                flag(&args, "--n")?.ok_or("--n is required")?,
                flag(&args, "--pid")?.ok_or("--pid is required")?,
                Duration::from_millis(flag(&args, "--settle-ms")?.unwrap_or(500)),
            )
        })(),
        _ => Err(USAGE.to_owned()),
    };
    if let Err(err) = result {
        eprintln!("bench: {err}");
        std::process::exit(1);
    }
}

/// The sizes of a run: the full one, or `--quick` (every measurement, tiny counts).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) quick: bool,
    pub(crate) ir: instructions::Settings,
    pub(crate) wall_rounds: usize,
    pub(crate) wall_seconds: u64,
    pub(crate) wall_seconds_h2: u64,
    pub(crate) detect_trials: usize,
    pub(crate) detect_patience_ms: u64,
    pub(crate) detect_give_up: usize,
    pub(crate) upload_trials: usize,
    pub(crate) lateness_n: [usize; 2],
    pub(crate) lateness_window_ms: u64,
    pub(crate) memory_n: usize,
    pub(crate) memory_reps: usize,
    pub(crate) fanout_n: usize,
    pub(crate) fanout_reps: usize,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            quick: false,
            ir: instructions::Settings {
                n1: 2_000,
                n2: 12_000,
                repeats: 2,
                jobs: 1,
                quick: false,
            },
            wall_rounds: 15,
            wall_seconds: 3,
            wall_seconds_h2: 2,
            detect_trials: 100,
            detect_patience_ms: 1000,
            detect_give_up: 3,
            upload_trials: 100,
            lateness_n: [1_000, 10_000],
            lateness_window_ms: 1_000,
            memory_n: 10_000,
            memory_reps: 3,
            fanout_n: 100_000,
            fanout_reps: 7,
        }
    }

    fn quick() -> Plan {
        Plan {
            quick: true,
            ir: instructions::Settings {
                n1: 200,
                n2: 1_200,
                repeats: 1,
                jobs: 2,
                quick: true,
            },
            wall_rounds: 2,
            wall_seconds: 1,
            wall_seconds_h2: 1,
            detect_trials: 5,
            detect_patience_ms: 300,
            detect_give_up: 1,
            upload_trials: 5,
            lateness_n: [100, 1_000],
            lateness_window_ms: 200,
            memory_n: 500,
            memory_reps: 1,
            fanout_n: 100_000,
            fanout_reps: 1,
        }
    }
}

/// How long a measurement took, and how busy the machine was (1-minute load average at
/// its start and end: anything above the load the measurement itself adds is other work).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    pub(crate) name: &'static str,
    pub(crate) took: Duration,
    pub(crate) load: (f64, f64),
}

/// The 1-minute load average.
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A measurement's result: `None` if not run, the error if it failed.
pub(crate) type Measured<T> = Option<Result<T, String>>;

/// Memory runs per (serve call, variant).
pub(crate) type MemoryRuns = Vec<(&'static str, &'static str, Vec<memory::Held>)>;

/// Everything one run found; a measurement that failed keeps its error for the report.
#[derive(Debug)]
pub(crate) struct Results {
    pub(crate) plan: Plan,
    pub(crate) machine: Vec<(String, String)>,
    pub(crate) instructions: Measured<Vec<instructions::CaseResult>>,
    pub(crate) callgrind: Measured<Vec<(String, f64)>>,
    pub(crate) allocations: Measured<Vec<allocations::CaseAllocations>>,
    pub(crate) wall_h1: Measured<wallclock::Rounds>,
    pub(crate) wall_h2: Measured<wallclock::Rounds>,
    pub(crate) detect: Measured<Vec<detect::Row>>,
    pub(crate) uploads: Measured<Vec<uploads::Row>>,
    pub(crate) lateness: Measured<Vec<lateness::Lateness>>,
    pub(crate) memory: Measured<MemoryRuns>,
    pub(crate) fanout: Measured<Vec<fanout::Run>>,
    pub(crate) took: Vec<Step>,
    /// `--only`'s list, if given: the other sections keep their last text.
    pub(crate) only: Option<String>,
}

fn run_all(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    if let Some(repeats) = flag::<usize>(args, "--repeats")? {
        plan.ir.repeats = repeats.max(1);
    }
    let md: PathBuf = flag(args, "--md")?.unwrap_or_else(|| "docs/benchmarks.md".into());
    let svg: PathBuf = flag(args, "--svg")?.unwrap_or_else(|| md.with_extension("svg"));
    let template: PathBuf = flag(args, "--template")?.unwrap_or_else(|| md.clone());
    let work: PathBuf = flag(args, "--work")?.unwrap_or_else(std::env::temp_dir);
    let only: Option<String> = flag(args, "--only")?;
    if let Some(o) = &only {
        if let Some(bad) = o.split(',').find(|k| !KINDS.contains(k)) {
            return Err(format!("--only: no measurement {bad:?}\n{USAGE}"));
        }
    }
    let wanted = |kind: &str| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|k| k == kind))
    };
    std::fs::create_dir_all(&work).map_err(|e| format!("{work:?}: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bins = Bins {
        server: exe.with_file_name("server"),
        bench: exe.clone(),
        go_peer: flag::<PathBuf>(args, "--go-peer")?,
    };

    let mut results = Results {
        plan,
        machine: report::machine(),
        instructions: None,
        callgrind: None,
        allocations: None,
        wall_h1: None,
        wall_h2: None,
        detect: None,
        uploads: None,
        lateness: None,
        memory: None,
        fanout: None,
        took: Vec::new(),
        only: only.clone(),
    };
    let step = |name: &'static str, results: &mut Results, f: &mut dyn FnMut(&mut Results)| {
        eprintln!("bench: {name}…");
        let t = Instant::now();
        let before = load_average();
        f(results);
        results.took.push(Step {
            name,
            took: t.elapsed(),
            load: (before, load_average()),
        });
        eprintln!("bench: {name} took {:.1} s", t.elapsed().as_secs_f64());
    };
    if wanted("instructions") {
        step("instructions", &mut results, &mut |r| {
            r.instructions = Some(instructions::measure(&bins, &work, plan.ir));
        });
    }
    if wanted("callgrind") {
        step("callgrind", &mut results, &mut |r| {
            let case = instructions::case("ctx", "axum", false);
            r.callgrind = Some(callgrind::measure(
                &bins, &work, &case, plan.ir.n1, plan.ir.n2,
            ));
        });
    }
    if wanted("allocations") {
        step("allocations", &mut results, &mut |r| {
            r.allocations = Some(allocations::measure(&bins, &work, plan.ir));
        });
    }
    if wanted("wallclock") {
        step("wall clock, HTTP/1.1", &mut results, &mut |r| {
            r.wall_h1 = Some(wall_clock(&bins, &work, plan, wallclock::Load::Wrk));
        });
        step("wall clock, HTTP/2", &mut results, &mut |r| {
            r.wall_h2 = Some(wall_clock(&bins, &work, plan, wallclock::Load::H2load));
        });
    }
    if wanted("detect") {
        step("disconnect detection", &mut results, &mut |r| {
            r.detect = Some(
                run(Command::new(&bins.bench).args([
                    "detect",
                    "--trials",
                    &plan.detect_trials.to_string(),
                    "--patience-ms",
                    &plan.detect_patience_ms.to_string(),
                    "--give-up-after",
                    &plan.detect_give_up.to_string(),
                ]))
                .map(|out| detect::parse(&out)),
            );
            r.uploads = Some(uploads_all(&bins, plan));
        });
    }
    if wanted("lateness") {
        step("deadline lateness", &mut results, &mut |r| {
            r.lateness = Some(lateness_all(&bins, &work, plan));
        });
    }
    if wanted("memory") {
        step("memory", &mut results, &mut |r| {
            r.memory = Some(memory_all(&bins, &work, plan));
        });
    }
    if wanted("fanout") {
        step("fan-out", &mut results, &mut |r| {
            r.fanout = Some(
                run(Command::new(&bins.bench).args([
                    "fanout",
                    "--n",
                    &plan.fanout_n.to_string(),
                    "--reps",
                    &plan.fanout_reps.to_string(),
                ]))
                .map(|out| fanout::parse(&out)),
            );
        });
    }

    let template_text = std::fs::read_to_string(&template).unwrap_or_default();
    let svg_name = svg.file_name().map_or("benchmarks.svg".into(), |n| {
        n.to_string_lossy().into_owned()
    });
    let text = report::markdown(&results, &template_text, &svg_name);
    if let Some(dir) = md.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    std::fs::write(&md, text).map_err(|e| format!("{md:?}: {e}"))?;
    report::chart(&results, &svg)?;
    eprintln!("bench: wrote {} and {}", md.display(), svg.display());
    let failed = report::failures(&results);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("measurements failed: {}", failed.join("; ")))
    }
}

/// The wall-clock servers: (label, variant, serve call); every ratio is to `bare`.
pub(crate) const WALL: [(&str, &str, &str); 11] = [
    ("bare", "bare", "axum"),
    ("noop", "noop", "axum"),
    ("ctx", "ctx", "axum"),
    ("ctx-timeout", "ctx-timeout", "axum"),
    ("tower-timeout", "tower-timeout", "axum"),
    ("yield", "yield", "axum"),
    ("ctx-timeout-yield", "ctx-timeout-yield", "axum"),
    ("tower-timeout-yield", "tower-timeout-yield", "axum"),
    ("ctx-run", "ctx-run", "axum"),
    ("serve", "bare", "reqctx"),
    ("serve-ctx-reqctx", "ctx-reqctx", "reqctx"),
];

fn wall_clock(
    bins: &Bins,
    work: &std::path::Path,
    plan: Plan,
    load: wallclock::Load,
) -> Result<wallclock::Rounds, String> {
    use wallclock::Entry;
    let mut entries: Vec<Entry> = WALL
        .iter()
        .map(|(label, variant, serve)| Entry {
            label,
            variant,
            serve,
            path: "/",
        })
        .collect();
    if load == wallclock::Load::Wrk {
        if bins.go_peer.is_some() {
            entries.push(Entry {
                label: "go",
                variant: "go",
                serve: "go",
                path: "/",
            });
        }
    } else {
        // HTTP/2 costs the client more per request; the comparison that matters, in half
        // the time. The Go peer's standard library has no h2c server (Go 1.19).
        let keep = ["bare", "ctx", "ctx-timeout", "tower-timeout", "serve"];
        entries.retain(|e| keep.contains(&e.label));
        if plan.quick {
            entries.retain(|e| e.label == "bare" || e.label == "ctx");
        }
    }
    wallclock::measure(
        bins,
        work,
        &entries,
        load,
        plan.wall_rounds,
        if load == wallclock::Load::Wrk {
            plan.wall_seconds
        } else {
            plan.wall_seconds_h2
        },
        !plan.quick,
    )
}

/// The unread-upload rows: every load, every server, the client on CPU 1 and the server
/// on CPU 0; a load's spinner runs for at most two minutes and is killed once the load's
/// rows are done.
fn uploads_all(bins: &Bins, plan: Plan) -> Result<Vec<uploads::Row>, String> {
    let mut rows = Vec::new();
    for (load, _, cpu) in uploads::LOADS {
        let spinner = match cpu {
            Some(cpu) => {
                let mut cmd = pinned(cpu, &bins.bench);
                cmd.args(["spin", "--seconds", "120"])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null());
                Some(cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?)
            }
            None => None,
        };
        let mut measured = || -> Result<(), String> {
            for (serve, _) in uploads::SERVERS {
                let out = run(pinned(1, &bins.bench)
                    .args(["upload-detect", "--server-bin"])
                    .arg(&bins.server)
                    .args(["--serve", serve, "--load", load, "--trials"])
                    .arg(plan.upload_trials.to_string())
                    .args(["--patience-ms", &plan.detect_patience_ms.to_string()]))?;
                rows.extend(uploads::parse(&out));
            }
            Ok(())
        };
        let result = measured();
        if let Some(mut spinner) = spinner {
            let _ = spinner.kill();
            let _ = spinner.wait();
        }
        result?;
    }
    Ok(rows)
}

/// The lateness runs, in the report's order: (server variant, serve call, with the larger
/// N in flight or the smaller). `lateness-tokio` is the wheel's own share: no layer, the
/// same deadlines in a plain `tokio::time::sleep_until`, under plain `axum::serve`, at
/// each N.
pub(crate) const LATENESS_RUNS: [(&str, &str, bool); 5] = [
    ("lateness", "reqctx", false),
    ("lateness-tokio", "axum", false),
    ("lateness", "reqctx", true),
    ("lateness", "axum", true),
    ("lateness-tokio", "axum", true),
];

fn lateness_all(
    bins: &Bins,
    work: &std::path::Path,
    plan: Plan,
) -> Result<Vec<lateness::Lateness>, String> {
    let [small, large] = plan.lateness_n;
    let serve_large = large.min(serve_capacity());
    let mut all = Vec::new();
    for (variant, serve, n) in LATENESS_RUNS.map(|(variant, serve, large_n)| {
        let n = match (large_n, serve) {
            (false, _) => small,
            (true, "reqctx") => serve_large,
            (true, _) => large,
        };
        (variant, serve, n)
    }) {
        let mut cmd = pinned(0, &bins.server);
        cmd.args(["--variant", variant, "--serve", serve])
            .args(["--workers", "1", "--port", "0"]);
        let log = work.join(format!("{variant}-{serve}-{n}.log"));
        let server = Spawned::start(cmd, Some(log))?;
        let probes = (n / 4).clamp(1, 1000);
        let lead_ms = 500 + n as u64 / 4;
        let out = run(pinned(1, &bins.bench).args([
            "lateness-client",
            "--addr",
            &server.addr.to_string(),
            "--n",
            &n.to_string(),
            "--probes",
            &probes.to_string(),
            "--lead-ms",
            &lead_ms.to_string(),
            "--window-ms",
            &plan.lateness_window_ms.to_string(),
        ]))?;
        drop(server);
        let found =
            lateness::parse(&out, serve, variant).ok_or_else(|| format!("no result in {out:?}"))?;
        if found.margin_ms < 0.0 {
            return Err(format!(
                "{n} in flight: the last request went out {:.0} ms after the first deadline",
                -found.margin_ms
            ));
        }
        all.push(found);
    }
    Ok(all)
}

/// The memory variants, with how the report names them.
pub(crate) const MEMORY_VARIANTS: [(&str, &str); 7] = [
    ("park", "no layer, the handler parked on a `Notify`"),
    (
        "noop-park",
        "a do-nothing `Router::layer` (axum's layering alone), the handler parked on a `Notify`",
    ),
    (
        "tower-timeout-park",
        "tower-http's `TimeoutLayer` 2 h, the handler parked on a `Notify`",
    ),
    (
        "ctx-park",
        "`ContextLayer::new()`, the handler parked on a `Notify`",
    ),
    (
        "ctx-live-park",
        "`ContextLayer::new().live_view(&view)`, the handler parked on a `Notify`",
    ),
    (
        "ctx-timeout-park",
        "`ContextLayer::new().timeout(2h)` (timer armed), the handler parked on a `Notify`",
    ),
    (
        "ctx-timeout-cancelled",
        "`ContextLayer::new().timeout(2h)`, the handler awaits `ctx.cancelled()`",
    ),
];

/// How many connections `serve` holds in a server process under this limit: one
/// descriptor per connection, up to its default `max_connections` (the soft limit less a
/// sixteenth, at least 64), less a margin for the process's other descriptors.
fn serve_capacity() -> usize {
    let limit = fd_limit();
    limit
        .saturating_sub((limit / 16).max(64))
        .saturating_sub(100)
}

fn memory_all(bins: &Bins, work: &std::path::Path, plan: Plan) -> Result<MemoryRuns, String> {
    let serve_n = plan.memory_n.min(serve_capacity());
    let mut all: MemoryRuns = Vec::new();
    for serve in ["axum", "reqctx"] {
        for (variant, _) in MEMORY_VARIANTS {
            all.push((serve, variant, Vec::new()));
        }
    }
    for _ in 0..plan.memory_reps {
        for (serve, variant, held) in &mut all {
            let n = if *serve == "reqctx" {
                serve_n
            } else {
                plan.memory_n
            };
            let mut cmd = pinned(0, &bins.server);
            cmd.args(["--variant", variant, "--serve", serve]).args([
                "--runtime",
                "current-thread",
                "--port",
                "0",
            ]);
            let log = work.join(format!("memory-{variant}-{serve}.log"));
            let server = Spawned::start(cmd, Some(log))?;
            let out = run(pinned(1, &bins.bench).args([
                "hold-client",
                "--addr",
                &server.addr.to_string(),
                "--n",
                &n.to_string(),
                "--pid",
                &server.pid().to_string(),
                "--settle-ms",
                if plan.quick { "100" } else { "500" },
            ]))?;
            drop(server);
            held.push(memory::parse(&out).ok_or_else(|| format!("no result in {out:?}"))?);
        }
    }
    Ok(all)
}

/// This process's limit on open files (inherited by the servers it starts).
fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse()
                .ok()
        })
        .unwrap_or(1024)
}
