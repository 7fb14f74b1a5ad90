//! The HTTP face of the gateway: routes, cross-cutting layers, graceful shutdown.
//!
//! Layers, outermost first:
//! 1. sensitive headers: `authorization` and `x-api-key` are redacted from every log line;
//! 2. request id: the client's `x-request-id` is kept, or a UUID is generated;
//! 3. trace: one span per request (tenant, route, target, attempts), one line with status and latency;
//! 4. request id propagation onto the response;
//! 5. panic catcher: a bug answers 500 in OpenAI's error shape; being inside 2-4, that answer still
//!    carries the request id and is logged like any other.
//!
//! The in-flight limit is not a layer: an API request takes a slot (`admission`) once it is
//! authenticated and its body is read, so slow clients hold none, tenants share the slots fairly,
//! and `/healthz` and `/metrics` never wait for one. Connections (their cap, header and idle
//! timeouts, shutdown) are `listener`'s.
//!
//! `tests/openai_api.rs` pins the observable part: every response, errors included, has the id.
//!
//! Authentication is not a layer: handlers call `context()`, so what a stage needs is visible in
//! its signature instead of travelling as a request extension.

mod admin;
mod admission;
mod anthropic;
mod auth;
mod body;
mod console;
mod keys;
mod listener;
mod openai;
mod prompts;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router as HttpRouter;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveHeadersLayer;
use tower_http::trace::TraceLayer;
use tracing::field::Empty;

pub use auth::Auth;

use crate::cache::CacheControls;
use crate::config::Config;
use crate::error::ApiError;
use crate::pipeline::{Failed, Pipeline, RequestContext, Trace};
use crate::prompts::PromptRef;
use crate::protocol::answer::{Answer, AnswerFacts};
use crate::telemetry::Metrics;

pub struct AppState {
    pub pipeline: Pipeline,
    pub auth: Auth,
    max_body_bytes: usize,
    body_timeout: Duration,
    admission: Arc<admission::Admission>,
    pub request_log: Option<Arc<crate::request_log::RequestLog>>,
    otlp: Option<Arc<crate::otel::Exporter>>,
    payloads: Option<crate::request_log::PayloadPolicy>,
}

#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    Messages,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
        }
    }
}

