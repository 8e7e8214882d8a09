//! The cost sections: instructions per request (with the cost rows and the
//! callgrind breakdown), heap allocations, and memory per in-flight request.

use std::fmt::Write as _;

use reqctx_benches::stats::median;

use super::failed;
use super::figures::{int, ir, mean, met, ratio, ratio_delta, serve_name, signed, verdict};
use crate::instructions::{CaseResult, ROWS, row_name};
use crate::{MEMORY_VARIANTS, Results};

/// What the issue measured on this machine, for comparison.
pub(super) const REFERENCE: &str = "Reference figures from the issue (measured here earlier with axum 0.8.9, default \
features, hello world, `Router::layer`, `h2load --h1`, served by `axum::serve`): bare \
14,816 instructions/request; a do-nothing layer +845 (1.06×); tower-http `TimeoutLayer` \
+1,825 (1.12×); a minimal tokio-util token-per-request layer +2,306 (1.16×), of which the \
token itself ≈ +780 and the first extensions insert ≈ +360; a Go net/http peer ≈ 1.87× \
the CPU per request of bare axum. Memory per in-flight request: a token layer +259 B, \
with a hand-written deadline future +380 B, with `select!` in a boxed async block \
+2,246 B. Fan-out floor: 100k tokio-util child tokens, each awaited by a task, all woken \
55 ms after cancel (current-thread runtime).";

