//! The request log: one record per API request (who, which route and prompt version, what the
//! cache did, which target answered, status, tokens, cost, latency), kept in an embedded,
//! time-ordered store on this replica and queried through `GET /admin/requests`.
//!
//! Writing never holds a request up: a record goes into a bounded queue (`try_send`) and a
//! writer thread appends it, in batches, to the current segment file (`segments`); a full queue
//! drops the record and counts it (`reprise_request_log_dropped_total`). A `kill -9` loses what
//! is still queued (at most `queue` records, normally the last few milliseconds); what the
//! writer has written is in the operating system's hands, and forced to disk every 200 ms.
//!
//! The log is local to the replica by design, not in `Store`: many replicas each export to the
//! team's collector (`otel`) for a shared view, and the log's reads are scans of recent time,
//! which a key-value interface does not offer.

mod payload;
mod segments;
mod timeline;

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use payload::PayloadPolicy;
pub use timeline::{Summary, Timeline, TimelineQuery};

use crate::error::ApiError;
use crate::protocol::answer::AnswerFacts;
use crate::telemetry::Metrics;

/// One API request, as the log keeps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: String,
    /// Unix milliseconds when the request arrived.
    pub at_ms: u64,
    /// Unix microseconds when the request arrived, for span times.
    #[serde(skip)]
    pub at_us: u64,
    pub endpoint: Label,
    pub tenant: Arc<str>,
    /// The run-time key's id (`None`: a key from `[auth]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<PromptRecord>,
    /// `hit`, `semantic-hit`, `miss`, `bypass`, `refresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Label>,
    /// What the semantic stage did (`hit`, `rejected-GUARD`, `miss`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
    /// The cache entry that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// When the cache lookup started (ms after the request arrived) and how long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_lookup: Option<Timing>,
    /// The target that answered (`provider/model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub attempts: u32,
    /// Every upstream attempt, in the order they ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<AttemptRecord>,
    pub status: u16,
    /// The error's kind for a failed request (for a stream: also `stream_interrupted` or
    /// `client_closed` after a 200 head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Label>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input tokens the provider served from its own prompt cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u64,
    pub cost_usd: f64,
    pub saved_usd: f64,
    /// Until the answer ended (a stream: its last chunk).
    pub latency_ms: f64,
    /// A stream's first token to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_ms: Option<f64>,
    pub stream: bool,
    /// The upstream's id for the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// The client's span, when it sent a `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// Whether the trace is exported (the client's sampling decision, or the gateway's).
    #[serde(skip)]
    pub sampled: bool,
    /// The request and answer, on routes that capture them (`[request_log.payloads]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
}

/// A value from a fixed set of names: borrowed when the record is made, owned when read back.
pub type Label = std::borrow::Cow<'static, str>;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptRecord {
    pub id: String,
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `arm/arms` in a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Timing {
    /// After the request arrived.
    pub start_ms: f64,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub target: String,
    /// `first`, `retry`, `failover` or `hedge`.
    pub kind: Label,
    /// `ok`, an error kind, or `cancelled` (a hedge that lost).
    pub outcome: Label,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// After the request arrived.
    pub start_ms: f64,
    /// A stream's winning attempt: until the stream ended.
    pub latency_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_ms: Option<f64>,
    pub span_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Payload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
}

