//! The registry behind a [`LiveView`](super::LiveView): what the layer writes per request.
//!
//! Sharded by the thread that registers the request (a request ends in the shard it began
//! in, whatever thread ends it). Each shard is one mutex over a slab of in-flight slots,
//! its share of the recent rings and of the per-route counters. A request takes the lock
//! of its shard when it registers, when its body starts to stream (or it is held as an
//! upgrade), and when it ends: no allocation once the slab, the rings and the counters
//! have grown to the load (they grow in steps, never per request, and never shrink below
//! it), and no lock shared between shards on the request's path.
//!
//! Memory is bounded whatever the load: the slab by the peak number of requests in flight,
//! the rings by `recent_per_cause` per cause and shard, the counters by the route cap per
//! shard (routes past the cap count under "other"), the interned routes by the cap.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Method, Uri};
use reqctx::{Cause, DeadlineOrigin};

use crate::cause::{HandlerPanicked, ResponseBodyFailed, ResponseDiscarded, ServiceFailed};
use crate::connection::ConnectionContext;

/// Route id of a request with no matched route (no axum `MatchedPath`: the layer outside
/// the router, or a fallback).
pub(crate) const UNMATCHED: u16 = 0;
/// Route id of every route past the cap.
pub(crate) const OTHER: u16 = 1;
const FIRST_ROUTE: u16 = 2;

/// Cause kinds, in the order of [`CAUSES`].
pub(crate) const CAUSES: [&str; 10] = [
    "completed",
    "deadline_exceeded",
    "client_disconnected",
    "shutdown",
    "cancelled",
    "handler_panicked",
    "service_failed",
    "response_discarded",
    "response_body_failed",
    "custom",
];

fn cause_index(cause: &Cause) -> usize {
    match cause {
        Cause::Completed => 0,
        Cause::DeadlineExceeded { .. } => 1,
        Cause::ClientDisconnected => 2,
        Cause::Shutdown => 3,
        Cause::Cancelled => 4,
        _ => {
            if cause.downcast_ref::<HandlerPanicked>().is_some() {
                5
            } else if cause.downcast_ref::<ServiceFailed>().is_some() {
                6
            } else if cause.downcast_ref::<ResponseDiscarded>().is_some() {
                7
            } else if cause.downcast_ref::<ResponseBodyFailed>().is_some() {
                8
            } else {
                9
            }
        }
    }
}

/// Latency buckets, as `golang.org/x/net/trace`'s: every request, then above 10 ms, 100 ms,
/// 1 s and 10 s.
pub(crate) const BUCKETS: [&str; 5] = ["all", ">10ms", ">100ms", ">1s", ">10s"];

fn bucket(d: Duration) -> usize {
    match d.as_millis() {
        0..=10 => 0,
        11..=100 => 1,
        101..=1_000 => 2,
        1_001..=10_000 => 3,
        _ => 4,
    }
}

/// The last minute in 10-second steps, the last hour in 5-minute steps.
pub(crate) const MINUTE_STEP: u64 = 10;
pub(crate) const MINUTE_STEPS: usize = 6;
pub(crate) const HOUR_STEP: u64 = 300;
pub(crate) const HOUR_STEPS: usize = 12;

/// Who set a live request's deadline, as the view shows it: a route's timeout is told
/// apart from the layer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Query,
    Header,
    Layer,
    Route,
    Code,
}

impl Origin {
    pub(crate) fn of(origin: DeadlineOrigin) -> Origin {
        match origin {
            DeadlineOrigin::Query => Origin::Query,
            DeadlineOrigin::Header => Origin::Header,
            DeadlineOrigin::Layer => Origin::Layer,
            _ => Origin::Code,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Origin::Query => "query",
            Origin::Header => "header",
            Origin::Layer => "layer",
            Origin::Route => "route",
            Origin::Code => "code",
        }
    }
}

/// Where a live request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Running,
    Streaming,
    Upgraded,
}

/// What the view shows of a request beyond the default fields: only what the user opted
/// in to (see [`LiveView::show_path`](super::LiveView::show_path) and the others). Boxed,
/// and made only when some field is on.
#[derive(Clone, Debug, Default)]
pub(crate) struct Extras {
    pub(crate) uri: Option<Uri>,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

/// The settings, fixed when the view is made.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) recent_per_cause: usize,
    pub(crate) max_routes: usize,
    pub(crate) max_rows: usize,
    pub(crate) show_path: bool,
    pub(crate) show_query: bool,
    pub(crate) headers: Vec<HeaderName>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            recent_per_cause: 10,
            max_routes: 64,
            max_rows: 1_000,
            show_path: false,
            show_query: false,
            headers: Vec::new(),
        }
    }
}

impl Settings {
    fn wants_extras(&self) -> bool {
        self.show_path || self.show_query || !self.headers.is_empty()
    }
}

