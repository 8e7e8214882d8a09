//! Numbers as the report writes them, and the lookups of instruction-count rows that
//! every section and the chart share.

use crate::instructions::CaseResult;

/// `14816.4` → `14,816`.
pub(super) fn int(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("−{out}") } else { out }
}

pub(super) fn signed(v: f64) -> String {
    if v.round() >= 0.0 {
        format!("+{}", int(v))
    } else {
        int(v)
    }
}

pub(super) fn ms(us: f64) -> String {
    if us.is_nan() {
        "–".into()
    } else {
        format!("{:.2}", us / 1e3)
    }
}

pub(super) fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**missed**" }
}

/// Per-request instructions of `label` under `serve`/`h2`, if measured.
pub(super) fn ir<'a>(
    cases: &'a [CaseResult],
    label: &str,
    serve: &str,
    h2: bool,
) -> Option<&'a CaseResult> {
    cases
        .iter()
        .find(|c| c.case.label == label && c.case.serve == serve && c.case.h2 == h2)
        .filter(|c| !c.per_request.is_empty())
}

/// Mean instructions per request of a row.
pub(super) fn mean(cases: &[CaseResult], label: &str, serve: &str, h2: bool) -> Option<f64> {
    ir(cases, label, serve, h2).map(CaseResult::mean)
}

/// The ratio of a row to the one denominator: `bare` under plain `axum::serve`, same
/// protocol.
pub(super) fn ratio(cases: &[CaseResult], label: &str, serve: &str, h2: bool) -> Option<f64> {
    Some(mean(cases, label, serve, h2)? / mean(cases, "bare", "axum", h2)?)
}

/// `1.248× (+3,221)` for a row, or `–`.
pub(super) fn ratio_delta(cases: &[CaseResult], label: &str, serve: &str, h2: bool) -> String {
    match (
        ratio(cases, label, serve, h2),
        mean(cases, label, serve, h2),
        mean(cases, "bare", "axum", h2),
    ) {
        (Some(x), Some(m), Some(b)) => format!("{x:.3}× ({})", signed(m - b)),
        _ => "–".into(),
    }
}

pub(super) fn verdict(ok: Option<bool>) -> &'static str {
    ok.map_or("–", met)
}

pub(super) fn serve_name(serve: &str) -> &'static str {
    if serve == "axum" {
        "`axum::serve`"
    } else {
        "`tower_reqctx::serve`"
    }
}