/// How a request ended, as the server saw it.
pub struct Ending<'a> {
    pub endpoint: &'static str,
    pub status: u16,
    /// From the request's arrival to its end.
    pub elapsed: Duration,
    /// What the whole answer (or a stream's usage chunk) says.
    pub response: Option<&'a AnswerFacts>,
    /// A stream's first chunk to the client.
    pub first_token: Option<Duration>,
    /// Overrides the trace's error kind (a stream that broke after its head).
    pub error: Option<&'static str>,
    pub payload: Option<Payload>,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl RequestRecord {
    /// The record of an answered (or failed) request, once it ended.
    pub fn of(
        trace: &crate::pipeline::Trace,
        ending: Ending<'_>,
        prices: &crate::prices::PriceTable,
    ) -> Option<Self> {
        let caller = trace.caller.as_ref()?;
        let response = ending.response;
        let (input_tokens, output_tokens) = match response {
            Some(answer) if !trace.cache.is_hit() => answer.tokens(),
            _ => (0, 0),
        };
        let cached_tokens = match response {
            Some(answer) if !trace.cache.is_hit() => answer.usage.map_or(0, |u| u.cached_tokens),
            _ => 0,
        };
        let cost_usd = match response {
            Some(answer) if !trace.cache.is_hit() => prices.cost(
                trace.target.as_deref(),
                answer.model.as_deref(),
                input_tokens,
                output_tokens,
            ),
            _ => 0.0,
        };
        let at_us = micros(SystemTime::now()).saturating_sub(ending.elapsed.as_micros() as u64);
        let offset = |at: SystemTime| (micros(at) as f64 - at_us as f64) / 1000.0;
        let upstream = trace
            .tried
            .iter()
            .map(|attempt| {
                let winner_of_stream = trace.stream && attempt.outcome == "ok";
                let start_ms = offset(attempt.started);
                AttemptRecord {
                    target: attempt.target.clone(),
                    kind: Label::Borrowed(attempt.kind),
                    outcome: Label::Borrowed(attempt.outcome),
                    status: attempt.status,
                    start_ms,
                    latency_ms: if winner_of_stream {
                        (ms(ending.elapsed) - start_ms).max(ms(attempt.duration))
                    } else {
                        ms(attempt.duration)
                    },
                    first_token_ms: attempt.first_token.map(ms),
                    span_id: crate::otel::hex(&attempt.span_id),
                }
            })
            .collect();
        let trace_context = &caller.trace;
        Some(Self {
            id: caller.request_id.clone(),
            at_ms: at_us / 1000,
            at_us,
            endpoint: Label::Borrowed(ending.endpoint),
            tenant: Arc::clone(&caller.tenant),
            key: caller.key.clone(),
            user: caller.user.clone(),
            route: trace.route.clone(),
            prompt: trace.prompt.as_ref().map(|p| PromptRecord {
                id: p.id.clone(),
                version: p.version,
                label: p.label.clone(),
                arm: p.arm.map(|(arm, arms)| format!("{arm}/{arms}")),
            }),
            cache: trace.cache.status.map(|s| Label::Borrowed(s.label())),
            semantic: trace.cache.semantic.map(|s| Label::Borrowed(s.label())),
            similarity: trace.cache.similarity,
            entry: trace.cache.entry.clone(),
            cache_lookup: trace.cache_lookup.map(|(at, took)| Timing {
                start_ms: offset(at),
                duration_ms: ms(took),
            }),
            target: trace.target.clone(),
            attempts: trace.attempts,
            upstream,
            status: ending.status,
            error: ending.error.or(trace.error).map(Label::Borrowed),
            input_tokens,
            output_tokens,
            cached_tokens,
            cost_usd,
            saved_usd: trace.cache.saved_usd,
            latency_ms: ms(ending.elapsed),
            first_token_ms: ending.first_token.map(ms),
            stream: trace.stream,
            response_id: response.and_then(|r| r.id.clone()),
            trace_id: Some(trace_context.trace_id_hex()),
            span_id: Some(crate::otel::hex(&trace_context.span_id)),
            parent_span_id: trace_context.parent.map(|p| crate::otel::hex(&p)),
            sampled: trace_context.sampled,
            payload: ending.payload,
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
    /// `id`, `id@v<version>` or `id@<label>`.
    pub prompt: Option<String>,
    /// Only records with an error (`true`) or without one (`false`).
    pub error: Option<String>,
    /// RFC 3339 or a duration back from now (`1h`); the last hour by default.
    pub since: Option<String>,
    pub until: Option<String>,
    /// At most this many records, newest first (100 by default, at most 1,000).
    pub limit: Option<String>,
    /// `true`: instead of a list, new records as server-sent events while the connection lasts.
    pub follow: Option<String>,
}

impl RequestQuery {
    pub fn follows(&self) -> Result<bool, ApiError> {
        self.follow
            .as_deref()
            .map_or(Ok(false), str::parse::<bool>)
            .map_err(|_| ApiError::invalid("follow: true or false", Some("follow")))
    }
}

/// The filters of a query other than its time range and tenant (which choose what is scanned).
pub struct Filter<'q> {
    query: &'q RequestQuery,
    status: Option<u16>,
    prompt: Option<(&'q str, Option<&'q str>)>,
    error: Option<bool>,
}

impl<'q> Filter<'q> {
    pub fn of(query: &'q RequestQuery) -> Result<Self, ApiError> {
        let status = query
            .status
            .as_deref()
            .map(str::parse::<u16>)
            .transpose()
            .map_err(|_| ApiError::invalid("status: an HTTP status code", Some("status")))?;
        let error = query
            .error
            .as_deref()
            .map(str::parse::<bool>)
            .transpose()
            .map_err(|_| ApiError::invalid("error: true or false", Some("error")))?;
        let prompt = query.prompt.as_deref().map(|p| match p.split_once('@') {
            Some((id, selector)) => (id, Some(selector)),
            None => (p, None),
        });
        Ok(Self {
            query,
            status,
            prompt,
            error,
        })
    }

    pub fn keeps(&self, record: &RequestRecord) -> bool {
        let query = self.query;
        let same = |wanted: &Option<String>, actual: &Option<String>| {
            wanted.as_ref().is_none_or(|w| actual.as_ref() == Some(w))
        };
        let prompt_matches = self.prompt.is_none_or(|(id, selector)| {
            record.prompt.as_ref().is_some_and(|p| {
                p.id == id
                    && selector.is_none_or(|s| {
                        s.strip_prefix('v')
                            .and_then(|v| v.parse::<u32>().ok())
                            .map_or(p.label.as_deref() == Some(s), |v| v == p.version)
                    })
            })
        });
        query.tenant.as_ref().is_none_or(|t| *record.tenant == **t)
            && same(&query.key, &record.key)
            && same(&query.route, &record.route)
            && same(&query.target, &record.target)
            && query
                .cache
                .as_ref()
                .is_none_or(|c| record.cache.as_deref() == Some(c.as_str()))
            && self.status.is_none_or(|s| record.status == s)
            && self.error.is_none_or(|e| record.error.is_some() == e)
            && prompt_matches
    }
}

pub struct RequestLog {
    queue: Arc<segments::Queue>,
    /// The most records waiting to be written.
    capacity: usize,
    /// Records as they are made, for `reprise logs --follow`.
    live: tokio::sync::broadcast::Sender<Arc<RequestRecord>>,
    stopping: tokio_util::sync::CancellationToken,
    segments: segments::Segments,
    metrics: Arc<Metrics>,
    /// Records queued, and records stored: equal once the writer has caught up.
    queued: AtomicU64,
    stored: Arc<AtomicU64>,
    timeline: Arc<Timeline>,
}

impl Drop for RequestLog {
    /// The writer writes what is still queued, then stops.
    fn drop(&mut self) {
        self.queue.close();
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `"field":"value"` as the record's JSON spells it: a line without it cannot match, so it is
/// not parsed.
fn needle(field: &str, value: &str) -> Vec<u8> {
    let mut needle = format!("\"{field}\":").into_bytes();
    needle.extend(serde_json::to_vec(value).unwrap_or_default());
    needle
}

impl RequestLog {
    /// Opens (or creates) the log at `path` and starts its writer.
    pub fn open(
        config: &crate::config::RequestLogConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let (segments, file) = segments::open(&config.path).map_err(|e| {
            anyhow::anyhow!(
                "request_log.path: cannot open the log at {}: {e}",
                config.path.display()
            )
        })?;
        let queue = Arc::new(segments::Queue::default());
        let stored = Arc::new(AtomicU64::new(0));
        let writer = segments::Writer {
            dir: config.path.clone(),
            file,
            segments: Arc::clone(&segments),
            bounds: segments::Bounds::new(config.max_bytes, config.max_age),
            stored: Arc::clone(&stored),
            synced_at: std::time::Instant::now(),
            dirty: false,
        };
        std::thread::Builder::new()
            .name("request-log".into())
            .spawn({
                let queue = Arc::clone(&queue);
                move || writer.run(&queue)
            })?;
        let timeline = Arc::new(Timeline::default());
        let opened_ms = now_ms();
        let earlier: Vec<std::path::PathBuf> = segments
            .read()
            .iter()
            .filter(|s| s.records > 0 && s.last_ms + timeline::KEPT_MS >= opened_ms)
            .map(|s| s.path.clone())
            .collect();
        std::thread::Builder::new()
            .name("request-log-timeline".into())
            .spawn({
                let timeline = Arc::clone(&timeline);
                move || rebuild_timeline(&timeline, &earlier, opened_ms)
            })?;
        Ok(Arc::new(Self {
            queue,
            capacity: config.queue,
            live: tokio::sync::broadcast::channel(1024).0,
            stopping: tokio_util::sync::CancellationToken::new(),
            segments,
            metrics,
            queued: AtomicU64::new(0),
            stored,
            timeline,
        }))
    }

    /// Queues a record; never waits. A full queue drops it (and counts it).
    ///
    /// The record is appended, as its JSON line, to a buffer the writer thread swaps out on its
    /// own tick: no allocation per record, no wake-up of the writer, and nothing freed on
    /// another thread (which contends on the allocator's locks).
    pub fn push(&self, record: &Arc<RequestRecord>) {
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(Arc::clone(record));
        }
        self.timeline.add(record);
        let queued = LINE.with_borrow_mut(|line| {
            line.clear();
            if serde_json::to_writer(&mut *line, &**record).is_err() {
                return true;
            }
            line.push(b'\n');
            self.queue
                .push(line, record.at_ms, &record.tenant, self.capacity)
        });
        if queued {
            self.queued.fetch_add(1, Ordering::Relaxed);
        } else {
            self.metrics.request_log_dropped();
        }
    }

    /// Records from now on, as they are made (a slow reader misses some, and is told how
    /// many), until the gateway stops.
    pub fn follow(
        &self,
    ) -> (
        tokio::sync::broadcast::Receiver<Arc<RequestRecord>>,
        tokio_util::sync::CancellationToken,
    ) {
        (self.live.subscribe(), self.stopping.clone())
    }

    /// Ends every follower's stream, so a graceful stop does not wait on them.
    pub fn stop_following(&self) {
        self.stopping.cancel();
    }

    /// Waits (up to `within`) until every queued record is written, then forces them to disk:
    /// on shutdown, so a graceful stop loses nothing.
    pub async fn drain(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.stored.load(Ordering::Acquire) < self.queued.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let current = self.segments.read().last().map(|s| s.path.clone());
        if let Some(path) = current {
            // fsync applies to the file, whichever descriptor asks.
            let synced = tokio::task::spawn_blocking(move || File::open(path)?.sync_data()).await;
            if !matches!(synced, Ok(Ok(()))) {
                tracing::warn!("cannot flush the request log");
            }
        }
    }

    /// The record of request `id`: the newest segments first, so a recent request is found
    /// after reading little.
    pub fn get(&self, id: &str) -> Result<Option<Value>, ApiError> {
        let needle = needle("id", id);
        let finder = memchr::memmem::Finder::new(&needle);
        let mut found = None;
        self.scan(&self.candidates(0, u64::MAX, None), |line| {
            if finder.find(line).is_some()
                && let Ok(record) = serde_json::from_slice::<RequestRecord>(line)
                && record.id == id
            {
                found = serde_json::to_value(&record).ok();
                return false;
            }
            true
        })?;
        Ok(found)
    }

    /// Records matching `query`, newest first (by when they finished).
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
        let filter = Filter::of(query)?;
        let needles: Vec<Vec<u8>> = [
            ("tenant", &query.tenant),
            ("key", &query.key),
            ("route", &query.route),
            ("target", &query.target),
            ("cache", &query.cache),
        ]
        .into_iter()
        .filter_map(|(field, value)| value.as_deref().map(|v| needle(field, v)))
        .collect();
        let finders: Vec<memchr::memmem::Finder<'_>> =
            needles.iter().map(memchr::memmem::Finder::new).collect();
        let mut found = Vec::new();
        let candidates = self.candidates(since, until, query.tenant.as_deref());
        self.scan(&candidates, |line| {
            if finders.iter().all(|f| f.find(line).is_some())
                && let Ok(record) = serde_json::from_slice::<RequestRecord>(line)
                && (since..=until).contains(&record.at_ms)
                && filter.keeps(&record)
                && let Ok(value) = serde_json::to_value(&record)
            {
                found.push(value);
            }
            found.len() < limit
        })?;
        Ok(found)
    }

    /// The segments that may hold a match, newest first.
    fn candidates(&self, since: u64, until: u64, tenant: Option<&str>) -> Vec<std::path::PathBuf> {
        self.segments
            .read()
            .iter()
            .rev()
            .filter(|s| s.may_hold(since, until, tenant))
            .map(|s| s.path.clone())
            .collect()
    }

    /// Calls `visit` on every line of `paths`, each read newest line first, until it says
    /// stop. A segment deleted meanwhile (retention) is skipped.
    fn scan(
        &self,
        paths: &[std::path::PathBuf],
        mut visit: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), ApiError> {
        for path in paths {
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ApiError::StoreUnavailable(format!("request log: {e}"))),
            };
            let mut end = bytes.len();
            for newline in memchr::memrchr_iter(b'\n', &bytes) {
                let line = &bytes[newline + 1..end];
                end = newline;
                if !line.is_empty() && !visit(line) {
                    return Ok(());
                }
            }
            if end > 0 && !visit(&bytes[..end]) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The log's figures over time.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// How many records the log holds.
    pub fn len(&self) -> usize {
        self.segments
            .read()
            .iter()
            .map(|s| s.records as usize)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The size of the log's segments.
    pub fn size_on_disk(&self) -> u64 {
        self.segments.read().iter().map(|s| s.bytes).sum()
    }
}

/// Adds the records the log held when it was opened (`before_ms`) to the timeline, oldest
/// segment first; later records reach it as they are pushed.
fn rebuild_timeline(timeline: &Timeline, segments: &[std::path::PathBuf], before_ms: u64) {
    use std::io::BufRead;
    let mut line = Vec::new();
    for path in segments {
        let Ok(file) = File::open(path) else {
            continue;
        };
        let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Ok(record) = serde_json::from_slice::<RequestRecord>(&line)
                && record.at_ms < before_ms
            {
                timeline.add(&record);
            }
        }
    }
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
