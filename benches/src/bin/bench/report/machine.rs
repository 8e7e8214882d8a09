//! Facts about the machine, the tools and the commit, for the report's header.

use crate::procs::version;

/// Facts about the machine and the tools, for the report.
pub(crate) fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(String::new(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1048576.0)
        });
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let crates = [
        "axum",
        "hyper",
        "hyper-util",
        "h2",
        "tokio",
        "tokio-util",
        "tower-http",
    ]
    .iter()
    .map(|name| format!("{name} {}", locked_version(&lock, name)))
    .collect::<Vec<_>>()
    .join(", ");
    vec![
        (
            "date".into(),
            version("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        ),
        ("commit".into(), commit()),
        ("CPU".into(), format!("{} × {model}", crate::procs::cpus())),
        ("memory".into(), mem),
        ("kernel".into(), version("uname", &["-sr"])),
        ("rustc".into(), version("rustc", &["--version"])),
        ("crates".into(), crates),
        ("valgrind".into(), version("valgrind", &["--version"])),
        ("wrk".into(), version("wrk", &["--version"])),
        ("h2load".into(), version("h2load", &["--version"])),
        ("go".into(), version("go", &["version"])),
    ]
}

/// The commit measured: `git rev-parse --short=10 HEAD`, and "+ uncommitted changes" when
/// the work tree differs from it anywhere but in this report and its chart.
pub(super) fn commit() -> String {
    let head = version("git", &["rev-parse", "--short=10", "HEAD"]);
    let changed = std::process::Command::new("git")
        .args([
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)docs/benchmarks.md",
            ":(exclude)docs/benchmarks.svg",
        ])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if changed {
        format!("{head} + uncommitted changes")
    } else {
        head
    }
}

pub(super) fn locked_version(lock: &str, name: &str) -> String {
    let header = format!("name = \"{name}\"\n");
    lock.split("[[package]]")
        .filter(|block| block.contains(&header))
        .filter_map(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("version = \""))
                .map(|v| v.trim_end_matches('"').to_owned())
        })
        .collect::<Vec<_>>()
        .join(" + ")
}
