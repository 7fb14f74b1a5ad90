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

use std::collections::{BTreeMap, VecDeque};

use parking_lot::Mutex;

/// A request adds to three maps; a keyed hash against flooding is not needed for names the
/// gateway's own config and keys define.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
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

/// The guards a refusal can name (`rejected-GUARD`), as the stored cells number them.
const GUARDS: [&str; 10] = [
    "numbers",
    "times",
    "negation",
    "polarity",
    "entities",
    "substitution",
    "content",
    "feedback",
    "score",
    "ambiguous",
];

fn latency_bucket(ms: f64) -> u8 {
    let bucket = if ms <= FIRST_BOUND_MS {
        0
    } else {
        ((ms / FIRST_BOUND_MS).ln() / GROWTH.ln()).ceil() as usize
    };
    bucket.min(LATENCY_BUCKETS - 1) as u8
}

/// A sparse count per small number, sorted: most cells see a handful of latency buckets and
/// no refusals, and a dense array in each would be most of the timeline's memory.
#[derive(Debug, Clone, Default)]
struct Counts(Vec<(u8, u32)>);

impl Counts {
    fn add(&mut self, slot: u8) {
        match self.0.binary_search_by_key(&slot, |&(s, _)| s) {
            Ok(at) => self.0[at].1 += 1,
            Err(at) => self.0.insert(at, (slot, 1)),
        }
    }
}

/// Latency slots come first, then one per guard.
const REFUSAL_SLOTS: u8 = LATENCY_BUCKETS as u8;

/// One tenant's requests on one route in one step, as kept.
#[derive(Debug, Clone, Default)]
struct Cell {
    requests: u32,
    exact_hits: u32,
    semantic_hits: u32,
    errors: u32,
    spend_usd: f64,
    saved_usd: f64,
    /// Latency buckets and refusals by guard.
    counts: Counts,
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
        self.counts.add(latency_bucket(record.latency_ms));
        if let Some(guard) = record
            .semantic
            .as_deref()
            .and_then(|s| s.strip_prefix("rejected-"))
            .and_then(|g| GUARDS.iter().position(|known| *known == g))
        {
            self.counts.add(REFUSAL_SLOTS + guard as u8);
        }
    }
}

/// One target's upstream attempts in one step, as kept.
#[derive(Debug, Clone, Default)]
struct AttemptCell {
    attempts: u32,
    errors: u32,
    latency: Counts,
}

/// Cells added up for a summary.
#[derive(Debug, Clone, Default)]
struct Sum {
    requests: u64,
    exact_hits: u64,
    semantic_hits: u64,
    errors: u64,
    spend_usd: f64,
    saved_usd: f64,
    latency: [u64; LATENCY_BUCKETS],
    refusals: [u64; GUARDS.len()],
}

impl Sum {
    fn add(&mut self, cell: &Cell) {
        self.requests += u64::from(cell.requests);
        self.exact_hits += u64::from(cell.exact_hits);
        self.semantic_hits += u64::from(cell.semantic_hits);
        self.errors += u64::from(cell.errors);
        self.spend_usd += cell.spend_usd;
        self.saved_usd += cell.saved_usd;
        for &(slot, n) in &cell.counts.0 {
            match slot.checked_sub(REFUSAL_SLOTS) {
                None => self.latency[usize::from(slot)] += u64::from(n),
                Some(guard) => self.refusals[usize::from(guard)] += u64::from(n),
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
        for (mine, theirs) in self.latency.iter_mut().zip(other.latency) {
            *mine += theirs;
        }
        for (mine, theirs) in self.refusals.iter_mut().zip(other.refusals) {
            *mine += theirs;
        }
    }
}

/// The geometric middle of the latency bucket holding quantile `q`.
fn quantile(latency: &[u64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bucket, &n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(FIRST_BOUND_MS * GROWTH.powi(bucket as i32) / GROWTH.sqrt());
        }
    }
    None
}

/// Tenant, route and target names, numbered once so cells are keyed by two small numbers.
#[derive(Debug, Default)]
struct Names {
    numbers: HashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Names {
    fn number(&mut self, name: &str) -> u32 {
        if let Some(&n) = self.numbers.get(name) {
            return n;
        }
        let n = self.names.len() as u32;
        self.names.push(name.into());
        self.numbers.insert(name.into(), n);
        n
    }

    fn name(&self, number: u32) -> &str {
        &self.names[number as usize]
    }
}

#[derive(Debug)]
struct Bucket {
    start_ms: u64,
    /// By tenant and route.
    cells: HashMap<(u32, u32), Cell>,
    targets: HashMap<u32, AttemptCell>,
}

impl Bucket {
    fn new(start_ms: u64) -> Self {
        Self {
            start_ms,
            cells: HashMap::default(),
            targets: HashMap::default(),
        }
    }

