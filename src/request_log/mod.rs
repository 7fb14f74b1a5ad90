//! The request log: one record per API request (who, which route and prompt version, what the
//! cache did, which target answered, status, tokens, cost, latency), kept in an embedded,
//! time-ordered store on this replica and queried through `GET /admin/requests`.
//!
//! Writing never holds a request up: a record goes into a bounded queue (`try_send`) and a
//! writer task stores it in batches; a full queue drops the record and counts it
//! (`reprise_request_log_dropped_total`). A `kill -9` loses what is still queued plus at most
//! `FLUSH_EVERY` of written records.
//!
//! The log is sled used directly, not through `Store`: it is local to the replica by design
//! (each replica exports to the team's collector for a shared view) and its queries need
//! ordered range scans, which the `Store` trait does not offer. Layout, in three trees:
//! - `records`: time key (ms since the epoch, big-endian, then a sequence number) → the record
//!   as JSON;
//! - `ids`: request id → time key;
//! - `tenants`: tenant, 0, time key → nothing: one tenant's last hour is one range scan however
//!   large the log.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::telemetry::Metrics;

const FLUSH_EVERY: Duration = Duration::from_millis(200);
const BATCH: usize = 512;

/// One API request, as the log keeps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: String,
    /// Unix milliseconds when the request arrived.
    pub at_ms: u64,
    pub endpoint: String,
    pub tenant: String,
    /// The run-time key's id (`None`: a key from `[auth]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Value>,
    /// `hit`, `semantic-hit`, `miss`, `bypass`, `refresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// What the semantic stage did (`hit`, `rejected-GUARD`, `miss`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
    /// The cache entry that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// The target that answered (`provider/model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub attempts: u32,
    pub status: u16,
    /// The error's kind for a failed request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub saved_usd: f64,
    pub latency_ms: f64,
    pub stream: bool,
}

impl RequestRecord {
    /// The record of an answered (or failed) request; `response` is the whole answer, if it
    /// was one (a stream's tokens are not known when it starts).
    pub fn of(
        endpoint: &str,
        trace: &crate::pipeline::Trace,
        status: u16,
        elapsed: Duration,
        response: Option<&Value>,
        prices: &crate::prices::PriceTable,
    ) -> Option<Self> {
        let caller = trace.caller.as_ref()?;
        let (input_tokens, output_tokens) = match response {
            Some(answer) if !trace.cache.is_hit() => crate::cache::usage_counts(answer),
            _ => (0, 0),
        };
        let cost_usd = response.map_or(0.0, |answer| {
            prices.cost(trace.target.as_deref(), answer, input_tokens, output_tokens)
        });
        Some(Self {
            id: caller.request_id.clone(),
            at_ms: now_ms().saturating_sub(elapsed.as_millis() as u64),
            endpoint: endpoint.to_owned(),
            tenant: caller.tenant.to_string(),
            key: caller.key.clone(),
            user: caller.user.clone(),
            route: trace.route.clone(),
            prompt: trace.prompt.as_ref().map(|p| {
                serde_json::json!({"id": p.id, "version": p.version, "label": p.label,
                    "arm": p.arm.map(|(arm, arms)| format!("{arm}/{arms}"))})
            }),
            cache: trace.cache.status.map(|s| s.label().to_owned()),
            semantic: trace.cache.semantic.map(|s| s.label().to_owned()),
            similarity: trace.cache.similarity,
            entry: trace.cache.entry.clone(),
            target: trace.target.clone(),
            attempts: trace.attempts,
            status,
            error: trace.error.map(str::to_owned),
            input_tokens,
            output_tokens,
            cost_usd,
            saved_usd: trace.cache.saved_usd,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            stream: trace.stream,
        })
    }
}

/// `GET /admin/requests`'s filters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestQuery {
    pub tenant: Option<String>,
    pub key: Option<String>,
    pub route: Option<String>,
    pub target: Option<String>,
    pub status: Option<String>,
    pub cache: Option<String>,
    /// RFC 3339 or a duration back from now (`1h`); the last hour by default.
    pub since: Option<String>,
    pub until: Option<String>,
    /// At most this many records, newest first (100 by default, at most 1,000).
    pub limit: Option<String>,
}

pub struct RequestLog {
    sender: tokio::sync::mpsc::Sender<RequestRecord>,
    db: sled::Db,
    records: sled::Tree,
    ids: sled::Tree,
    tenants: sled::Tree,
    metrics: Arc<Metrics>,
    /// Records queued, and records stored: equal once the writer has caught up.
    queued: AtomicU64,
    stored: Arc<AtomicU64>,
}