/// One protocol's cells of a cost row: (measured, verdict).
pub(super) type Cell = (String, &'static str);

/// The cost rows for one protocol: (row, target, cell).
pub(super) fn cost_rows(cases: &[CaseResult], h2: bool) -> Vec<(String, String, Cell)> {
    let m = |label: &str, serve: &str| mean(cases, label, serve, h2);
    let x = |label: &str, serve: &str| ratio_delta(cases, label, serve, h2);
    let mut rows = Vec::new();
    let tower = m("tower-timeout", "axum");
    let tower_x = ratio(cases, "tower-timeout", "axum", h2);
    rows.push((
        "a do-nothing `Router::layer` (`noop`)".to_owned(),
        "none (≈ +860: axum re-boxes the route)".to_owned(),
        (x("noop", "axum"), "–"),
    ));
    rows.push((
        "tower-http `TimeoutLayer` 30 s (`tower-timeout`), the target of the next two".to_owned(),
        "–".to_owned(),
        (x("tower-timeout", "axum"), "–"),
    ));
    for (label, what) in [
        ("ctx", "`Router::layer(ContextLayer::new())` (`ctx`)"),
        (
            "ctx-timeout",
            "`ContextLayer::new().timeout(30s)` (`ctx-timeout`)",
        ),
    ] {
        rows.push((
            what.to_owned(),
            format!(
                "≤ `TimeoutLayer` ({})",
                tower_x.map_or("–".into(), |t| format!("{t:.3}×"))
            ),
            (
                x(label, "axum"),
                verdict(m(label, "axum").zip(tower).map(|(a, t)| a <= t)),
            ),
        ));
    }
    // The yielding rows: Δ and ratio over the same handler without a layer.
    let over_yield = |label: &str| match (m(label, "axum"), m("yield", "axum")) {
        (Some(a), Some(y)) => format!(
            "{} over `yield` ({:.3}× `yield`); {}",
            signed(a - y),
            a / y,
            x(label, "axum")
        ),
        _ => "–".into(),
    };
    let tower_yield = m("tower-timeout-yield", "axum");
    rows.push((
        "tower-http `TimeoutLayer`, handler yields once (`tower-timeout-yield`)".to_owned(),
        "–".to_owned(),
        (over_yield("tower-timeout-yield"), "–"),
    ));
    rows.push((
        "`.timeout(30s)`, handler yields once (`ctx-timeout-yield`), vs that handler bare"
            .to_owned(),
        format!(
            "≤ `tower-timeout-yield` ({})",
            tower_yield
                .zip(m("yield", "axum"))
                .map_or("–".into(), |(t, y)| format!("{:.3}× `yield`", t / y))
        ),
        (
            over_yield("ctx-timeout-yield"),
            verdict(
                m("ctx-timeout-yield", "axum")
                    .zip(tower_yield)
                    .map(|(a, t)| a <= t),
            ),
        ),
    ));
    // `ctx.run` rows: targeted at most 300 instructions over the row without `run`.
    let run_row = |what: &str, label: &str, base: &str| {
        let target = m(base, "axum").map(|t| t + 300.0);
        let measured = match (m(label, "axum"), m(base, "axum")) {
            (Some(a), Some(t)) => format!(
                "{} ({} over `{base}`); {}",
                int(a),
                signed(a - t),
                x(label, "axum")
            ),
            _ => "–".into(),
        };
        (
            what.to_owned(),
            format!("≤ `{base}` + 300 ({})", target.map_or("–".into(), int)),
            (
                measured,
                verdict(m(label, "axum").zip(target).map(|(a, t)| a <= t)),
            ),
        )
    };
    rows.push(run_row(
        "handler extracts `ReqCtx` and awaits `ctx.run(yield once)` (`ctx-run`)",
        "ctx-run",
        "ctx-timeout-yield",
    ));
    rows.push(run_row(
        "the same over work ready at once, no yield (`ctx-run-ready`)",
        "ctx-run-ready",
        "ctx-timeout",
    ));
    let serve_x = ratio(cases, "bare", "reqctx", h2);
    rows.push((
        "`tower_reqctx::serve` alone (`serve` `bare`)".to_owned(),
        "≤ 1.08×".to_owned(),
        (x("bare", "reqctx"), verdict(serve_x.map(|v| v <= 1.08))),
    ));
    if !h2 {
        rows.push((
            "of which hyper's header-read timer (`serve` − `serve` with \
             `header_read_timeout(None)`)"
                .to_owned(),
            "none (≈ 330, stays)".to_owned(),
            (
                match (m("bare", "reqctx"), m("bare", "reqctx-notimer")) {
                    (Some(a), Some(b)) => signed(a - b),
                    _ => "–".into(),
                },
                "–",
            ),
        ));
    } else {
        rows.push((
            "of which hyper's header-read timer".to_owned(),
            "–".to_owned(),
            ("HTTP/1 only".to_owned(), "–"),
        ));
    }
    let setup_target = match (
        m("bare", "reqctx"),
        m("ctx-reqctx", "axum"),
        m("bare", "axum"),
    ) {
        (Some(sv), Some(c), Some(b)) => Some(sv + (c - b) + 300.0),
        _ => None,
    };
    rows.push((
        "the README's setup: `serve` + `ContextLayer::new()` + a `ReqCtx` handler \
         (`serve` `ctx-reqctx`)"
            .to_owned(),
        format!(
            "≤ `serve` alone + (`ctx-reqctx` − `bare`) + 300 ({})",
            setup_target.map_or("–".into(), int)
        ),
        (
            match m("ctx-reqctx", "reqctx") {
                Some(a) => format!("{}; {}", int(a), x("ctx-reqctx", "reqctx")),
                None => "–".into(),
            },
            verdict(
                m("ctx-reqctx", "reqctx")
                    .zip(setup_target)
                    .map(|(a, t)| a <= t),
            ),
        ),
    ));
    rows
}

pub(super) fn instructions(s: &mut String, r: &Results, svg_name: &str) {
    let p = r.plan.ir;
    let _ = writeln!(
        s,
        "User-space instructions of the server process (current-thread runtime) under \
         `valgrind --tool=cachegrind --cache-sim=no`, two-point: `(Ir(N2) − Ir(N1)) / \
         (N2 − N1)` with N1 = {} and N2 = {} requests from `h2load --h1 -n N -c 8 -t 1` \
         (HTTP/1.1, keep-alive) or `h2load -n N -c 8 -t 1` (HTTP/2, h2c prior knowledge), \
         so start-up, connection set-up and shutdown cancel out. The server exits on \
         SIGTERM through graceful shutdown, so cachegrind writes its counts. {} repeat(s), \
         run one after the other; the last column is how far apart they are. **Every ratio \
         is to `bare` under plain `axum::serve`, same protocol**; Δ is instructions over \
         the same handler without a layer under plain `axum::serve` (`bare`, or `yield` \
         for the yielding handlers, `bare-query` for `ctx-query`).\n",
        int(p.n1 as f64),
        int(p.n2 as f64),
        p.repeats
    );
    let cases = match &r.instructions {
        None => return,
        Some(Err(e)) => return failed(s, "The instruction counts", e),
        Some(Ok(c)) => c,
    };
    let _ = writeln!(
        s,
        "#### The cost rows and their targets\n\n\
         Ratio (Δ) to `bare` under plain `axum::serve`; the target beside each row, \
         checked against figures of this run.\n\n\
         | row | target | HTTP/1.1 | | HTTP/2 | |\n|---|---|---|---|---|---|"
    );
    let h1 = cost_rows(cases, false);
    let h2 = cost_rows(cases, true);
    for ((row, target, (a, av)), (_, _, (b, bv))) in h1.iter().zip(&h2) {
        let _ = writeln!(s, "| {row} | {target} | {a} | {av} | {b} | {bv} |");
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "#### Every row\n\n\
         | row | what | HTTP/1.1 instr/req | ratio | Δ | HTTP/2 instr/req | ratio | Δ | repeats agree within |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    let cell = |label: &str, serve: &str, h2: bool| -> (String, String, String, Option<f64>) {
        match ir(cases, label, serve, h2) {
            Some(c) => {
                let (bl, bs) = c.case.base;
                let base = mean(cases, bl, bs, h2);
                let suffix = if bl == "bare" {
                    String::new()
                } else {
                    format!(" (vs {bl})")
                };
                (
                    int(c.mean()),
                    ratio(cases, label, serve, h2).map_or("–".into(), |x| format!("{x:.3}×")),
                    base.map_or("–".into(), |b| {
                        format!("{}{suffix}", signed(c.mean() - b))
                    }),
                    c.spread_percent(),
                )
            }
            None => ("–".into(), "–".into(), "–".into(), None),
        }
    };
    for (label, serve, what) in ROWS {
        let (a, ar, ad, asp) = cell(label, serve, false);
        let (b, br, bd, bsp) = cell(label, serve, true);
        let spread = match (asp, bsp) {
            (Some(a), Some(b)) => format!("{:.2}%", a.max(b)),
            (Some(a), None) | (None, Some(a)) => format!("{a:.2}%"),
            (None, None) => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {what} | {a} | {ar} | {ad} | {b} | {br} | {bd} | {spread} |",
            row_name(label, serve)
        );
    }
    let _ = writeln!(
        s,
        "\n![instructions per request, as a ratio to bare under axum::serve]({svg_name})\n\n{REFERENCE}\n"
    );
    where_it_goes(s, cases);
}

pub(super) fn allocations(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "The HTTP/1.1 servers of the instruction counts (current-thread runtime) under \
         `valgrind --tool=dhat`, two-point as there: allocations (blocks) and bytes \
         allocated per request. Sites: DHAT records each allocation's stack; a site is \
         the first frame walking out from `malloc` that is not allocator plumbing \
         (`Box::new`, `Arc::new`, `RawVec`, hashbrown's growth…), so an `Arc::new` in \
         `CancelNode::new` counts as `CancelNode::new`; after `←`, the next such frame, its \
         caller. Inlining can move a site into its caller; counts and bytes are exact.\n"
    );
    let all = match &r.allocations {
        None => return,
        Some(Err(e)) => return failed(s, "The allocation counts", e),
        Some(Ok(a)) => a,
    };
    let find = |label: &str, serve: &str| {
        all.iter()
            .find(|a| a.case.label == label && a.case.serve == serve)
    };
    // Issue 24's targets: `ctx` ≤ `tower-timeout` and ≤ `noop`; `ctx-run` ≤
    // `tower-timeout-yield` + 1. Allocations per request are two-point means, exact up to
    // the requests a run's start and end leave over: 0.05 of slack.
    let _ = writeln!(s, "| target | measured | |\n|---|---|---|");
    for (label, base, more, what) in [
        (
            "ctx",
            "tower-timeout",
            0.0,
            "`ContextLayer::new()` (`ctx`) ≤ tower-http `TimeoutLayer` (`tower-timeout`)",
        ),
        (
            "ctx",
            "noop",
            0.0,
            "`ContextLayer::new()` (`ctx`) ≤ a do-nothing layer (`noop`)",
        ),
        (
            "ctx-run",
            "tower-timeout-yield",
            1.0,
            "`ReqCtx` + `ctx.run` over a yielding handler (`ctx-run`) ≤ `TimeoutLayer` over \
             it (`tower-timeout-yield`) + 1",
        ),
    ] {
        let (measured, verdict) = match (find(label, "axum"), find(base, "axum")) {
            (Some(a), Some(b)) => (
                format!(
                    "{:.2} vs {:.2} ({:+.2}, {} bytes)",
                    a.blocks,
                    b.blocks,
                    a.blocks - b.blocks,
                    signed(a.bytes - b.bytes)
                ),
                met(a.blocks <= b.blocks + more + 0.05),
            ),
            _ => ("not measured in this run".to_owned(), "–"),
        };
        let _ = writeln!(
            s,
            "| allocations per request: {what}, listed by site below | {measured} | {verdict} |"
        );
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "| row | allocations/req | bytes/req | Δ allocations | Δ bytes | vs |\n|---|---:|---:|---:|---:|---|"
    );
    for a in all {
        let (bl, bs) = a.case.base;
        let base = find(bl, bs);
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | {} | {} | {} |",
            row_name(a.case.label, a.case.serve),
            a.blocks,
            int(a.bytes),
            base.map_or("–".into(), |b| format!("{:+.2}", a.blocks - b.blocks)),
            base.map_or("–".into(), |b| signed(a.bytes - b.bytes)),
            row_name(bl, bs)
        );
    }
    s.push('\n');
    for ((label, serve), (base_label, base_serve)) in [
        (("ctx", "axum"), ("noop", "axum")),
        (("ctx", "axum"), ("tower-timeout", "axum")),
        (("ctx-live", "axum"), ("ctx", "axum")),
        (("ctx-run", "axum"), ("tower-timeout-yield", "axum")),
        (("bare", "reqctx"), ("bare", "axum")),
        (("ctx-reqctx", "reqctx"), ("bare", "reqctx")),
    ] {
        let (Some(a), Some(b)) = (find(label, serve), find(base_label, base_serve)) else {
            continue;
        };
        let mut delta: Vec<(&String, f64, f64)> = a
            .sites
            .iter()
            .map(|(site, (n, bytes))| {
                let (bn, bb) = b.sites.get(site).copied().unwrap_or((0.0, 0.0));
                (site, n - bn, bytes - bb)
            })
            .chain(
                b.sites
                    .iter()
                    .filter(|(site, _)| !a.sites.contains_key(*site))
                    .map(|(site, (n, bytes))| (site, -n, -bytes)),
            )
            .filter(|(_, n, bytes)| n.abs() >= 0.05 || bytes.abs() >= 8.0)
            .collect();
        delta.sort_by(|x, y| {
            y.1.abs()
                .total_cmp(&x.1.abs())
                .then(y.2.abs().total_cmp(&x.2.abs()))
        });
        let _ = writeln!(
            s,
            "{} − {}: {:+.2} allocations, {} bytes per request.\n\n| Δ allocations | Δ bytes | site |\n|---:|---:|---|",
            row_name(label, serve),
            row_name(base_label, base_serve),
            a.blocks - b.blocks,
            signed(a.bytes - b.bytes)
        );
        for (site, n, bytes) in delta.iter().take(12) {
            let site = site
                .split(" ← ")
                .map(|f| format!("`{}`", short_name(f)))
                .collect::<Vec<_>>()
                .join(" ← ");
            let _ = writeln!(s, "| {n:+.2} | {} | {site} |", signed(*bytes));
        }
        s.push('\n');
    }
}