impl AppState {
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new().with_tenant_labels(config.metrics.tenant_labels));
        let request_log = match &config.request_log {
            Some(log) => Some(crate::request_log::RequestLog::open(
                log,
                Arc::clone(&metrics),
            )?),
            None => None,
        };
        let otlp = match &config.otlp {
            Some(otlp) => Some(crate::otel::Exporter::start(otlp, Arc::clone(&metrics))?),
            None => None,
        };
        let payloads = match &config.request_log {
            Some(log) => crate::request_log::PayloadPolicy::from_config(&log.payloads)?,
            None => None,
        };
        Ok(Self {
            request_log,
            otlp,
            payloads,
            pipeline: Pipeline::from_config(config, metrics).await?,
            auth: Auth::from_config(&config.auth, &config.metrics),
            max_body_bytes: config.server.max_body_bytes,
            body_timeout: config.server.body_timeout,
            admission: admission::Admission::new(
                config.server.max_in_flight,
                config.server.tenant_in_flight(),
            ),
        })
    }

    /// Metrics, prompt stats and the request span's fields, once per request when its response
    /// head is sent; `response` is the whole answer, if it was one (not a stream).
    fn record(
        &self,
        endpoint: Endpoint,
        trace: &Trace,
        status: u16,
        started: Instant,
        response: Option<&AnswerFacts>,
    ) {
        let route = trace.route.as_deref().unwrap_or("-");
        let elapsed = started.elapsed();
        self.pipeline
            .metrics
            .request(endpoint.label(), route, status, elapsed);
        self.pipeline
            .record_prompt_use(trace, status, elapsed, response);
        let span = tracing::Span::current();
        span.record("route", route);
        if let Some(target) = &trace.target {
            span.record("target", target.as_str());
        }
        span.record("attempts", trace.attempts);
    }

    /// Whether finished requests leave a record (in the log, or as exported spans).
    fn keeps_records(&self) -> bool {
        self.request_log.is_some() || self.otlp.is_some()
    }

    /// The request log's record of a finished request, and its spans for the collector.
    fn log(&self, trace: &Trace, ending: crate::request_log::Ending<'_>) {
        if !self.keeps_records() {
            return;
        }
        let Some(record) =
            crate::request_log::RequestRecord::of(trace, ending, self.pipeline.prices())
        else {
            return;
        };
        let record = Arc::new(record);
        if let Some(exporter) = &self.otlp {
            exporter.export(&record);
        }
        if let Some(log) = &self.request_log {
            log.push(&record);
        }
    }

    /// [`Self::chat`], on the runtime for large requests when the body was large
    /// ([`crate::runtime::large_requests`]).
    async fn chat_sized(
        self: &Arc<Self>,
        context: RequestContext,
        request: crate::protocol::openai::ChatRequest,
        body_bytes: usize,
    ) -> (
        Option<Captured>,
        Result<crate::pipeline::Answered<crate::providers::ChatReply>, Failed>,
    ) {
        let large = (body_bytes > PARSE_ASIDE_BYTES)
            .then(crate::runtime::large_requests)
            .flatten();
        let Some(runtime) = large else {
            return self.chat(&context, request).await;
        };
        let state = Arc::clone(self);
        // A client that hangs up cancels its request there as it would here.
        let task = tokio_util::task::AbortOnDropHandle::new(
            runtime.spawn(async move { state.chat(&context, request).await }),
        );
        match task.await {
            Ok(answered) => answered,
            // The same 500 as a panic on the serving thread (the panic layer answers it).
            Err(error) => std::panic::resume_unwind(
                error
                    .try_into_panic()
                    .unwrap_or_else(|_| Box::new("the request's task was cancelled")),
            ),
        }
    }

    /// A chat request through the pipeline, inside its trace; the request as received comes
    /// back too when its route may capture payloads.
    async fn chat(
        &self,
        context: &RequestContext,
        request: crate::protocol::openai::ChatRequest,
    ) -> (
        Option<Captured>,
        Result<crate::pipeline::Answered<crate::providers::ChatReply>, Failed>,
    ) {
        let captured = self.capture_request(context, &request);
        let answered = context
            .trace
            .clone()
            .scope(self.pipeline.chat(context, request))
            .await;
        (captured, answered)
    }

    /// The request as received, kept for the record when its route may capture payloads.
    fn capture_request(
        &self,
        context: &RequestContext,
        request: &crate::protocol::openai::ChatRequest,
    ) -> Option<Captured> {
        let policy = self.payloads.as_ref()?;
        // A prompt may choose another route; the route is checked again once it is known.
        let names_prompt = context.prompt.is_some() || request.extra.contains_key("prompt");
        (policy.captures(&request.model) || names_prompt)
            .then(|| serde_json::to_value(request).ok())
            .flatten()
            .map(Captured)
    }

    /// What the record keeps of a request and its answer, redacted and cut to size, if its
    /// route captures payloads.
    fn payload(
        &self,
        trace: &Trace,
        request: Option<Captured>,
        answer: Option<serde_json::Value>,
    ) -> Option<crate::request_log::Payload> {
        let policy = self.payloads.as_ref()?;
        if !policy.captures(trace.route.as_deref()?) {
            return None;
        }
        Some(crate::request_log::Payload {
            request: request.map(|r| policy.capture(&r.0)),
            response: answer.map(|a| match a {
                serde_json::Value::String(text) => policy.capture_text(&text),
                other => policy.capture(&other),
            }),
        })
    }

    /// Records a request that ended with its whole answer or an error.
    fn finish(
        &self,
        endpoint: Endpoint,
        trace: &Trace,
        status: u16,
        started: Instant,
        response: Option<&Answer>,
        request: Option<Captured>,
    ) {
        let facts = response.map(Answer::facts);
        self.record(endpoint, trace, status, started, facts);
        if self.keeps_records() {
            let captures = self.payloads.is_some() && request.is_some();
            let captured_answer = response.filter(|_| captures).map(|a| a.value().clone());
            let payload = self.payload(trace, request, captured_answer);
            self.log(
                trace,
                crate::request_log::Ending {
                    endpoint: endpoint.label(),
                    status,
                    elapsed: started.elapsed(),
                    response: facts,
                    first_token: None,
                    error: None,
                    payload,
                },
            );
        }
    }
}

