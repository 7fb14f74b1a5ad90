//! The business pipeline, composed in plain code: every stage a request passes is called from
//! here, in order, so the path of a request reads top to bottom:
//!
//! 1. prompt resolution: a `prompt` reference (body or header) becomes the rendered messages,
//!    model alias and default parameters of one immutable prompt version;
//! 2. route resolution: the model alias names a route;
//! 3. cache lookup ([`CacheStage`]): exact, then semantic; a hit answers at once, whole or
//!    replayed as a stream;
//! 4. router (failover chain) → providers;
//! 5. cache store: the miss's [`PendingWrite`] stores the complete answer off the response path
//!    (a stream once it ended normally, never a truncated one).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::cache::{
    CacheControls, CacheLookup, CacheReport, CacheScope, CacheStage, PendingWrite, PromptScope,
    UpstreamCheck,
};
use crate::config::{CacheConfig, Config, StoreKind};
use crate::error::ApiError;
use crate::experiments::Experiments;
use crate::keys::{KeyRecord, KeyStore};
use crate::limits::usage::UsageBook;
use crate::limits::{BudgetState, Limits, RateState, Upstream};
use crate::otel::TraceContext;
use crate::prices::PriceTable;
use crate::prompts::experiment::MetricInfo;
use crate::prompts::{PromptRef, PromptStore, Resolution, Usage as PromptUsage};
use crate::protocol::answer::AnswerFacts;
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest, StreamOptions, is_usage_only_chunk};
use crate::providers::{ChatReply, ChunkStream};
use crate::router::{Attempt, Route, RouteFailure, Router, Served, TargetHealth};
use crate::store::{FjallStore, RedisStore, Store};
use crate::telemetry::{Metrics, PromptUse};

/// What later stages need to know about the caller, resolved once by the server.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub tenant: Arc<str>,
    pub request_id: String,
    pub cache: CacheControls,
    /// A prompt named by header (`x-reprise-prompt`), for SDKs that cannot add a body field.
    pub prompt: Option<PromptRef>,
    /// The end user (`x-reprise-user`), for sticky rollout arms; else the body's `user`.
    pub user: Option<String>,
    /// The run-time key the request came with (`None`: a key from `[auth]`).
    pub key: Option<Arc<KeyRecord>>,
    /// The trace the request continues (the client's `traceparent`) or starts.
    pub trace: TraceContext,
}

/// The prompt version that rendered a request.
#[derive(Debug, Clone)]
pub struct PromptTrace {
    pub id: String,
    pub version: u32,
    pub label: Option<String>,
    /// For a rollout: the arm (1-based) and how many there are.
    pub arm: Option<(usize, usize)>,
    pub experiment: Option<Arc<crate::prompts::experiment::ExperimentTag>>,
}

/// How an answer (or a failure) was produced, for response headers and the request's log line.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub route: Option<String>,
    pub target: Option<String>,
    pub attempts: u32,
    pub cache: CacheReport,
    pub prompt: Option<PromptTrace>,
    /// For `x-ratelimit-*-requests`, once the request was admitted.
    pub rate: Option<RateState>,
    /// For `x-ratelimit-*-tokens`, once the request was admitted upstream.
    pub tokens: Option<RateState>,
    /// For `x-reprise-budget-*`, once the request was admitted upstream.
    pub budget: Option<BudgetState>,
    /// Who asked, for the request log.
    pub caller: Option<Caller>,
    pub stream: bool,
    /// The kind of error a failed request ended with.
    pub error: Option<&'static str>,
    /// Every upstream attempt.
    pub tried: Vec<Attempt>,
    /// When the cache was looked up, and for how long.
    pub cache_lookup: Option<(std::time::SystemTime, Duration)>,
    /// A stream's usage chunk, once it passed (for the request log).
    pub stream_usage: Option<Arc<StreamUsage>>,
}

/// The usage chunk of a stream, kept as it passes so the request log can count a stream's
/// tokens and cost when it ends.
#[derive(Debug, Default)]
pub struct StreamUsage(parking_lot::Mutex<Option<Value>>);

impl StreamUsage {
    pub fn take(&self) -> Option<Value> {
        self.0.lock().take()
    }
}

