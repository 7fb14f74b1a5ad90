//! The usage book: requests, tokens, cost, cache hits and money saved per day, tenant, key,
//! route and model (`GET /admin/usage`, `reprise usage`).
//!
//! Each replica adds up what it served in memory and writes it to the store every
//! `FLUSH_INTERVAL` (and on shutdown), one row per day, tenant, key, route and model at
//! `usage/v1/{day}/{tenant}/{key}/{route}/{model}`, by compare-and-swap so replicas sharing
//! Redis add to the same rows without losing each other's counts. A replica killed outright
//! loses at most its last interval of usage; budgets do not depend on it (their spend is
//! written per request, see `limits`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::store::Store;

pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
const PREFIX: &str = "usage/v1/";
/// The key column of requests made with a key from `[auth]` (they have no id).
const STATIC_KEY: &str = "-";

/// One row's coordinates. Every request makes one and the book clones it, so the columns are
/// shared strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsageKey {
    pub day: Arc<str>,
    pub tenant: Arc<str>,
    pub key: Arc<str>,
    pub route: Arc<str>,
    pub model: Arc<str>,
}

impl UsageKey {
    pub fn today(tenant: &str, key: Option<&str>, route: &str) -> Self {
        Self {
            day: today(),
            tenant: shared_name(tenant),
            key: shared_name(key.unwrap_or(STATIC_KEY)),
            route: shared_name(route),
            model: NO_MODEL.with(Arc::clone),
        }
    }

    fn store_key(&self) -> String {
        let part =
            |text: &str| url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
        format!(
            "{PREFIX}{}/{}/{}/{}/{}",
            self.day,
            part(&self.tenant),
            part(&self.key),
            part(&self.route),
            part(&self.model)
        )
    }

    fn from_store_key(key: &str) -> Option<Self> {
        let mut parts = key.strip_prefix(PREFIX)?.split('/');
        let mut next = || -> Option<Arc<str>> {
            let part = parts.next()?;
            Some(
                url::form_urlencoded::parse(format!("x={part}").as_bytes())
                    .next()?
                    .1
                    .into(),
            )
        };
        Some(Self {
            day: next()?,
            tenant: next()?,
            key: next()?,
            route: next()?,
            model: next()?,
        })
    }

    fn column(&self, dimension: Dimension) -> &str {
        match dimension {
            Dimension::Day => &self.day,
            Dimension::Tenant => &self.tenant,
            Dimension::Key => &self.key,
            Dimension::Route => &self.route,
            Dimension::Model => &self.model,
        }
    }
}

thread_local! {
    /// The model column before a target answered.
    static NO_MODEL: Arc<str> = Arc::from("-");
    /// Today's date (UTC) and the day number it was written for: formatted once a day per
    /// thread, not per request.
    static TODAY: std::cell::RefCell<(u64, Arc<str>)> = std::cell::RefCell::new((u64::MAX, Arc::from("")));
}

const SECONDS_PER_DAY: u64 = 86_400;

/// Past this many names a thread's set of them starts again, so that it stays small.
const NAMES_KEPT: usize = 4_096;

/// `name` as a shared string: the same tenants, keys, routes and models name the rows of
/// request after request, so each serving thread makes each name once.
pub fn shared_name(name: &str) -> Arc<str> {
    thread_local! {
        static NAMES: std::cell::RefCell<std::collections::HashSet<Arc<str>>> =
            std::cell::RefCell::new(std::collections::HashSet::new());
    }
    NAMES.with_borrow_mut(|names| {
        if let Some(known) = names.get(name) {
            return Arc::clone(known);
        }
        if names.len() >= NAMES_KEPT {
            names.clear();
        }
        let made: Arc<str> = Arc::from(name);
        names.insert(Arc::clone(&made));
        made
    })
}

fn today() -> Arc<str> {
    let now = SystemTime::now();
    let day = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() / SECONDS_PER_DAY);
    TODAY.with_borrow_mut(|(cached_day, text)| {
        if *cached_day != day {
            *text = Arc::from(&humantime::format_rfc3339_seconds(now).to_string()[..10]);
            *cached_day = day;
        }
        Arc::clone(text)
    })
}

/// What a row adds up. Money is in billionths of a USD, so sums stay exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageCounts {
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_nanos: u64,
    pub cache_hits: u64,
    pub tokens_saved: u64,
    pub saved_nanos: u64,
}