/// A request body kept for payload capture.
pub struct Captured(serde_json::Value);

/// Follows a stream to its end (or its client's leaving) and then records it: tokens and cost
/// from its usage chunk, time to first token, and its text when its route captures payloads.
pub(crate) struct StreamRecorder {
    state: Arc<AppState>,
    endpoint: Endpoint,
    trace: Trace,
    started: Instant,
    request: Option<Captured>,
    first_token: Option<Duration>,
    text: Option<String>,
    /// `None` until the stream ends; then the error it ended with, if any.
    ended: Option<Option<&'static str>>,
}

impl StreamRecorder {
    fn new(
        state: &Arc<AppState>,
        endpoint: Endpoint,
        trace: &Trace,
        started: Instant,
        request: Option<Captured>,
    ) -> Option<Self> {
        if !state.keeps_records() {
            return None;
        }
        let captures = state
            .payloads
            .as_ref()
            .is_some_and(|p| trace.route.as_deref().is_some_and(|r| p.captures(r)));
        Some(Self {
            state: Arc::clone(state),
            endpoint,
            trace: trace.clone(),
            started,
            request,
            first_token: None,
            text: captures.then(String::new),
            ended: None,
        })
    }

    pub(crate) fn on_chunk(&mut self, chunk: &serde_json::Value) {
        if self.first_token.is_none() && crate::protocol::openai::chunk_carries_output(chunk) {
            self.first_token = Some(self.started.elapsed());
        }
        let (Some(text), Some(policy)) = (&mut self.text, &self.state.payloads) else {
            return;
        };
        if text.len() > policy.max_bytes() {
            return;
        }
        for choice in chunk
            .get("choices")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(delta) = choice.pointer("/delta/content").and_then(|c| c.as_str()) {
                text.push_str(delta);
            }
        }
    }

    pub(crate) fn ended(&mut self, error: Option<&'static str>) {
        self.ended = Some(error);
    }
}

impl Drop for StreamRecorder {
    fn drop(&mut self) {
        let error = self.ended.unwrap_or(Some("client_closed"));
        let usage = self
            .trace
            .stream_usage
            .as_ref()
            .and_then(|u| u.take())
            .map(|chunk| AnswerFacts::of_value(&chunk));
        let answer = self.text.take().map(serde_json::Value::String);
        let payload = self.state.payload(&self.trace, self.request.take(), answer);
        self.state.log(
            &self.trace,
            crate::request_log::Ending {
                endpoint: self.endpoint.label(),
                status: 200,
                elapsed: self.started.elapsed(),
                response: usage.as_ref(),
                first_token: self.first_token,
                error,
                payload,
            },
        );
    }
}

/// The caller's tenant, and its run-time key if it came with one: `[auth]` keys first (a map
/// probe), then the key store.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Arc<str>, Option<Arc<crate::keys::KeyRecord>>), ApiError> {
    let presented = auth::presented_key(headers).ok_or(ApiError::Unauthorized)?;
    if let Some(tenant) = state.auth.static_tenant(presented) {
        return Ok((tenant, None));
    }
    if let Some(keys) = state.pipeline.key_store()
        && let Some(record) = keys.authenticate(presented).await?
    {
        return Ok((Arc::from(record.tenant.as_str()), Some(record)));
    }
    Err(ApiError::Unauthorized)
}