    fn add(&mut self, record: &RequestRecord, tenant: u32, route: u32, targets: &[u32]) {
        self.cells.entry((tenant, route)).or_default().add(record);
        for (attempt, &target) in record.upstream.iter().zip(targets) {
            let cell = self.targets.entry(target).or_default();
            cell.attempts += 1;
            if !matches!(&*attempt.outcome, "ok" | "cancelled") {
                cell.errors += 1;
            }
            cell.latency.add(latency_bucket(attempt.latency_ms));
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

    /// The bucket `at_ms` falls in, made if need be; `None` if it is older than the ring keeps.
    fn bucket(&mut self, at_ms: u64) -> Option<&mut Bucket> {
        let start = at_ms - at_ms % self.step_ms;
        let newest = self.buckets.back().map(|b| b.start_ms);
        match newest {
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
                    return None;
                }
                match self.buckets.binary_search_by_key(&start, |b| b.start_ms) {
                    Ok(at) => self.buckets.get_mut(at),
                    Err(at) => {
                        self.buckets.insert(at, Bucket::new(start));
                        self.buckets.get_mut(at)
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct Rings {
    names: Names,
    minutes: Ring,
    hours: Ring,
}

/// The log's figures over time (see the module's comment).
#[derive(Debug)]
pub struct Timeline {
    rings: Mutex<Rings>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            rings: Mutex::new(Rings {
                names: Names::default(),
                minutes: Ring::new(MINUTE_MS, MINUTES_KEPT),
                hours: Ring::new(HOUR_MS, HOURS_KEPT),
            }),
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

impl From<&Sum> for Figures {
    fn from(sum: &Sum) -> Self {
        Self {
            requests: sum.requests,
            exact_hits: sum.exact_hits,
            semantic_hits: sum.semantic_hits,
            hit_ratio: (sum.requests > 0)
                .then(|| (sum.exact_hits + sum.semantic_hits) as f64 / sum.requests as f64),
            errors: sum.errors,
            spend_usd: sum.spend_usd,
            saved_usd: sum.saved_usd,
            latency_p50_ms: quantile(&sum.latency, 0.5),
            latency_p95_ms: quantile(&sum.latency, 0.95),
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
        let Rings {
            names,
            minutes,
            hours,
        } = &mut *rings;
        let tenant = names.number(&record.tenant);
        let route = names.number(record.route.as_deref().unwrap_or("-"));
        let targets: smallvec::SmallVec<[u32; 4]> = record
            .upstream
            .iter()
            .map(|a| names.number(&a.target))
            .collect();
        for ring in [minutes, hours] {
            if let Some(bucket) = ring.bucket(record.at_ms) {
                bucket.add(record, tenant, route, &targets);
            }
        }
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
        let names = &rings.names;
        let ring = if minutes {
            &rings.minutes
        } else {
            &rings.hours
        };
        let step = ring.step_ms;
        let last = now_ms - now_ms % step;
        let first = last.saturating_sub(step * (steps - 1));
        let keeps = |tenant: &str, route: &str| {
            query.tenant.as_deref().is_none_or(|t| t == tenant)
                && query.route.as_deref().is_none_or(|r| r == route)
        };
        let mut per_step: BTreeMap<u64, Sum> = BTreeMap::new();
        let mut routes: BTreeMap<&str, Sum> = BTreeMap::new();
        let mut tenants: BTreeMap<&str, Sum> = BTreeMap::new();
        let mut targets: BTreeMap<&str, (u64, u64, [u64; LATENCY_BUCKETS])> = BTreeMap::new();
        let mut total = Sum::default();
        for bucket in ring
            .buckets
            .iter()
            .filter(|b| (first..=last).contains(&b.start_ms))
        {
            let mut step_sum = Sum::default();
            let mut by_tenant: HashMap<u32, Sum> = HashMap::default();
            let mut by_route: HashMap<u32, Sum> = HashMap::default();
            for (&(tenant, route), cell) in &bucket.cells {
                if !keeps(names.name(tenant), names.name(route)) {
                    continue;
                }
                step_sum.add(cell);
                by_tenant.entry(tenant).or_default().add(cell);
                by_route.entry(route).or_default().add(cell);
            }
            for (tenant, sum) in by_tenant {
                tenants.entry(names.name(tenant)).or_default().merge(&sum);
            }
            for (route, sum) in by_route {
                routes.entry(names.name(route)).or_default().merge(&sum);
            }
            total.merge(&step_sum);
            per_step.insert(bucket.start_ms, step_sum);
            for (&target, cell) in &bucket.targets {
                let (attempts, errors, latency) = targets.entry(names.name(target)).or_default();
                *attempts += u64::from(cell.attempts);
                *errors += u64::from(cell.errors);
                for &(slot, n) in &cell.latency.0 {
                    latency[usize::from(slot)] += u64::from(n);
                }
            }
        }
        let points = (0..steps)
            .map(|i| {
                let at_ms = first + i * step;
                let figures = per_step.get(&at_ms).map(Figures::from).unwrap_or_default();
                Point { at_ms, figures }
            })
            .collect();
        let named = |sums: BTreeMap<&str, Sum>| {
            sums.iter()
                .map(|(name, sum)| Named {
                    name: (*name).to_owned(),
                    figures: sum.into(),
                })
                .collect()
        };
        Ok(Summary {
            window: window.to_owned(),
            step_seconds: step / 1000,
            points,
            refusals: GUARDS
                .iter()
                .zip(total.refusals)
                .filter(|&(_, n)| n > 0)
                .map(|(guard, n)| ((*guard).to_owned(), n))
                .collect(),
            total: (&total).into(),
            by_route: named(routes),
            by_tenant: named(tenants),
            targets: targets
                .into_iter()
                .map(|(target, (attempts, errors, latency))| TargetFigures {
                    target: target.to_owned(),
                    attempts,
                    errors,
                    error_rate: (attempts > 0).then(|| errors as f64 / attempts as f64),
                    latency_p50_ms: quantile(&latency, 0.5),
                    latency_p95_ms: quantile(&latency, 0.95),
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
        let mut latency = [0; LATENCY_BUCKETS];
        for ms in 1..=1000 {
            latency[usize::from(latency_bucket(f64::from(ms)))] += 1;
        }
        let p50 = quantile(&latency, 0.5).unwrap();
        let p95 = quantile(&latency, 0.95).unwrap();
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
