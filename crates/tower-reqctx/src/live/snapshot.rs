//! What the view shows, read from the registry at one instant: the page's JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use super::registry::{
    BUCKETS, CAUSES, Counters, Ended, Extras, HOUR_STEP, HOUR_STEPS, Live, MINUTE_STEP,
    MINUTE_STEPS, ORIGINS, Origin, Registry, STATES, State, UNMATCHED, Window, lock, method_name,
};

/// What a [`LiveView`](super::LiveView) shows at one instant: the page's JSON
/// (`?format=json`), field for field.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// Milliseconds since the view was made.
    pub uptime_ms: u64,
    /// The heap the view holds, in bytes, from its tables' capacities: bounded by the
    /// peak number of requests in flight and the settings, whatever the load.
    pub memory_bytes: usize,
    /// The requests in flight, oldest first.
    pub in_flight: InFlight,
    /// The last requests that ended, per cause.
    pub recent: Recent,
    /// Counts per route over the last minute and the last hour.
    pub routes: Routes,
    /// The names of the latency buckets of [`WindowCounts::buckets`].
    pub buckets: [&'static str; 5],
}

/// The requests in flight.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct InFlight {
    /// How many are in flight.
    pub total: usize,
    /// How many rows follow (the oldest `limit` at most).
    pub shown: usize,
    /// The most rows shown ([`LiveView::max_rows`](super::LiveView::max_rows)).
    pub limit: usize,
    /// One per request, oldest first.
    pub rows: Vec<Row>,
}

/// A request in flight.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Row {
    /// The view's own id for the request, unique in the view.
    pub id: u64,
    /// The request's method.
    pub method: String,
    /// The matched route (axum's `MatchedPath`, such as `/users/{id}`); `None` when no
    /// route matched or the layer sits outside the router.
    pub route: Option<String>,
    /// The request's path, when [`show_path`](super::LiveView::show_path) is on.
    pub path: Option<String>,
    /// Its query string, when [`show_query`](super::LiveView::show_query) is on.
    pub query: Option<String>,
    /// The headers [`show_header`](super::LiveView::show_header) names, with their values.
    pub headers: Vec<(String, String)>,
    /// Milliseconds since the layer received it.
    pub age_ms: f64,
    /// Milliseconds left before its deadline (negative once it has passed); `None`
    /// without a deadline.
    pub budget_ms: Option<f64>,
    /// Who set the deadline: `query`, `header`, `layer` or `route`.
    pub origin: Option<&'static str>,
    /// `connected` or `disconnected`: whether the request's connection is still open,
    /// under [`serve`](crate::serve) and `WatchedListener`; `None` where the layer has
    /// no connection to watch (plain `axum::serve`).
    pub client: Option<&'static str>,
    /// `running` (the handler has not answered), `streaming` (the body is being sent) or
    /// `upgraded` (held as a WebSocket or a tunnel).
    pub state: &'static str,
}

/// The last requests that ended, per cause.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Recent {
    /// How many are kept per cause ([`LiveView::recent_per_cause`](super::LiveView::recent_per_cause)).
    pub per_cause: usize,
    /// One entry per cause seen, in a fixed order (`completed` first).
    pub causes: Vec<CauseRing>,
}

/// The last requests that ended with one cause.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct CauseRing {
    /// The cause's label, as in the logs and metrics (`deadline_exceeded`).
    pub cause: &'static str,
    /// Newest first.
    pub requests: Vec<EndedRow>,
}

/// A request that ended.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct EndedRow {
    /// As in [`Row`].
    pub id: u64,
    /// As in [`Row`].
    pub method: String,
    /// As in [`Row`].
    pub route: Option<String>,
    /// As in [`Row`].
    pub path: Option<String>,
    /// As in [`Row`].
    pub query: Option<String>,
    /// As in [`Row`].
    pub headers: Vec<(String, String)>,
    /// From the layer receiving it to the end of its context.
    pub duration_ms: f64,
    /// The response's status; `None` when there was no response (the client left first).
    pub status: Option<u16>,
    /// The cause's label.
    pub cause: &'static str,
    /// The cause, in words (`deadline exceeded (set by the client's query parameter)`).
    pub detail: String,
    /// Milliseconds since it ended.
    pub ago_ms: f64,
}

