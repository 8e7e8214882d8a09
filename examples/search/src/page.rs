//! The results page: HTML for a person, or JSON with the same facts.
//!
//! The deadline shown is the one the request's context has (`ctx.deadline()`,
//! `ctx.remaining()`, `ctx.deadline_origin()`), not what the query string asked for: a
//! `?timeout=99999999999h` is clamped, a route has its own timeout, a second `timeout`
//! parameter is ignored, and only the context knows what applied.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tower_reqctx::reqctx::DeadlineOrigin;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Hit {
    pub(crate) title: String,
    pub(crate) url: String,
    pub(crate) snippet: String,
}

/// The request's deadline as its context has it.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Deadline {
    /// Time left when the handler started, in milliseconds.
    pub(crate) budget_ms: f64,
    /// Time left when the page was made.
    pub(crate) left_ms: f64,
    /// Who set it: `query`, `layer`, `header` or `code`.
    pub(crate) origin: &'static str,
    #[serde(skip)]
    pub(crate) origin_text: &'static str, // "the client's `timeout` parameter", ...
}

impl Deadline {
    pub(crate) fn new(budget: Duration, left: Duration, origin: DeadlineOrigin) -> Deadline {
        let (origin, origin_text) = match origin {
            DeadlineOrigin::Query => ("query", "your timeout parameter"),
            DeadlineOrigin::Header => ("header", "the caller's deadline header"),
            DeadlineOrigin::Layer => ("layer", "the server's timeout for this page"),
            DeadlineOrigin::Code => ("code", "the application"),
            _ => ("other", "the server"),
        };
        Deadline {
            budget_ms: budget.as_secs_f64() * 1e3,
            left_ms: left.as_secs_f64() * 1e3,
            origin,
            origin_text,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Page {
    pub(crate) query: String,
    pub(crate) user_ip: String,
    pub(crate) results: Vec<Hit>,
    pub(crate) elapsed_ms: f64,
    pub(crate) deadline: Option<Deadline>, // None: the request has no deadline
    pub(crate) live_view: bool,            // link to the live view (`--serve`)
}

/// "1 result", "2 results", "no results".
pub(crate) fn count(n: usize) -> String {
    match n {
        0 => "no results".to_owned(),
        1 => "1 result".to_owned(),
        n => format!("{n} results"),
    }
}

/// A duration in milliseconds as a person reads it: `850 ms`, `2 s`, `1.25 s`, `0.4 ms`.
pub(crate) fn human_ms(ms: f64) -> String {
    if ms >= 999.5 {
        let s = format!("{:.2}", ms / 1e3);
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s} s")
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

const STYLE: &str = "
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --accent: #0b57d0; --line: #d1d9e0; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: var(--ink); background: #f6f8fa; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 1rem 0; }
.wrap { max-width: 46rem; margin: 0 auto; padding: 0 1.25rem; }
form { display: flex; gap: .5rem; }
input[type=search] { flex: 1; font: inherit; padding: .5rem .85rem; border: 1px solid var(--line); border-radius: 2rem; }
button { font: inherit; padding: .5rem 1.1rem; border: 0; border-radius: 2rem; background: var(--accent); color: #fff; cursor: pointer; }
.brand { font-weight: 650; margin-right: .75rem; align-self: center; }
.meta { color: var(--muted); font-size: .92rem; margin: 1.1rem 0 .4rem; }
.deadline { display: inline-block; background: #fff; border: 1px solid var(--line); border-radius: .5rem; padding: .45rem .75rem; font-size: .92rem; }
.deadline b { font-variant-numeric: tabular-nums; }
ol { list-style: none; padding: 0; margin: 1rem 0 2rem; }
li { background: #fff; border: 1px solid var(--line); border-radius: .6rem; padding: .85rem 1rem; margin-bottom: .7rem; }
li a { color: var(--accent); font-weight: 600; text-decoration: none; font-size: 1.05rem; }
li a:hover { text-decoration: underline; }
.url { color: #1a7f37; font-size: .85rem; overflow-wrap: anywhere; }
.snippet { margin: .25rem 0 0; }
.empty { color: var(--muted); }
";

/// The page, with everything the user typed escaped.
pub(crate) fn render(page: &Page) -> String {
    let q = escape(&page.query);
    let mut html = String::with_capacity(4096);
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head><body>\n\
         <header><div class=\"wrap\"><form action=\"\" method=\"get\">\
         <span class=\"brand\">reqctx search</span>\
         <input type=\"search\" name=\"q\" value=\"{q}\" placeholder=\"golang, context, rust\">\
         <button>Search</button></form></div></header>\n<main class=\"wrap\">\n",
        title = if page.query.is_empty() {
            "reqctx search".to_owned()
        } else {
            format!("{q} – reqctx search")
        },
    );
    if page.query.is_empty() {
        html.push_str(
            "<p class=\"meta\">Type a query. Add <code>&amp;timeout=50ms</code> and \
             <code>&amp;latency_ms=500</code> to watch a deadline pass.</p>\n",
        );
    } else {
        let _ = writeln!(
            html,
            "<p class=\"meta\">{n} for “{q}” in {ms}. Your address: {ip}.</p>",
            n = count(page.results.len()),
            ms = human_ms(page.elapsed_ms),
            ip = escape(&page.user_ip),
        );
    }
    match &page.deadline {
        Some(d) => {
            let _ = writeln!(
                html,
                "<p class=\"deadline\">Deadline <b>{budget}</b>, set by {origin}; \
                 <b>{left}</b> left when this page was made.</p>",
                budget = human_ms(d.budget_ms),
                origin = d.origin_text,
                left = human_ms(d.left_ms),
            );
        }
        None => html.push_str("<p class=\"deadline\">No deadline.</p>\n"),
    }
    if !page.query.is_empty() {
        if page.results.is_empty() {
            html.push_str("<p class=\"empty\">Nothing matched. Try “context”.</p>\n");
        } else {
            html.push_str("<ol>\n");
            for hit in &page.results {
                let _ = writeln!(
                    html,
                    "<li><a href=\"{url}\">{title}</a><div class=\"url\">{url}</div>\
                     <p class=\"snippet\">{snippet}</p></li>",
                    url = escape(&hit.url),
                    title = escape(&hit.title),
                    snippet = escape(&hit.snippet),
                );
            }
            html.push_str("</ol>\n");
        }
    }
    if page.live_view {
        html.push_str(
            "<p class=\"meta\"><a href=\"/debug/requests\">Requests in flight, and how the \
             last ones ended</a> (the live view)</p>\n",
        );
    }
    html.push_str("</main></body></html>\n");
    html
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(results: usize, deadline: Option<Deadline>) -> Page {
        Page {
            query: "<golang>".into(),
            user_ip: "127.0.0.1".into(),
            results: (0..results)
                .map(|i| Hit {
                    title: format!("t{i}"),
                    url: format!("https://example.com/{i}?a=1&b=2"),
                    snippet: "s".into(),
                })
                .collect(),
            elapsed_ms: 12.34,
            deadline,
            live_view: false,
        }
    }

    /// The text a person reads, tags removed.
    fn text(html: &str) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in html.split("</style>").nth(1).unwrap().chars() {
            match c {
                '<' => in_tag = true,
                '>' => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out
    }

    #[test]
    fn counts_in_words() {
        assert_eq!(count(0), "no results");
        assert_eq!(count(1), "1 result");
        assert_eq!(count(2), "2 results");
        assert!(text(&render(&page(1, None))).contains("1 result for"));
    }

    #[test]
    fn shows_the_contexts_deadline_without_nested_parentheses() {
        let d = Deadline::new(
            Duration::from_millis(100),
            Duration::from_millis(40),
            DeadlineOrigin::Layer,
        );
        let t = text(&render(&page(3, Some(d))));
        assert!(
            t.contains("Deadline 100 ms, set by the server's timeout for this page; 40 ms left"),
            "{t}"
        );
        // No parenthesis inside another.
        let mut depth = 0;
        for c in t.chars() {
            match c {
                '(' => {
                    depth += 1;
                    assert!(depth < 2, "{t}");
                }
                ')' => depth -= 1,
                _ => {}
            }
        }
        let d = Deadline::new(
            Duration::from_secs(2),
            Duration::from_millis(1987),
            DeadlineOrigin::Query,
        );
        assert!(
            text(&render(&page(0, Some(d))))
                .contains("Deadline 2 s, set by your timeout parameter; 1.99 s")
        );
    }

    #[test]
    fn escapes_what_the_user_typed() {
        let html = render(&page(1, None));
        assert!(!html.contains("<golang>"));
        assert!(html.contains("&lt;golang&gt;"));
        assert!(html.contains("?a=1&amp;b=2"));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ms(0.42), "0.4 ms");
        assert_eq!(human_ms(49.6), "50 ms");
        assert_eq!(human_ms(999.4), "999 ms");
        assert_eq!(human_ms(2000.0), "2 s");
        assert_eq!(human_ms(1999.96), "2 s");
        assert_eq!(human_ms(1250.0), "1.25 s");
        assert_eq!(human_ms(1500.0), "1.5 s");
    }
}