pub(super) fn inclusive(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "`ctx` (`ContextLayer::new()` under plain `axum::serve`, current-thread) over \
         HTTP/1.1 under `valgrind --tool=callgrind`, two-point as for the instruction \
         counts ({} and {} requests); inclusive instructions per request of every \
         function of `reqctx` and `tower-reqctx` (`callgrind_annotate --inclusive=yes`). \
         Inclusive means with everything it calls: `ContextService::call` includes the \
         inner service's `call`, `ResponseFuture::poll` the handler's future; the leaves \
         are the context's own costs.\n",
        int(r.plan.ir.n1 as f64),
        int(r.plan.ir.n2 as f64)
    );
    match &r.callgrind {
        None => {}
        Some(Err(e)) => failed(s, "The callgrind profile", e),
        Some(Ok(rows)) => {
            let _ = writeln!(s, "| inclusive instr/req | function |\n|---:|---|");
            for (f, v) in rows.iter().take(25) {
                let _ = writeln!(s, "| {} | `{}` |", int(*v), short_name(f));
            }
            s.push('\n');
        }
    }
}

/// The functions whose self instructions per request grew most from one row to another.
pub(super) fn where_it_goes(s: &mut String, cases: &[CaseResult]) {
    let _ = writeln!(
        s,
        "#### Where the instructions go\n\nSelf instructions per request by function, \
         from the same cachegrind profiles (two-point, HTTP/1.1, first repeat), one row \
         minus another; the largest differences. Inlined code is counted in the function \
         it was inlined into, so a `ContextService::call` line includes what the compiler \
         inlined into it. `ctx-query` − `ctx` includes `http` parsing the longer URI \
         (`PathAndQuery::from_shared`, `from_utf8`), which `bare-query` pays too.\n"
    );
    for ((label, serve), (base, base_serve)) in [
        (("ctx", "axum"), ("noop", "axum")),
        (("ctx", "axum"), ("tower-timeout", "axum")),
        (("ctx-timeout", "axum"), ("ctx", "axum")),
        (("ctx-live", "axum"), ("ctx", "axum")),
        (("ctx-query", "axum"), ("ctx", "axum")),
        (
            ("ctx-timeout-yield", "axum"),
            ("tower-timeout-yield", "axum"),
        ),
        (("ctx-run", "axum"), ("ctx-timeout-yield", "axum")),
        (("ctx-run-ready", "axum"), ("ctx-timeout", "axum")),
        (("bare", "reqctx"), ("bare", "axum")),
        (("bare", "reqctx"), ("bare", "reqctx-notimer")),
        (("ctx-reqctx", "reqctx"), ("bare", "reqctx")),
    ] {
        let (Some(c), Some(b)) = (
            ir(cases, label, serve, false),
            ir(cases, base, base_serve, false),
        ) else {
            continue;
        };
        let mut delta: Vec<(String, f64)> = c
            .functions
            .iter()
            .map(|(f, v)| (f.clone(), v - b.functions.get(f).copied().unwrap_or(0.0)))
            .chain(
                b.functions
                    .iter()
                    .filter(|(f, _)| !c.functions.contains_key(*f))
                    .map(|(f, v)| (f.clone(), -v)),
            )
            .filter(|(_, d)| d.abs() >= 5.0)
            .collect();
        delta.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let _ = writeln!(
            s,
            "{} − {}: {} instructions per request in all.\n\n| instr/req | function |\n|---:|---|",
            row_name(label, serve),
            row_name(base, base_serve),
            signed(c.mean() - b.mean())
        );
        for (f, d) in delta.iter().take(12) {
            let _ = writeln!(s, "| {} | `{}` |", signed(*d), short_name(f));
        }
        s.push('\n');
    }
}