/// Who made a request, as the request log records it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub request_id: String,
    pub tenant: Arc<str>,
    /// The run-time key's id.
    pub key: Option<String>,
    pub user: Option<String>,
    pub trace: TraceContext,
}

impl Caller {
    fn of(context: &RequestContext, body_user: Option<&str>) -> Self {
        Self {
            request_id: context.request_id.clone(),
            tenant: Arc::clone(&context.tenant),
            key: context.key.as_ref().map(|k| k.id.clone()),
            user: context
                .user
                .clone()
                .or_else(|| body_user.map(str::to_owned)),
            trace: context.trace.clone(),
        }
    }
}

pub struct Answered<T> {
    pub value: T,
    pub trace: Trace,
}

pub struct Failed {
    pub error: ApiError,
    pub trace: Trace,
}

impl From<ApiError> for Failed {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            trace: Trace::default(),
        }
    }
}

pub struct Pipeline {
    router: Arc<Router>,
    prompts: Option<Arc<PromptStore>>,
    keys: Option<KeyStore>,
    limits: Limits,
    cache: CacheStage,
    prices: Arc<PriceTable>,
    pub metrics: Arc<Metrics>,
    /// The request log or the trace exporter counts a stream's tokens, so every stream asks
    /// the upstream for its usage.
    stream_usage: bool,
    /// Outcomes clients report on prompt requests (`[feedback]`).
    feedback: Option<crate::feedback::Feedback>,
    /// Experiments on prompt rollouts (with `[prompts]`).
    experiments: Option<Arc<Experiments>>,
}

impl Pipeline {
    pub async fn from_config(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let router = Arc::new(Router::from_config(config, Arc::clone(&metrics))?);
        let prices = Arc::new(PriceTable::from_config(&config.prices));
        let caching = CacheStage::policies(config).values().any(|p| p.enabled);
        // The store is opened only when something keeps data, so a plain gateway writes nothing
        // to disk.
        let tenant_limits: std::collections::HashMap<_, _> = config
            .tenants
            .iter()
            .map(|(name, tenant)| (name.clone(), tenant.limits()))
            .collect();
        let store = if caching
            || config.prompts.is_some()
            || config.keys.is_some()
            || !tenant_limits.is_empty()
        {
            Some(open_store(&config.cache).await?)
        } else {
            None
        };
        let prompts = match (&config.prompts, &store) {
            (Some(prompts), Some(store)) => {
                let metric_info = config
                    .feedback
                    .iter()
                    .flat_map(|f| &f.metrics)
                    .map(|(name, metric)| {
                        (
                            name.clone(),
                            MetricInfo {
                                boolean: metric.kind == crate::config::MetricKind::Boolean,
                                higher_is_better: metric.higher_is_better,
                            },
                        )
                    })
                    .collect();
                let opened =
                    PromptStore::open(Arc::clone(store), Some(&prompts.dir), metric_info).await?;
                opened.follow(prompts.sync_interval);
                Some(opened)
            }
            _ => None,
        };
        let usage = UsageBook::new(store.clone());
        usage.flush_periodically();
        let limits = Limits::new(
            store.clone(),
            tenant_limits,
            Arc::clone(&prices),
            Arc::clone(&metrics),
            usage,
            config.limits.hold_lease,
        );
        let keys = match (&config.keys, &store) {
            (Some(keys), Some(store)) => Some(KeyStore::new(Arc::clone(store), keys.cache_ttl)),
            _ => None,
        };
        let experiments = match (&config.prompts, &prompts, &store) {
            (Some(config), Some(prompts), Some(store)) => {
                let experiments = Experiments::new(
                    Arc::clone(store),
                    Arc::clone(prompts),
                    config.experiments.clone(),
                    Arc::clone(&metrics),
                );
                experiments.start();
                Some(experiments)
            }
            _ => None,
        };
        let feedback = match (&config.feedback, &store) {
            (Some(feedback), Some(store)) => {
                let feedback = crate::feedback::Feedback::new(
                    feedback,
                    Arc::clone(store),
                    Arc::clone(&metrics),
                    experiments.clone(),
                );
                feedback.expire_periodically();
                Some(feedback)
            }
            _ => None,
        };
        let cache =
            CacheStage::from_config(config, store, Arc::clone(&metrics), Arc::clone(&prices))?;
        Ok(Self {
            router,
            prompts,
            keys,
            limits,
            cache,
            prices,
            metrics,
            stream_usage: config.request_log.is_some() || config.otlp.is_some(),
            feedback,
            experiments,
        })
    }

