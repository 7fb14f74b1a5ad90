//! Logs and metrics. Every metric is recorded through one method here, so label sets stay
//! low-cardinality (route and target names from config, status codes, error kinds) by construction.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::{LogConfig, LogFormat};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    endpoint: &'static str,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    target: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExtraAttemptLabels {
    route: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OtlpLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeedbackLabels {
    prompt: String,
    version: u32,
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    prompt: String,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    /// `key` or `tenant`.
    scope: &'static str,
    /// `requests`, `tokens`, `concurrent` or `budget`.
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    tenant: String,
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SemanticLabels {
    tenant: String,
    route: String,
    /// hit, miss, rejected-GUARD, overloaded, error, write-only: a fixed set.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientTimeoutLabels {
    /// `header` (no whole request head in time, idle keep-alive included) or `body`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardLabels {
    guard: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerificationLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheErrorLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PromptLabels {
    prompt: String,
    version: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PromptOutcomeLabels {
    prompt: String,
    version: u32,
    /// The cache outcome (`hit`, `semantic-hit`, `miss`, ...) or `error`: a fixed set.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PromptTokenLabels {
    prompt: String,
    version: u32,
    kind: &'static str,
}

/// One answered request that used a prompt version, for the per-version metrics.
#[derive(Debug, Clone, Copy)]
pub struct PromptUse<'a> {
    pub prompt: &'a str,
    pub version: u32,
    pub outcome: &'static str,
    pub elapsed: Duration,
}

/// Why the router made more than one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraAttempt {
    RetrySameTarget,
    Failover,
    Hedge,
}

impl ExtraAttempt {
    pub fn label(self) -> &'static str {
        match self {
            ExtraAttempt::RetrySameTarget => "retry",
            ExtraAttempt::Failover => "failover",
            ExtraAttempt::Hedge => "hedge",
        }
    }
}

/// The series a request counts in, found by its route (or target) as a borrowed string: after
/// a series' first request, counting builds no label set (an allocation per string label) and
/// takes no family lock; the family still owns the series for the exposition.
struct Handles<V>(parking_lot::RwLock<std::collections::HashMap<Box<str>, Vec<V>>>);

impl<V> Default for Handles<V> {
    fn default() -> Self {
        Self(parking_lot::RwLock::default())
    }
}

impl<V> Handles<V> {
    /// Calls `count` with the handle under `key` that `matches`, made once with `make`.
    fn with(
        &self,
        key: &str,
        matches: impl Fn(&V) -> bool,
        make: impl FnOnce() -> V,
        count: impl FnOnce(&V),
    ) {
        if let Some(found) = self
            .0
            .read()
            .get(key)
            .and_then(|v| v.iter().find(|h| matches(h)))
        {
            count(found);
            return;
        }
        let mut handles = self.0.write();
        let list = match handles.get_mut(key) {
            Some(list) => list,
            None => handles.entry(key.into()).or_default(),
        };
        match list.iter().position(&matches) {
            Some(at) => count(&list[at]),
            None => {
                list.push(make());
                count(&list[list.len() - 1]);
            }
        }
    }
}

