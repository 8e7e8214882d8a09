//! The registry behind a [`LiveView`](super::LiveView): what the layer writes per request.
//!
//! Sharded by the thread that registers the request (a request ends in the shard it began
//! in, whatever thread ends it). Each shard is one mutex over a slab of in-flight slots,
//! its share of the recent rings and of the per-route counters. A request takes the lock
//! of its shard when it registers and when it ends; when its body starts to stream (or it
//! is held as an upgrade) it stores one byte, without the lock (in a shard's first 1,024
//! slots; past them, with it). No allocation once the slab, the rings and the counters
//! have grown to the load (they grow in steps, never per request, and never shrink below
//! it), and no lock shared between shards on the request's path.
//!
//! Memory is bounded whatever the load: the slab by the peak number of requests in flight,
//! the rings by `recent_per_cause` per cause and shard, the counters by the route cap per
//! shard (routes past the cap count under "other"), the interned routes by the cap.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use http::{HeaderName, Method};
use reqctx::{Cause, DeadlineOrigin};

use crate::cause::label_index;
use crate::connection::ConnectionContext;

/// Route id of a request with no matched route (no axum `MatchedPath`: the layer outside
/// the router, or a fallback).
pub(crate) const UNMATCHED: u16 = 0;
/// Route id of every route past the cap.
#[cfg_attr(not(feature = "axum"), allow(dead_code))] // no matched routes without axum
pub(crate) const OTHER: u16 = 1;
#[cfg_attr(not(feature = "axum"), allow(dead_code))]
const FIRST_ROUTE: u16 = 2;

/// Cause labels, as in the logs and metrics: the view counts and keeps rings by index.
pub(crate) use crate::cause::LABELS as CAUSES;

/// A cause as the owner keeps it for its view: its index in [`CAUSES`], and the origin
/// of a deadline.
pub(crate) fn code(cause: &Cause) -> (u8, u8) {
    let origin = match cause {
        Cause::DeadlineExceeded { origin } => Origin::of(*origin) as u8,
        _ => Origin::None as u8,
    };
    (label_index(cause) as u8, origin)
}

/// Whether the cause of index `c` is rebuilt from its index (and origin) alone.
pub(crate) fn is_common(c: u8) -> bool {
    c <= 4
}

/// Standard methods as one byte; 0 is any other (its name goes in the request's extras).
const METHODS: [Method; 9] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::HEAD,
    Method::OPTIONS,
    Method::CONNECT,
    Method::PATCH,
    Method::TRACE,
];

fn method_code(m: &Method) -> u8 {
    match *m {
        Method::GET => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::PATCH => 8,
        Method::TRACE => 9,
        _ => 0,
    }
}

/// A method's name, from its code and the request's extras.
pub(crate) fn method_name(code: u8, extras: Option<&Extras>) -> String {
    match code {
        1..=9 => METHODS[usize::from(code) - 1].as_str().to_owned(),
        _ => extras
            .and_then(|e| e.method.as_ref())
            .map_or_else(|| "OTHER".to_owned(), |m| m.as_str().to_owned()),
    }
}

/// Latency buckets, as `golang.org/x/net/trace`'s: every request, then above 10 ms, 100 ms,
/// 1 s and 10 s.
pub(crate) const BUCKETS: [&str; 5] = ["all", ">10ms", ">100ms", ">1s", ">10s"];

fn bucket(ns: u64) -> usize {
    match ns {
        0..=10_000_000 => 0,
        10_000_001..=100_000_000 => 1,
        100_000_001..=1_000_000_000 => 2,
        1_000_000_001..=10_000_000_000 => 3,
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
#[repr(u8)]
pub(crate) enum Origin {
    None,
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
            Origin::None => "none",
        }
    }

    /// The origin a `DeadlineExceeded` names, for its words in the view.
    pub(crate) fn deadline_origin(self) -> DeadlineOrigin {
        match self {
            Origin::Query => DeadlineOrigin::Query,
            Origin::Header => DeadlineOrigin::Header,
            Origin::Code => DeadlineOrigin::Code,
            _ => DeadlineOrigin::Layer,
        }
    }
}

