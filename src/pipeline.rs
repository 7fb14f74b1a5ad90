//! The business pipeline, composed in plain code: every stage a request passes is called from
//! here, in order, so the path of a request can be read top to bottom:
//!
//! 1. prompt resolution: a `prompt` reference (body or header) becomes the rendered messages,
//!    model alias and default parameters of one immutable prompt version;
//! 2. route resolution (the model alias names a route);
//! 3. exact cache: a hit answers at once, whole or replayed as a stream;
//! 4. semantic cache: an earlier answer to a request that means the same, if it passes the
//!    guards;
//! 5. router (failover chain) → providers;
//! 6. on the way back, the cache writers store complete answers off the response path (streams
//!    once they ended normally, never a truncated one), exact entry and semantic entry alike.
//!
//! Prompt resolution (before 1) slots in here later.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::cache::entry::{StreamAssembler, replay_chunks, usage_counts};
use crate::cache::exact::{
    CacheControls, CacheStatus, ExactCache, Plan, Price, PriceTable, RouteStats,
    prefix as cache_prefix,
};
use crate::cache::flight::{Joined, Leader};
use crate::cache::index::IndexParams;
use crate::cache::semantic::{
    AgreementDefaults, FeedbackOutcome, Lookup, PromptText, SemanticCache, SemanticPlan,
    SemanticSettings, prefix as semantic_prefix,
};
use crate::cache::verify;
use crate::config::{CacheConfig, CachePolicy, Config, SemanticConfig, StoreKind, VerifierKind};
use crate::embed::{Embedder, EmbedderConfig};
use crate::error::ApiError;
use crate::prompts::{PromptRef, PromptStore, Resolution, Usage as PromptUsage};
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest, StreamOptions};
use crate::providers::ChunkStream;
use crate::router::{Route, RouteFailure, Router, Served, TargetHealth};
use crate::store::{RedisStore, SledStore, Store};
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
}

/// The prompt version that rendered a request.
#[derive(Debug, Clone)]
pub struct PromptTrace {
    pub id: String,
    pub version: u32,
    pub label: Option<String>,
    /// For a rollout: the arm (1-based) and how many there are.
    pub arm: Option<(usize, usize)>,
}

/// How an answer (or a failure) was produced, for response headers and the request's log line.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub route: Option<String>,
    pub target: Option<String>,
    pub attempts: u32,
    pub cache: Option<CacheStatus>,
    pub cache_age: Option<Duration>,
    /// Prompt plus completion tokens of a cache hit: what the upstream would have billed.
    pub tokens_saved: u64,
    pub cache_key: Option<String>,
    /// What the semantic stage did (`hit`, `miss`, `rejected-numbers`, `skipped-tools`, ...);
    /// `None` if the route has no semantic stage.
    pub semantic: Option<String>,
    pub similarity: Option<f32>,
    /// The semantic entry that answered.
    pub cache_entry: Option<String>,
    pub prompt: Option<PromptTrace>,
}

pub enum ChatAnswer {
    Complete(Value),
    Stream(ChunkStream),
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

/// One tenant's use of one route's cache, for the admin API.
#[derive(Debug, serde::Serialize)]
pub struct CacheStatsRow {
    pub tenant: String,
    pub route: String,
    /// Entries in the store now (`null` if the store could not be read).
    pub entries: Option<u64>,
    /// Semantic entries in the store now (`null` if unknown or the route has none).
    pub semantic_entries: Option<u64>,
    /// Exact and semantic hits over all lookups.
    pub hit_ratio: f64,
    #[serde(flatten)]
    pub counters: RouteStats,
}

/// What an admin purge removes: everything, or narrowed by tenant, route, namespace, or one key.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeSelector {
    pub tenant: Option<String>,
    pub route: Option<String>,
    pub namespace: Option<String>,
    pub key: Option<String>,
}

