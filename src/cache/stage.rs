//! The cache's one front door. The pipeline asks it two things: "is there an answer for this
//! request?" ([`CacheStage::lookup`]) and, on a miss, "store this answer once it is complete"
//! ([`PendingWrite`]). Everything else (exact before semantic, single flight, stream replay,
//! counting, the admin API's stats and purges) happens behind it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use super::entry::{StreamAssembler, replay_chunks};
use super::exact::{ExactCache, Joined, Leader, Plan};
use super::semantic::{
    AgreementDefaults, FeedbackOutcome, HitCheck, IndexParams, Lookup, Probe, SemanticCache,
    SemanticOutcome, SemanticPlan, SemanticSettings, SkipReason, Verification, judge_from_config,
    learnt_cutoff,
};
use super::stats::{CacheCounters, RouteStats};
use super::{CacheScope, CacheStatus, entry_path, prefix};
use crate::config::{CachePolicy, Config, SemanticConfig, VerifierKind};
use crate::embed::{Embedded, Embedder, EmbedderConfig};
use crate::error::ApiError;
use crate::prices::PriceTable;
use crate::protocol::answer::Answer;
use crate::protocol::openai::{ChatRequest, is_usage_only_chunk};
use crate::providers::{ChatReply, ChunkStream};
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

/// What the cache did for one request: response headers and the request's log line.
#[derive(Debug, Clone, Default)]
pub struct CacheReport {
    pub status: Option<CacheStatus>,
    /// The exact entry's key (`x-reprise-cache-key`), so a client can purge exactly it.
    pub key: Option<String>,
    /// The age of the answer served from the cache.
    pub age: Option<Duration>,
    /// Prompt plus completion tokens of a hit: what the upstream would have billed.
    pub tokens_saved: u64,
    /// What those tokens would have cost (USD, from `[prices]`).
    pub saved_usd: f64,
    /// The model that produced the answer a hit served.
    pub model: Option<String>,
    /// `None` if the route has no semantic stage.
    pub semantic: Option<SemanticOutcome>,
    pub similarity: Option<f32>,
    /// `calibrated`: the probability the model gave the entry that answered.
    pub score: Option<f32>,
    /// The semantic entry that answered (`x-reprise-cache-entry`, named by feedback).
    pub entry: Option<String>,
}

impl CacheReport {
    pub fn is_hit(&self) -> bool {
        self.age.is_some()
    }
}

pub enum CacheLookup {
    /// Served from the cache, whole or replayed as a stream as the request wants; `check` is set
    /// when the upstream is also to be asked behind the answer (semantic verification).
    Hit {
        reply: ChatReply,
        check: Option<UpstreamCheck>,
    },
    Miss(PendingWrite),
}

impl CacheLookup {
    fn hit(reply: ChatReply) -> Self {
        Self::Hit { reply, check: None }
    }
}

/// A served semantic hit to compare with the upstream's own answer to the same request.
pub struct UpstreamCheck {
    cache: SemanticCache,
    check: HitCheck,
}

impl UpstreamCheck {
    /// Hands the upstream's answer to the entry it is compared with.
    pub fn compare(self, response: &Value) {
        self.cache.observe(self.check.probe, response);
    }
}

/// A miss's promise to store the upstream's answer, and to hand it to identical requests
/// waiting on this one. Dropped unused (an upstream failure, a client gone), it stores nothing
/// and releases the waiting requests to go upstream themselves.
pub struct PendingWrite {
    write: Option<Box<Write>>,
    leader: Option<Leader>,
}

struct Write {
    exact: ExactCache,
    plan: Plan,
    semantic: Option<(SemanticCache, SemanticPlan, Arc<Embedded>)>,
    /// A cached answer the upstream's is compared with (semantic verification).
    probe: Option<(SemanticCache, Probe)>,
}

impl Write {
    fn store(self, target: &str, response: Answer, leader: Option<Leader>) {
        // An answer too large to keep is still compared with a probed entry; its flight leader,
        // dropped unpublished, sends waiting twins upstream themselves.
        let too_large = self.exact.too_large(&response);
        if let Some((cache, plan, query)) = &self.semantic
            && !too_large
        {
            let learnt = self
                .probe
                .as_ref()
                .and_then(|(_, probe)| learnt_cutoff(probe, response.value()));
            cache.store_behind(plan, Arc::clone(query), target, response.value(), learnt);
        }
        if let Some((cache, probe)) = self.probe {
            cache.observe(probe, response.value());
        }
        if !too_large {
            self.exact
                .store_behind(&self.plan, target, response, leader);
        }
    }
}

