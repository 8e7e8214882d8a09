//! The timed sections: wall clock, disconnect detection, deadline lateness and shutdown
//! fan-out.

use std::fmt::Write as _;

use reqctx_benches::stats::{median, min_median_max};

use super::failed;
use super::figures::{int, met, ms, serve_name, verdict};
use crate::Results;
use crate::wallclock::Rounds;
use crate::{detect, uploads};

pub(super) fn wall(s: &mut String, r: &Results) {
    let p = r.plan;
    let _ = writeln!(
        s,
        "Every server up at once, each pinned to CPU 0 (`taskset -c 0`) on a tokio \
         current-thread runtime (the Go peer with `GOMAXPROCS=1`); the load generator on \
         CPU 1. {} rounds; in each, every server gets one run ({} s over HTTP/1.1, {} s \
         over HTTP/2), in random order. Ratios are taken within a round (requests/s over \
         `bare`'s, under plain `axum::serve`, in the same round): min / median / max over \
         rounds. Latencies are medians over rounds. `serve` is `tower_reqctx::serve` \
         with no layer, `serve-ctx-reqctx` the README's setup (`serve` + \
         `ContextLayer::new()` + a `ReqCtx` handler); every other row is under plain \
         `axum::serve`.\n",
        p.wall_rounds, p.wall_seconds, p.wall_seconds_h2
    );
    for (title, rounds, tool) in [
        ("HTTP/1.1", &r.wall_h1, "`wrk -t1 -c8 -dNs --latency`"),
        (
            "HTTP/2 (h2c)",
            &r.wall_h2,
            "`h2load -c 8 -t 1 -m 1 -D N` (latencies from its per-request log)",
        ),
    ] {
        match rounds {
            None => {}
            Some(Err(e)) => failed(s, &format!("The {title} wall-clock run"), e),
            Some(Ok(rounds)) => wall_table(s, title, tool, rounds),
        }
    }
    if let Some(Ok(rounds)) = &r.wall_h1 {
        let m = median(&mut rounds.ratios("ctx", "bare"));
        let tower = median(&mut rounds.ratios("tower-timeout", "bare"));
        let _ = writeln!(
            s,
            "| target | measured | |\n|---|---|---|\n\
             | wall clock (wrk), `ctx` ≥ 0.97× `bare`, median of rounds | {} | {} |\n\
             | wall clock (wrk), `ctx` ≥ `tower-timeout` (tower-http `TimeoutLayer`), \
             median ratio to `bare` over the rounds of this run | {} vs {} | {} |\n",
            m.map_or("–".into(), |m| format!("{m:.3}×")),
            m.map_or("–", |m| met(m >= 0.97)),
            m.map_or("–".into(), |m| format!("{m:.3}×")),
            tower.map_or("–".into(), |t| format!("{t:.3}×")),
            verdict(m.zip(tower).map(|(m, t)| m >= t))
        );
    }
}

pub(super) fn wall_table(s: &mut String, title: &str, tool: &str, rounds: &Rounds) {
    let _ = writeln!(
        s,
        "{title}, {tool}:\n\n| variant | requests/s (median) | ratio min / median / max | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|"
    );
    for e in &rounds.entries {
        let rps = median(&mut rounds.values(e.label, |x| x.rps));
        let mut ratios = rounds.ratios(e.label, "bare");
        let ratio = min_median_max(&mut ratios).map_or("–".into(), |(a, m, b)| {
            format!("{a:.3} / {m:.3} / {b:.3}")
        });
        let p50 = median(&mut rounds.values(e.label, |x| x.p50_us));
        let p99 = median(&mut rounds.values(e.label, |x| x.p99_us));
        let name = if e.label == "go" {
            "Go net/http peer".to_owned()
        } else {
            format!("`{}`", e.label)
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {ratio} | {} | {} |",
            rps.map_or("–".into(), int),
            p50.map_or("–".into(), ms),
            p99.map_or("–".into(), ms)
        );
    }
    s.push('\n');
}