fn backend(error: sled::Error) -> ApiError {
    ApiError::StoreUnavailable(format!("request log: {error}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn time_key(at_ms: u64, sequence: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&at_ms.to_be_bytes());
    key[8..].copy_from_slice(&sequence.to_be_bytes());
    key
}

fn tenant_key(tenant: &str, time: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + 1 + time.len());
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(time);
    key
}

impl RequestLog {
    /// Opens (or creates) the log at `path` and starts its writer and its retention.
    pub fn open(
        config: &crate::config::RequestLogConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let db = open_db(&config.path).map_err(|e| {
            anyhow::anyhow!(
                "request_log.path: cannot open the log at {}: {e}",
                config.path.display()
            )
        })?;
        let records = db.open_tree("records")?;
        let ids = db.open_tree("ids")?;
        let tenants = db.open_tree("tenants")?;
        let (sender, receiver) = tokio::sync::mpsc::channel(config.queue);
        let log = Arc::new(Self {
            sender,
            db,
            records,
            ids,
            tenants,
            metrics,
            queued: AtomicU64::new(0),
            stored: Arc::default(),
        });
        let sequence = Arc::new(AtomicU64::new(0));
        tokio::spawn(write(
            Arc::downgrade(&log),
            receiver,
            sequence,
            Arc::clone(&log.stored),
        ));
        tokio::spawn(retain(
            Arc::downgrade(&log),
            config.max_age,
            config.max_bytes,
        ));
        Ok(log)
    }

    /// Queues a record; never waits. A full queue drops it (and counts it).
    pub fn push(&self, record: RequestRecord) {
        match self.sender.try_send(record) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.metrics.request_log_dropped(),
        }
    }

    /// Waits (up to `within`) until every queued record is stored, then flushes them to disk:
    /// on shutdown, so a graceful stop loses nothing.
    pub async fn drain(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.stored.load(Ordering::Acquire) < self.queued.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let db = self.db.clone();
        if !matches!(
            tokio::task::spawn_blocking(move || db.flush()).await,
            Ok(Ok(_))
        ) {
            tracing::warn!("cannot flush the request log");
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<Value>, ApiError> {
        let Some(time) = self.ids.get(id.as_bytes()).map_err(backend)? else {
            return Ok(None);
        };
        let record = self.records.get(&time).map_err(backend)?;
        Ok(record.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Records matching `query`, newest first.
    pub fn query(&self, query: &RequestQuery) -> Result<Vec<Value>, ApiError> {
        let now = now_ms();
        let since = parse_time(query.since.as_deref(), now, "since")?.unwrap_or(now - 3_600_000);
        let until = parse_time(query.until.as_deref(), now, "until")?.unwrap_or(u64::MAX);
        let limit = match query.limit.as_deref() {
            Some(limit) => limit
                .parse::<usize>()
                .map_err(|_| ApiError::invalid("limit: a number", Some("limit")))?,
            None => 100,
        }
        .clamp(1, 1000);
        let status = query
            .status
            .as_deref()
            .map(str::parse::<u16>)
            .transpose()
            .map_err(|_| ApiError::invalid("status: an HTTP status code", Some("status")))?;
        let (from, to) = (time_key(since, 0), time_key(until, u64::MAX));
        let keep = |record: &RequestRecord| {
            query
                .key
                .as_ref()
                .is_none_or(|k| record.key.as_ref() == Some(k))
                && query
                    .route
                    .as_ref()
                    .is_none_or(|r| record.route.as_ref() == Some(r))
                && query
                    .target
                    .as_ref()
                    .is_none_or(|t| record.target.as_ref() == Some(t))
                && status.is_none_or(|s| record.status == s)
                && query
                    .cache
                    .as_ref()
                    .is_none_or(|c| record.cache.as_ref() == Some(c))
        };
        let mut found = Vec::new();
        let mut take = |bytes: &[u8]| -> bool {
            if let Ok(record) = serde_json::from_slice::<RequestRecord>(bytes)
                && keep(&record)
                && let Ok(value) = serde_json::to_value(&record)
            {
                found.push(value);
            }
            found.len() < limit
        };
        match &query.tenant {
            Some(tenant) => {
                let range = tenant_key(tenant, &from)..=tenant_key(tenant, &to);
                for entry in self.tenants.range(range).rev() {
                    let (key, _) = entry.map_err(backend)?;
                    let time = &key[key.len() - 16..];
                    if let Some(bytes) = self.records.get(time).map_err(backend)?
                        && !take(&bytes)
                    {
                        break;
                    }
                }
            }
            None => {
                for entry in self.records.range(from..=to).rev() {
                    let (_, bytes) = entry.map_err(backend)?;
                    if !take(&bytes) {
                        break;
                    }
                }
            }
        }
        Ok(found)
    }

    /// How many records the log holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn store(&self, batch: &[(u64, RequestRecord)]) -> Result<(), sled::Error> {
        let (mut records, mut ids, mut tenants) = (
            sled::Batch::default(),
            sled::Batch::default(),
            sled::Batch::default(),
        );
        for (sequence, record) in batch {
            let time = time_key(record.at_ms, *sequence);
            let Ok(bytes) = serde_json::to_vec(record) else {
                continue;
            };
            records.insert(&time, bytes);
            ids.insert(record.id.as_bytes(), &time);
            tenants.insert(tenant_key(&record.tenant, &time), &[]);
        }
        self.records.apply_batch(records)?;
        self.ids.apply_batch(ids)?;
        self.tenants.apply_batch(tenants)
    }

    /// Removes the records older than `before_ms`, oldest first, at most `most` of them; how
    /// many.
    fn remove_before(&self, before_ms: u64, most: usize) -> Result<usize, sled::Error> {
        let mut removed = 0;
        for entry in self.records.range(..time_key(before_ms, 0)).take(most) {
            let (time, bytes) = entry?;
            if let Ok(record) = serde_json::from_slice::<RequestRecord>(&bytes) {
                self.ids.remove(record.id.as_bytes())?;
                self.tenants.remove(tenant_key(&record.tenant, &time))?;
            }
            self.records.remove(&time)?;
            removed += 1;
        }
        Ok(removed)
    }
}

fn open_db(path: &Path) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(path)
        .cache_capacity(16 << 20)
        .flush_every_ms(Some(FLUSH_EVERY.as_millis() as u64))
        .open()
}

/// A time given as RFC 3339 or as a duration back from now.
fn parse_time(text: Option<&str>, now: u64, field: &str) -> Result<Option<u64>, ApiError> {
    let Some(text) = text else { return Ok(None) };
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(Some(now.saturating_sub(ago.as_millis() as u64)));
    }
    humantime::parse_rfc3339_weak(text)
        .map(|at| {
            Some(
                at.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            )
        })
        .map_err(|_| {
            ApiError::invalid(
                format!("{field}: an RFC 3339 time or a duration back from now (1h)"),
                Some(field),
            )
        })
}

async fn write(
    log: std::sync::Weak<RequestLog>,
    mut receiver: tokio::sync::mpsc::Receiver<RequestRecord>,
    sequence: Arc<AtomicU64>,
    stored: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        let Some(log) = log.upgrade() else { return };
        let numbered: Vec<(u64, RequestRecord)> = batch
            .drain(..)
            .map(|record| (sequence.fetch_add(1, Ordering::Relaxed), record))
            .collect();
        let count = numbered.len() as u64;
        let written = tokio::task::spawn_blocking(move || log.store(&numbered)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!("cannot write to the request log");
        }
        stored.fetch_add(count, Ordering::Release);
    }
}

/// Every few seconds: drops records past `max_age`, then the oldest while the log is over
/// `max_bytes`.
async fn retain(log: std::sync::Weak<RequestLog>, max_age: Duration, max_bytes: u64) {
    let mut ticks = tokio::time::interval(Duration::from_secs(5));
    loop {
        ticks.tick().await;
        let Some(log) = log.upgrade() else { return };
        let pass = tokio::task::spawn_blocking(move || -> Result<(), sled::Error> {
            let cutoff = now_ms().saturating_sub(max_age.as_millis() as u64);
            while log.remove_before(cutoff, 10_000)? == 10_000 {}
            // One oldest minute a pass: sled gives space back lazily, so looping until the size
            // drops would empty the log.
            if log.db.size_on_disk()? > max_bytes
                && let Some((oldest, _)) = log.records.first()?
            {
                let oldest_ms = u64::from_be_bytes(oldest[..8].try_into().unwrap_or_default());
                log.remove_before(oldest_ms + 60_000, 10_000)?;
            }
            Ok(())
        })
        .await;
        if !matches!(pass, Ok(Ok(()))) {
            tracing::warn!("request log retention failed; will retry");
        }
    }
}