/// Counts per route.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Routes {
    /// The route cap ([`LiveView::max_routes`](super::LiveView::max_routes)); the rest
    /// count under `other`.
    pub max: usize,
    /// One per route that ended a request in the last hour, by name.
    pub rows: Vec<RouteRow>,
}

/// One route's counts.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct RouteRow {
    /// The route, `other` (past the cap) or `(no route)`.
    pub route: String,
    /// The last minute (in 10-second steps: 50 to 60 seconds).
    pub minute: WindowCounts,
    /// The last hour (in 5-minute steps: 55 to 60 minutes).
    pub hour: WindowCounts,
}

/// Counts over a window.
#[derive(Clone, Debug, Default, Serialize)]
#[non_exhaustive]
pub struct WindowCounts {
    /// Requests that ended in the window.
    pub total: u64,
    /// By cause label; only the causes seen.
    pub causes: BTreeMap<&'static str, u64>,
    /// Requests that took longer than each bucket: all, >10 ms, >100 ms, >1 s, >10 s.
    pub buckets: [u64; 5],
}

impl WindowCounts {
    fn add(&mut self, w: &Window) {
        for (c, &n) in w.causes.iter().enumerate() {
            if n > 0 {
                *self.causes.entry(CAUSES[c]).or_default() += u64::from(n);
                self.total += u64::from(n);
            }
        }
        // Cumulative: a request above 1 s is also above 10 ms.
        let mut above = 0;
        for b in (0..BUCKETS.len()).rev() {
            above += u64::from(w.buckets[b]);
            self.buckets[b] += above;
        }
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn extras(e: Option<&Extras>) -> (Option<String>, Option<String>, Vec<(String, String)>) {
    let Some(e) = e else {
        return (None, None, Vec::new());
    };
    let headers = e
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_string()))
        .collect();
    (
        e.path.as_deref().map(str::to_owned),
        e.query.as_deref().map(str::to_owned),
        headers,
    )
}

