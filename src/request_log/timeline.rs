//! The request log's figures over time, for the console's overview and providers pages:
//! requests, cache hits, errors, spend, savings, latency and semantic refusals per minute (the
//! last three hours) and per hour (the last week), split by tenant and route, and upstream
//! attempts per target.
//!
//! Why kept in memory next to the log rather than computed from it: a chart of the last week
//! would otherwise parse every record of the week on every refresh (seconds with a million
//! records). Adding a record is one lock and a few map lookups that allocate only for a new
//! minute, tenant or route. At startup the figures are rebuilt from the records already in
//! the log, off the request path, so a restart does not blank the charts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use super::RequestRecord;
use crate::error::ApiError;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
/// Three hours of minutes and a week of hours.
const MINUTES_KEPT: usize = 180;
const HOURS_KEPT: usize = 168;
/// How far back the timeline reaches.
pub const KEPT_MS: u64 = HOURS_KEPT as u64 * HOUR_MS;

/// Latency buckets grow by half from 0.25 ms; a percentile is read as its bucket's geometric
/// middle, so to within about 22%. The last bucket holds everything above about 70 s.
const LATENCY_BUCKETS: usize = 32;
const FIRST_BOUND_MS: f64 = 0.25;
const GROWTH: f64 = 1.5;

#[derive(Debug, Clone, Copy, Default)]
struct Histogram([u32; LATENCY_BUCKETS]);

impl Histogram {
    fn add(&mut self, ms: f64) {
        let bucket = if ms <= FIRST_BOUND_MS {
            0
        } else {
            ((ms / FIRST_BOUND_MS).ln() / GROWTH.ln()).ceil() as usize
        };
        self.0[bucket.min(LATENCY_BUCKETS - 1)] += 1;
    }

    fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    /// The geometric middle of the bucket holding quantile `q`.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.0.iter().map(|&n| u64::from(n)).sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, &n) in self.0.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return Some(FIRST_BOUND_MS * GROWTH.powi(bucket as i32) / GROWTH.sqrt());
            }
        }
        None
    }
}

/// One tenant's requests on one route in one step.
#[derive(Debug, Clone, Default)]
struct Cell {
    requests: u64,
    exact_hits: u64,
    semantic_hits: u64,
    errors: u64,
    spend_usd: f64,
    saved_usd: f64,
    latency: Histogram,
    /// Semantic candidates refused, by the guard that refused them.
    refusals: BTreeMap<Box<str>, u64>,
}

impl Cell {
    fn add(&mut self, record: &RequestRecord) {
        self.requests += 1;
        match record.cache.as_deref() {
            Some("hit") => self.exact_hits += 1,
            Some("semantic-hit") => self.semantic_hits += 1,
            _ => {}
        }
        if record.status >= 500 || record.error.is_some() {
            self.errors += 1;
        }
        self.spend_usd += record.cost_usd;
        self.saved_usd += record.saved_usd;
        self.latency.add(record.latency_ms);
        if let Some(guard) = record
            .semantic
            .as_deref()
            .and_then(|s| s.strip_prefix("rejected-"))
        {
            match self.refusals.get_mut(guard) {
                Some(n) => *n += 1,
                None => {
                    self.refusals.insert(guard.into(), 1);
                }
            }
        }
    }

    fn merge(&mut self, other: &Self) {
        self.requests += other.requests;
        self.exact_hits += other.exact_hits;
        self.semantic_hits += other.semantic_hits;
        self.errors += other.errors;
        self.spend_usd += other.spend_usd;
        self.saved_usd += other.saved_usd;
        self.latency.merge(&other.latency);
        for (guard, n) in &other.refusals {
            *self.refusals.entry(guard.clone()).or_default() += n;
        }
    }
}

/// One target's upstream attempts in one step.
#[derive(Debug, Clone, Default)]
struct AttemptCell {
    attempts: u64,
    errors: u64,
    latency: Histogram,
}