/// One request in flight.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) id: u64,
    pub(crate) method: Method,
    pub(crate) route: u16,
    pub(crate) state: State,
    pub(crate) start: Instant,
    pub(crate) deadline: Option<(Instant, Origin)>,
    pub(crate) conn: Option<ConnectionContext>,
    pub(crate) extras: Option<Box<Extras>>,
}

/// One request that ended, in its cause's ring.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) id: u64,
    pub(crate) method: Method,
    pub(crate) route: u16,
    pub(crate) status: u16, // 0: no response
    pub(crate) duration: Duration,
    pub(crate) at: Instant,
    pub(crate) cause: Cause,
    pub(crate) extras: Option<Box<Extras>>,
}

/// The last `n` ended requests of one cause, in one shard.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    pub(crate) entries: Vec<Ended>,
    next: usize,
}

impl Ring {
    fn push(&mut self, n: usize, ended: Ended) {
        if self.entries.len() < n {
            if self.entries.capacity() == 0 {
                self.entries.reserve_exact(n);
            }
            self.entries.push(ended);
        } else if n > 0 {
            self.entries[self.next] = ended;
            self.next = (self.next + 1) % n;
        }
    }
}

/// Counts of one time step.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Window {
    pub(crate) step: u64,
    pub(crate) causes: [u32; CAUSES.len()],
    pub(crate) buckets: [u32; BUCKETS.len()], // not cumulative: bucket `b` only
}

impl Window {
    fn count(&mut self, step: u64, cause: usize, bucket: usize) {
        if self.step != step {
            *self = Window {
                step,
                ..Window::default()
            };
        }
        self.causes[cause] = self.causes[cause].saturating_add(1);
        self.buckets[bucket] = self.buckets[bucket].saturating_add(1);
    }
}

/// One route's counts in one shard.
#[derive(Clone, Debug)]
pub(crate) struct Counters {
    pub(crate) minute: [Window; MINUTE_STEPS],
    pub(crate) hour: [Window; HOUR_STEPS],
}

impl Default for Counters {
    fn default() -> Counters {
        // Step 0 is a real step: mark the windows as never used.
        let unused = Window {
            step: u64::MAX,
            ..Window::default()
        };
        Counters {
            minute: [unused; MINUTE_STEPS],
            hour: [unused; HOUR_STEPS],
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Shard {
    pub(crate) slots: Vec<Option<Live>>,
    free: Vec<u32>,
    pub(crate) live: usize,
    next_id: u64,
    // The shard's cache of the registry's route ids.
    route_ids: HashMap<Arc<str>, u16, BuildHasherDefault<FxHasher>>,
    pub(crate) recent: Vec<Ring>,       // by cause
    pub(crate) counters: Vec<Counters>, // by route id
}

/// The registry of one [`LiveView`](super::LiveView).
#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) settings: Settings,
    pub(crate) epoch: Instant,
    shard_bits: u32,
    pub(crate) shards: Box<[Mutex<Shard>]>,
    // Interned route names, by id; ids 0 and 1 are "unmatched" and "other".
    routes: Mutex<Routes>,
    // Routes the view itself is served on: not listed.
    pub(crate) hidden: Mutex<Vec<u16>>,
}

#[derive(Debug, Default)]
struct Routes {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u16, BuildHasherDefault<FxHasher>>,
}

/// The live request's handle, in its owner: where its slot is, and its status.
#[derive(Debug)]
pub(crate) struct Ticket {
    registry: Arc<Registry>,
    slot: u32,
    status: u16,
}

const INDEX_BITS: u32 = 24;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The registry holds counts: a panic while one was held leaves nothing unsafe to read.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// The shard this thread registers in: threads are spread over the shards in turn.
    static SHARD: Cell<u32> = const { Cell::new(u32::MAX) };
}

fn thread_shard() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    SHARD.with(|s| {
        let mut n = s.get();
        if n == u32::MAX {
            n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xff;
            s.set(n);
        }
        n
    })
}

impl Registry {
    pub(crate) fn new(settings: Settings) -> Registry {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        let shards = cpus.next_power_of_two().clamp(1, 64);
        Registry {
            settings,
            epoch: Instant::now(),
            shard_bits: shards.trailing_zeros(),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            routes: Mutex::new(Routes {
                names: vec![Arc::from("(no route)"), Arc::from("other")],
                ids: HashMap::default(),
            }),
            hidden: Mutex::default(),
        }
    }

    /// A route's name for the view.
    pub(crate) fn route_names(&self) -> Vec<Arc<str>> {
        lock(&self.routes).names.clone()
    }