    /// The prompt store, if `[prompts]` is configured.
    pub fn prompts(&self) -> Result<&PromptStore, ApiError> {
        self.prompts.as_deref().ok_or_else(|| {
            ApiError::invalid(
                "this gateway has no prompt store (add [prompts] to its config)",
                Some("prompt"),
            )
        })
    }

    /// The run-time keys, if `[keys]` is configured.
    pub fn keys(&self) -> Result<&KeyStore, ApiError> {
        self.keys.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "this gateway keeps no run-time keys (add [keys] to its config)",
                None,
            )
        })
    }

    /// Outcomes reported on prompt requests, if `[feedback]` is configured.
    pub fn feedback(&self) -> Result<&crate::feedback::Feedback, ApiError> {
        self.feedback.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "this gateway takes no feedback (add [feedback] to its config)",
                None,
            )
        })
    }

    /// Experiments on prompt rollouts, if `[prompts]` is configured.
    pub fn experiments(&self) -> Result<&Experiments, ApiError> {
        self.experiments.as_deref().ok_or_else(|| {
            ApiError::invalid(
                "this gateway has no prompt store (add [prompts] to its config)",
                None,
            )
        })
    }

    /// The experiments, for the server to write their last counts at shutdown.
    pub fn experiments_handle(&self) -> Option<Arc<Experiments>> {
        self.experiments.clone()
    }

    /// What tokens cost, by model.
    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    /// Keys' and tenants' limits, and the usage book.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The run-time keys, for authentication (none configured: only `[auth]` keys exist).
    pub fn key_store(&self) -> Option<&KeyStore> {
        self.keys.as_ref()
    }

    /// The cache stage, for the admin API (stats, purges) and feedback.
    pub fn cache(&self) -> &CacheStage {
        &self.cache
    }

    pub async fn chat(
        &self,
        context: &RequestContext,
        mut request: ChatRequest,
    ) -> Result<Answered<ChatReply>, Failed> {
        let prompt = self.resolve_prompt(context, &mut request)?;
        let mut trace = Trace {
            prompt: prompt.as_ref().map(PromptTrace::of),
            caller: Some(Caller::of(context, request.user.as_deref())),
            stream: request.wants_stream(),
            ..Trace::default()
        };
        let fail = |error: ApiError, trace: &Trace| Failed {
            error,
            trace: trace.clone(),
        };
        request.validate().map_err(|e| fail(e, &trace))?;
        let route = self
            .resolve(context, &request.model)
            .map_err(|e| fail(e, &trace))?;
        trace.route = Some(route.name.clone());
        let admission = self
            .limits
            .admit(
                &context.tenant,
                context.key.as_deref(),
                Some(Upstream::chat(&route, &request)),
            )
            .await
            .map_err(|e| fail(e, &trace))?;
        trace.rate = admission.rate;

        let prompt_scope = prompt.as_ref().map(|p| prompt_scope(p, &request));
        let scope = CacheScope {
            tenant: &context.tenant,
            route: &route.name,
            targets: &route.target_ids,
            controls: &context.cache,
            prompt: prompt_scope.as_ref(),
        };
        let looked_up = (std::time::SystemTime::now(), std::time::Instant::now());
        let lookup = self
            .cache
            .lookup(&scope, &request, route.total_timeout(), &mut trace.cache)
            .await;
        if trace.cache.status.is_some() {
            trace.cache_lookup = Some((looked_up.0, looked_up.1.elapsed()));
        }
        let pending = match lookup {
            CacheLookup::Hit { reply, check } => {
                // A hit costs nothing: what was held for going upstream goes back.
                if let Ok(charge) = admission.upstream {
                    charge.cancel();
                }
                self.limits.book_hit(
                    &context.tenant,
                    context.key.as_deref(),
                    &route.name,
                    &trace.cache,
                );
                if let Some(check) = check {
                    self.check_behind(route, request, check);
                }
                return Ok(Answered {
                    value: reply,
                    trace,
                });
            }
            CacheLookup::Miss(pending) => pending,
        };

        // Only a request the cache could not answer costs anything: its refusal is raised here.
        let charge = admission
            .upstream
            .map_err(|refusal| fail(refusal.raise(), &trace))?;
        trace.tokens = charge.tokens;
        trace.budget = charge.budget;

        if request.wants_stream() {
            // Boxed: the stream's setup is the largest state of this future, and every request
            // would carry (and copy) its size.
            return Box::pin(self.stream_upstream(&route, request, pending, charge, trace)).await;
        }
        match self.router.chat(&route, &request).await {
            Ok(served) => {
                charge.settle(&served.target, &served.value).await;
                pending.store(&served.target, &served.value);
                trace.target = Some(served.target);
                trace.attempts = served.attempts;
                trace.tried = served.tried;
                Ok(Answered {
                    value: ChatReply::Complete(served.value),
                    trace,
                })
            }
            Err(failure) => Err(failed(failure, trace)),
        }
    }

    /// Asks the upstream for the answer a semantic hit was just served in its place, off the
    /// response path, and hands it to the cache to compare (semantic verification).
    fn check_behind(&self, route: Arc<Route>, mut request: ChatRequest, check: UpstreamCheck) {
        request.stream = None;
        request.stream_options = None;
        let router = Arc::clone(&self.router);
        tokio::spawn(async move {
            if let Ok(served) = router.chat(&route, &request).await {
                check.compare(served.value.value());
            }
        });
    }

    async fn stream_upstream(
        &self,
        route: &Route,
        mut request: ChatRequest,
        pending: PendingWrite,
        charge: crate::limits::Charge,
        mut trace: Trace,
    ) -> Result<Answered<ChatReply>, Failed> {
        // A stored stream must carry usage (entries record tokens), and so must a prompt
        // version's (its stats count tokens); a client that did not ask for it does not see the
        // extra chunk.
        let client_wants_usage = request.wants_usage_in_stream();
        let counted = trace.prompt.clone().filter(|_| self.prompts.is_some());
        let add_usage =
            (pending.stores() || counted.is_some() || charge.needs_usage() || self.stream_usage)
                && !client_wants_usage;
        if add_usage {
            request
                .stream_options
                .get_or_insert_with(StreamOptions::default)
                .include_usage = Some(true);
        }
        let served = match self.router.chat_stream(route, &request).await {
            Ok(served) => served,
            Err(failure) => return Err(failed(failure, trace)),
        };
        let mut stream = charge.meter(served.target.clone(), served.value);
        if self.stream_usage {
            let usage = Arc::new(StreamUsage::default());
            trace.stream_usage = Some(Arc::clone(&usage));
            stream = Box::pin(stream.inspect(move |item| {
                if let Ok(chunk) = item
                    && chunk.get("usage").is_some_and(|u| !u.is_null())
                {
                    *usage.0.lock() = Some(chunk.clone());
                }
            }));
        }
        if let (Some(prompt), Some(prompts)) = (counted, self.prompts.clone()) {
            let (metrics, prices) = (Arc::clone(&self.metrics), Arc::clone(&self.prices));
            let experiments = self.experiments.clone();
            let target = served.target.clone();
            stream = Box::pin(stream.inspect(move |item| {
                if let Ok(chunk) = item
                    && chunk.get("usage").is_some_and(|u| !u.is_null())
                {
                    let counters = PromptCounters {
                        prompts: &prompts,
                        metrics: &metrics,
                        prices: &prices,
                        experiments: experiments.as_deref(),
                    };
                    count_prompt_tokens(&counters, &prompt, &target, &AnswerFacts::of_value(chunk));
                }
            }));
        }
        let stream = if pending.stores() {
            pending.tee(stream, served.target.clone(), add_usage)
        } else if add_usage {
            strip_usage(stream)
        } else {
            stream
        };
        trace.target = Some(served.target);
        trace.attempts = served.attempts;
        trace.tried = served.tried;
        Ok(Answered {
            value: ChatReply::Stream(stream),
            trace,
        })
    }

    /// The prompt stage: a request naming a prompt (in its body or by header) becomes the
    /// request that prompt version makes.
    fn resolve_prompt(
        &self,
        context: &RequestContext,
        request: &mut ChatRequest,
    ) -> Result<Option<Resolution>, ApiError> {
        let reference = match (request.extra.remove("prompt"), &context.prompt) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "name the prompt in the body or in x-reprise-prompt, not both",
                    Some("prompt"),
                ));
            }
            (Some(value), None) => PromptRef::from_body(value)?,
            (None, Some(reference)) => reference.clone(),
            (None, None) => return Ok(None),
        };
        let user = context.user.as_deref().or(request.user.as_deref());
        let resolution = self.prompts()?.resolve(&reference, user)?;
        resolution.apply(request)?;
        Ok(Some(resolution))
    }

    /// Counts a finished request against its prompt version (admin stats and metrics). A whole
    /// answer's tokens are counted here; a stream's as its usage chunk passes
    /// (`count_prompt_tokens`); a cache hit cost nothing upstream.
    pub fn record_prompt_use(
        &self,
        trace: &Trace,
        status: u16,
        elapsed: Duration,
        response: Option<&AnswerFacts>,
    ) {
        let (Some(prompt), Some(prompts)) = (&trace.prompt, &self.prompts) else {
            return;
        };
        let outcome = if status >= 400 {
            "error"
        } else {
            trace.cache.status.map_or("none", |s| s.label())
        };
        if let (Some(feedback), Some(caller), true) = (&self.feedback, &trace.caller, status < 400)
        {
            feedback.remember(
                &caller.tenant,
                &caller.request_id,
                crate::feedback::Served {
                    prompt: prompt.id.clone(),
                    version: prompt.version,
                    arm: prompt.arm.map(|(arm, arms)| format!("{arm}/{arms}")),
                    label: prompt.experiment.as_ref().map(|e| e.label.clone()),
                    experiment: prompt.experiment.as_ref().map(|e| e.id.clone()),
                    cached: trace.cache.is_hit(),
                    at_ms: crate::request_log::now_ms(),
                },
            );
        }
        if let (Some(tag), Some(experiments)) = (&prompt.experiment, &self.experiments) {
            experiments.request(
                tag,
                &crate::experiments::Served {
                    version: prompt.version,
                    cached: trace.cache.is_hit(),
                    error: status >= 500,
                    latency: elapsed,
                },
            );
        }
        prompts.record_use(
            &prompt.id,
            prompt.version,
            &PromptUsage {
                outcome,
                error: status >= 400,
                latency: elapsed,
            },
        );
        self.metrics.prompt_request(&PromptUse {
            prompt: &prompt.id,
            version: prompt.version,
            outcome,
            elapsed,
        });
        if let Some(response) = response
            && !trace.cache.is_hit()
        {
            let target = trace.target.as_deref().unwrap_or_default();
            count_prompt_tokens(
                &PromptCounters {
                    prompts,
                    metrics: &self.metrics,
                    prices: &self.prices,
                    experiments: self.experiments.as_deref(),
                },
                prompt,
                target,
                response,
            );
        }
    }

    /// The route `model` names, if the caller's key may use it.
    fn resolve(&self, context: &RequestContext, model: &str) -> Result<Arc<Route>, ApiError> {
        let route = self
            .router
            .route(model)
            .ok_or_else(|| ApiError::ModelNotFound {
                model: model.to_owned(),
            })?;
        if let Some(key) = &context.key
            && !key.allows(&route.name)
        {
            return Err(ApiError::ModelNotAllowed {
                model: model.to_owned(),
            });
        }
        Ok(route)
    }

    pub async fn embeddings(
        &self,
        context: &RequestContext,
        request: EmbeddingsRequest,
    ) -> Result<Answered<Value>, Failed> {
        request.validate()?;
        let route = self.resolve(context, &request.model)?;
        let admission = self
            .limits
            .admit(
                &context.tenant,
                context.key.as_deref(),
                Some(Upstream::embeddings(&route, &request)),
            )
            .await?;
        let mut trace = Trace {
            route: Some(route.name.clone()),
            rate: admission.rate,
            caller: Some(Caller::of(context, None)),
            ..Trace::default()
        };
        let charge = admission.upstream.map_err(|refusal| Failed {
            error: refusal.raise(),
            trace: trace.clone(),
        })?;
        trace.tokens = charge.tokens;
        trace.budget = charge.budget;
        match self.router.embeddings(&route, &request).await {
            Ok(Served {
                value,
                target,
                attempts,
                tried,
            }) => {
                charge.settle_value(&target, &value).await;
                Ok(Answered {
                    value,
                    trace: Trace {
                        target: Some(target),
                        attempts,
                        tried,
                        ..trace
                    },
                })
            }
            Err(failure) => Err(failed(failure, trace)),
        }
    }

    pub fn models(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.router.route_names().collect();
        names.sort_unstable();
        names
    }

    pub fn health(&self) -> Vec<TargetHealth> {
        self.router.health()
    }
}