#[derive(Debug)]
struct Bucket {
    start_ms: u64,
    /// Tenant, then route.
    cells: HashMap<Arc<str>, HashMap<Box<str>, Cell>>,
    targets: HashMap<Box<str>, AttemptCell>,
}

impl Bucket {
    fn new(start_ms: u64) -> Self {
        Self {
            start_ms,
            cells: HashMap::new(),
            targets: HashMap::new(),
        }
    }

    fn add(&mut self, record: &RequestRecord) {
        let routes = match self.cells.get_mut(&*record.tenant) {
            Some(routes) => routes,
            None => self.cells.entry(Arc::clone(&record.tenant)).or_default(),
        };
        let route = record.route.as_deref().unwrap_or("-");
        match routes.get_mut(route) {
            Some(cell) => cell.add(record),
            None => routes.entry(route.into()).or_default().add(record),
        }
        for attempt in &record.upstream {
            let cell = match self.targets.get_mut(attempt.target.as_str()) {
                Some(cell) => cell,
                None => self
                    .targets
                    .entry(attempt.target.as_str().into())
                    .or_default(),
            };
            cell.attempts += 1;
            if !matches!(&*attempt.outcome, "ok" | "cancelled") {
                cell.errors += 1;
            }
            cell.latency.add(attempt.latency_ms);
        }
    }
}

/// Steps of one width, oldest first, the newest `kept` of them.
#[derive(Debug)]
struct Ring {
    step_ms: u64,
    kept: usize,
    buckets: VecDeque<Bucket>,
}

impl Ring {
    fn new(step_ms: u64, kept: usize) -> Self {
        Self {
            step_ms,
            kept,
            buckets: VecDeque::new(),
        }
    }

    fn add(&mut self, record: &RequestRecord) {
        let start = record.at_ms - record.at_ms % self.step_ms;
        let newest = self.buckets.back().map(|b| b.start_ms);
        let bucket = match newest {
            Some(newest) if newest == start => self.buckets.back_mut(),
            None => {
                self.buckets.push_back(Bucket::new(start));
                self.buckets.back_mut()
            }
            Some(newest) if newest < start => {
                self.buckets.push_back(Bucket::new(start));
                let oldest_kept = start.saturating_sub(self.step_ms * (self.kept as u64 - 1));
                while self
                    .buckets
                    .front()
                    .is_some_and(|b| b.start_ms < oldest_kept)
                {
                    self.buckets.pop_front();
                }
                self.buckets.back_mut()
            }
            // A record of an earlier step: one that finished late, or the log read at startup.
            Some(newest) => {
                if start + self.step_ms * self.kept as u64 <= newest {
                    return;
                }
                match self.buckets.binary_search_by_key(&start, |b| b.start_ms) {
                    Ok(at) => self.buckets.get_mut(at),
                    Err(at) => {
                        self.buckets.insert(at, Bucket::new(start));
                        self.buckets.get_mut(at)
                    }
                }
            }
        };
        if let Some(bucket) = bucket {
            bucket.add(record);
        }
    }
}

/// The log's figures over time (see the module's comment).
#[derive(Debug)]
pub struct Timeline {
    rings: Mutex<(Ring, Ring)>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            rings: Mutex::new((
                Ring::new(MINUTE_MS, MINUTES_KEPT),
                Ring::new(HOUR_MS, HOURS_KEPT),
            )),
        }
    }
}

/// Which records a summary counts.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineQuery {
    /// `1h` or `3h` (a point per minute), `24h` or `7d` (a point per hour); `1h` by default.
    pub window: Option<String>,
    pub tenant: Option<String>,
    pub route: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub requests: u64,
    pub exact_hits: u64,
    pub semantic_hits: u64,
    /// Of all requests, answered from the cache (exact or semantic).
    pub hit_ratio: Option<f64>,
    pub errors: u64,
    pub spend_usd: f64,
    pub saved_usd: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
}