    /// The route's id, interned under the cap.
    fn intern(&self, route: &str) -> u16 {
        let mut routes = lock(&self.routes);
        if let Some(&id) = routes.ids.get(route) {
            return id;
        }
        if routes.names.len() - usize::from(FIRST_ROUTE) >= self.settings.max_routes
            || routes.names.len() >= usize::from(u16::MAX)
        {
            return OTHER;
        }
        let id = routes.names.len() as u16;
        let name: Arc<str> = Arc::from(route);
        routes.names.push(name.clone());
        routes.ids.insert(name, id);
        id
    }

    /// The route of the view's own page, not listed.
    pub(crate) fn hide(&self, route: &str) {
        let id = self.intern(route);
        if id >= FIRST_ROUTE {
            let mut hidden = lock(&self.hidden);
            if !hidden.contains(&id) {
                hidden.push(id);
            }
        }
    }

    /// Registers a request that arrived at `start`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn register<B>(
        self: &Arc<Self>,
        req: &http::Request<B>,
        route: Option<&str>,
        start: Instant,
        deadline: Option<(Instant, Origin)>,
        conn: Option<&ConnectionContext>,
    ) -> Option<Ticket> {
        let extras = self.settings.wants_extras().then(|| self.extras(req));
        let shard_no = thread_shard() & ((1 << self.shard_bits) - 1);
        let mut shard = lock(&self.shards[shard_no as usize]);
        let route = match route {
            None => UNMATCHED,
            Some(route) => match shard.route_ids.get(route) {
                Some(&id) => id,
                None => {
                    let id = self.intern(route);
                    // Bounded: the routes under the cap, and as many past it.
                    if shard.route_ids.len() < 2 * self.settings.max_routes + 2 {
                        shard.route_ids.insert(Arc::from(route), id);
                    }
                    id
                }
            },
        };
        let index = match shard.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(shard.slots.len()).ok()?;
                if index >= 1 << INDEX_BITS {
                    return None; // 16 million in flight in one shard: not shown
                }
                shard.slots.push(None);
                index
            }
        };
        shard.next_id += 1;
        let id = (shard.next_id << self.shard_bits) | u64::from(shard_no);
        shard.slots[index as usize] = Some(Live {
            id,
            method: req.method().clone(),
            route,
            state: State::Running,
            start,
            deadline,
            conn: conn.cloned(),
            extras,
        });
        shard.live += 1;
        Some(Ticket {
            registry: self.clone(),
            slot: (shard_no << INDEX_BITS) | index,
            status: 0,
        })
    }

    fn extras<B>(&self, req: &http::Request<B>) -> Box<Extras> {
        let s = &self.settings;
        let headers = s
            .headers
            .iter()
            .flat_map(|name| {
                req.headers()
                    .get_all(name)
                    .iter()
                    .map(|v| (name.clone(), v.clone()))
            })
            .collect();
        Box::new(Extras {
            uri: (s.show_path || s.show_query).then(|| req.uri().clone()),
            headers,
        })
    }

    /// The heap the registry holds, from its tables' capacities: the slab, the rings,
    /// the counters, the route tables, and what the `show_*` options keep.
    pub(crate) fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        fn extras(e: &Option<Box<Extras>>) -> usize {
            e.as_ref().map_or(0, |e| {
                size_of::<Extras>()
                    + e.uri
                        .as_ref()
                        .map_or(0, |u| u.path().len() + u.query().map_or(0, str::len))
                    + e.headers.capacity() * size_of::<(HeaderName, HeaderValue)>()
                    + e.headers
                        .iter()
                        .map(|(n, v)| n.as_str().len() + v.len())
                        .sum::<usize>()
            })
        }
        // A hash table entry, plus its control byte.
        fn table<K, V>(m: &HashMap<K, V, BuildHasherDefault<FxHasher>>) -> usize {
            m.capacity() * (size_of::<(K, V)>() + 1)
        }
        let mut n = size_of::<Registry>() + self.shards.len() * size_of::<Mutex<Shard>>();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            n += shard.slots.capacity() * size_of::<Option<Live>>()
                + shard.free.capacity() * size_of::<u32>()
                + table(&shard.route_ids)
                + shard.route_ids.keys().map(|k| k.len() + 16).sum::<usize>()
                + shard.recent.capacity() * size_of::<Ring>()
                + shard.counters.capacity() * size_of::<Counters>();
            n += shard
                .slots
                .iter()
                .flatten()
                .map(|l| extras(&l.extras))
                .sum::<usize>();
            for ring in &shard.recent {
                n += ring.entries.capacity() * size_of::<Ended>();
                n += ring
                    .entries
                    .iter()
                    .map(|e| extras(&e.extras))
                    .sum::<usize>();
            }
        }
        let routes = lock(&self.routes);
        n += routes.names.capacity() * size_of::<Arc<str>>()
            + routes.names.iter().map(|k| k.len() + 16).sum::<usize>()
            + table(&routes.ids);
        n + lock(&self.hidden).capacity() * size_of::<u16>()
    }

    fn with_slot(&self, slot: u32, f: impl FnOnce(&mut Shard, usize)) {
        let shard = (slot >> INDEX_BITS) as usize;
        let index = (slot & ((1 << INDEX_BITS) - 1)) as usize;
        if let Some(shard_lock) = self.shards.get(shard) {
            f(&mut lock(shard_lock), index);
        }
    }
}