impl PromptTrace {
    fn of(resolution: &Resolution) -> Self {
        Self {
            id: resolution.id.clone(),
            version: resolution.version,
            label: resolution.label.clone(),
            arm: resolution.arm,
            experiment: resolution.experiment.clone(),
        }
    }
}

/// What a prompt version adds to the request's cache scopes.
fn prompt_scope(resolution: &Resolution, request: &ChatRequest) -> PromptScope {
    PromptScope {
        exact: resolution.cache_identity(),
        semantic: resolution.semantic_identity(),
        free_text: resolution.rendered.free_text.clone(),
        client_turns: resolution.has_client_turns(request),
    }
}

async fn open_store(config: &CacheConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.store {
        StoreKind::Embedded => Arc::new(
            FjallStore::open_when_free(
                &config.path,
                config.memory_bytes,
                Some(config.max_bytes),
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cache.path: cannot open the store at {}: {e}",
                    config.path.display()
                )
            })?,
        ),
        StoreKind::Redis => {
            let url = config.redis_url.as_deref().unwrap_or_default();
            Arc::new(
                RedisStore::new(url, &config.redis_prefix)
                    .map_err(|e| anyhow::anyhow!("cache.redis_url: {e}"))?,
            )
        }
    })
}

fn failed(failure: RouteFailure, trace: Trace) -> Failed {
    Failed {
        error: failure.error,
        trace: Trace {
            attempts: failure.attempts,
            tried: failure.tried,
            ..trace
        },
    }
}