/// Where a live request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
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
    pub(crate) method: Option<Method>, // a method that is not a standard one
    pub(crate) custom: Option<Cause>,  // an ended request's cause, when not a common one
    // Copies, not clones of the request's buffers: a kept `Uri` or `HeaderValue` can hold
    // the whole buffer hyper read it from.
    pub(crate) path: Option<Box<str>>,
    pub(crate) query: Option<Box<str>>,
    pub(crate) headers: Vec<(HeaderName, Box<str>)>,
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

/// One request in flight. Times are nanoseconds since the registry's epoch; `id` 0 is a
/// free slot.
#[derive(Clone, Debug, Default)]
pub(crate) struct Live {
    pub(crate) id: u64,
    pub(crate) start: u64,
    pub(crate) deadline: u64, // with `origin`; 0 with `Origin::None`
    pub(crate) conn: Option<ConnectionContext>,
    pub(crate) extras: Option<Box<Extras>>,
    pub(crate) route: u16,
    pub(crate) method: u8,
    pub(crate) state: u8,
    pub(crate) origin: u8,
}

/// One request that ended, in its cause's ring.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) id: u64,
    pub(crate) duration: u64,
    pub(crate) at: u64,
    pub(crate) extras: Option<Box<Extras>>, // and a cause that is not a common one
    pub(crate) route: u16,
    pub(crate) status: u16, // 0: no response
    pub(crate) method: u8,
    pub(crate) origin: u8, // a deadline's
}

impl Ended {
    /// The cause, for its words.
    pub(crate) fn cause(&self, c: usize) -> Cause {
        if let Some(cause) = self.extras.as_ref().and_then(|e| e.custom.as_ref()) {
            return cause.clone();
        }
        match c {
            0 => Cause::Completed,
            1 => Cause::DeadlineExceeded {
                origin: ORIGINS[usize::from(self.origin)].deadline_origin(),
            },
            2 => Cause::ClientDisconnected,
            3 => Cause::Shutdown,
            _ => Cause::Cancelled,
        }
    }
}

pub(crate) const ORIGINS: [Origin; 6] = [
    Origin::None,
    Origin::Query,
    Origin::Header,
    Origin::Layer,
    Origin::Route,
    Origin::Code,
];

pub(crate) const STATES: [State; 3] = [State::Running, State::Streaming, State::Upgraded];

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
            let old = std::mem::replace(&mut self.entries[self.next], ended);
            // Most entries own nothing: skip their drop glue (forgetting them leaks nothing).
            match old.extras {
                Some(_) => drop(old),
                None => std::mem::forget(old),
            }
            self.next += 1;
            if self.next == n {
                self.next = 0;
            }
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
        // A u32 per 10 s or 5 min step: it cannot overflow at any real rate.
        self.causes[cause] = self.causes[cause].wrapping_add(1);
        self.buckets[bucket] = self.buckets[bucket].wrapping_add(1);
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

/// The time steps of an instant, and until when they hold (the next 10-second boundary:
/// 5-minute steps change on one too).
#[derive(Clone, Copy, Debug, Default)]
struct Steps {
    until: u64,
    m: u64,
    mi: usize,
    h: u64,
    hi: usize,
}