pub(super) fn detection(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "From the client's close (or reset) to a task waiting on the handler's context \
         (`ctx.cancelled()`) waking, in process over loopback (a 2-worker runtime), the \
         transport cases of `tests/src/bin/probe.rs`, {} trials each. p50 and p99 by \
         nearest rank over the trials that saw it (with 100 trials, p99 is the second \
         largest); \"seen\" counts the trials whose context ended within {} ms. A case \
         seen in none of its first {} trial(s) is not tried further.\n",
        r.plan.detect_trials, r.plan.detect_patience_ms, r.plan.detect_give_up
    );
    let rows = match &r.detect {
        None => return,
        Some(Err(e)) => return failed(s, "Disconnect detection", e),
        Some(Ok(rows)) => rows,
    };
    let _ = write!(s, "| case |");
    for (_, name) in detect::SERVERS {
        let _ = write!(s, " {name}: seen, p50 / p99 ms |");
    }
    let _ = writeln!(s, " cause |\n|---|---:|---:|---:|---|");
    for (_, case) in detect::CASES {
        let _ = write!(s, "| {case} |");
        let mut causes = std::collections::BTreeSet::new();
        for (_, server) in detect::SERVERS {
            match rows.iter().find(|x| x.server == server && x.case == case) {
                Some(x) if x.detected > 0 => {
                    let _ = write!(
                        s,
                        " {}/{}, {} / {} |",
                        x.detected,
                        x.trials,
                        x.p50_us.map_or("–".into(), ms),
                        x.p99_us.map_or("–".into(), ms)
                    );
                    for c in x.causes.split(", ").filter(|c| !c.is_empty()) {
                        causes.insert(c.to_owned());
                    }
                    let _ = x.max_us;
                }
                Some(x) => {
                    let _ = write!(s, " not seen (0/{}) |", x.trials);
                }
                None => {
                    let _ = write!(s, " – |");
                }
            }
        }
        let _ = writeln!(
            s,
            " {} |",
            causes.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    s.push('\n');
    let worst = rows
        .iter()
        .filter(|x| x.server == detect::SERVERS[0].1 && x.detected > 0)
        .filter_map(|x| x.p99_us.map(|p| (p, x.case.as_str())))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    // Every case must be seen in every trial under `serve`: a case missing, or seen in
    // fewer trials, misses the target whatever the p99 of the others.
    let unseen: Vec<String> = detect::CASES
        .iter()
        .filter_map(|(_, case)| {
            match rows
                .iter()
                .find(|x| x.server == detect::SERVERS[0].1 && x.case == *case)
            {
                Some(x) if x.detected == x.trials && x.trials > 0 => None,
                Some(x) => Some(format!("{case}: {}/{}", x.detected, x.trials)),
                None => Some(format!("{case}: not run")),
            }
        })
        .collect();
    let _ = writeln!(
        s,
        "| target | measured | |\n|---|---|---|\n\
         | disconnect p99 ≤ 1 ms under `serve`, every case seen in every trial | {}{} | {} |\n",
        worst.map_or("–".into(), |(p, c)| format!("worst {} ms ({c})", ms(p))),
        if unseen.is_empty() {
            String::new()
        } else {
            format!("; not always seen: {}", unseen.join(", "))
        },
        worst.map_or("–", |(p, _)| met(p <= 1000.0 && unseen.is_empty()))
    );
    uploads(s, r);
}

/// The unread-upload rows, per size, server and load.
fn uploads(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "**Unread uploads, client and server in separate processes.** The client sends \
         `POST /upload` with its whole body (the sizes below, all under loopback's 128 KiB \
         receive buffer), waits for the handler (which never reads the body) to start, and \
         closes (FIN). From that close to the handler's context ending, both stamped with \
         the wall clock. The server (one tokio worker) is pinned to CPU 0, the client to \
         CPU 1; the loaded columns add a spinning process, bounded in time, on the client's \
         CPU or on the server's. {} trials per row; p50 and p99 by nearest rank. Other work \
         on the machine is not stopped: see the load average in the run's notes.\n",
        r.plan.upload_trials
    );
    let rows = match &r.uploads {
        None => return,
        Some(Err(e)) => return failed(s, "Unread-upload detection", e),
        Some(Ok(rows)) => rows,
    };
    let _ = write!(s, "| upload | server |");
    for (_, name, _) in uploads::LOADS {
        let _ = write!(s, " {name}: seen, p50 / p99 ms |");
    }
    let _ = writeln!(s, " cause |\n|---:|---|---:|---:|---:|---|");
    for kib in uploads::SIZES_KIB {
        for (serve, server) in uploads::SERVERS {
            let _ = write!(s, "| {kib} KiB | {server} |");
            let mut causes = std::collections::BTreeSet::new();
            for (load, _, _) in uploads::LOADS {
                match rows
                    .iter()
                    .find(|x| x.server == serve && x.load == load && x.kib == kib)
                {
                    Some(x) => {
                        let _ = write!(
                            s,
                            " {}/{}, {} / {} |",
                            x.seen,
                            x.trials,
                            x.p50_us.map_or("–".into(), ms),
                            x.p99_us.map_or("–".into(), ms)
                        );
                        for c in x.causes.split(", ").filter(|c| !c.is_empty()) {
                            causes.insert(c.to_owned());
                        }
                        let _ = x.max_us;
                    }
                    None => {
                        let _ = write!(s, " – |");
                    }
                }
            }
            let _ = writeln!(
                s,
                " {} |",
                causes.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
    }
    s.push('\n');
}

/// The lateness figures this target compares with ("no worse than before"): the
/// full `benches/run` at commit `9e46cd1c28` (2026-12-02), the last before the request
/// path's redesign (issue 24): (serve call, in flight, p99 µs, max µs), as that run
/// printed them (to 10 µs).
pub(super) const LATENESS_BEFORE: (&str, [(&str, usize, f64, f64); 3]) = (
    "9e46cd1c28",
    [
        ("reqctx", 1_000, 1_950.0, 2_020.0),
        ("reqctx", 10_000, 1_960.0, 2_050.0),
        ("axum", 10_000, 1_940.0, 2_110.0),
    ],
);

pub(super) fn lateness(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "How late after its deadline a handler waiting on `ctx.cancelled()` wakes: \
         `Instant::now() − ctx.deadline()` in the handler, returned as its answer. Over \
         loopback, in two processes (10k sockets on each side exceed one process's 20,000 \
         file descriptors; `tower_reqctx::serve` holds one per connection, up to its \
         default `max_connections`): the server (`lateness` variant, `ContextLayer::new()` with a \
         grace period so the handler answers for itself, one tokio worker, CPU 0) and a \
         client (CPU 1) that opens N connections, paced, each with one request carrying \
         its own `?timeout=`. A sample of them (one in four, at most 1,000) have deadlines \
         spread evenly over a {} ms window that opens after every request has been sent; \
         the others' deadlines are long after it, so all N stay in flight, and in the timer \
         wheel, while the sample expires. The timer wheel's own share: the row waiting in \
         a plain tokio timer (`lateness-tokio`: no layer, plain `axum::serve`, the handler \
         reads the same `?timeout=`, takes its deadline on entry and awaits \
         `tokio::time::sleep_until(deadline)`), with the same client and deadlines.\n",
        r.plan.lateness_window_ms
    );
    let late = match &r.lateness {
        None => return,
        Some(Err(e)) => return failed(s, "Deadline lateness", e),
        Some(Ok(l)) => l,
    };
    let _ = writeln!(
        s,
        "| served by | waiting in | in flight | sampled | answered | p50 ms | p99 ms | max ms | all sent before the first deadline by |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for l in late {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} ms |",
            serve_name(l.serve),
            waiting_in(l.variant),
            int(l.in_flight as f64),
            int(l.probes as f64),
            int(l.answered as f64),
            ms(l.p50_us),
            ms(l.p99_us),
            ms(l.max_us),
            l.margin_ms
        );
    }
    let _ = writeln!(
        s,
        "\ntokio's timer wheel has a resolution of 1 ms and rounds a deadline up to the \
         next tick, so up to 1 ms of lateness is the timer's, not the context's: the plain \
         tokio timer row shows how much.\n"
    );
    let ctx_rows: Vec<&crate::lateness::Lateness> =
        late.iter().filter(|l| l.variant == "lateness").collect();
    let most = ctx_rows.iter().map(|l| l.in_flight).max().unwrap_or(0);
    let _ = writeln!(s, "| target | measured | |\n|---|---|---|");
    for l in ctx_rows.iter().filter(|l| l.in_flight * 100 >= most * 95) {
        let _ = writeln!(
            s,
            "| deadline lateness p99 no worse than 2.0 ms at 10k in flight ({} in flight, {}) | {} ms | {} |",
            int(l.in_flight as f64),
            serve_name(l.serve),
            ms(l.p99_us),
            met(l.p99_us <= 2000.0)
        );
    }
    let (commit, before) = LATENESS_BEFORE;
    for l in &ctx_rows {
        let earlier = before
            .iter()
            .find(|(serve, n, _, _)| *serve == l.serve && *n == l.in_flight);
        let timer = late
            .iter()
            .find(|t| t.variant == "lateness-tokio" && t.in_flight == l.in_flight)
            .map_or(String::new(), |t| {
                format!(
                    "; a plain tokio timer in this run: p99 {} ms, max {} ms",
                    ms(t.p99_us),
                    ms(t.max_us)
                )
            });
        let (target, verdict) = match earlier {
            // A `--quick` run (dev profile, a shorter window) is not the earlier run's
            // measurement.
            Some(_) if r.plan.quick => ("not compared in a `--quick` run".to_owned(), "–"),
            // The earlier figures are rounded to 10 µs: half of that is allowed.
            Some((_, _, p99, max)) => (
                format!(
                    "p99 ≤ {} ms (max then {} ms), `benches/run` at `{commit}`",
                    ms(*p99),
                    ms(*max)
                ),
                met(l.p99_us <= p99 + 5.0),
            ),
            None => ("no earlier figure at this N".to_owned(), "–"),
        };
        let _ = writeln!(
            s,
            "| deadline lateness no worse than before ({} in flight, {}): {target} | p99 {} ms, max {} ms{timer} | {verdict} |",
            int(l.in_flight as f64),
            serve_name(l.serve),
            ms(l.p99_us),
            ms(l.max_us),
        );
    }
    s.push('\n');
}

