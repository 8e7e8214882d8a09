//! Starting, stopping and reading the processes a measurement needs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the programs are.
#[derive(Clone, Debug)]
pub(crate) struct Bins {
    pub(crate) server: PathBuf,
    pub(crate) bench: PathBuf,
    pub(crate) go_peer: Option<PathBuf>,
}

/// A server process that printed `ready ADDR`; killed when dropped, unless stopped.
#[derive(Debug)]
pub(crate) struct Spawned {
    child: Option<Child>,
    _stdout: BufReader<ChildStdout>,
    pub(crate) addr: SocketAddr,
}

impl Spawned {
    /// Starts `cmd` (stdin closed, stderr to `stderr` or nowhere) and waits for its
    /// `ready ADDR` line.
    pub(crate) fn start(mut cmd: Command, stderr: Option<PathBuf>) -> Result<Spawned, String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        match &stderr {
            Some(path) => {
                let file = std::fs::File::create(path).map_err(|e| format!("{path:?}: {e}"))?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        let addr = line
            .strip_prefix("ready ")
            .and_then(|a| a.trim().parse().ok());
        match (read, addr) {
            (Ok(_), Some(addr)) => Ok(Spawned {
                child: Some(child),
                _stdout: stdout,
                addr,
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let log = stderr
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                Err(format!(
                    "{cmd:?} did not print `ready ADDR` (got {line:?}): {}",
                    log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                ))
            }
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM and waits up to `patience` for the process to exit.
    pub(crate) fn terminate(mut self, patience: Duration) -> Result<ExitStatus, String> {
        let mut child = self.child.take().ok_or("already stopped")?;
        signal(child.id(), "TERM");
        let until = Instant::now() + patience;
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "pid {} ignored SIGTERM for {patience:?}",
                    child.id()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kill -SIG pid` (the workspace forbids `unsafe`, so no `libc::kill`).
pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs `cmd` to its end; `Err` with its stderr if it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<String, String> {
    let out: Output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {} {}",
            out.status,
            stdout.lines().rev().take(3).collect::<Vec<_>>().join(" | "),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ))
    }
}

/// The first line of `program args` (stdout, else stderr), for the report.
pub(crate) fn version(program: &str, args: &[&str]) -> String {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        }
        Err(_) => format!("{program}: not found"),
    }
}

/// `taskset -c CPU program args…` when the machine has more than one CPU, else the
/// program alone.
pub(crate) fn pinned(cpu: usize, program: &std::path::Path) -> Command {
    if cpus() > 1 {
        let mut cmd = Command::new("taskset");
        cmd.arg("-c").arg(cpu.to_string()).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// The number of CPUs this process may run on.
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// VmRSS of `pid`, in kB.
pub(crate) fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A small deterministic generator for shuffling (xorshift64*), seeded from the clock.
#[derive(Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn from_clock() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fisher–Yates.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}