impl Steps {
    fn at(now: u64) -> Steps {
        let secs = now / 1_000_000_000;
        let (m, h) = (secs / MINUTE_STEP, secs / HOUR_STEP);
        Steps {
            until: (m + 1) * MINUTE_STEP * 1_000_000_000,
            m,
            mi: (m % MINUTE_STEPS as u64) as usize,
            h,
            hi: (h % HOUR_STEPS as u64) as usize,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Shard {
    steps: Steps,
    pub(crate) slots: Vec<Live>,
    free: Vec<u32>,
    next_id: u64,
    // The shard's cache of the registry's route ids: by name, and by the matched route's
    // own pointer (axum hands out one `Arc<str>` per route; kept here, it cannot be freed
    // and reused for another name while it is cached).
    route_ids: HashMap<Arc<str>, u16>,
    #[cfg(feature = "axum")]
    route_cache: [Option<(Route, u16)>; ROUTE_CACHE],
    pub(crate) recent: Vec<Ring>,       // by cause
    pub(crate) counters: Vec<Counters>, // by route id
}

/// The registry of one [`LiveView`](super::LiveView).
#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) settings: Settings,
    pub(crate) epoch: Instant,
    epoch_raw: u64, // `epoch` on `clock()`'s raw counter
    wants_extras: bool,
    shard_bits: u32,
    pub(crate) shards: Box<[Mutex<Shard>]>,
    // The state of each shard's first `STATE_SLOTS` slots, set without the shard's lock
    // (a body starting to stream); the slots past them keep theirs in the slot.
    states: Box<[Box<[AtomicU8]>]>,
    // Interned route names, by id; ids 0 and 1 are "unmatched" and "other".
    routes: Mutex<Routes>,
    // Routes the view itself is served on: not listed.
    pub(crate) hidden: Mutex<Vec<u16>>,
}

#[derive(Debug, Default)]
struct Routes {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u16>,
}

/// The live request's handle, in its owner: where its slot is, and its status.
#[derive(Debug)]
pub(crate) struct Ticket {
    registry: Arc<Registry>,
    slot: u32,
    status: u16,
}

/// The clock of every registry: quanta's, which reads the CPU's time-stamp counter where
/// it is invariant (a few instructions, against about 75 for `Instant::now` and its
/// arithmetic) and the monotonic clock elsewhere. Calibrated once per process.
fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

impl Registry {
    /// Nanoseconds since the registry's epoch, on its clock: the ages and durations.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        let clock = clock();
        clock.delta_as_nanos(self.epoch_raw, clock.raw())
    }

    /// Nanoseconds since the registry's epoch on `Instant`'s clock: deadlines are
    /// `Instant`s, and their budgets are read on the same clock.
    pub(crate) fn now_instant(&self) -> u64 {
        self.at(Instant::now())
    }

    /// `at` on the registry's clock (0 for an instant before the epoch).
    #[inline]
    pub(crate) fn at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

const INDEX_BITS: u32 = 24;
#[cfg(feature = "axum")]
const ROUTE_CACHE: usize = 8;

/// A request's matched route, as the layer finds it.
#[cfg(feature = "axum")]
pub(crate) type Route = axum::extract::MatchedPath;
/// Without axum there is no matched route.
#[cfg(not(feature = "axum"))]
pub(crate) type Route = std::convert::Infallible;

const STATE_SLOTS: usize = 1024;

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
        let epoch_raw = clock().raw();
        let epoch = Instant::now();
        Registry {
            epoch_raw,
            wants_extras: settings.wants_extras(),
            settings,
            epoch,
            shard_bits: shards.trailing_zeros(),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            states: (0..shards)
                .map(|_| (0..STATE_SLOTS).map(|_| AtomicU8::new(0)).collect())
                .collect(),
            routes: Mutex::new(Routes {
                names: vec![Arc::from("(no route)"), Arc::from("other")],
                ids: HashMap::new(),
            }),
            hidden: Mutex::default(),
        }
    }

    /// A route's name for the view.
    pub(crate) fn route_names(&self) -> Vec<Arc<str>> {
        lock(&self.routes).names.clone()
    }

    /// The route's id, interned under the cap.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
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
    #[cfg(feature = "axum")]
    pub(crate) fn hide(&self, route: &str) {
        let id = self.intern(route);
        if id >= FIRST_ROUTE {
            let mut hidden = lock(&self.hidden);
            if !hidden.contains(&id) {
                hidden.push(id);
            }
        }
    }