impl From<&Cell> for Figures {
    fn from(cell: &Cell) -> Self {
        Self {
            requests: cell.requests,
            exact_hits: cell.exact_hits,
            semantic_hits: cell.semantic_hits,
            hit_ratio: (cell.requests > 0)
                .then(|| (cell.exact_hits + cell.semantic_hits) as f64 / cell.requests as f64),
            errors: cell.errors,
            spend_usd: cell.spend_usd,
            saved_usd: cell.saved_usd,
            latency_p50_ms: cell.latency.quantile(0.5),
            latency_p95_ms: cell.latency.quantile(0.95),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Point {
    /// Unix milliseconds when the step starts.
    pub at_ms: u64,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Debug, Serialize)]
pub struct Named {
    pub name: String,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Debug, Serialize)]
pub struct TargetFigures {
    pub target: String,
    pub attempts: u64,
    pub errors: u64,
    pub error_rate: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub window: String,
    pub step_seconds: u64,
    /// One per step of the window, oldest first; a step without requests has zeros.
    pub points: Vec<Point>,
    pub total: Figures,
    pub by_route: Vec<Named>,
    pub by_tenant: Vec<Named>,
    /// Upstream attempts (not filtered by tenant or route: a target serves them all).
    pub targets: Vec<TargetFigures>,
    /// Semantic candidates refused, by guard.
    pub refusals: BTreeMap<String, u64>,
}

impl Timeline {
    pub fn add(&self, record: &RequestRecord) {
        let mut rings = self.rings.lock();
        rings.0.add(record);
        rings.1.add(record);
    }