async fn context(state: &AppState, headers: &HeaderMap) -> Result<RequestContext, ApiError> {
    let (tenant, key) = authenticate(state, headers).await?;
    tracing::Span::current().record("tenant", &*tenant);
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let cache = CacheControls::from_headers(headers)?;
    let text = |name: &str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                std::str::from_utf8(v.as_bytes())
                    .map_err(|_| ApiError::invalid(format!("{name} is not UTF-8"), Some(name)))
            })
            .transpose()
    };
    let prompt = match text("x-reprise-prompt")? {
        Some(reference) => Some(PromptRef::from_header(
            reference,
            text("x-reprise-prompt-variables")?,
        )?),
        None => None,
    };
    let user = text("x-reprise-user")?.map(str::to_owned);
    let mut trace = crate::otel::TraceContext::from_headers(headers);
    if trace.parent.is_none()
        && let Some(exporter) = &state.otlp
    {
        trace.sampled = exporter.samples(&trace);
    }
    Ok(RequestContext {
        trace,
        tenant,
        request_id,
        cache,
        prompt,
        user,
        key,
    })
}

/// Bodies above this are parsed on the blocking pool: a few megabytes of JSON take milliseconds
/// of CPU that would otherwise stall every request sharing the runtime thread.
const PARSE_ASIDE_BYTES: usize = 256 * 1024;

/// An API request ready for the pipeline, holding its in-flight slot until it is dropped.
struct Admitted<T> {
    context: RequestContext,
    request: T,
    /// The body's size: a large one is served off the serving thread.
    body_bytes: usize,
    _slot: admission::Slot,
}

/// What every API handler does first: authenticate, read the body within the size and time
/// limits, parse it, then wait for an in-flight slot.
async fn authenticated_request<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Admitted<T>, ApiError> {
    let context = context(state, headers).await?;
    let bytes = read_body(state, body, state.max_body_bytes).await?;
    let body_bytes = bytes.len();
    let request = if body_bytes > PARSE_ASIDE_BYTES {
        tokio::task::spawn_blocking(move || crate::protocol::parse_json(&bytes))
            .await
            .map_err(|_| ApiError::invalid("the request body could not be parsed", None))??
    } else {
        crate::protocol::parse_json(&bytes)?
    };
    let slot = state.admission.admit(&context.tenant).await;
    Ok(Admitted {
        context,
        request,
        body_bytes,
        _slot: slot,
    })
}

/// A query string's parameters as `T` (every value a string), or 400 naming what is wrong.
fn query_params<T: serde::de::DeserializeOwned>(
    params: std::collections::HashMap<String, String>,
    what: &str,
) -> Result<T, ApiError> {
    serde_json::to_value(params)
        .and_then(serde_json::from_value)
        .map_err(|e| ApiError::invalid(format!("{what} query: {e}"), None))
}

async fn read_body(state: &AppState, body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let read = body::read_limited(body, limit, state.body_timeout).await;
    if matches!(read, Err(ApiError::BodyTimeout { .. })) {
        state.pipeline.metrics.client_timed_out("body");
    }
    read
}

