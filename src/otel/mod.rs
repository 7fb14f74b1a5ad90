//! OpenTelemetry export: each finished request becomes a span tree sent over OTLP/HTTP
//! (protobuf) to the collector the team already runs (Tempo, Jaeger, Langfuse, Datadog's agent).
//!
//! The spans are built from the request's record, not from `tracing` spans: the record already
//! holds everything the GenAI semantic conventions ask for (operation, models, provider, tokens)
//! with the timings of the cache lookup and of every upstream attempt, so exporting costs one
//! queue push on the request path and nothing more. Per request:
//! - a SERVER span `chat {model}` (or `embeddings {model}`), child of the client's
//!   `traceparent` if it sent one;
//! - an INTERNAL span `cache lookup`;
//! - a CLIENT span per upstream attempt (`chat {upstream model}`), whose id is the parent the
//!   upstream saw in the `traceparent` the gateway sent it.
//!
//! Like the request log, export never holds a request up: a bounded queue, and spans that do
//! not fit are dropped and counted (`reprise_otlp_spans_total{result="dropped"}`).

pub mod context;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use secrecy::ExposeSecret;

pub use context::{TraceContext, hex, new_span_id, upstream, upstream_headers};

use crate::config::OtlpConfig;
use crate::request_log::RequestRecord;
use crate::telemetry::Metrics;

/// Requests per export call at most, and how often the queue is sent.
const BATCH: usize = 512;
const LINGER: Duration = Duration::from_millis(200);

pub struct Exporter {
    sender: tokio::sync::mpsc::Sender<Arc<RequestRecord>>,
    metrics: Arc<Metrics>,
    sample_ratio: f64,
    queued: AtomicU64,
    done: Arc<AtomicU64>,
}

impl Exporter {
    pub fn start(config: &OtlpConfig, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &config.headers {
            let mut value = reqwest::header::HeaderValue::from_str(value.expose_secret())
                .map_err(|_| anyhow::anyhow!("otlp.headers.{name}: not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| anyhow::anyhow!("otlp.headers.{name}: not a header name"))?,
                value,
            );
        }
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/x-protobuf"),
        );
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let (sender, receiver) = tokio::sync::mpsc::channel(config.queue);
        let exporter = Arc::new(Self {
            sender,
            metrics: Arc::clone(&metrics),
            sample_ratio: config.sample_ratio,
            queued: AtomicU64::new(0),
            done: Arc::default(),
        });
        let sink = Sink {
            client,
            url: config.traces_url(),
            resource: resource(&config.service_name),
            metrics,
            done: Arc::clone(&exporter.done),
        };
        tokio::spawn(sink.run(receiver));
        Ok(exporter)
    }

    /// Whether a new trace (no client `traceparent`) is exported: decided once per trace.
    pub fn samples(&self, context: &TraceContext) -> bool {
        // The trace id's low bits, as the W3C spec's random-trace-id flag intends.
        let low = u64::from_be_bytes(context.trace_id[8..].try_into().unwrap_or_default());
        let position = low as f64 / u64::MAX as f64;
        self.sample_ratio >= 1.0 || position < self.sample_ratio
    }

    /// Queues a finished request's spans; never waits.
    pub fn export(&self, record: &Arc<RequestRecord>) {
        if !record.sampled {
            return;
        }
        match self.sender.try_send(Arc::clone(record)) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self
                .metrics
                .otlp_spans("dropped", span_count(record) as u64),
        }
    }

    /// On shutdown: waits (up to `within`) until what is queued has been sent.
    pub async fn drain(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.done.load(Ordering::Acquire) < self.queued.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

struct Sink {
    client: reqwest::Client,
    url: url::Url,
    resource: Resource,
    metrics: Arc<Metrics>,
    /// Requests sent or given up on.
    done: Arc<AtomicU64>,
}

impl Sink {
    /// Sends what is queued every `LINGER`. The sink sleeps rather than waits on the queue, so
    /// a request's push wakes nothing (a wake-up per request cost more than building its spans).
    async fn run(self, mut receiver: tokio::sync::mpsc::Receiver<Arc<RequestRecord>>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::time::sleep(LINGER).await;
            let mut gone = false;
            loop {
                match receiver.try_recv() {
                    Ok(record) => {
                        batch.push(record);
                        if batch.len() == BATCH {
                            self.export(&mut batch).await;
                        }
                    }
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                        gone = true;
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                self.export(&mut batch).await;
            }
            if gone {
                return;
            }
        }
    }

    async fn export(&self, batch: &mut Vec<Arc<RequestRecord>>) {
        let spans: Vec<Span> = batch.iter().flat_map(|r| spans_of(r)).collect();
        let count = spans.len() as u64;
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "reprise".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec();
        let result = if self.send(body).await {
            "exported"
        } else {
            "failed"
        };
        self.metrics.otlp_spans(result, count);
        self.done.fetch_add(batch.len() as u64, Ordering::Release);
        batch.clear();
    }

    /// Posts one batch, retrying what the OTLP spec calls retryable a few times.
    async fn send(&self, body: Vec<u8>) -> bool {
        let body = bytes::Bytes::from(body);
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            match self
                .client
                .post(self.url.clone())
                .body(body.clone())
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => return true,
                Ok(response) => {
                    let status = response.status().as_u16();
                    tracing::warn!(status, "the OTLP collector refused a batch of spans");
                    if !matches!(status, 429 | 502 | 503 | 504) {
                        return false;
                    }
                }
                Err(error) => {
                    // The collector's address is configuration, not a client's business, but
                    // it can still name internal hosts: the log says only what failed.
                    let kind = if error.is_timeout() {
                        "timed out"
                    } else if error.is_connect() {
                        "could not connect"
                    } else {
                        "failed"
                    };
                    tracing::warn!("sending spans to the OTLP collector {kind}");
                }
            }
        }
        false
    }
}