/// Adds the tokens (and their cost) of an answer, or of a stream's usage chunk, to its prompt
/// version: the one place prompt usage is counted.
/// Where a prompt version's tokens and cost are counted.
struct PromptCounters<'a> {
    prompts: &'a PromptStore,
    metrics: &'a Metrics,
    prices: &'a PriceTable,
    experiments: Option<&'a Experiments>,
}

fn count_prompt_tokens(
    counters: &PromptCounters<'_>,
    prompt: &PromptTrace,
    target: &str,
    answer: &AnswerFacts,
) {
    let Some(usage) = answer.usage else {
        return;
    };
    let (input, output) = (usage.prompt_tokens, usage.completion_tokens);
    let cost = counters
        .prices
        .cost(Some(target), answer.model.as_deref(), input, output);
    counters
        .prompts
        .record_tokens(&prompt.id, prompt.version, input, output, cost);
    counters
        .metrics
        .prompt_usage(&prompt.id, prompt.version, input, output, cost);
    if let (Some(tag), Some(experiments)) = (&prompt.experiment, counters.experiments) {
        experiments.tokens(tag, prompt.version, input, output, cost);
    }
}

/// Drops the usage chunk the gateway asked for on the client's behalf.
fn strip_usage(stream: ChunkStream) -> ChunkStream {
    Box::pin(stream.filter(|item| {
        let keep = !matches!(item, Ok(chunk) if is_usage_only_chunk(chunk));
        futures::future::ready(keep)
    }))
}