impl UsageCounts {
    fn add(&mut self, other: &UsageCounts) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost_nanos += other.cost_nanos;
        self.cache_hits += other.cache_hits;
        self.tokens_saved += other.tokens_saved;
        self.saved_nanos += other.saved_nanos;
    }

    fn view(&self) -> Value {
        json!({
            "requests": self.requests,
            "errors": self.errors,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_nanos as f64 / 1e9,
            "cache_hits": self.cache_hits,
            "tokens_saved": self.tokens_saved,
            "saved_usd": self.saved_nanos as f64 / 1e9,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Day,
    Tenant,
    Key,
    Route,
    Model,
}

impl Dimension {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "day" => Self::Day,
            "tenant" => Self::Tenant,
            "key" => Self::Key,
            "route" => Self::Route,
            "model" => Self::Model,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Tenant => "tenant",
            Self::Key => "key",
            Self::Route => "route",
            Self::Model => "model",
        }
    }
}

/// `GET /admin/usage`'s query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// First day (`YYYY-MM-DD`, UTC), today by default.
    pub from: Option<String>,
    /// Last day, inclusive; `from` by default.
    pub to: Option<String>,
    pub tenant: Option<String>,
    pub key: Option<String>,
    pub route: Option<String>,
    pub model: Option<String>,
    /// Comma-separated columns to group by (`day,tenant,key,route,model`, all by default).
    pub group_by: Option<String>,
}

/// The most days one query may span.
const MAX_DAYS: i64 = 400;

pub struct UsageBook {
    store: Option<Arc<dyn Store>>,
    /// Added since the last flush.
    pending: parking_lot::Mutex<HashMap<UsageKey, UsageCounts>>,
    /// Taken by a flush and not yet written: still counted by queries.
    flushing: parking_lot::Mutex<HashMap<UsageKey, UsageCounts>>,
    /// One flush at a time.
    writer: tokio::sync::Mutex<()>,
}

impl UsageBook {
    pub fn new(store: Option<Arc<dyn Store>>) -> Arc<Self> {
        Arc::new(Self {
            store,
            pending: Default::default(),
            flushing: Default::default(),
            writer: Default::default(),
        })
    }