    /// Registers a request that arrives now.
    #[inline]
    pub(crate) fn register<B>(
        self: &Arc<Self>,
        req: &http::Request<B>,
        route: Option<&Route>,
        deadline: Option<(Instant, Origin)>,
        conn: Option<&ConnectionContext>,
    ) -> Option<Ticket> {
        let method = method_code(req.method());
        let extras = (method == 0 || self.wants_extras).then(|| self.extras(req));
        let start = self.now();
        let (deadline, origin) = match deadline {
            Some((at, origin)) => (self.at(at), origin as u8),
            None => (0, Origin::None as u8),
        };
        let shard_no = thread_shard() & ((1 << self.shard_bits) - 1);
        let mut shard = lock(&self.shards[shard_no as usize]);
        let route = match route {
            None => UNMATCHED,
            Some(route) => self.route_id(&mut shard, route),
        };
        let index = match shard.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(shard.slots.len()).ok()?;
                if index >= 1 << INDEX_BITS {
                    return None; // 16 million in flight in one shard: not shown
                }
                shard.slots.push(Live::default());
                index
            }
        };
        shard.next_id += 1;
        let id = (shard.next_id << self.shard_bits) | u64::from(shard_no);
        if let Some(state) = self.states[shard_no as usize].get(index as usize) {
            state.store(State::Running as u8, Ordering::Relaxed);
        }
        // Field by field: a free slot owns nothing (its end took it), so nothing to drop.
        let slot = &mut shard.slots[index as usize];
        (slot.id, slot.start, slot.deadline) = (id, start, deadline);
        (slot.route, slot.method, slot.state, slot.origin) =
            (route, method, State::Running as u8, origin);
        if let Some(conn) = conn {
            slot.conn = Some(conn.clone());
        }
        if extras.is_some() {
            slot.extras = extras;
        }
        drop(shard);
        Some(Ticket {
            registry: self.clone(),
            slot: (shard_no << INDEX_BITS) | index,
            status: 0,
        })
    }

    /// The matched route's id: from the shard's cache by the route's own pointer, else by
    /// its name.
    #[cfg(feature = "axum")]
    #[inline]
    fn route_id(&self, shard: &mut Shard, route: &Route) -> u16 {
        let name = route.as_str();
        let slot = (name.as_ptr() as usize >> 3) % ROUTE_CACHE;
        match &shard.route_cache[slot] {
            Some((cached, id)) if std::ptr::eq(cached.as_str(), name) => *id,
            _ => self.route_miss(shard, slot, route),
        }
    }

    #[cfg(not(feature = "axum"))]
    fn route_id(&self, _: &mut Shard, route: &Route) -> u16 {
        match *route {}
    }

    #[cfg(feature = "axum")]
    #[cold]
    fn route_miss(&self, shard: &mut Shard, slot: usize, route: &Route) -> u16 {
        let name = route.as_str();
        let id = match shard.route_ids.get(name) {
            Some(&id) => id,
            None => {
                let id = self.intern(name);
                // Bounded: the routes under the cap, and as many past it.
                if shard.route_ids.len() < 2 * self.settings.max_routes + 2 {
                    shard.route_ids.insert(Arc::from(name), id);
                }
                id
            }
        };
        shard.route_cache[slot] = Some((route.clone(), id));
        id
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
                    .map(|v| (name.clone(), String::from_utf8_lossy(v.as_bytes()).into()))
            })
            .collect();
        let method = req.method();
        Box::new(Extras {
            method: (method_code(method) == 0).then(|| method.clone()),
            custom: None,
            path: s.show_path.then(|| req.uri().path().into()),
            query: s
                .show_query
                .then(|| req.uri().query().map(Into::into))
                .flatten(),
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
                    + e.path.as_ref().map_or(0, |p| p.len())
                    + e.query.as_ref().map_or(0, |q| q.len())
                    + e.headers.capacity() * size_of::<(HeaderName, Box<str>)>()
                    + e.headers
                        .iter()
                        .map(|(n, v)| n.as_str().len() + v.len())
                        .sum::<usize>()
            })
        }
        // A hash table entry, plus its control byte.
        fn table<K, V>(m: &HashMap<K, V>) -> usize {
            m.capacity() * (size_of::<(K, V)>() + 1)
        }
        let mut n =
            size_of::<Registry>() + self.shards.len() * (size_of::<Mutex<Shard>>() + STATE_SLOTS);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            n += shard.slots.capacity() * size_of::<Live>()
                + shard.free.capacity() * size_of::<u32>()
                + table(&shard.route_ids)
                + shard.route_ids.keys().map(|k| k.len() + 16).sum::<usize>()
                + shard.recent.capacity() * size_of::<Ring>()
                + shard.counters.capacity() * size_of::<Counters>();
            n += shard.slots.iter().map(|l| extras(&l.extras)).sum::<usize>();
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

    /// A live request's state.
    pub(crate) fn state(&self, shard: usize, index: usize, live: &Live) -> u8 {
        match self.states[shard].get(index) {
            Some(s) => s.load(Ordering::Relaxed),
            None => live.state,
        }
    }

    fn with_slot(&self, slot: u32, f: impl FnOnce(&mut Shard, usize)) {
        let (shard, index) = split(slot);
        if let Some(shard_lock) = self.shards.get(shard) {
            f(&mut lock(shard_lock), index);
        }
    }
}