/// What a lateness row's handler waits in.
fn waiting_in(variant: &str) -> &'static str {
    if variant == "lateness-tokio" {
        "plain `tokio::time::sleep_until`, no layer"
    } else {
        "`ctx.cancelled()`, `ContextLayer`"
    }
}

pub(super) fn fanout(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "In process, no sockets (100k connections exceed this machine's descriptor and port \
         limits), a current-thread runtime: a root, one connection context under it, and \
         N request contexts under that (made as the layer makes them, \
         `with_driven_deadline(None)`), each awaited by its own task through \
         `ctx.cancelled()`, every task polled once. Timed from `cancel_with(Shutdown)` on \
         the root until the last task has woken; also how long the cancel call itself \
         took. The floor: the same with tokio-util child tokens of one root token.\n"
    );
    let f = match &r.fanout {
        None => return,
        Some(Err(e)) => return failed(s, "Fan-out", e),
        Some(Ok(f)) => f,
    };
    let _ = writeln!(
        s,
        "| tree | N | all woken, ms: min / median / max | the cancel call, ms (median) |\n|---|---:|---:|---:|"
    );
    for kind in ["reqctx", "tokio-util"] {
        let mut all: Vec<f64> = f
            .iter()
            .filter(|x| x.kind == kind)
            .map(|x| x.all_us)
            .collect();
        let mut call: Vec<f64> = f
            .iter()
            .filter(|x| x.kind == kind)
            .map(|x| x.call_us)
            .collect();
        let n = f.iter().find(|x| x.kind == kind).map_or(0, |x| x.n);
        let name = if kind == "reqctx" {
            "reqctx: root → connection → requests"
        } else {
            "tokio-util: root token → child tokens"
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} |",
            int(n as f64),
            min_median_max(&mut all).map_or("–".into(), |(a, m, b)| format!(
                "{} / {} / {}",
                ms(a),
                ms(m),
                ms(b)
            )),
            median(&mut call).map_or("–".into(), ms)
        );
    }
    s.push('\n');
    let mut all: Vec<f64> = f
        .iter()
        .filter(|x| x.kind == "reqctx")
        .map(|x| x.all_us)
        .collect();
    let n = f.first().map_or(0, |x| x.n);
    let m = median(&mut all);
    let _ = writeln!(
        s,
        "| target | measured | |\n|---|---|---|\n\
         | fan-out: {} contexts all woken ≤ 60 ms after the root's cancel | {} | {} |\n",
        int(n as f64),
        m.map_or("–".into(), |m| format!("{} ms (median)", ms(m))),
        m.map_or("–", |m| met(m <= 60_000.0))
    );
}