fn resource(service_name: &str) -> Resource {
    Resource {
        attributes: vec![
            attr("service.name", service_name),
            attr("service.version", env!("CARGO_PKG_VERSION")),
            attr("service.instance.id", uuid::Uuid::new_v4().to_string()),
        ],
        ..Default::default()
    }
}

fn span_count(record: &RequestRecord) -> usize {
    1 + usize::from(record.cache_lookup.is_some()) + record.upstream.len()
}

/// A value an attribute can hold.
enum Attr {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl From<&str> for Attr {
    fn from(v: &str) -> Self {
        Attr::Text(v.to_owned())
    }
}
impl From<String> for Attr {
    fn from(v: String) -> Self {
        Attr::Text(v)
    }
}
impl From<&String> for Attr {
    fn from(v: &String) -> Self {
        Attr::Text(v.clone())
    }
}
impl From<&std::borrow::Cow<'_, str>> for Attr {
    fn from(v: &std::borrow::Cow<'_, str>) -> Self {
        Attr::Text(v.to_string())
    }
}
impl From<u64> for Attr {
    fn from(v: u64) -> Self {
        Attr::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<u32> for Attr {
    fn from(v: u32) -> Self {
        Attr::Int(i64::from(v))
    }
}
impl From<u16> for Attr {
    fn from(v: u16) -> Self {
        Attr::Int(i64::from(v))
    }
}
impl From<f64> for Attr {
    fn from(v: f64) -> Self {
        Attr::Float(v)
    }
}
impl From<f32> for Attr {
    fn from(v: f32) -> Self {
        Attr::Float(f64::from(v))
    }
}
impl From<bool> for Attr {
    fn from(v: bool) -> Self {
        Attr::Bool(v)
    }
}

fn attr(key: &str, value: impl Into<Attr>) -> KeyValue {
    let value = match value.into() {
        Attr::Text(v) => any_value::Value::StringValue(v),
        Attr::Int(v) => any_value::Value::IntValue(v),
        Attr::Float(v) => any_value::Value::DoubleValue(v),
        Attr::Bool(v) => any_value::Value::BoolValue(v),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// Appends `key` when the value is there.
fn attr_opt<V: Into<Attr>>(attributes: &mut Vec<KeyValue>, key: &str, value: Option<V>) {
    if let Some(value) = value {
        attributes.push(attr(key, value));
    }
}

fn unhex(text: Option<&str>) -> Vec<u8> {
    let Some(text) = text else { return Vec::new() };
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok())
        .collect()
}

/// `gen_ai.operation.name` of an endpoint.
fn operation(endpoint: &str) -> &'static str {
    match endpoint {
        "embeddings" => "embeddings",
        _ => "chat",
    }
}

/// `provider/model` split at the first slash (a model may itself contain slashes).
fn provider_and_model(target: &str) -> (&str, &str) {
    target.split_once('/').unwrap_or((target, target))
}

fn status(error: bool) -> Option<Status> {
    error.then(|| Status {
        code: StatusCode::Error as i32,
        message: String::new(),
    })
}

/// What the cache did, on the request span and on the lookup's.
fn cache_attributes(attributes: &mut Vec<KeyValue>, record: &RequestRecord) {
    attr_opt(attributes, "reprise.cache.outcome", record.cache.as_ref());
    attr_opt(
        attributes,
        "reprise.cache.semantic",
        record.semantic.as_ref(),
    );
    attr_opt(attributes, "reprise.cache.similarity", record.similarity);
    attr_opt(attributes, "reprise.cache.entry", record.entry.as_ref());
}

/// The request's spans, parents first.
pub fn spans_of(record: &RequestRecord) -> Vec<Span> {
    let trace_id = unhex(record.trace_id.as_deref());
    let request_span = unhex(record.span_id.as_deref());
    let start = record.at_us * 1000;
    let at = |offset_ms: f64| start + (offset_ms.max(0.0) * 1e6) as u64;
    let operation = operation(&record.endpoint);
    let route = record.route.as_deref().unwrap_or("-");
    let mut spans = Vec::with_capacity(span_count(record));

    let mut attributes = vec![
        attr("gen_ai.operation.name", operation),
        attr("gen_ai.request.model", route),
        attr("http.response.status_code", record.status),
        attr("reprise.request_id", &record.id),
        attr("reprise.tenant", &*record.tenant),
        attr("reprise.attempts", record.attempts),
        attr("reprise.stream", record.stream),
    ];
    if let Some(target) = &record.target {
        let (provider, model) = provider_and_model(target);
        attributes.push(attr("gen_ai.provider.name", provider));
        attributes.push(attr("gen_ai.response.model", model));
        attributes.push(attr("reprise.target", target));
    }
    if record.input_tokens + record.output_tokens > 0 {
        attributes.push(attr("gen_ai.usage.input_tokens", record.input_tokens));
        attributes.push(attr("gen_ai.usage.output_tokens", record.output_tokens));
    }
    if record.cached_tokens > 0 {
        attributes.push(attr(
            "gen_ai.usage.cache_read.input_tokens",
            record.cached_tokens,
        ));
    }
    attr_opt(
        &mut attributes,
        "gen_ai.response.id",
        record.response_id.as_ref(),
    );
    attr_opt(&mut attributes, "error.type", record.error.as_ref());
    attr_opt(&mut attributes, "user.id", record.user.as_ref());
    attr_opt(&mut attributes, "reprise.route", record.route.as_ref());
    attr_opt(&mut attributes, "reprise.key", record.key.as_ref());
    cache_attributes(&mut attributes, record);
    attr_opt(
        &mut attributes,
        "reprise.first_token_ms",
        record.first_token_ms,
    );
    if let Some(prompt) = &record.prompt {
        attributes.push(attr("reprise.prompt.id", &prompt.id));
        attributes.push(attr("reprise.prompt.version", prompt.version));
        attr_opt(
            &mut attributes,
            "reprise.prompt.label",
            prompt.label.as_ref(),
        );
        attr_opt(&mut attributes, "reprise.prompt.arm", prompt.arm.as_ref());
    }
    if record.cost_usd > 0.0 {
        attributes.push(attr("reprise.cost_usd", record.cost_usd));
    }
    if record.saved_usd > 0.0 {
        attributes.push(attr("reprise.saved_usd", record.saved_usd));
    }
    spans.push(Span {
        trace_id: trace_id.clone(),
        span_id: request_span.clone(),
        parent_span_id: unhex(record.parent_span_id.as_deref()),
        name: format!("{operation} {route}"),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: at(record.latency_ms),
        attributes,
        status: status(record.status >= 500 || (record.status < 400 && record.error.is_some())),
        ..Default::default()
    });

    if let Some(lookup) = &record.cache_lookup {
        let mut attributes = Vec::new();
        cache_attributes(&mut attributes, record);
        spans.push(Span {
            trace_id: trace_id.clone(),
            span_id: new_span_id().to_vec(),
            parent_span_id: request_span.clone(),
            name: "cache lookup".into(),
            kind: SpanKind::Internal as i32,
            start_time_unix_nano: at(lookup.start_ms),
            end_time_unix_nano: at(lookup.start_ms + lookup.duration_ms),
            attributes,
            ..Default::default()
        });
    }

    for attempt in &record.upstream {
        let (provider, model) = provider_and_model(&attempt.target);
        let ok = attempt.outcome == "ok";
        let mut attributes = vec![
            attr("gen_ai.operation.name", operation),
            attr("gen_ai.provider.name", provider),
            attr("gen_ai.request.model", model),
            attr("reprise.target", &attempt.target),
            attr("reprise.attempt.kind", &attempt.kind),
        ];
        attr_opt(&mut attributes, "http.response.status_code", attempt.status);
        attr_opt(
            &mut attributes,
            "reprise.first_token_ms",
            attempt.first_token_ms,
        );
        if ok {
            attributes.push(attr("gen_ai.response.model", model));
            attr_opt(
                &mut attributes,
                "gen_ai.response.id",
                record.response_id.as_ref(),
            );
            if record.input_tokens + record.output_tokens > 0 {
                attributes.push(attr("gen_ai.usage.input_tokens", record.input_tokens));
                attributes.push(attr("gen_ai.usage.output_tokens", record.output_tokens));
            }
        } else {
            attributes.push(attr("error.type", &attempt.outcome));
        }
        spans.push(Span {
            trace_id: trace_id.clone(),
            span_id: unhex(Some(&attempt.span_id)),
            parent_span_id: request_span.clone(),
            name: format!("{operation} {model}"),
            kind: SpanKind::Client as i32,
            start_time_unix_nano: at(attempt.start_ms),
            end_time_unix_nano: at(attempt.start_ms + attempt.latency_ms),
            attributes,
            status: status(!ok && attempt.outcome != "cancelled"),
            ..Default::default()
        });
    }
    spans
}