fn trace_headers(trace: &Trace) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    if let Some(route) = &trace.route {
        put("x-reprise-route", route);
    }
    if let Some(target) = &trace.target {
        put("x-reprise-target", target);
    }
    if trace.attempts > 0 {
        put("x-reprise-attempts", &trace.attempts.to_string());
    }
    let cache = &trace.cache;
    if let Some(status) = cache.status {
        put("x-reprise-cache", status.label());
    }
    if let Some(key) = &cache.key {
        put("x-reprise-cache-key", key);
    }
    if let Some(semantic) = cache.semantic {
        put("x-reprise-cache-semantic", semantic.label());
    }
    if let Some(similarity) = cache.similarity {
        put("x-reprise-cache-similarity", &format!("{similarity:.4}"));
    }
    if let Some(score) = cache.score {
        put("x-reprise-cache-score", &format!("{score:.4}"));
    }
    if let Some(entry) = &cache.entry {
        put("x-reprise-cache-entry", entry);
    }
    if let Some(prompt) = &trace.prompt {
        put("x-reprise-prompt", &prompt.id);
        put("x-reprise-prompt-version", &prompt.version.to_string());
        if let Some(label) = &prompt.label {
            put("x-reprise-prompt-label", label);
        }
        if let Some((arm, arms)) = prompt.arm {
            put("x-reprise-prompt-arm", &format!("{arm}/{arms}"));
        }
    }
    if let Some(age) = cache.age {
        put("x-reprise-cache-age", &age.as_secs().to_string());
        put(
            "x-reprise-cache-tokens-saved",
            &cache.tokens_saved.to_string(),
        );
    }
    if let Some(rate) = &trace.rate {
        crate::error::put_rate_headers(&mut headers, rate, crate::limits::Limit::Requests);
    }
    if let Some(tokens) = &trace.tokens {
        crate::error::put_rate_headers(&mut headers, tokens, crate::limits::Limit::Tokens);
    }
    if let Some(budget) = &trace.budget {
        put_budget_headers(&mut headers, budget);
    }
    headers
}

/// What is left of the tightest budget, and a warning past its soft threshold.
fn put_budget_headers(headers: &mut HeaderMap, budget: &crate::limits::BudgetState) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    put(
        "x-reprise-budget-remaining-usd",
        format!("{:.6}", budget.remaining_usd),
    );
    if budget.warning {
        put(
            "x-reprise-budget-warning",
            format!(
                "{}; {:.0}% of the {} budget is spent or held",
                budget.scope,
                budget.used * 100.0,
                budget.scope
            ),
        );
    }
}

fn respond_error(
    state: &AppState,
    endpoint: Endpoint,
    mut failed: Failed,
    started: Instant,
    request: Option<Captured>,
) -> Response {
    failed.trace.error = Some(failed.error.kind());
    state.finish(
        endpoint,
        &failed.trace,
        failed.error.status().as_u16(),
        started,
        None,
        request,
    );
    (trace_headers(&failed.trace), failed.error).into_response()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    let body = serde_json::json!({"error": {
        "message": "internal error", "type": "server_error", "param": null, "code": "internal_error",
    }});
    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
}

async fn not_found() -> Response {
    with_status(
        ApiError::invalid("unknown endpoint", None),
        StatusCode::NOT_FOUND,
    )
}

async fn method_not_allowed() -> Response {
    with_status(
        ApiError::invalid("method not allowed on this endpoint", None),
        StatusCode::METHOD_NOT_ALLOWED,
    )
}

fn with_status(error: ApiError, status: StatusCode) -> Response {
    let mut response = error.into_response();
    *response.status_mut() = status;
    response
}