impl Registry {
    pub(crate) fn snapshot(&self) -> Snapshot {
        let now = self.now();
        let now_instant = self.now_instant();
        let names = self.route_names();
        let hidden = lock(&self.hidden).clone();
        let s = &self.settings;
        let route_name = |id: u16| -> Option<String> {
            (id != UNMATCHED).then(|| {
                names
                    .get(usize::from(id))
                    .map_or("other", |n| &**n)
                    .to_owned()
            })
        };

        // In flight: each shard's live slots copied out under its lock (a clone of the
        // connection's handle, and of the extras of a view that shows some), then sorted.
        let mut live: Vec<(Live, u8)> = Vec::new();
        for (n, shard) in self.shards.iter().enumerate() {
            let shard = lock(shard);
            let slots = shard.slots.iter().enumerate();
            live.extend(
                slots
                    .filter(|(_, l)| l.id != 0 && !hidden.contains(&l.route))
                    .map(|(i, l)| (l.clone(), self.state(n, i, l))),
            );
        }
        let total = live.len();
        live.sort_unstable_by_key(|(l, _)| (l.start, l.id));
        live.truncate(s.max_rows);
        let rows: Vec<Row> = live
            .iter()
            .map(|(l, state)| self.row(l, *state, (now, now_instant), &route_name))
            .collect();

        // Recent: each cause's rings merged, newest first.
        let mut causes: Vec<Vec<(u64, EndedRow)>> = (0..CAUSES.len()).map(|_| Vec::new()).collect();
        let mut counters: BTreeMap<u16, (WindowCounts, WindowCounts)> = BTreeMap::new();
        let secs = now / 1_000_000_000;
        let (m, h) = (secs / MINUTE_STEP, secs / HOUR_STEP);
        let recent_minute = |step: u64| step != u64::MAX && step + MINUTE_STEPS as u64 > m;
        let recent_hour = |step: u64| step != u64::MAX && step + HOUR_STEPS as u64 > h;
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (c, ring) in shard.recent.iter().enumerate() {
                for e in &ring.entries {
                    if hidden.contains(&e.route) {
                        continue;
                    }
                    causes[c].push((e.at, self.ended(e, c, now, &route_name)));
                }
            }
            for (route, Counters { minute, hour }) in shard.counters.iter().enumerate() {
                let route = route as u16;
                if hidden.contains(&route) {
                    continue;
                }
                let in_hour = hour.iter().any(|w| recent_hour(w.step));
                if !in_hour {
                    continue;
                }
                let entry = counters.entry(route).or_default();
                for w in minute.iter().filter(|w| recent_minute(w.step)) {
                    entry.0.add(w);
                }
                for w in hour.iter().filter(|w| recent_hour(w.step)) {
                    entry.1.add(w);
                }
            }
        }
        let causes = causes
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(c, mut v)| {
                v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.id.cmp(&a.1.id)));
                v.truncate(s.recent_per_cause);
                CauseRing {
                    cause: CAUSES[c],
                    requests: v.into_iter().map(|(_, r)| r).collect(),
                }
            })
            .collect();
        let mut route_rows: Vec<RouteRow> = counters
            .into_iter()
            .map(|(id, (minute, hour))| RouteRow {
                route: route_name(id).unwrap_or_else(|| "(no route)".to_owned()),
                minute,
                hour,
            })
            .collect();
        route_rows.sort_by(|a, b| a.route.cmp(&b.route));

        Snapshot {
            uptime_ms: now / 1_000_000,
            memory_bytes: self.heap_bytes(),
            in_flight: InFlight {
                total,
                shown: rows.len(),
                limit: s.max_rows,
                rows,
            },
            recent: Recent {
                per_cause: s.recent_per_cause,
                causes,
            },
            routes: Routes {
                max: s.max_routes,
                rows: route_rows,
            },
            buckets: BUCKETS,
        }
    }

    fn row(
        &self,
        l: &Live,
        state: u8,
        (now, now_instant): (u64, u64),
        route_name: &impl Fn(u16) -> Option<String>,
    ) -> Row {
        let (path, query, headers) = extras(l.extras.as_deref());
        let origin = ORIGINS[usize::from(l.origin)];
        let deadline = (origin != Origin::None).then_some(l.deadline);
        let budget_ms = deadline.map(|at| match at.checked_sub(now_instant) {
            Some(left) => ms(left),
            None => -ms(now_instant - at),
        });
        Row {
            id: l.id,
            method: method_name(l.method, l.extras.as_deref()),
            route: route_name(l.route),
            path,
            query,
            headers,
            age_ms: ms(now.saturating_sub(l.start)),
            budget_ms,
            origin: deadline.map(|_| origin.name()),
            client: l.conn.as_ref().map(|c| match c.context().is_cancelled() {
                true => "disconnected",
                false => "connected",
            }),
            state: match STATES[usize::from(state)] {
                State::Running => "running",
                State::Streaming => "streaming",
                State::Upgraded => "upgraded",
            },
        }
    }

    fn ended(
        &self,
        e: &Ended,
        c: usize,
        now: u64,
        route_name: &impl Fn(u16) -> Option<String>,
    ) -> EndedRow {
        let (path, query, headers) = extras(e.extras.as_deref());
        EndedRow {
            id: e.id,
            method: method_name(e.method, e.extras.as_deref()),
            route: route_name(e.route),
            path,
            query,
            headers,
            duration_ms: ms(e.duration),
            status: (e.status != 0).then_some(e.status),
            cause: CAUSES[c],
            detail: match (c, ORIGINS[usize::from(e.origin)]) {
                (1, Origin::Route) => "deadline exceeded (set by the route's timeout)".to_owned(),
                _ => e.cause(c).to_string(),
            },
            ago_ms: ms(now.saturating_sub(e.at)),
        }
    }
}