impl Ticket {
    /// The response's status, shown when the request ends.
    #[inline]
    pub(crate) fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    pub(crate) fn set_state(&self, state: State) {
        self.registry.with_slot(self.slot, |shard, i| {
            if let Some(Some(live)) = shard.slots.get_mut(i) {
                live.state = state;
            }
        });
    }

    pub(crate) fn set_deadline(&self, deadline: Option<(Instant, Origin)>) {
        self.registry.with_slot(self.slot, |shard, i| {
            if let Some(Some(live)) = shard.slots.get_mut(i) {
                live.deadline = deadline;
            }
        });
    }

    /// The request ended with `cause`: its slot is freed, the request goes into its
    /// cause's ring and its route's counters.
    pub(crate) fn end(self, cause: &Cause) {
        let Ticket {
            registry,
            slot,
            status,
        } = self;
        let now = Instant::now();
        let settings = &registry.settings;
        registry.with_slot(slot, |shard, i| {
            let Some(live) = shard.slots.get_mut(i).and_then(Option::take) else {
                return;
            };
            shard.free.push(i as u32);
            shard.live -= 1;
            let duration = now.saturating_duration_since(live.start);
            let c = cause_index(cause);
            let secs = now.saturating_duration_since(registry.epoch).as_secs();
            let route = usize::from(live.route);
            if shard.counters.len() <= route {
                shard.counters.resize_with(route + 1, Counters::default);
            }
            let counters = &mut shard.counters[route];
            let b = bucket(duration);
            let m = secs / MINUTE_STEP;
            counters.minute[(m % MINUTE_STEPS as u64) as usize].count(m, c, b);
            let h = secs / HOUR_STEP;
            counters.hour[(h % HOUR_STEPS as u64) as usize].count(h, c, b);
            if shard.recent.is_empty() {
                shard.recent.resize_with(CAUSES.len(), Ring::default);
            }
            shard.recent[c].push(
                settings.recent_per_cause,
                Ended {
                    id: live.id,
                    method: live.method,
                    route: live.route,
                    status,
                    duration,
                    at: now,
                    cause: cause.clone(),
                    extras: live.extras,
                },
            );
        });
    }
}

/// A small, fast hash for route names (rustc's FxHasher): the keys are the app's own
/// route patterns, never a client's input, so no flooding resistance is needed.
#[derive(Default)]
pub(crate) struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_x_net_trace() {
        assert_eq!(bucket(Duration::from_millis(10)), 0);
        assert_eq!(bucket(Duration::from_millis(11)), 1);
        assert_eq!(bucket(Duration::from_millis(101)), 2);
        assert_eq!(bucket(Duration::from_secs(2)), 3);
        assert_eq!(bucket(Duration::from_secs(11)), 4);
    }

    #[test]
    fn routes_past_the_cap_count_as_other() {
        let registry = Registry::new(Settings {
            max_routes: 2,
            ..Settings::default()
        });
        assert_eq!(registry.intern("/a"), FIRST_ROUTE);
        assert_eq!(registry.intern("/b"), FIRST_ROUTE + 1);
        assert_eq!(registry.intern("/c"), OTHER);
        assert_eq!(registry.intern("/a"), FIRST_ROUTE);
        assert_eq!(registry.route_names().len(), 4);
    }

    #[test]
    fn a_ring_keeps_the_last_n() {
        let mut ring = Ring::default();
        for id in 0..25 {
            ring.push(
                10,
                Ended {
                    id,
                    method: Method::GET,
                    route: 0,
                    status: 200,
                    duration: Duration::ZERO,
                    at: Instant::now(),
                    cause: Cause::Completed,
                    extras: None,
                },
            );
        }
        let mut ids: Vec<u64> = ring.entries.iter().map(|e| e.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (15..25).collect::<Vec<_>>());
        assert_eq!(ring.entries.capacity(), 10);
    }

    #[test]
    fn a_window_restarts_at_a_new_step() {
        let mut w = Counters::default().minute[0];
        w.count(7, 0, 0);
        w.count(7, 1, 2);
        assert_eq!((w.causes[0], w.causes[1], w.buckets[2]), (1, 1, 1));
        w.count(13, 0, 0);
        assert_eq!((w.step, w.causes[0], w.causes[1]), (13, 1, 0));
    }
}