/// The gateway's routes. `/metrics` is among them unless it has a listener of its own.
pub fn app(state: Arc<AppState>, with_metrics: bool) -> HttpRouter {
    let request_id = HeaderName::from_static("x-request-id");
    let layers = ServiceBuilder::new()
        .layer(SetSensitiveHeadersLayer::new([
            axum::http::header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
        ]))
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<Body>| {
                    let id = request
                        .extensions()
                        .get::<RequestId>()
                        .and_then(|id| id.header_value().to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id = %id,
                        tenant = Empty,
                        route = Empty,
                        target = Empty,
                        attempts = Empty,
                    )
                })
                .on_request(())
                // Upstream 5xx are answered and logged by the router and `on_response`; tower-http's
                // default would log each again at ERROR as if the gateway had failed.
                .on_failure(())
                .on_response(
                    |response: &axum::http::Response<_>,
                     latency: Duration,
                     _span: &tracing::Span| {
                        tracing::info!(
                            status = response.status().as_u16(),
                            latency_ms = %format_args!("{:.2}", latency.as_secs_f64() * 1000.0),
                            "request finished"
                        );
                    },
                ),
        )
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(CatchPanicLayer::custom(panic_response));
    let routes = if with_metrics {
        operations()
    } else {
        HttpRouter::new().route("/healthz", get(admin::liveness))
    };
    routes
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/health/providers", get(admin::provider_health))
        .route("/v1/cache/feedback", post(openai::cache_feedback))
        .route("/v1/feedback", post(openai::feedback))
        .route("/admin/cache/stats", get(admin::cache_stats))
        .route("/admin/cache/purge", post(admin::cache_purge))
        .route("/admin/cache/review", get(admin::cache_review))
        .route("/admin/cache/feedback", post(admin::cache_feedback))
        .route("/admin/overview", get(admin::overview))
        .route("/admin/usage", get(keys::usage))
        .route("/admin/tenants", get(keys::tenants))
        .route("/admin/requests", get(admin::requests))
        .route("/admin/requests/{id}", get(admin::request))
        .route("/admin/keys", get(keys::list).post(keys::create))
        .route("/admin/keys/{id}", get(keys::show).patch(keys::update))
        .route("/admin/keys/{id}/rotate", post(keys::rotate))
        .route("/admin/keys/{id}/revoke", post(keys::revoke))
        .route("/console", get(console::index))
        .route("/console/login", post(console::login))
        .route("/console/logout", post(console::logout))
        .route("/console/{asset}", get(console::asset))
        .route("/admin/prompts", get(prompts::list))
        .route("/admin/prompts/audit", get(prompts::audit))
        .route("/admin/prompts/stats", get(prompts::stats))
        .route("/admin/prompts/{id}", get(prompts::show))
        .route("/admin/prompts/{id}/history", get(prompts::history))
        .route("/admin/prompts/{id}/export", get(prompts::export))
        .route("/admin/prompts/{id}/feedback", get(prompts::feedback))
        .route("/admin/prompts/{id}/experiments", get(prompts::experiments))
        .route(
            "/admin/prompts/{id}/experiments/{label}",
            get(prompts::experiment),
        )
        .route(
            "/admin/prompts/{id}/experiments/{label}/promote",
            post(prompts::promote),
        )
        .route("/admin/prompts/{id}/diff", get(prompts::diff))
        .route(
            "/admin/prompts/{id}/versions",
            post(prompts::create_version),
        )
        .route(
            "/admin/prompts/{id}/versions/{version}",
            get(prompts::version),
        )
        .route(
            "/admin/prompts/{id}/labels/{label}",
            axum::routing::put(prompts::set_label).delete(prompts::delete_label),
        )
        .route(
            "/admin/prompts/{id}/labels/{label}/rollback",
            post(prompts::rollback),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(layers)
        .with_state(state)
}

/// `/metrics` and `/healthz`, on the API listener or on `[metrics] listen`.
fn operations() -> HttpRouter<Arc<AppState>> {
    HttpRouter::new()
        .route("/metrics", get(admin::metrics))
        .route("/healthz", get(admin::liveness))
}

/// Tells the server to stop accepting connections and drain. Cloneable; any holder may trigger it.
#[derive(Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// A gateway listening on a socket, running on the current tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when `[metrics] listen` gives it a listener of its own.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Shutdown,
    grace: Duration,
    task: tokio::task::JoinHandle<()>,
    serving: Option<listener::ServingThreads>,
    /// Gone once every connection and background write let go of the gateway's state (and so
    /// of its store: an embedded store can be reopened only then).
    state: std::sync::Weak<AppState>,
    /// Writes deferred settlements and the usage book once the last request is done.
    closer: crate::limits::Closer,
    /// Stores what the request log still has queued once the last request is done.
    request_log: Option<Arc<crate::request_log::RequestLog>>,
    /// Sends the spans still queued.
    otlp: Option<Arc<crate::otel::Exporter>>,
    /// Writes the experiments' last counts once the last request is done.
    experiments: Option<Arc<crate::experiments::Experiments>>,
}