    pub fn summary(&self, query: &TimelineQuery, now_ms: u64) -> Result<Summary, ApiError> {
        let window = query.window.as_deref().unwrap_or("1h");
        let (minutes, steps) = match window {
            "1h" => (true, 60),
            "3h" => (true, 180),
            "24h" => (false, 24),
            "7d" => (false, 168),
            _ => {
                return Err(ApiError::invalid(
                    "window: one of 1h, 3h, 24h, 7d",
                    Some("window"),
                ));
            }
        };
        let rings = self.rings.lock();
        let ring = if minutes { &rings.0 } else { &rings.1 };
        let step = ring.step_ms;
        let last = now_ms - now_ms % step;
        let first = last.saturating_sub(step * (steps - 1));
        let keeps = |tenant: &str, route: &str| {
            query.tenant.as_deref().is_none_or(|t| t == tenant)
                && query.route.as_deref().is_none_or(|r| r == route)
        };
        let mut per_step: BTreeMap<u64, Cell> = BTreeMap::new();
        let mut routes: BTreeMap<&str, Cell> = BTreeMap::new();
        let mut tenants: BTreeMap<&str, Cell> = BTreeMap::new();
        let mut targets: BTreeMap<&str, AttemptCell> = BTreeMap::new();
        let mut total = Cell::default();
        for bucket in ring
            .buckets
            .iter()
            .filter(|b| (first..=last).contains(&b.start_ms))
        {
            let step_cell = per_step.entry(bucket.start_ms).or_default();
            for (tenant, by_route) in &bucket.cells {
                for (route, cell) in by_route {
                    if !keeps(tenant, route) {
                        continue;
                    }
                    step_cell.merge(cell);
                    routes.entry(route).or_default().merge(cell);
                    tenants.entry(tenant).or_default().merge(cell);
                    total.merge(cell);
                }
            }
            for (target, cell) in &bucket.targets {
                let sum = targets.entry(target).or_default();
                sum.attempts += cell.attempts;
                sum.errors += cell.errors;
                sum.latency.merge(&cell.latency);
            }
        }
        let points = (0..steps)
            .map(|i| {
                let at_ms = first + i * step;
                let figures = per_step.get(&at_ms).map(Figures::from).unwrap_or_default();
                Point { at_ms, figures }
            })
            .collect();
        let named = |cells: BTreeMap<&str, Cell>| {
            cells
                .iter()
                .map(|(name, cell)| Named {
                    name: (*name).to_owned(),
                    figures: cell.into(),
                })
                .collect()
        };
        Ok(Summary {
            window: window.to_owned(),
            step_seconds: step / 1000,
            points,
            refusals: total
                .refusals
                .iter()
                .map(|(guard, n)| (guard.to_string(), *n))
                .collect(),
            total: (&total).into(),
            by_route: named(routes),
            by_tenant: named(tenants),
            targets: targets
                .into_iter()
                .map(|(target, cell)| TargetFigures {
                    target: target.to_owned(),
                    attempts: cell.attempts,
                    errors: cell.errors,
                    error_rate: (cell.attempts > 0)
                        .then(|| cell.errors as f64 / cell.attempts as f64),
                    latency_p50_ms: cell.latency.quantile(0.5),
                    latency_p95_ms: cell.latency.quantile(0.95),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        at_ms: u64,
        tenant: &str,
        route: &str,
        cache: &str,
        latency_ms: f64,
    ) -> RequestRecord {
        RequestRecord {
            at_ms,
            tenant: tenant.into(),
            route: Some(route.into()),
            cache: Some(cache.to_owned().into()),
            status: 200,
            latency_ms,
            cost_usd: if cache == "miss" { 0.01 } else { 0.0 },
            saved_usd: if cache == "miss" { 0.0 } else { 0.01 },
            ..RequestRecord::default()
        }
    }

    #[test]
    fn percentiles_are_read_within_a_quarter() {
        let mut histogram = Histogram::default();
        for ms in 1..=1000 {
            histogram.add(f64::from(ms));
        }
        let p50 = histogram.quantile(0.5).unwrap();
        let p95 = histogram.quantile(0.95).unwrap();
        assert!((375.0..=625.0).contains(&p50), "{p50}");
        assert!((712.0..=1188.0).contains(&p95), "{p95}");
    }

    #[test]
    fn a_summary_has_every_step_and_splits_by_tenant_and_route() {
        let timeline = Timeline::default();
        let now = 10 * HOUR_MS + 30 * MINUTE_MS;
        timeline.add(&record(now - 5 * MINUTE_MS, "acme", "chat", "miss", 10.0));
        timeline.add(&record(now - 5 * MINUTE_MS, "acme", "chat", "hit", 1.0));
        timeline.add(&record(now, "globex", "support", "semantic-hit", 2.0));
        // Arrived out of order, and too old for the minutes kept.
        timeline.add(&record(
            now - 2 * MINUTE_MS,
            "acme",
            "support",
            "miss",
            20.0,
        ));
        timeline.add(&record(now - 4 * HOUR_MS, "acme", "chat", "miss", 20.0));

        let hour = timeline.summary(&TimelineQuery::default(), now).unwrap();
        assert_eq!(hour.points.len(), 60);
        assert_eq!(hour.total.requests, 4);
        assert_eq!(hour.total.exact_hits + hour.total.semantic_hits, 2);
        assert_eq!(hour.points[54].figures.requests, 2);
        assert_eq!(hour.points[57].figures.requests, 1);
        assert_eq!(hour.points[59].figures.requests, 1);
        let acme = hour.by_tenant.iter().find(|n| n.name == "acme").unwrap();
        assert_eq!(acme.figures.requests, 3);

        let week = timeline
            .summary(
                &TimelineQuery {
                    window: Some("7d".into()),
                    tenant: Some("acme".into()),
                    route: Some("chat".into()),
                },
                now,
            )
            .unwrap();
        assert_eq!(week.points.len(), 168);
        assert_eq!(week.total.requests, 3);
        assert!((week.total.spend_usd - 0.02).abs() < 1e-9);
        assert!(
            timeline
                .summary(
                    &TimelineQuery {
                        window: Some("2h".into()),
                        ..TimelineQuery::default()
                    },
                    now
                )
                .is_err()
        );
    }
}