/// A demangled name without its hash, shortened for a table.
pub(super) fn short_name(f: &str) -> String {
    let f = match f.rfind("::h") {
        Some(at) if f[at + 3..].chars().all(|c| c.is_ascii_hexdigit()) && f.len() - at == 19 => {
            &f[..at]
        }
        _ => f,
    };
    let f = f.replace('`', "'").replace('|', "\\|");
    if f.chars().count() > 140 {
        format!("{}…", f.chars().take(140).collect::<String>())
    } else {
        f
    }
}

pub(super) fn memory(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "The server (tokio's current-thread runtime) holds N requests in flight, one per \
         connection, opened by a client process 64 connects at a time; every handler \
         waits (parked on a `Notify` nobody notifies, or on `ctx.cancelled()`). VmRSS \
         after every handler has started, minus VmRSS after the first request, over N: \
         the request and its connection together. The difference to `park` under the \
         same serve call is the layer's. Median of {} run(s), each on a fresh server. N \
         is {} under plain `axum::serve`; under `tower_reqctx::serve` the same, unless \
         its default `max_connections` (one file descriptor per connection, the soft limit \
         less a sixteenth) is lower.\n",
        r.plan.memory_reps,
        int(r.plan.memory_n as f64),
    );
    let mem = match &r.memory {
        None => return,
        Some(Err(e)) => return failed(s, "The memory measurement", e),
        Some(Ok(m)) => m,
    };
    let _ = writeln!(
        s,
        "| served by | runtime | variant | layer and handler | N | bytes per request (runs) | median | over `park` | target | |\n|---|---|---|---|---:|---:|---:|---:|---|---|"
    );
    for (serve, variant, held) in mem {
        let what = MEMORY_VARIANTS
            .iter()
            .find(|(v, _)| v == variant)
            .map_or("", |(_, w)| w);
        let runs = held
            .iter()
            .map(|h| int(h.per_request()))
            .collect::<Vec<_>>()
            .join(", ");
        let m = memory_median(mem, serve, variant);
        let extra = match (m, memory_median(mem, serve, "park")) {
            (Some(m), Some(b)) if *variant != "park" => Some(m - b),
            _ => None,
        };
        let limit = match (*serve, *variant) {
            ("axum", "ctx-park") => Some(400.0),
            ("axum", "ctx-timeout-cancelled") => Some(600.0),
            _ => None,
        };
        let n = held.first().map_or(0, |h| h.n);
        let _ = writeln!(
            s,
            "| {} | current-thread | `{variant}` | {what} | {} | {runs} | {} | {} | {} | {} |",
            serve_name(serve),
            int(n as f64),
            m.map_or("–".into(), int),
            extra.map_or(String::new(), |x| format!("{} B", signed(x))),
            limit.map_or("–".into(), |l| format!("≤ +{} B", int(l))),
            match (extra, limit) {
                (Some(x), Some(l)) => met(x <= l),
                _ => "–",
            }
        );
    }
    s.push('\n');
}

/// The median bytes per request of `variant` under `serve`.
pub(super) fn memory_median(mem: &crate::MemoryRuns, serve: &str, variant: &str) -> Option<f64> {
    mem.iter()
        .find(|(s, v, _)| *s == serve && *v == variant)
        .and_then(|(_, _, h)| median(&mut h.iter().map(|h| h.per_request()).collect::<Vec<_>>()))
}