/// By route: `(endpoint, status)` → requests, `endpoint` → latency.
enum RouteSeries {
    Requests(&'static str, u16, Counter),
    Latency(&'static str, Histogram),
}

pub struct Metrics {
    registry: Registry,
    route_series: Handles<RouteSeries>,
    /// By target: outcome → attempts.
    attempt_series: Handles<(&'static str, Counter)>,
    /// By route: (tenant label, outcome) → cache requests.
    cache_series: Handles<(Box<str>, &'static str, Counter)>,
    /// Off: per-tenant series carry `tenant="all"`, so the exposition names no tenant.
    tenant_labels: bool,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    upstream_attempts: Family<AttemptLabels, Counter>,
    extra_attempts: Family<ExtraAttemptLabels, Counter>,
    budget_exhausted: Family<RouteLabels, Counter>,
    route_panics: Family<RouteLabels, Counter>,
    limit_refusals: Family<LimitLabels, Counter>,
    request_log_dropped: Counter,
    budget_warnings: Family<LimitLabels, Counter>,
    connections_open: Gauge,
    client_timeouts: Family<ClientTimeoutLabels, Counter>,
    breaker_state: Family<TargetLabels, Gauge>,
    time_to_first_token: Family<TargetLabels, Histogram, fn() -> Histogram>,
    otlp_spans: Family<OtlpLabels, Counter>,
    cache_requests: Family<CacheLabels, Counter>,
    cache_tokens_saved: Family<RouteLabels, Counter>,
    cache_cost_saved: Family<RouteLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    cache_errors: Family<CacheErrorLabels, Counter>,
    cache_writes: Counter,
    cache_writes_skipped: Family<CacheErrorLabels, Counter>,
    semantic_lookups: Family<SemanticLabels, Counter>,
    semantic_lookup_seconds: Histogram,
    semantic_rejections: Family<GuardLabels, Counter>,
    semantic_feedback: Family<VerdictLabels, Counter>,
    semantic_entries: Gauge,
    semantic_verifications: Family<VerificationLabels, Counter>,
    semantic_verified_error: Gauge<f64, std::sync::atomic::AtomicU64>,
    semantic_cutoff_offset: Gauge<f64, std::sync::atomic::AtomicU64>,
    prompt_requests: Family<PromptOutcomeLabels, Counter>,
    prompt_latency: Family<PromptLabels, Histogram, fn() -> Histogram>,
    prompt_tokens: Family<PromptTokenLabels, Counter>,
    prompt_cost: Family<PromptLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    feedback_count: Family<FeedbackLabels, Gauge>,
    experiment_decisions: Family<DecisionLabels, Counter>,
    feedback_mean: Family<FeedbackLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~52 s: gateway-only answers (cache hits later) and slow LLM calls both resolve.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("reprise");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Client requests answered, by endpoint, route and status",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time to the response head (streams: to the first token)",
            latency.clone(),
        );
        let upstream_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "upstream_attempts",
            "Upstream attempts by target and outcome (ok or error kind)",
            upstream_attempts.clone(),
        );
        let extra_attempts = Family::<ExtraAttemptLabels, Counter>::default();
        registry.register(
            "extra_attempts",
            "Attempts beyond the first: retry on the same target, failover, hedge",
            extra_attempts.clone(),
        );
        let budget_exhausted = Family::<RouteLabels, Counter>::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries or hedges refused by the route's retry budget",
            budget_exhausted.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open",
            connections_open.clone(),
        );
        let client_timeouts = Family::<ClientTimeoutLabels, Counter>::default();
        registry.register(
            "client_timeouts",
            "Client connections closed for sending a request head or body too slowly",
            client_timeouts.clone(),
        );
        let route_panics = Family::<RouteLabels, Counter>::default();
        registry.register(
            "route_panics",
            "Requests sent to targets open for their error rate because no target of the route admitted them",
            route_panics.clone(),
        );
        let limit_refusals = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Requests refused by a key's or tenant's limit (requests, tokens, concurrent, budget)",
            limit_refusals.clone(),
        );
        let request_log_dropped = Counter::default();
        registry.register(
            "request_log_dropped",
            "Request records dropped because the request log's queue was full",
            request_log_dropped.clone(),
        );
        let budget_warnings = Family::<LimitLabels, Counter>::default();
        registry.register(
            "budget_soft_limit",
            "Requests admitted past a budget's soft threshold",
            budget_warnings.clone(),
        );
        let breaker_state = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker per target: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        let time_to_first_token =
            Family::<TargetLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "upstream_time_to_first_token_seconds",
            "Time from sending a streamed request to a target to its first output token",
            time_to_first_token.clone(),
        );
        let otlp_spans = Family::<OtlpLabels, Counter>::default();
        registry.register(
            "otlp_spans",
            "Spans handed to the OTLP exporter, by result: exported, dropped (queue full) or \
             failed (the collector refused or was unreachable)",
            otlp_spans.clone(),
        );
        let cache_requests = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Exact-cache outcomes by route: hit, miss, bypass, refresh",
            cache_requests.clone(),
        );
        let cache_tokens_saved = Family::<RouteLabels, Counter>::default();
        registry.register(
            "cache_tokens_saved",
            "Prompt plus completion tokens answered from the cache",
            cache_tokens_saved.clone(),
        );
        let cache_cost_saved =
            Family::<RouteLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "cache_cost_saved_usd",
            "Estimated upstream cost of the cache hits (per the price table)",
            cache_cost_saved.clone(),
        );
        let cache_errors = Family::<CacheErrorLabels, Counter>::default();
        registry.register(
            "cache_errors",
            "Cache store failures (lookup, write, corrupt_entry); requests go upstream",
            cache_errors.clone(),
        );
        let cache_writes = Counter::default();
        let cache_writes_skipped = Family::<CacheErrorLabels, Counter>::default();
        registry.register(
            "cache_writes_skipped",
            "Answers not cached, by reason (too_large: over cache.max_entry_bytes)",
            cache_writes_skipped.clone(),
        );
        registry.register(
            "cache_writes",
            "Answers stored in the exact cache",
            cache_writes.clone(),
        );
        let semantic_lookups = Family::<SemanticLabels, Counter>::default();
        registry.register(
            "semantic_lookups",
            "Semantic-cache lookups by outcome: hit, miss, rejected-GUARD (best candidate \
             refused by a guard), overloaded (embedding queue full: stage skipped), error",
            semantic_lookups.clone(),
        );
        // 0.5 ms .. ~4 s.
        let semantic_lookup_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "semantic_lookup_duration_seconds",
            "Embedding plus index search plus verification of one semantic lookup",
            semantic_lookup_seconds.clone(),
        );
        let semantic_rejections = Family::<GuardLabels, Counter>::default();
        registry.register(
            "semantic_rejections",
            "Semantic candidates above the threshold refused, by guard",
            semantic_rejections.clone(),
        );
        let semantic_feedback = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "semantic_feedback",
            "Client feedback about semantic hits: correct or wrong",
            semantic_feedback.clone(),
        );
        let semantic_entries = Gauge::default();
        registry.register(
            "semantic_index_entries",
            "Live entries in this replica's semantic index",
            semantic_entries.clone(),
        );
        let semantic_verifications = Family::<VerificationLabels, Counter>::default();
        registry.register(
            "semantic_verifications",
            "Semantic answers checked against the upstream's fresh answer: kind hit (a sampled \
             would-be hit) or near_miss (a candidate just below its cut-off), result agree or \
             disagree",
            semantic_verifications.clone(),
        );
        let semantic_verified_error = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "semantic_verified_error_ratio",
            "Share of sampled would-be hits whose cached answer the upstream contradicted",
            semantic_verified_error.clone(),
        );
        let semantic_cutoff_offset = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "semantic_cutoff_offset",
            "How far the verified error has raised every entry's calibrated cut-off",
            semantic_cutoff_offset.clone(),
        );
        let prompt_requests = Family::<PromptOutcomeLabels, Counter>::default();
        registry.register(
            "prompt_requests",
            "Requests that used a prompt version, by prompt, version and outcome (the cache \
             outcome, or error)",
            prompt_requests.clone(),
        );
        let prompt_latency =
            Family::<PromptLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "prompt_request_duration_seconds",
            "Time to the response head of requests that used a prompt version",
            prompt_latency.clone(),
        );
        let prompt_tokens = Family::<PromptTokenLabels, Counter>::default();
        registry.register(
            "prompt_tokens",
            "Tokens billed upstream for a prompt version (kind: prompt or completion; cache hits \
             bill nothing)",
            prompt_tokens.clone(),
        );
        let prompt_cost =
            Family::<PromptLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "prompt_cost_usd",
            "Estimated upstream cost of a prompt version (per the price table)",
            prompt_cost.clone(),
        );
        let feedback_count = Family::<FeedbackLabels, Gauge>::default();
        registry.register(
            "prompt_feedback_count",
            "Reported outcomes of fresh (not cached) answers per prompt version and metric, as \
             this replica last saw the shared tally",
            feedback_count.clone(),
        );
        let feedback_mean =
            Family::<FeedbackLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "prompt_feedback_mean",
            "Mean reported value of fresh answers per prompt version and metric (booleans: the \
             share of true)",
            feedback_mean.clone(),
        );
        let experiment_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "experiment_decisions",
            "Decisions experiments made on prompt rollouts (promote, rollback), by this replica",
            experiment_decisions.clone(),
        );
        Self {
            registry,
            route_series: Handles::default(),
            attempt_series: Handles::default(),
            cache_series: Handles::default(),
            experiment_decisions,
            feedback_count,
            feedback_mean,
            prompt_requests,
            prompt_latency,
            prompt_tokens,
            prompt_cost,
            semantic_lookups,
            semantic_lookup_seconds,
            semantic_rejections,
            semantic_feedback,
            semantic_entries,
            semantic_verifications,
            semantic_verified_error,
            semantic_cutoff_offset,
            cache_writes,
            cache_writes_skipped,
            cache_requests,
            cache_tokens_saved,
            cache_cost_saved,
            cache_errors,
            requests,
            latency,
            upstream_attempts,
            extra_attempts,
            budget_exhausted,
            route_panics,
            limit_refusals,
            request_log_dropped,
            budget_warnings,
            connections_open,
            client_timeouts,
            breaker_state,
            time_to_first_token,
            otlp_spans,
            tenant_labels: true,
        }
    }

    pub fn with_tenant_labels(mut self, on: bool) -> Self {
        self.tenant_labels = on;
        self
    }

    fn tenant_label(&self, tenant: &str) -> String {
        if self.tenant_labels { tenant } else { "all" }.to_owned()
    }

    pub fn request(&self, endpoint: &'static str, route: &str, status: u16, elapsed: Duration) {
        self.route_series.with(
            route,
            |s| matches!(s, RouteSeries::Requests(e, c, _) if *e == endpoint && *c == status),
            || {
                let labels = RequestLabels {
                    endpoint,
                    route: route.to_owned(),
                    status,
                };
                RouteSeries::Requests(
                    endpoint,
                    status,
                    self.requests.get_or_create(&labels).clone(),
                )
            },
            |series| {
                if let RouteSeries::Requests(_, _, counter) = series {
                    counter.inc();
                }
            },
        );
        self.route_series.with(
            route,
            |s| matches!(s, RouteSeries::Latency(e, _) if *e == endpoint),
            || {
                let labels = LatencyLabels {
                    endpoint,
                    route: route.to_owned(),
                };
                RouteSeries::Latency(endpoint, self.latency.get_or_create(&labels).clone())
            },
            |series| {
                if let RouteSeries::Latency(_, histogram) = series {
                    histogram.observe(elapsed.as_secs_f64());
                }
            },
        );
    }

    pub fn upstream_attempt(&self, target: &str, outcome: &'static str) {
        self.attempt_series.with(
            target,
            |(o, _)| *o == outcome,
            || {
                let labels = AttemptLabels {
                    target: target.to_owned(),
                    outcome,
                };
                (
                    outcome,
                    self.upstream_attempts.get_or_create(&labels).clone(),
                )
            },
            |(_, counter)| {
                counter.inc();
            },
        );
    }

    pub fn extra_attempt(&self, route: &str, kind: ExtraAttempt) {
        let kind = kind.label();
        self.extra_attempts
            .get_or_create(&ExtraAttemptLabels {
                route: route.to_owned(),
                kind,
            })
            .inc();
    }

    pub fn budget_exhausted(&self, route: &str) {
        self.budget_exhausted
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    /// Counts the connection as open until the returned guard is dropped.
    pub fn connection_opened(&self) -> impl Drop + use<> {
        struct Open(Gauge);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.connections_open.inc();
        Open(self.connections_open.clone())
    }

    pub fn client_timed_out(&self, kind: &'static str) {
        self.client_timeouts
            .get_or_create(&ClientTimeoutLabels { kind })
            .inc();
    }

    pub fn limit_refused(&self, scope: &'static str, limit: &'static str) {
        self.limit_refusals
            .get_or_create(&LimitLabels { scope, limit })
            .inc();
    }

    pub fn time_to_first_token(&self, target: &str, elapsed: Duration) {
        self.time_to_first_token
            .get_or_create(&TargetLabels {
                target: target.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn otlp_spans(&self, result: &'static str, spans: u64) {
        self.otlp_spans
            .get_or_create(&OtlpLabels { result })
            .inc_by(spans);
    }

    pub fn request_log_dropped(&self) {
        self.request_log_dropped.inc();
    }

    pub fn budget_warned(&self, scope: &'static str) {
        self.budget_warnings
            .get_or_create(&LimitLabels {
                scope,
                limit: "budget",
            })
            .inc();
    }

    pub fn route_panic(&self, route: &str) {
        self.route_panics
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    pub fn breaker_state(&self, target: &str, state: i64) {
        self.breaker_state
            .get_or_create(&TargetLabels {
                target: target.to_owned(),
            })
            .set(state);
    }

    pub fn cache_request(
        &self,
        tenant: &str,
        route: &str,
        outcome: &'static str,
        tokens_saved: u64,
        cost_saved: f64,
    ) {
        let tenant = if self.tenant_labels { tenant } else { "all" };
        self.cache_series.with(
            route,
            |(t, o, _)| **t == *tenant && *o == outcome,
            || {
                let labels = CacheLabels {
                    tenant: tenant.to_owned(),
                    route: route.to_owned(),
                    outcome,
                };
                let counter = self.cache_requests.get_or_create(&labels).clone();
                (tenant.into(), outcome, counter)
            },
            |(_, _, counter)| {
                counter.inc();
            },
        );
        if cost_saved > 0.0 {
            self.cache_cost_saved
                .get_or_create(&RouteLabels {
                    route: route.to_owned(),
                })
                .inc_by(cost_saved);
        }
        if tokens_saved > 0 {
            self.cache_tokens_saved
                .get_or_create(&RouteLabels {
                    route: route.to_owned(),
                })
                .inc_by(tokens_saved);
        }
    }

    pub fn cache_write_skipped(&self, reason: &'static str) {
        self.cache_writes_skipped
            .get_or_create(&CacheErrorLabels { kind: reason })
            .inc();
    }

    pub fn cache_written(&self) {
        self.cache_writes.inc();
    }

    pub fn cache_error(&self, kind: &'static str) {
        self.cache_errors
            .get_or_create(&CacheErrorLabels { kind })
            .inc();
    }

    pub fn semantic_lookup(&self, tenant: &str, route: &str, outcome: &str, elapsed: Duration) {
        self.semantic_lookups
            .get_or_create(&SemanticLabels {
                tenant: self.tenant_label(tenant),
                route: route.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.semantic_lookup_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn semantic_rejected(&self, guard: &'static str) {
        self.semantic_rejections
            .get_or_create(&GuardLabels { guard })
            .inc();
    }

    pub fn semantic_feedback(&self, verdict: &'static str) {
        self.semantic_feedback
            .get_or_create(&VerdictLabels { verdict })
            .inc();
    }

    pub fn semantic_verified(
        &self,
        kind: &'static str,
        agreed: bool,
        error_ratio: Option<f64>,
        cutoff_offset: f32,
    ) {
        let result = if agreed { "agree" } else { "disagree" };
        self.semantic_verifications
            .get_or_create(&VerificationLabels { kind, result })
            .inc();
        if let Some(ratio) = error_ratio {
            self.semantic_verified_error.set(ratio);
        }
        self.semantic_cutoff_offset.set(f64::from(cutoff_offset));
    }

    pub fn semantic_entries(&self, entries: usize) {
        self.semantic_entries.set(entries as i64);
    }

    pub fn prompt_request(&self, used: &PromptUse<'_>) {
        self.prompt_requests
            .get_or_create(&PromptOutcomeLabels {
                prompt: used.prompt.to_owned(),
                version: used.version,
                outcome: used.outcome,
            })
            .inc();
        self.prompt_latency
            .get_or_create(&PromptLabels {
                prompt: used.prompt.to_owned(),
                version: used.version,
            })
            .observe(used.elapsed.as_secs_f64());
    }

    /// Tokens billed for a prompt version (a stream's arrive after its request was counted).
    pub fn prompt_usage(
        &self,
        prompt: &str,
        version: u32,
        prompt_tokens: u64,
        completion_tokens: u64,
        cost_usd: f64,
    ) {
        for (kind, tokens) in [("prompt", prompt_tokens), ("completion", completion_tokens)] {
            if tokens > 0 {
                self.prompt_tokens
                    .get_or_create(&PromptTokenLabels {
                        prompt: prompt.to_owned(),
                        version,
                        kind,
                    })
                    .inc_by(tokens);
            }
        }
        if cost_usd > 0.0 {
            self.prompt_cost
                .get_or_create(&PromptLabels {
                    prompt: prompt.to_owned(),
                    version,
                })
                .inc_by(cost_usd);
        }
    }

    /// A prompt version's feedback tally for `metric` after a report.
    pub fn prompt_feedback(&self, prompt: &str, version: u32, metric: &str, count: u64, mean: f64) {
        let labels = FeedbackLabels {
            prompt: prompt.to_owned(),
            version,
            metric: metric.to_owned(),
        };
        self.feedback_count
            .get_or_create(&labels)
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.feedback_mean.get_or_create(&labels).set(mean);
    }

    pub fn experiment_decision(&self, prompt: &str, decision: &'static str) {
        self.experiment_decisions
            .get_or_create(&DecisionLabels {
                prompt: prompt.to_owned(),
                decision,
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the configured level.
pub fn init_logging(config: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: in a file or a log collector they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    // A second init (tests starting several gateways in one process) is harmless: ignore it.
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
