//! Where the layer's instructions go, by call tree: the `ctx` server under
//! `valgrind --tool=callgrind`, two-point as for the instruction counts, and the
//! inclusive instructions per request of every function of `reqctx` and `tower-reqctx`
//! (from `callgrind_annotate --inclusive=yes`).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use crate::instructions::{Case, under_valgrind};
use crate::procs::{Bins, run};

/// Inclusive instructions per request by function, for `case`, largest first.
pub(crate) fn measure(
    bins: &Bins,
    dir: &Path,
    case: &Case,
    n1: u64,
    n2: u64,
) -> Result<Vec<(String, f64)>, String> {
    let mut points = Vec::new();
    for n in [n1, n2] {
        let name = format!("callgrind-{}-{n}", case.label);
        let out = dir.join(format!("callgrind.{name}"));
        let tool = [
            "--tool=callgrind".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        under_valgrind(bins, dir, case, n, &name, &tool)?;
        let text = run(Command::new("callgrind_annotate")
            .args(["--inclusive=yes", "--threshold=100"])
            .arg(&out))?;
        points.push(parse(&text));
    }
    let dn = (n2 - n1) as f64;
    let mut per_request: Vec<(String, f64)> = points[1]
        .iter()
        .map(|(f, v2)| {
            let v1 = points[0].get(f).copied().unwrap_or(0);
            (f.clone(), (*v2 as f64 - v1 as f64) / dn)
        })
        .filter(|(f, v)| *v >= 5.0 && (f.contains("reqctx::") || f.contains("reqctx<")))
        .collect();
    per_request.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(per_request)
}

/// `  1,234 (12.3%)  file:function [object]` lines.
fn parse(text: &str) -> HashMap<String, u64> {
    let mut found = HashMap::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some((count, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(count) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('(') {
            Some(r) => r.split_once(')').map_or(r, |(_, after)| after).trim_start(),
            None => rest,
        };
        let rest = match rest.rfind(" [") {
            Some(at) if rest.ends_with(']') => &rest[..at],
            _ => rest,
        };
        let function = strip_file(rest);
        *found.entry(function.to_owned()).or_default() += count;
    }
    found
}

/// `file:function` → `function`, keeping the `::` of paths.
fn strip_file(s: &str) -> &str {
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b':' && b.get(i + 1) != Some(&b':') && (i == 0 || b[i - 1] != b':') {
            return &s[i + 1..];
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_annotate_lines() {
        let text = "232,105,490 (95.54%)  ???:tower_reqctx::serve::serve_connection::{{closure}} [/x/server]\n 3,098,071 ( 1.28%)  ???:reqctx::node::CancelNode::cancel [/x/server]\n--------\n";
        let found = parse(text);
        assert_eq!(found["reqctx::node::CancelNode::cancel"], 3_098_071);
        assert_eq!(
            found["tower_reqctx::serve::serve_connection::{{closure}}"],
            232_105_490
        );
        assert_eq!(strip_file("./malloc/malloc.c:free"), "free");
        assert_eq!(strip_file("a::b::c"), "a::b::c");
    }
}
