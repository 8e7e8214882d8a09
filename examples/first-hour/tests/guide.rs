//! The guide's checked snippets are the examples' code, as written: a fenced block right
//! after `<!-- checked: PATH -->` is the whole file at PATH, after
//! `<!-- checked: PATH#NAME -->` the lines between `// [guide:NAME]` and `// [/guide:NAME]`
//! in it (without their common indentation). For a `Cargo.toml`, the block's
//! `[dependencies]` are the example's, crate for crate, with at least the block's features.
//! The examples build and run in CI, so the snippets compile as written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Each checked snippet: the marker's target and the fenced block's lines.
fn snippets(guide: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = guide.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(target) = line
            .trim()
            .strip_prefix("<!-- checked: ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        let open = lines[i + 1..]
            .iter()
            .position(|l| l.starts_with("```"))
            .map(|p| i + 1 + p)
            .unwrap_or_else(|| panic!("no block after the marker for {target}"));
        let close = lines[open + 1..]
            .iter()
            .position(|l| l.starts_with("```"))
            .map(|p| open + 1 + p)
            .unwrap_or_else(|| panic!("an unclosed block for {target}"));
        out.push((target.to_owned(), lines[open + 1..close].join("\n")));
    }
    out
}

/// The lines between the region's markers, dedented.
fn region(file: &str, name: &str) -> String {
    let open = format!("// [guide:{name}]");
    let close = format!("// [/guide:{name}]");
    let lines: Vec<&str> = file
        .lines()
        .skip_while(|l| l.trim() != open)
        .skip(1)
        .take_while(|l| l.trim() != close)
        .collect();
    assert!(!lines.is_empty(), "no region {name}");
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let dedented: Vec<&str> = lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect();
    dedented.join("\n")
}

/// `name -> features` of the `[dependencies]` lines of a manifest or a guide block.
fn dependencies(toml: &str) -> BTreeMap<String, Vec<String>> {
    let mut deps = BTreeMap::new();
    let mut in_deps = false;
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        let Some((name, spec)) = line.split_once('=') else {
            continue;
        };
        if !in_deps || line.starts_with('#') {
            continue;
        }
        let features = spec
            .split_once("features = [")
            .map(|(_, rest)| rest.split(']').next().unwrap_or(""))
            .unwrap_or("")
            .split(',')
            .map(|f| f.trim().trim_matches('"').to_owned())
            .filter(|f| !f.is_empty())
            .collect();
        deps.insert(name.trim().to_owned(), features);
    }
    deps
}

#[test]
fn the_guides_checked_snippets_are_the_examples_code() {
    let guide = read(&root().join("docs/guide.md"));
    let snippets = snippets(&guide);
    assert!(
        snippets.len() >= 5,
        "the markers went missing: {snippets:?}"
    );
    for (target, block) in snippets {
        let (path, name) = match target.split_once('#') {
            Some((path, name)) => (path, Some(name)),
            None => (target.as_str(), None),
        };
        let file = read(&root().join(path));
        if path.ends_with("Cargo.toml") {
            let guide_deps = dependencies(&format!("[dependencies]\n{block}"));
            let example_deps = dependencies(&file);
            let names = |d: &BTreeMap<String, Vec<String>>| d.keys().cloned().collect::<Vec<_>>();
            assert_eq!(names(&guide_deps), names(&example_deps), "{target}");
            for (name, features) in &guide_deps {
                for f in features {
                    assert!(example_deps[name].contains(f), "{target}: {name}'s {f}");
                }
            }
            continue;
        }
        let expected = match name {
            Some(name) => region(&file, name),
            None => file.trim_end().to_owned(),
        };
        assert_eq!(
            block.trim_end(),
            expected,
            "the guide's block for {target} differs from the example"
        );
    }
}