    /// Writes the book to the store every `FLUSH_INTERVAL` for as long as it exists.
    pub fn flush_periodically(self: &Arc<Self>) {
        if self.store.is_none() {
            return;
        }
        let book = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(FLUSH_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(book) = book.upgrade() else { return };
                book.flush().await;
            }
        });
    }

    pub fn add(&self, key: UsageKey, counts: UsageCounts) {
        self.pending.lock().entry(key).or_default().add(&counts);
    }

    /// Adds what this replica counted since the last flush to the store's rows.
    pub async fn flush(&self) {
        let Some(store) = &self.store else { return };
        let _writer = self.writer.lock().await;
        let taken = std::mem::take(&mut *self.pending.lock());
        {
            let mut flushing = self.flushing.lock();
            for (key, counts) in taken {
                flushing.entry(key).or_default().add(&counts);
            }
        }
        let rows: Vec<(UsageKey, UsageCounts)> = self
            .flushing
            .lock()
            .iter()
            .map(|(k, c)| (k.clone(), *c))
            .collect();
        for (key, counts) in rows {
            match add_to_row(store.as_ref(), &key.store_key(), &counts).await {
                Ok(()) => {
                    self.flushing.lock().remove(&key);
                }
                Err(error) => {
                    // Kept in `flushing`: the next flush tries again.
                    tracing::warn!(%error, "cannot write usage; will retry");
                    return;
                }
            }
        }
    }

    /// Rows matching `query`, grouped and summed, with their total.
    pub async fn query(&self, query: &UsageQuery) -> Result<Value, ApiError> {
        let from = query.from.clone().unwrap_or_else(|| today().to_string());
        let to = query.to.clone().unwrap_or_else(|| from.clone());
        let days = days_between(&from, &to)?;
        let group: Vec<Dimension> = match &query.group_by {
            None => vec![
                Dimension::Day,
                Dimension::Tenant,
                Dimension::Key,
                Dimension::Route,
                Dimension::Model,
            ],
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(|name| {
                    Dimension::parse(name).ok_or_else(|| {
                        ApiError::invalid(
                            format!(
                                "group_by: unknown column {name:?} (day, tenant, key, route, model)"
                            ),
                            Some("group_by"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let wanted = |key: &UsageKey| {
            days.iter().any(|day| day.as_str() == &*key.day)
                && [
                    (&query.tenant, &*key.tenant),
                    (&query.key, &*key.key),
                    (&query.route, &*key.route),
                    (&query.model, &*key.model),
                ]
                .into_iter()
                .all(|(filter, value)| filter.as_deref().is_none_or(|f| f == value))
        };
        let mut rows: Vec<(UsageKey, UsageCounts)> = Vec::new();
        if let Some(store) = &self.store {
            for day in &days {
                store
                    .scan_prefix(&format!("{PREFIX}{day}/"), &mut |key, bytes| {
                        if let (Some(key), Ok(counts)) = (
                            UsageKey::from_store_key(&key),
                            serde_json::from_slice::<UsageCounts>(&bytes),
                        ) {
                            rows.push((key, counts));
                        }
                    })
                    .await
                    .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?;
            }
        }
        for unwritten in [&self.flushing, &self.pending] {
            rows.extend(unwritten.lock().iter().map(|(k, c)| (k.clone(), *c)));
        }
        let mut grouped: std::collections::BTreeMap<Vec<String>, UsageCounts> = Default::default();
        let mut total = UsageCounts::default();
        for (key, counts) in rows.iter().filter(|(key, _)| wanted(key)) {
            let columns = group.iter().map(|d| key.column(*d).to_owned()).collect();
            grouped.entry(columns).or_default().add(counts);
            total.add(counts);
        }
        let data: Vec<Value> = grouped
            .into_iter()
            .map(|(columns, counts)| {
                let mut row = serde_json::Map::new();
                for (dimension, value) in group.iter().zip(columns) {
                    row.insert(dimension.name().to_owned(), Value::String(value));
                }
                if let Value::Object(figures) = counts.view() {
                    row.extend(figures);
                }
                Value::Object(row)
            })
            .collect();
        Ok(json!({
            "object": "usage",
            "from": from,
            "to": to,
            "group_by": group.iter().map(|d| d.name()).collect::<Vec<_>>(),
            "data": data,
            "total": total.view(),
        }))
    }
}

async fn add_to_row(
    store: &dyn Store,
    key: &str,
    counts: &UsageCounts,
) -> Result<(), crate::store::StoreError> {
    loop {
        let current = store.get(key).await?;
        let mut row = current
            .as_deref()
            .and_then(|bytes| serde_json::from_slice::<UsageCounts>(bytes).ok())
            .unwrap_or_default();
        row.add(counts);
        let bytes = serde_json::to_vec(&row).unwrap_or_default();
        if store
            .compare_and_swap(key, current.as_deref(), bytes)
            .await?
        {
            return Ok(());
        }
    }
}

/// Every day from `from` to `to`, inclusive.
fn days_between(from: &str, to: &str) -> Result<Vec<String>, ApiError> {
    let parse = |text: &str, field: &'static str| {
        humantime::parse_rfc3339_weak(&format!("{text} 00:00:00"))
            .ok()
            .filter(|_| text.len() == 10)
            .ok_or_else(|| ApiError::invalid(format!("{field}: expected YYYY-MM-DD"), Some(field)))
    };
    let (start, end) = (parse(from, "from")?, parse(to, "to")?);
    let span = end
        .duration_since(start)
        .map_err(|_| ApiError::invalid("`to` is before `from`", Some("to")))?;
    let count = (span.as_secs() / 86_400) as i64 + 1;
    if count > MAX_DAYS {
        return Err(ApiError::invalid(
            format!("at most {MAX_DAYS} days per query"),
            Some("to"),
        ));
    }
    Ok((0..count)
        .map(|i| {
            let day = start + Duration::from_secs(i as u64 * 86_400);
            humantime::format_rfc3339_seconds(day).to_string()[..10].to_owned()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_made_once_per_thread_and_the_set_stays_bounded() {
        let first = shared_name("tenant-a");
        assert!(Arc::ptr_eq(&first, &shared_name("tenant-a")));
        assert_eq!(&*shared_name("tenant-b"), "tenant-b");
        for i in 0..NAMES_KEPT + 10 {
            assert_eq!(*shared_name(&format!("name-{i}")), format!("name-{i}"));
        }
        // Started again past the bound: the name is made anew, and still reads the same.
        let again = shared_name("tenant-a");
        assert_eq!(again, first);
        assert!(!Arc::ptr_eq(&again, &first));
    }

    #[test]
    fn store_keys_round_trip_names_with_slashes() {
        let key = UsageKey {
            day: "2026-12-02".into(),
            tenant: "acme".into(),
            key: "key_1".into(),
            route: "chat".into(),
            model: "meta/llama 3".into(),
        };
        assert_eq!(UsageKey::from_store_key(&key.store_key()), Some(key));
    }

    #[test]
    fn days_span_months_and_refuse_reversed_ranges() {
        let days = days_between("2026-11-29", "2026-12-02").unwrap();
        assert_eq!(
            days,
            ["2026-11-29", "2026-11-30", "2026-12-01", "2026-12-02"]
        );
        assert!(days_between("2026-12-02", "2026-12-01").is_err());
        assert!(days_between("2026-12", "2026-12-01").is_err());
    }
}