enum CacheRead {
    Answered(Box<Answered<ChatAnswer>>),
    Miss {
        leader: Option<Leader>,
        /// The query's embedding, to store the answer semantically.
        vector: Option<Arc<Vec<f32>>>,
    },
}

/// Where an upstream answer is stored once it is complete.
struct CacheWriter {
    exact: Plan,
    semantic: Option<(SemanticPlan, Arc<Vec<f32>>)>,
}

impl CacheWriter {
    fn store(
        &self,
        exact_cache: &ExactCache,
        semantic_cache: Option<&SemanticCache>,
        target: &str,
        response: Value,
        leader: Option<Leader>,
    ) {
        if let (Some((plan, vector)), Some(cache)) = (&self.semantic, semantic_cache) {
            cache.store_behind(plan, Arc::clone(vector), target, &response);
        }
        exact_cache.store_behind(&self.exact, target, response, leader);
    }
}

pub struct Pipeline {
    router: Router,
    tenants: Vec<String>,
    prompts: Option<Arc<PromptStore>>,
    exact_cache: Option<ExactCache>,
    semantic_cache: Option<SemanticCache>,
    cache_policies: HashMap<String, CachePolicy>,
    prices: Arc<PriceTable>,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    pub async fn from_config(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let router = Router::from_config(config, Arc::clone(&metrics))?;
        let defaults = config.cache.defaults();
        let cache_policies: HashMap<String, CachePolicy> = config
            .routes
            .iter()
            .map(|(name, route)| (name.clone(), route.cache.resolve(&defaults)))
            .collect();
        let prices = Arc::new(PriceTable(
            config
                .prices
                .iter()
                .map(|(model, p)| {
                    (
                        model.clone(),
                        Price {
                            input: p.input,
                            output: p.output,
                        },
                    )
                })
                .collect(),
        ));
        let caching = cache_policies.values().any(|p| p.enabled);
        // The store is opened only when something keeps data, so a plain gateway writes nothing
        // to disk.
        let store = if caching || config.prompts.is_some() {
            Some(open_store(&config.cache).await?)
        } else {
            None
        };
        let prompts = match (&config.prompts, &store) {
            (Some(prompts), Some(store)) => {
                let opened = PromptStore::open(Arc::clone(store), Some(&prompts.dir)).await?;
                opened.follow(prompts.sync_interval);
                Some(opened)
            }
            _ => None,
        };
        let mut semantic_cache = None;
        let exact_cache = match store {
            Some(store) if caching => {
                if cache_policies.values().any(|p| p.semantic.is_some()) {
                    semantic_cache = Some(start_semantic(
                        &config.semantic,
                        Arc::clone(&store),
                        Arc::clone(&metrics),
                    )?);
                }
                Some(ExactCache::new(
                    store,
                    Arc::clone(&metrics),
                    Arc::clone(&prices),
                ))
            }
            _ => None,
        };
        let mut tenants: Vec<String> = config.auth.keys.iter().map(|k| k.tenant.clone()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        Ok(Self {
            router,
            tenants,
            prompts,
            exact_cache,
            semantic_cache,
            cache_policies,
            prices,
            metrics,
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

    /// Counts a finished request against its prompt version (admin stats and metrics).
    pub fn record_prompt_use(
        &self,
        trace: &Trace,
        status: u16,
        elapsed: Duration,
        response: Option<&Value>,
    ) {
        let (Some(prompt), Some(prompts)) = (&trace.prompt, &self.prompts) else {
            return;
        };
        let outcome = if status >= 400 {
            "error"
        } else {
            trace.cache.map_or("none", CacheStatus::label)
        };
        // Hits cost nothing upstream; streams are counted when their usage chunk passes.
        let (prompt_tokens, completion_tokens, cost_usd) = match response {
            Some(response) if trace.cache_age.is_none() => {
                let (input, output) = usage_counts(response);
                let cost = self
                    .prices
                    .cost(trace.target.as_deref(), response, input, output);
                (input, output, cost)
            }
            _ => (0, 0, 0.0),
        };
        prompts.record_use(
            &prompt.id,
            prompt.version,
            &PromptUsage {
                outcome,
                error: status >= 400,
                latency: elapsed,
                prompt_tokens,
                completion_tokens,
                cost_usd,
            },
        );
        self.metrics.prompt_request(&PromptUse {
            prompt: &prompt.id,
            version: prompt.version,
            outcome,
            elapsed,
            prompt_tokens,
            completion_tokens,
            cost_usd,
        });
    }

    fn resolve(&self, model: &str) -> Result<Arc<Route>, ApiError> {
        self.router
            .route(model)
            .ok_or_else(|| ApiError::ModelNotFound {
                model: model.to_owned(),
            })
    }

    fn cache_plan(
        &self,
        context: &RequestContext,
        route: &Route,
        prompt: Option<&Resolution>,
        request: &ChatRequest,
    ) -> Result<Plan, Option<CacheStatus>> {
        let (Some(cache), Some(policy)) = (&self.exact_cache, self.cache_policies.get(&route.name))
        else {
            return Err(None);
        };
        cache.plan(
            policy,
            &context.cache,
            &context.tenant,
            &route.name,
            &route.target_ids,
            prompt.map(Resolution::cache_identity).as_deref(),
            request,
        )
    }

    pub async fn chat(
        &self,
        context: &RequestContext,
        mut request: ChatRequest,
    ) -> Result<Answered<ChatAnswer>, Failed> {
        let prompt = self.resolve_prompt(context, &mut request)?;
        let mut trace = Trace {
            prompt: prompt.as_ref().map(|p| PromptTrace {
                id: p.id.clone(),
                version: p.version,
                label: p.label.clone(),
                arm: p.arm,
            }),
            ..Trace::default()
        };
        let fail = |error: ApiError, trace: &Trace| Failed {
            error,
            trace: trace.clone(),
        };
        request.validate().map_err(|e| fail(e, &trace))?;
        let route = self.resolve(&request.model).map_err(|e| fail(e, &trace))?;
        trace.route = Some(route.name.clone());
        let plan = self.cache_plan(context, &route, prompt.as_ref(), &request);
        let semantic_plan = self.semantic_plan(
            context,
            &route,
            prompt.as_ref(),
            &request,
            &plan,
            &mut trace,
        );
        let (leader, vector) = match self
            .read_cache(
                context,
                &route,
                &request,
                &plan,
                semantic_plan.as_ref(),
                &mut trace,
            )
            .await
        {
            CacheRead::Answered(answered) => return Ok(*answered),
            CacheRead::Miss { leader, vector } => (leader, vector),
        };
        let writer = plan
            .ok()
            .filter(|p| p.mode.write())
            .map(|exact| CacheWriter {
                exact,
                semantic: semantic_plan.zip(vector),
            });

        if !request.wants_stream() {
            let served = self.router.chat(&route, &request).await;
            return match served {
                Ok(served) => {
                    if let (Some(writer), Some(cache)) = (&writer, &self.exact_cache) {
                        writer.store(
                            cache,
                            self.semantic_cache.as_ref(),
                            &served.target,
                            served.value.clone(),
                            leader,
                        );
                    }
                    trace.target = Some(served.target);
                    trace.attempts = served.attempts;
                    Ok(Answered {
                        value: ChatAnswer::Complete(served.value),
                        trace,
                    })
                }
                Err(failure) => Err(failed(failure, trace)),
            };
        }

        // A cached stream must carry usage (entries record tokens), and so must a prompt
        // version's (its stats count tokens); a client that did not ask for it does not see the
        // extra chunk.
        let client_wants_usage = request.wants_usage_in_stream();
        let counted = trace.prompt.clone().zip(self.prompts.clone());
        let add_usage = (writer.is_some() || counted.is_some()) && !client_wants_usage;
        if add_usage {
            request
                .stream_options
                .get_or_insert_with(StreamOptions::default)
                .include_usage = Some(true);
        }
        match self.router.chat_stream(&route, &request).await {
            Ok(served) => {
                let mut stream = served.value;
                if let Some((prompt, prompts)) = counted {
                    stream = count_prompt_usage(
                        stream,
                        prompt,
                        prompts,
                        Arc::clone(&self.metrics),
                        Arc::clone(&self.prices),
                        served.target.clone(),
                    );
                }
                let stream = match (writer, &self.exact_cache) {
                    (Some(writer), Some(cache)) => tee_into_cache(
                        stream,
                        cache,
                        self.semantic_cache.clone(),
                        writer,
                        served.target.clone(),
                        !client_wants_usage,
                        leader,
                    ),
                    _ if add_usage => Box::pin(stream.filter(|item| {
                        let keep = !matches!(item, Ok(chunk) if is_usage_only(chunk));
                        futures::future::ready(keep)
                    })),
                    _ => stream,
                };
                trace.target = Some(served.target);
                trace.attempts = served.attempts;
                Ok(Answered {
                    value: ChatAnswer::Stream(stream),
                    trace,
                })
            }
            Err(failure) => Err(failed(failure, trace)),
        }
    }

    /// The exact-cache stage: a stored answer, an identical request's answer (single flight), or
    /// a miss, which leaves `trace` saying why and, for the first of identical misses, the flight
    /// to lead.
    async fn read_cache(
        &self,
        context: &RequestContext,
        route: &Route,
        request: &ChatRequest,
        plan: &Result<Plan, Option<CacheStatus>>,
        semantic_plan: Option<&SemanticPlan>,
        trace: &mut Trace,
    ) -> CacheRead {
        let mut leader = None;
        let mut vector = None;
        match (plan, &self.exact_cache) {
            (Ok(plan), Some(cache)) => {
                trace.cache_key = Some(plan.key_hex.clone());
                if plan.mode.read()
                    && let Some((entry, age)) = cache.get(plan).await
                {
                    trace.cache_age = Some(age);
                    let answered = answer_from_cache(
                        cache,
                        context,
                        route,
                        request,
                        entry.response,
                        Some(&entry.target),
                        CacheStatus::Hit,
                        trace.clone(),
                    );
                    return CacheRead::Answered(Box::new(answered));
                }
                if let (Some(semantic_plan), Some(semantic)) = (semantic_plan, &self.semantic_cache)
                {
                    match semantic.lookup(semantic_plan).await {
                        Lookup::Hit(hit) => {
                            trace.semantic = Some(hit.basis.into());
                            trace.similarity = Some(hit.similarity);
                            trace.cache_entry = Some(hit.entry);
                            trace.cache_age = Some(hit.age);
                            let answered = answer_from_cache(
                                cache,
                                context,
                                route,
                                request,
                                hit.response,
                                Some(&hit.target),
                                CacheStatus::SemanticHit,
                                trace.clone(),
                            );
                            return CacheRead::Answered(Box::new(answered));
                        }
                        Lookup::Miss {
                            outcome,
                            vector: computed,
                        } => {
                            trace.semantic = Some(outcome);
                            vector = computed;
                        }
                    }
                }
                match cache.join_flight(plan) {
                    Some(Joined::Leader(flight)) => leader = Some(flight),
                    Some(Joined::Follower(follower)) => {
                        // An identical request is being answered: wait for it instead of paying twice.
                        if let Ok(Some(answer)) =
                            tokio::time::timeout(route.total_timeout(), follower.answer()).await
                        {
                            trace.cache_age = Some(Duration::ZERO);
                            let answered = answer_from_cache(
                                cache,
                                context,
                                route,
                                request,
                                (*answer).clone(),
                                None,
                                CacheStatus::Hit,
                                trace.clone(),
                            );
                            return CacheRead::Answered(Box::new(answered));
                        }
                    }
                    None => {}
                }
                trace.cache = Some(plan.status_without_hit());
            }
            (Err(Some(status)), _) => trace.cache = Some(*status),
            _ => {}
        }
        if let (Some(status), Some(cache)) = (trace.cache, &self.exact_cache) {
            cache.record(&context.tenant, &route.name, status, None);
        }
        CacheRead::Miss { leader, vector }
    }

    /// Whether the semantic stage runs for this request; `trace` records why not.
    fn semantic_plan(
        &self,
        context: &RequestContext,
        route: &Route,
        prompt: Option<&Resolution>,
        request: &ChatRequest,
        plan: &Result<Plan, Option<CacheStatus>>,
        trace: &mut Trace,
    ) -> Option<SemanticPlan> {
        let semantic = self.semantic_cache.as_ref()?;
        let policy = self.cache_policies.get(&route.name)?;
        policy.semantic?;
        let Ok(exact) = plan else {
            trace.semantic = Some("skipped-bypass".into());
            return None;
        };
        let semantic_scope = prompt
            .map(Resolution::semantic_identity)
            .unwrap_or_default();
        match semantic.plan(
            policy,
            exact.mode,
            &context.cache,
            &context.tenant,
            &route.name,
            &route.target_ids,
            prompt
                .map(|p| PromptText {
                    scope: &semantic_scope,
                    free_text: p.rendered.free_text.as_deref(),
                    client_turns: p.has_client_turns(request),
                })
                .as_ref(),
            request,
        ) {
            Ok(plan) => Some(plan),
            Err(reason) => {
                trace.semantic = Some(reason.to_owned());
                None
            }
        }
    }

    /// A client's verdict on a semantic hit (`POST /v1/cache/feedback`).
    pub async fn semantic_feedback(
        &self,
        context: &RequestContext,
        entry: &str,
        similarity: Option<f32>,
        correct: bool,
    ) -> Result<FeedbackOutcome, ApiError> {
        let semantic = self.semantic_cache.as_ref().ok_or_else(|| {
            ApiError::invalid("no route has the semantic cache enabled", Some("entry"))
        })?;
        semantic
            .feedback(&context.tenant, entry, similarity, correct)
            .await
    }

    /// The semantic index's state, for the admin API: `None` without a semantic stage.
    pub fn semantic_status(&self) -> Option<Value> {
        let semantic = self.semantic_cache.as_ref()?;
        Some(serde_json::json!({
            "loaded": semantic.loaded().is_some(),
            "loaded_at_startup": semantic.loaded(),
            "indexed_entries": semantic.indexed(),
        }))
    }

    pub async fn embeddings(
        &self,
        _context: &RequestContext,
        request: EmbeddingsRequest,
    ) -> Result<Answered<Value>, Failed> {
        request.validate()?;
        let route = self.resolve(&request.model)?;
        let trace = Trace {
            route: Some(route.name.clone()),
            ..Trace::default()
        };
        match self.router.embeddings(&route, &request).await {
            Ok(Served {
                value,
                target,
                attempts,
            }) => Ok(Answered {
                value,
                trace: Trace {
                    target: Some(target),
                    attempts,
                    ..trace
                },
            }),
            Err(failure) => Err(failed(failure, trace)),
        }
    }

    fn cache(&self) -> Result<&ExactCache, ApiError> {
        self.exact_cache
            .as_ref()
            .ok_or_else(|| ApiError::invalid("no route has the cache enabled", None))
    }

    fn cached_routes(&self) -> Vec<&str> {
        let mut routes: Vec<&str> = self
            .cache_policies
            .iter()
            .filter(|(_, p)| p.enabled)
            .map(|(name, _)| name.as_str())
            .collect();
        routes.sort_unstable();
        routes
    }

    pub async fn cache_stats(&self) -> Result<Vec<CacheStatsRow>, ApiError> {
        let cache = self.cache()?;
        let mut rows = Vec::new();
        for tenant in &self.tenants {
            for route in self.cached_routes() {
                let entries = cache
                    .store()
                    .count_prefix(&cache_prefix(Some(tenant), Some(route), None))
                    .await
                    .ok();
                let semantic_entries = match self
                    .cache_policies
                    .get(route)
                    .and_then(|p| p.semantic.as_ref())
                {
                    Some(_) => cache
                        .store()
                        .count_prefix(&semantic_prefix(Some(tenant), Some(route), None))
                        .await
                        .ok(),
                    None => None,
                };
                let counters = cache.stats(tenant, route);
                let hits = counters.hits + counters.semantic_hits;
                let lookups = hits + counters.misses;
                rows.push(CacheStatsRow {
                    tenant: tenant.clone(),
                    route: route.to_owned(),
                    entries,
                    semantic_entries,
                    hit_ratio: if lookups == 0 {
                        0.0
                    } else {
                        hits as f64 / lookups as f64
                    },
                    counters,
                });
            }
        }
        Ok(rows)
    }

    /// Removes cache entries; how many.
    pub async fn purge(&self, selector: PurgeSelector) -> Result<u64, ApiError> {
        let cache = self.cache()?;
        if let Some(tenant) = &selector.tenant
            && !self.tenants.contains(tenant)
        {
            return Err(ApiError::invalid(
                format!("unknown tenant {tenant:?}"),
                Some("tenant"),
            ));
        }
        if let Some(route) = &selector.route
            && !self.cached_routes().contains(&route.as_str())
        {
            return Err(ApiError::invalid(
                format!("no cached route {route:?}"),
                Some("route"),
            ));
        }
        let store = cache.store();
        let unavailable = |e: crate::store::StoreError| ApiError::CacheUnavailable(e.to_string());
        if let Some(key) = &selector.key {
            let (Some(tenant), Some(route)) = (&selector.tenant, &selector.route) else {
                return Err(ApiError::invalid(
                    "purging one key needs its tenant and route",
                    Some("key"),
                ));
            };
            if key.len() != 64 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ApiError::invalid(
                    "key must be the 64 hex digits of x-reprise-cache-key",
                    Some("key"),
                ));
            }
            let namespace = selector.namespace.as_deref().unwrap_or("");
            let removed = store
                .delete(&crate::cache::exact::entry_path(
                    tenant, route, namespace, key,
                ))
                .await
                .map_err(unavailable)?;
            return Ok(u64::from(removed));
        }
        let routes: Vec<Option<&str>> = match (&selector.route, &selector.namespace) {
            (Some(route), _) => vec![Some(route.as_str())],
            // A namespace lives under each route: purge it route by route.
            (None, Some(_)) => self.cached_routes().into_iter().map(Some).collect(),
            (None, None) => vec![None],
        };
        let tenants: Vec<Option<&str>> = match &selector.tenant {
            Some(tenant) => vec![Some(tenant.as_str())],
            None if selector.namespace.is_some() || selector.route.is_some() => {
                self.tenants.iter().map(|t| Some(t.as_str())).collect()
            }
            None => vec![None],
        };
        let mut removed = 0;
        for tenant in &tenants {
            for route in &routes {
                let namespace = selector.namespace.as_deref();
                for prefix in [
                    cache_prefix(*tenant, *route, namespace),
                    semantic_prefix(*tenant, *route, namespace),
                ] {
                    removed += store.delete_prefix(&prefix).await.map_err(unavailable)?;
                }
            }
        }
        Ok(removed)
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

/// A stored (or coalesced) answer, whole or replayed as a stream as the request wants.
#[allow(clippy::too_many_arguments)]
fn answer_from_cache(
    cache: &ExactCache,
    context: &RequestContext,
    route: &Route,
    request: &ChatRequest,
    response: Value,
    target: Option<&str>,
    status: CacheStatus,
    mut trace: Trace,
) -> Answered<ChatAnswer> {
    let (prompt_tokens, completion_tokens) = usage_counts(&response);
    trace.cache = Some(status);
    trace.tokens_saved = prompt_tokens + completion_tokens;
    cache.record(
        &context.tenant,
        &route.name,
        status,
        Some((&response, target)),
    );
    let value = if request.wants_stream() {
        let chunks = replay_chunks(&response, request.wants_usage_in_stream());
        ChatAnswer::Stream(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok))))
    } else {
        ChatAnswer::Complete(response)
    };
    Answered { value, trace }
}

fn start_semantic(
    config: &SemanticConfig,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SemanticCache> {
    let embedder = Embedder::load(&EmbedderConfig {
        model_dir: config.model_dir.clone(),
        onnxruntime: config.onnxruntime_path(),
        queue: config.queue,
        max_batch: config.max_batch,
        intra_threads: config.intra_threads,
        max_length: config.max_length,
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "semantic.model_dir: {e} (scripts/fetch-embedding-model.sh fetches the model)"
        )
    })?;
    let verifier = verify::from_config(config, &embedder);
    Ok(SemanticCache::start(
        embedder,
        verifier,
        store,
        metrics,
        SemanticSettings {
            candidates: config.candidates,
            index: IndexParams {
                connections: config.connections,
                ef_construction: config.ef_construction,
                ef_search: config.ef_search,
                max_entries: config.max_entries,
                ..IndexParams::default()
            },
            sync_interval: config.sync_interval,
            agreement: AgreementDefaults {
                neighbours: config.answer_agreement,
                min_similarity: config.agreement_similarity,
                rules: config.verifier != VerifierKind::Off,
            },
        },
    ))
}

async fn open_store(config: &CacheConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.store {
        StoreKind::Sled => Arc::new(
            SledStore::open_when_free(
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
            ..trace
        },
    }
}

fn is_usage_only(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && chunk.get("usage").is_some_and(|u| !u.is_null())
}

/// Adds a stream's usage chunk to its prompt version's token and cost counts as it passes.
fn count_prompt_usage(
    stream: ChunkStream,
    prompt: PromptTrace,
    prompts: Arc<PromptStore>,
    metrics: Arc<Metrics>,
    prices: Arc<PriceTable>,
    target: String,
) -> ChunkStream {
    Box::pin(stream.inspect(move |item| {
        if let Ok(chunk) = item
            && chunk.get("usage").is_some_and(|u| !u.is_null())
        {
            let (input, output) = usage_counts(chunk);
            let cost = prices.cost(Some(&target), chunk, input, output);
            prompts.record_tokens(&prompt.id, prompt.version, input, output, cost);
            metrics.prompt_usage(&prompt.id, prompt.version, input, output, cost);
        }
    }))
}

/// Forwards a live stream to the client while assembling it; only a stream that ended normally is
/// stored. A client that disconnects drops this stream, and nothing is stored (a flight `leader`
/// dropped with it sends its followers upstream).
fn tee_into_cache(
    mut stream: ChunkStream,
    cache: &ExactCache,
    semantic: Option<SemanticCache>,
    writer: CacheWriter,
    target: String,
    strip_usage: bool,
    leader: Option<Leader>,
) -> ChunkStream {
    // Cloning shares the store: the writer outlives this request's borrow of the pipeline.
    let cache = cache.clone();
    Box::pin(async_stream::stream! {
        let mut assembler = StreamAssembler::default();
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    assembler.push(&chunk);
                    if strip_usage && is_usage_only(&chunk) {
                        continue;
                    }
                    yield Ok(chunk);
                }
                Err(error) => {
                    yield Err(error);
                    return;
                }
            }
        }
        writer.store(&cache, semantic.as_ref(), &target, assembler.finish(), leader);
    })
}