impl RunningServer {
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Runs until shutdown is triggered, then lets in-flight requests finish for up to the grace
    /// period. Returns whether everything drained in time.
    pub async fn wait(mut self) -> anyhow::Result<bool> {
        let mut stopped = self.shutdown.0.subscribe();
        let mut task = self.task;
        let state = self.state;
        tokio::select! {
            result = &mut task => {
                result?;
                if let Some(serving) = self.serving.take() {
                    serving.release().await;
                }
                return Ok(true);
            }
            _ = stopped.wait_for(|stop| *stop) => {}
        }
        if let Some(log) = &self.request_log {
            log.stop_following();
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(result) => {
                result?;
                // Cache writes finish just after the last connection.
                if let Some(log) = &self.request_log {
                    log.drain(Duration::from_secs(2)).await;
                }
                drop(self.request_log);
                if let Some(exporter) = &self.otlp {
                    exporter.drain(Duration::from_secs(5)).await;
                }
                drop(self.otlp);
                // The experiments' counts since their last flush, so a deploy loses none.
                if let Some(experiments) = self.experiments.take() {
                    experiments.flush_now().await;
                }
                while state.strong_count() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if let Some(serving) = self.serving.take() {
                    serving.release().await;
                }
                self.closer.close().await;
                Ok(state.strong_count() == 0)
            }
            Err(_) => {
                task.abort();
                if let Some(serving) = self.serving.take() {
                    serving.release().await;
                }
                self.closer.close().await;
                Ok(false)
            }
        }
    }

    pub async fn stop(self) -> anyhow::Result<bool> {
        self.shutdown.trigger();
        self.wait().await
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Builds the gateway from config and starts listening on `server.listen` (port 0 picks a free
/// one), and on `metrics.listen` if set. The API is served by threads of its own (one per core
/// unless `server.worker_threads` says otherwise); `/metrics` on its own port, startup and
/// background work by the calling runtime.
pub async fn start(config: &Config) -> anyhow::Result<RunningServer> {
    let state = Arc::new(AppState::from_config(config).await?);
    let weak_state = Arc::downgrade(&state);
    let listen = config.server.listen;
    let threads = crate::runtime::serving_threads(config.server.worker_threads);
    let listeners = listener::bind_reusing_port(listen, threads)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listeners[0].local_addr()?;
    let metrics_listener = match config.metrics.listen {
        Some(listen) => Some(bind(listen).await?),
        None => None,
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()?;
    let (sender, receiver) = watch::channel(false);
    let limits = || listener::ConnectionLimits {
        slots: Arc::new(tokio::sync::Semaphore::new(config.server.max_connections)),
        header_timeout: config.server.header_timeout,
    };
    let metrics = Arc::clone(&state.pipeline.metrics);
    let closer = state.pipeline.limits().closer();
    let request_log = state.request_log.clone();
    let experiments = state.pipeline.experiments_handle();
    let otlp = state.otlp.clone();
    let (serving, served) = listener::ServingThreads::start(
        listeners,
        &app(Arc::clone(&state), metrics_listener.is_none()),
        &limits(),
        &receiver,
        &metrics,
    )?;
    let operations = metrics_listener.map(|metrics_listener| {
        listener::serve(
            metrics_listener,
            operations().with_state(state),
            limits(),
            receiver,
            metrics,
        )
    });
    let task = tokio::spawn(async move {
        let api = futures::future::join_all(served);
        match operations {
            Some(operations) => {
                tokio::join!(api, operations);
            }
            None => {
                api.await;
            }
        }
    });
    Ok(RunningServer {
        addr,
        metrics_addr,
        shutdown: Shutdown(sender),
        grace: config.server.shutdown_grace,
        closer,
        request_log,
        experiments,
        otlp,
        task,
        serving: Some(serving),
        state: weak_state,
    })
}
