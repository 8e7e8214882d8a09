//! Heap allocations per request: the server under `valgrind --tool=dhat`, two-point as
//! for the instruction counts, in all and by allocation site.
//!
//! How a site is named: DHAT records the full stack of every allocation; the site is the
//! first frame, walking out from `malloc`, that is not allocator plumbing (`Box::new`,
//! `Arc::new`, `RawVec`, hashbrown's growth…), so an `Arc::new` in `CancelNode::new` is
//! counted as `CancelNode::new`, followed by the next such frame, its caller
//! (`HashMap::insert ← Extensions::insert`). Inlining can move a site into its caller; the
//! counts and bytes are exact either way.

use std::collections::HashMap;
use std::path::Path;

use crate::instructions::{Case, Settings, cases, under_valgrind};
use crate::procs::Bins;

/// Frames that say how, not where: skipped when naming a site.
const PLUMBING: [&str; 22] = [
    "malloc",
    "realloc",
    "calloc",
    "alloc::alloc",
    "__rust_alloc",
    "__rdl",
    "alloc::raw_vec",
    "RawVec",
    "exchange_malloc",
    "finish_grow",
    "do_reserve_and_handle",
    "grow_one",
    "Box<T>::new",
    "Box<T>::pin",
    "Arc<T>::new",
    "alloc::sync::Arc<T",
    "reserve_rehash",
    "RawTableInner",
    "RawTable<T,A>::reserve",
    "with_capacity",
    "new_uninitialized",
    "{{vtable.shim}}",
];

/// Allocations (blocks) and bytes, by site.
type Sites = HashMap<String, (f64, f64)>;

/// What one case allocates per request.
#[derive(Clone, Debug)]
pub(crate) struct CaseAllocations {
    pub(crate) case: Case,
    pub(crate) blocks: f64,
    pub(crate) bytes: f64,
    pub(crate) sites: Sites,
}

/// Every HTTP/1.1 case under plain `axum::serve` and `serve` (`quick`: bare, noop and ctx
/// under `axum::serve`).
pub(crate) fn measure(
    bins: &Bins,
    dir: &Path,
    settings: Settings,
) -> Result<Vec<CaseAllocations>, String> {
    let mut all = Vec::new();
    for case in cases(settings.quick)
        .into_iter()
        .filter(|c| !c.h2 && c.serve != "reqctx-notimer")
        .filter(|c| !settings.quick || c.serve == "axum")
    {
        let mut points = Vec::new();
        for n in [settings.n1, settings.n2] {
            let name = format!("dhat-{}-{}-{n}", case.label, case.serve);
            let out = dir.join(format!("{name}.json"));
            let tool = [
                "--tool=dhat".to_owned(),
                format!("--dhat-out-file={}", out.display()),
            ];
            under_valgrind(bins, dir, &case, n, &name, &tool)?;
            points.push(parse(&out)?);
        }
        let dn = (settings.n2 - settings.n1) as f64;
        let mut sites = Sites::new();
        for (site, (b2, y2)) in &points[1] {
            let (b1, y1) = points[0].get(site).copied().unwrap_or((0.0, 0.0));
            let per = ((b2 - b1) / dn, (y2 - y1) / dn);
            if per.0.abs() >= 0.005 {
                sites.insert(site.clone(), per);
            }
        }
        all.push(CaseAllocations {
            case,
            blocks: sites.values().map(|v| v.0).sum(),
            bytes: sites.values().map(|v| v.1).sum(),
            sites,
        });
    }
    Ok(all)
}

/// Blocks and bytes by site, from DHAT's JSON (`pps`: program points with `tbk` total
/// blocks, `tb` total bytes and `fs` frame indexes into `ftbl`).
fn parse(path: &Path) -> Result<Sites, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path:?}: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{path:?}: {e}"))?;
    let frames: Vec<&str> = json["ftbl"]
        .as_array()
        .ok_or("no ftbl")?
        .iter()
        .map(|f| f.as_str().unwrap_or(""))
        .collect();
    let mut sites = Sites::new();
    for pp in json["pps"].as_array().ok_or("no pps")? {
        let named: Vec<String> = pp["fs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| frames.get(i.as_u64()? as usize).copied())
            .filter(|f| !PLUMBING.iter().any(|p| f.contains(p)))
            .take(2)
            .map(site_name)
            .collect();
        let site = if named.is_empty() {
            "?".to_owned()
        } else {
            named.join(" ← ")
        };
        let entry = sites.entry(site).or_default();
        entry.0 += pp["tbk"].as_f64().unwrap_or(0.0);
        entry.1 += pp["tb"].as_f64().unwrap_or(0.0);
    }
    let _ = std::fs::remove_file(path);
    Ok(sites)
}

/// `0x1234: name (in /path)` → `name`.
fn site_name(frame: &str) -> String {
    let name = frame.split_once(": ").map_or(frame, |(_, n)| n);
    let name = match name.rfind(" (in ") {
        Some(at) => &name[..at],
        None => name,
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sites() {
        assert_eq!(
            site_name("0x4A2F1B: reqctx::node::CancelNode::new (in /x/server)"),
            "reqctx::node::CancelNode::new"
        );
    }
}