/// A ticket's shard and index.
#[inline]
fn split(slot: u32) -> (usize, usize) {
    (
        (slot >> INDEX_BITS) as usize,
        (slot & ((1 << INDEX_BITS) - 1)) as usize,
    )
}

impl Ticket {
    /// The response's status, shown when the request ends.
    #[inline]
    pub(crate) fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    pub(crate) fn set_state(&self, state: State) {
        let (shard, index) = split(self.slot);
        if let Some(s) = self.registry.states.get(shard).and_then(|s| s.get(index)) {
            s.store(state as u8, Ordering::Relaxed);
            return;
        }
        self.registry.with_slot(self.slot, |shard, i| {
            if let Some(live) = shard.slots.get_mut(i) {
                live.state = state as u8;
            }
        });
    }

    pub(crate) fn set_deadline(&self, deadline: Option<(Instant, Origin)>) {
        let (at, origin) = match deadline {
            Some((at, origin)) => (self.registry.at(at), origin),
            None => (0, Origin::None),
        };
        self.registry.with_slot(self.slot, |shard, i| {
            if let Some(live) = shard.slots.get_mut(i) {
                (live.deadline, live.origin) = (at, origin as u8);
            }
        });
    }

    /// The request ended with the cause `c` (an index of [`CAUSES`]; `custom` is the cause
    /// itself when it is not one of the first five, `origin` a deadline's): its slot is
    /// freed, the request goes into its cause's ring and its route's counters.
    pub(crate) fn end(self, c: usize, origin: u8, custom: Option<Cause>) {
        let Ticket {
            registry,
            slot,
            status,
        } = self;
        let now = registry.now();
        let n = registry.settings.recent_per_cause;
        registry.with_slot(slot, |shard, i| {
            let Some(live) = shard.slots.get_mut(i).filter(|l| l.id != 0) else {
                return;
            };
            let (id, start, route, method) = (live.id, live.start, live.route, live.method);
            let mut extras = live.extras.take();
            if custom.is_some() {
                extras.get_or_insert_with(Box::default).custom = custom;
            }
            // The layer's origin of a deadline that a route's timeout set is the route's.
            let origin = match live.origin == Origin::Route as u8 && origin == Origin::Layer as u8 {
                true => live.origin,
                false => origin,
            };
            live.id = 0;
            if live.conn.is_some() {
                live.conn = None;
            }
            shard.free.push(i as u32);
            let duration = now.saturating_sub(start);
            if now >= shard.steps.until {
                shard.steps = Steps::at(now);
            }
            let Steps { m, mi, h, hi, .. } = shard.steps;
            let route_id = route;
            let route = usize::from(route);
            if shard.counters.len() <= route {
                shard.counters.resize_with(route + 1, Counters::default);
            }
            let counters = &mut shard.counters[route];
            let b = bucket(duration);
            counters.minute[mi].count(m, c, b);
            counters.hour[hi].count(h, c, b);
            if shard.recent.is_empty() {
                shard.recent.resize_with(CAUSES.len(), Ring::default);
            }
            shard.recent[c].push(
                n,
                Ended {
                    id,
                    duration,
                    at: now,
                    extras,
                    route: route_id,
                    status,
                    method,
                    origin,
                },
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_sizes_the_docs_give() {
        assert_eq!(std::mem::size_of::<Live>(), 48);
        assert_eq!(std::mem::size_of::<Ended>(), 40);
        assert!(std::mem::size_of::<Counters>() <= 1_300);
    }

    #[test]
    fn buckets_follow_x_net_trace() {
        let ns = |d: Duration| d.as_nanos() as u64;
        assert_eq!(bucket(ns(Duration::from_millis(10))), 0);
        assert_eq!(bucket(ns(Duration::from_millis(11))), 1);
        assert_eq!(bucket(ns(Duration::from_millis(101))), 2);
        assert_eq!(bucket(ns(Duration::from_secs(2))), 3);
        assert_eq!(bucket(ns(Duration::from_secs(11))), 4);
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
                    duration: 0,
                    at: 0,
                    extras: None,
                    route: 0,
                    status: 200,
                    method: 1,
                    origin: 0,
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