impl PendingWrite {
    fn none() -> Self {
        Self {
            write: None,
            leader: None,
        }
    }

    /// Whether the answer will be stored: a stored stream needs its usage chunk.
    pub fn stores(&self) -> bool {
        self.write.is_some()
    }

    /// Stores a whole answer off the response path.
    pub fn store(self, target: &str, response: &Answer) {
        if let Some(write) = self.write {
            write.store(target, response.clone(), self.leader);
        }
    }

    /// Forwards a live stream while assembling it; only a stream that ended normally is stored.
    /// A client that disconnects drops the stream, and nothing is stored. With `strip_usage`,
    /// the usage chunk the cache asked for is not forwarded.
    pub fn tee(self, mut stream: ChunkStream, target: String, strip_usage: bool) -> ChunkStream {
        let Some(write) = self.write else {
            return stream;
        };
        let leader = self.leader;
        Box::pin(async_stream::stream! {
            let mut assembler = StreamAssembler::default();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => {
                        assembler.push(&chunk);
                        if strip_usage && is_usage_only_chunk(&chunk) {
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
            write.store(&target, Answer::from_value(assembler.finish()), leader);
        })
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

/// What an admin purge removes: narrowed by tenant, route, namespace, or one key, or everything
/// with an explicit `all`. An empty selector is refused rather than read as "everything".
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeSelector {
    #[serde(default)]
    pub all: bool,
    pub tenant: Option<String>,
    pub route: Option<String>,
    pub namespace: Option<String>,
    pub key: Option<String>,
}

pub struct CacheStage {
    /// `None` when no route caches: the stage then only reports "no cache".
    exact: Option<ExactCache>,
    semantic: Option<SemanticCache>,
    policies: HashMap<String, CachePolicy>,
    counters: CacheCounters,
    tenants: Vec<String>,
    /// Models of cached routes without a price: the stats say their savings are not counted.
    unpriced: std::collections::BTreeMap<String, Vec<String>>,
}

impl CacheStage {
    /// The stage `config` describes. `store` is `None` when nothing keeps data, and then no
    /// route may cache (the pipeline opens a store whenever one does).
    pub fn from_config(
        config: &Config,
        store: Option<Arc<dyn Store>>,
        metrics: Arc<Metrics>,
        prices: Arc<PriceTable>,
    ) -> anyhow::Result<Self> {
        let policies = Self::policies(config);
        let mut semantic = None;
        let exact = match store {
            Some(store) if policies.values().any(|p| p.enabled) => {
                if policies.values().any(|p| p.semantic.is_some()) {
                    semantic = Some(start_semantic(
                        &config.semantic,
                        Arc::clone(&store),
                        Arc::clone(&metrics),
                    )?);
                }
                Some(ExactCache::new(
                    store,
                    Arc::clone(&metrics),
                    config.cache.max_entry_bytes,
                ))
            }
            _ => None,
        };
        let mut tenants: Vec<String> = config.auth.keys.iter().map(|k| k.tenant.clone()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        Ok(Self {
            exact,
            semantic,
            policies,
            counters: CacheCounters::new(metrics, prices),
            tenants,
            unpriced: config.unpriced_cached_models(),
        })
    }

    /// Each route's cache policy, its own settings over `[cache]`'s.
    pub fn policies(config: &Config) -> HashMap<String, CachePolicy> {
        let defaults = config.cache.defaults();
        config
            .routes
            .iter()
            .map(|(name, route)| (name.clone(), route.cache.resolve(&defaults)))
            .collect()
    }

    /// An answer from the cache, or the promise to store the upstream's. `wait` bounds how long
    /// this request waits for an identical one already being answered.
    pub async fn lookup(
        &self,
        scope: &CacheScope<'_>,
        request: &ChatRequest,
        wait: Duration,
        report: &mut CacheReport,
    ) -> CacheLookup {
        let (Some(exact), Some(policy)) = (&self.exact, self.policies.get(scope.route)) else {
            return CacheLookup::Miss(PendingWrite::none());
        };
        let plan = match exact.plan(policy, scope, request) {
            Ok(plan) => plan,
            Err(status) => {
                if policy.semantic.is_some() && self.semantic.is_some() {
                    report.semantic = Some(SemanticOutcome::Skipped(SkipReason::Bypass));
                }
                if let Some(status) = status {
                    report.status = Some(status);
                    self.counters
                        .record(scope.tenant, scope.route, status, None);
                }
                return CacheLookup::Miss(PendingWrite::none());
            }
        };
        report.key = Some(plan.key_hex.clone());
        let semantic_plan = self.semantic_plan(policy, &plan, scope, request, report);
        if plan.mode.read()
            && let Some(stored) = exact.get(&plan).await
        {
            report.age = Some(stored.age);
            let reply = self.answer(
                scope,
                request,
                stored.answer,
                Some(&stored.target),
                CacheStatus::Hit,
                report,
            );
            return CacheLookup::hit(reply);
        }
        let mut query = None;
        let mut probe = None;
        if let (Some(semantic_plan), Some(semantic)) = (&semantic_plan, &self.semantic) {
            match semantic.lookup(semantic_plan).await {
                Lookup::Hit(mut hit) => {
                    semantic.remember(semantic_plan, hit.basis, Some(&hit));
                    let check = hit
                        .check
                        .take()
                        .zip(self.semantic.clone())
                        .map(|(check, cache)| UpstreamCheck { cache, check });
                    report.semantic = Some(hit.basis);
                    report.similarity = Some(hit.similarity);
                    report.score = hit.score;
                    report.entry = Some(hit.entry);
                    report.age = Some(hit.age);
                    let reply = self.answer(
                        scope,
                        request,
                        Answer::from_value(hit.response),
                        Some(&hit.target),
                        CacheStatus::SemanticHit,
                        report,
                    );
                    return CacheLookup::Hit { reply, check };
                }
                Lookup::Miss {
                    outcome,
                    query: computed,
                    probe: to_compare,
                } => {
                    semantic.remember(semantic_plan, outcome, None);
                    report.semantic = Some(outcome);
                    query = computed;
                    probe = to_compare.zip(self.semantic.clone()).map(|(p, c)| (c, p));
                }
            }
        }
        let mut leader = None;
        match exact.join_flight(&plan) {
            Some(Joined::Leader(flight)) => leader = Some(flight),
            Some(Joined::Follower(follower)) => {
                // An identical request is being answered: wait for it instead of paying twice.
                if let Ok(Some(answer)) = tokio::time::timeout(wait, follower.answer()).await {
                    report.age = Some(Duration::ZERO);
                    let reply = self.answer(scope, request, answer, None, CacheStatus::Hit, report);
                    return CacheLookup::hit(reply);
                }
            }
            None => {}
        }
        let status = plan.status_without_hit();
        report.status = Some(status);
        self.counters
            .record(scope.tenant, scope.route, status, None);
        let write = plan.mode.write().then(|| {
            Box::new(Write {
                exact: exact.clone(),
                semantic: semantic_plan
                    .zip(query)
                    .zip(self.semantic.clone())
                    .map(|((plan, query), cache)| (cache, plan, query)),
                probe,
                plan,
            })
        });
        CacheLookup::Miss(PendingWrite { write, leader })
    }

    /// Whether the semantic stage runs for this request; `report` records why not.
    fn semantic_plan(
        &self,
        policy: &CachePolicy,
        exact: &Plan,
        scope: &CacheScope<'_>,
        request: &ChatRequest,
        report: &mut CacheReport,
    ) -> Option<SemanticPlan> {
        let semantic = self.semantic.as_ref()?;
        let semantic_policy = policy.semantic.as_ref()?;
        match semantic.plan(policy, semantic_policy, exact.mode, scope, request) {
            Ok(plan) => Some(plan),
            Err(reason) => {
                report.semantic = Some(SemanticOutcome::Skipped(reason));
                None
            }
        }
    }

    /// A stored (or coalesced) answer, whole or replayed as a stream as the request wants.
    fn answer(
        &self,
        scope: &CacheScope<'_>,
        request: &ChatRequest,
        response: Answer,
        target: Option<&str>,
        status: CacheStatus,
        report: &mut CacheReport,
    ) -> ChatReply {
        let facts = response.facts();
        let (prompt_tokens, completion_tokens) = facts.tokens();
        report.status = Some(status);
        report.tokens_saved = prompt_tokens + completion_tokens;
        report.saved_usd =
            self.counters
                .record(scope.tenant, scope.route, status, Some((facts, target)));
        report.model = target
            .map(|t| t.split_once('/').map_or(t, |(_, model)| model).to_owned())
            .or_else(|| facts.model.clone());
        if request.wants_stream() {
            let chunks = replay_chunks(response.value(), request.wants_usage_in_stream());
            ChatReply::Stream(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok))))
        } else {
            ChatReply::Complete(response)
        }
    }

    /// A client's verdict on a semantic hit (`POST /v1/cache/feedback`).
    pub async fn feedback(
        &self,
        tenant: &str,
        entry: &str,
        similarity: Option<f32>,
        correct: bool,
    ) -> Result<FeedbackOutcome, ApiError> {
        let semantic = self.semantic.as_ref().ok_or_else(|| {
            ApiError::invalid("no route has the semantic cache enabled", Some("entry"))
        })?;
        semantic.feedback(tenant, entry, similarity, correct).await
    }

    /// The semantic stage's recent hits and refusals on this replica (empty without one).
    pub fn semantic_reviews(&self, tenant: Option<&str>, limit: usize) -> Vec<Value> {
        self.semantic.as_ref().map_or_else(Vec::new, |semantic| {
            semantic
                .reviews(tenant, limit)
                .iter()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect()
        })
    }

    /// The semantic index's state, for the admin API: `None` without a semantic stage.
    pub fn semantic_status(&self) -> Option<Value> {
        let semantic = self.semantic.as_ref()?;
        Some(serde_json::json!({
            "loaded": semantic.loaded().is_some(),
            "loaded_at_startup": semantic.loaded(),
            "indexed_entries": semantic.indexed(),
            "embedded_texts": semantic.embedded_texts(),
        }))
    }

    fn store(&self) -> Result<&dyn Store, ApiError> {
        self.exact
            .as_ref()
            .map(ExactCache::store)
            .ok_or_else(|| ApiError::invalid("no route has the cache enabled", None))
    }

    fn cached_routes(&self) -> Vec<&str> {
        let mut routes: Vec<&str> = self
            .policies
            .iter()
            .filter(|(_, p)| p.enabled)
            .map(|(name, _)| name.as_str())
            .collect();
        routes.sort_unstable();
        routes
    }

    pub async fn stats(&self) -> Result<Vec<CacheStatsRow>, ApiError> {
        let store = self.store()?;
        let mut rows = Vec::new();
        for tenant in &self.tenants {
            for route in self.cached_routes() {
                let entries = store
                    .count_prefix(&prefix(Some(tenant), Some(route), None))
                    .await
                    .ok();
                let semantic_entries =
                    match self.policies.get(route).and_then(|p| p.semantic.as_ref()) {
                        Some(_) => store
                            .count_prefix(&super::semantic::prefix(Some(tenant), Some(route), None))
                            .await
                            .ok(),
                        None => None,
                    };
                let counters = self.counters.get(tenant, route);
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

    /// Models whose hits `cost_saved_usd` counts as free, for want of a `[prices]` entry, with
    /// the cached routes that use them.
    pub fn unpriced_models(&self) -> &std::collections::BTreeMap<String, Vec<String>> {
        &self.unpriced
    }

    /// Removes cache entries, exact and semantic; how many.
    pub async fn purge(&self, selector: PurgeSelector) -> Result<u64, ApiError> {
        let narrowed = selector.tenant.is_some()
            || selector.route.is_some()
            || selector.namespace.is_some()
            || selector.key.is_some();
        match (selector.all, narrowed) {
            (false, false) => {
                return Err(ApiError::invalid(
                    "say what to purge: tenant, route, namespace or key, or {\"all\": true} for every tenant's entries",
                    None,
                ));
            }
            (true, true) => {
                return Err(ApiError::invalid(
                    "\"all\" purges everything and cannot be combined with a selector",
                    Some("all"),
                ));
            }
            _ => {}
        }
        let store = self.store()?;
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
        let unavailable = |e: StoreError| ApiError::CacheUnavailable(e.to_string());
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
                .delete(&entry_path(tenant, route, namespace, key))
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
                    prefix(*tenant, *route, namespace),
                    super::semantic::prefix(*tenant, *route, namespace),
                ] {
                    removed += store.delete_prefix(&prefix).await.map_err(unavailable)?;
                }
            }
        }
        Ok(removed)
    }
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
    let judge = judge_from_config(config, &embedder)
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
    Ok(SemanticCache::start(
        embedder,
        judge,
        store,
        metrics,
        SemanticSettings {
            candidates: config.candidates,
            verification: Verification::new(
                config.verify_share,
                config.verify_band,
                config.verify_max_error(),
            ),
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
