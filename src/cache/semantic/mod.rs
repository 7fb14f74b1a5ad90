//! The semantic cache stage: a request that means the same as an earlier one of the same scope
//! is answered with the earlier answer.
//!
//! A lookup embeds only the text that varies (the last user turn), searches the scope's HNSW
//! graph, and takes the most similar entry that clears three bars: the route's threshold, the
//! entry's own threshold (raised by feedback about wrong hits), and the [`Verifier`], which
//! rejects what embeddings get wrong (other numbers, times, a negation, the other side of a
//! polarity pair, other names).
//!
//! Entries live in the store (`semantic/v1/{tenant}/{route}/{namespace}/{model}/{id}`) with their
//! vector, so the in-memory index is rebuilt from the store at startup and replicas sharing a
//! Redis learn of each other's entries through the store's change feed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod calibrated;
mod features;
mod index;
mod outcome;
mod review;
mod rules;
mod verifier;
mod verify;
mod words;

pub use calibrated::{CalibratedJudge, OperatingPoint, PairVerdict, ScoreModel};
pub use features::{FEATURE_NAMES, PairFeatures, VETOES, pair_features};
pub use index::{IndexEntry, IndexParams, SemanticIndex};
pub use outcome::{Guard, SemanticOutcome, SkipReason};
pub use rules::RuleVerifier;
pub use verifier::{Chain, Rejection, Verifier};
pub use verify::{HitCheck, Probe, ProbeKind, Verification, learnt_cutoff};
use verify::{Observed, ProbedEntry};
pub use words::WordVerifier;

use super::key::{KeyScope, semantic_scope};
use super::{CacheMode, CacheScope, escape_segment, namespace_segment, now_ms};
use crate::config::{
    CachePolicy, DEFAULT_SEMANTIC_THRESHOLD, SemanticConfig, SemanticPolicy, VerifierKind,
};
use crate::embed::{EmbedError, Embedded, Embedder, MODEL_ID, PackedWords};
use crate::error::ApiError;
use crate::protocol::openai::{ChatRequest, Content, Role};
use crate::store::Store;
use crate::telemetry::Metrics;
use index::{Match, ScopeKey};
use rules::within_agreement;

const BASE: &str = "semantic/v1/";
const FEED: &str = "semantic/v1/feed";
/// A reported wrong hit raises the entry's threshold this far above the reported similarity.
const FEEDBACK_MARGIN: f32 = 0.02;
/// Above any cosine similarity: the entry never hits semantically again.
const NEVER: f32 = 1.01;
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(30);

/// How old `record` is, if it may answer `plan`'s request at `similarity`.
fn usable(
    plan: &SemanticPlan,
    record: &SemanticRecord,
    similarity: f32,
    now: u64,
) -> Result<Duration, Unusable> {
    if record.tenant != plan.tenant || record.scope != hex(&plan.scope) {
        return Err(Unusable::OutOfScope);
    }
    let age = Duration::from_millis(now.saturating_sub(record.created_at_ms));
    if plan.max_age.is_some_and(|max| age > max) {
        return Err(Unusable::TooOld);
    }
    if record.threshold.is_some_and(|t| similarity < t) {
        return Err(Unusable::Feedback);
    }
    Ok(age)
}

fn semantic_hit(
    plan: &SemanticPlan,
    candidate: &Match,
    record: SemanticRecord,
    age: Duration,
    basis: SemanticOutcome,
) -> SemanticHit {
    let id = candidate.entry.rsplit('/').next().unwrap_or_default();
    SemanticHit {
        response: record.response,
        target: record.target,
        similarity: candidate.similarity,
        score: None,
        entry: plan.public_id(id),
        entry_text: record.text,
        age,
        basis,
        check: None,
    }
}

/// The store prefix of what a purge or a count selects (see [`super::prefix_under`]).
pub fn prefix(tenant: Option<&str>, route: Option<&str>, namespace: Option<&str>) -> String {
    super::prefix_under(BASE, tenant, route, namespace)
}

/// One semantic entry as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SemanticRecord {
    pub created_at_ms: u64,
    pub ttl_secs: u64,
    pub tenant: String,
    pub route: String,
    pub namespace: String,
    /// The embedding model; vectors of another model are never compared with this one's.
    pub model: String,
    /// Hex of the scope key.
    pub scope: String,
    /// The embedded text (the last user turn), for the verifier.
    pub text: String,
    #[serde(with = "vector_base64")]
    pub vector: Vec<f32>,
    /// Raised by feedback about a wrong hit: the entry hits only above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    #[serde(default)]
    pub wrong_reports: u32,
    /// `calibrated` with verification: the entry's own cut-off, learnt from the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<f32>,
    /// The highest probability at which the upstream contradicted this entry's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disagreed_at: Option<f32>,
    /// `calibrated`: the text's words in context, from the forward pass that embedded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub words: Option<PackedWords>,
    pub target: String,
    pub response: Value,
}

impl SemanticRecord {
    fn expires_at_ms(&self) -> u64 {
        self.created_at_ms
            .saturating_add(self.ttl_secs.saturating_mul(1000))
    }
}

mod vector_base64 {
    use super::{BASE64, Engine};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(vector: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        serializer.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = BASE64.decode(text).map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom("vector bytes not a multiple of 4"));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// The semantic stage's decision for one request that may use it.
#[derive(Debug, Clone)]
pub struct SemanticPlan {
    scope: ScopeKey,
    text: String,
    threshold: f32,
    read: bool,
    write: bool,
    tenant: String,
    route: String,
    namespace: String,
    ttl: Duration,
    max_age: Option<Duration>,
    cache_truncated: bool,
    agreement: Option<Agreement>,
}

impl SemanticPlan {
    /// `{route}/{namespace}/{id}`: what `x-reprise-cache-entry` reports and feedback names.
    fn public_id(&self, id: &str) -> String {
        format!(
            "{}/{}/{id}",
            escape_segment(&self.route),
            namespace_segment(&self.namespace)
        )
    }

    fn path(&self, id: &str) -> String {
        entry_path(&self.tenant, &self.public_id(id))
    }

    /// The entry this request's answer is stored as: one per scope and text.
    fn entry_id(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.scope);
        hasher.update(self.text.as_bytes());
        hasher.finalize().to_hex().to_string()
    }
}

/// A semantic hit.
#[derive(Debug)]
pub struct SemanticHit {
    pub response: Value,
    pub target: String,
    pub similarity: f32,
    /// `calibrated`: the probability the model gave the served entry.
    pub score: Option<f32>,
    /// `{route}/{namespace}/{id}`, for `x-reprise-cache-entry` and feedback.
    pub entry: String,
    /// The text the entry was stored for, for the review.
    pub entry_text: String,
    pub age: Duration,
    /// `Hit`, or `HitAgreement` for an answer its neighbours agreed on.
    pub basis: SemanticOutcome,
    /// Set when this hit is to be checked against the upstream behind its answer.
    pub check: Option<HitCheck>,
}

pub enum Lookup {
    Hit(Box<SemanticHit>),
    /// No hit; `outcome` says why. The query embedded, if it was, lets the answer be
    /// stored without embedding twice.
    Miss {
        outcome: SemanticOutcome,
        query: Option<Arc<Embedded>>,
        /// A cached answer to compare with the upstream's, once it arrives.
        probe: Option<Probe>,
    },
}

/// What feedback did to an entry.
#[derive(Debug, Serialize)]
pub struct FeedbackOutcome {
    pub entry: String,
    /// The entry's threshold now; above 1 means it never hits semantically again.
    pub threshold: Option<f32>,
    pub wrong_reports: u32,
}

struct Shared {
    embedder: Embedder,
    index: SemanticIndex,
    judge: Judge,
    verification: Verification,
    /// The candidates' least similarity where a route sets none.
    default_threshold: f32,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    candidates: usize,
    agreement: AgreementDefaults,
    /// Set once the startup rebuild of the index finished.
    loaded: AtomicBool,
    /// Tells this process's own feed events apart from other replicas'.
    origin: u64,
    loaded_entries: AtomicU64,
    review: review::Review,
}

#[derive(Clone)]
pub struct SemanticCache {
    shared: Arc<Shared>,
}

#[derive(Serialize, Deserialize)]
struct FeedEvent {
    origin: u64,
    path: String,
}

/// A request embedded and searched for.
struct Searched {
    /// Its vector and (calibrated only) its words in context, which the features need too.
    query: Arc<Embedded>,
    matches: Vec<Match>,
    now: u64,
}

/// How candidates are judged (`semantic.verifier`).
pub enum Judge {
    /// A veto chain above the route's threshold; `None` is a plain threshold.
    Verifier(Option<Box<dyn Verifier>>),
    Calibrated(Box<CalibratedJudge>),
}

impl Judge {
    fn default_threshold(&self) -> f32 {
        match self {
            Judge::Calibrated(judge) => judge.model.min_similarity,
            Judge::Verifier(_) => DEFAULT_SEMANTIC_THRESHOLD,
        }
    }
}

/// Settings of the semantic stage that are not per route.
pub struct SemanticSettings {
    pub candidates: usize,
    pub verification: Verification,
    pub index: IndexParams,
    pub sync_interval: Duration,
    pub agreement: AgreementDefaults,
}

/// `[semantic]`'s answer agreement, which a route's cache policy may override.
#[derive(Debug, Clone, Copy)]
pub struct AgreementDefaults {
    /// 0: off.
    pub neighbours: usize,
    pub min_similarity: f32,
    /// Whether the rules (numbers, times, negation, polarity, names) still apply: off only with
    /// `verifier = "off"`.
    pub rules: bool,
}

impl AgreementDefaults {
    fn for_route(&self, policy: &SemanticPolicy) -> Option<Agreement> {
        let neighbours = policy.answer_agreement.unwrap_or(self.neighbours);
        (neighbours >= 2).then(|| Agreement {
            neighbours,
            min_similarity: policy.agreement_similarity.unwrap_or(self.min_similarity),
            rules: self.rules,
        })
    }
}

/// `semantic.answer_agreement`: a request may be answered with the answer its `neighbours`
/// nearest entries were all given, word for word, by the upstream. Each entry was a different
/// wording, so their agreement is the upstream's own evidence that it treats this neighbourhood
/// alike, which the word check (built to catch "cancel" vs "track") cannot know.
#[derive(Debug, Clone, Copy)]
pub struct Agreement {
    pub neighbours: usize,
    /// Every one of the neighbours is at least this similar to the request.
    pub min_similarity: f32,
    pub rules: bool,
}

/// Why a stored entry may not answer a request although the index returned it.
enum Unusable {
    OutOfScope,
    TooOld,
    /// Feedback raised the entry's threshold above this similarity.
    Feedback,
}

/// The digest of an answer's text, for [`Agreement`]: `None` for an answer without text.
/// A miss that carries `probe`, to be compared with the upstream's answer once it arrives; a
/// hit (by agreement among the nearest entries) as it is.
fn with_probe(lookup: Lookup, probe: Option<Probe>) -> Lookup {
    match lookup {
        Lookup::Miss { outcome, query, .. } => Lookup::Miss {
            outcome,
            query,
            probe,
        },
        hit => hit,
    }
}

fn answer_digest(response: &Value) -> Option<blake3::Hash> {
    let text = response["choices"][0]["message"]["content"]
        .as_str()?
        .trim();
    (!text.is_empty()).then(|| blake3::hash(text.as_bytes()))
}

impl SemanticCache {
    /// Starts the stage: the index is rebuilt from the store in the background (lookups miss
    /// until it is loaded), and with a shared store the change feed is followed.
    pub fn start(
        embedder: Embedder,
        judge: Judge,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        settings: SemanticSettings,
    ) -> Self {
        let shared = Arc::new(Shared {
            embedder,
            index: SemanticIndex::new(settings.index),
            default_threshold: judge.default_threshold(),
            judge,
            verification: settings.verification,
            store,
            metrics,
            candidates: settings.candidates,
            agreement: settings.agreement,
            loaded: AtomicBool::new(false),
            origin: rand::random(),
            loaded_entries: AtomicU64::new(0),
            review: review::Review::default(),
        });
        tokio::spawn(background(Arc::downgrade(&shared), settings.sync_interval));
        Self { shared }
    }

    /// Texts the embedding model has run on since start (queries, and entries written without
    /// their words): what the semantic stage costs in forward passes.
    pub fn embedded_texts(&self) -> u64 {
        self.shared.embedder.stats().texts.load(Ordering::Relaxed)
    }

    /// Whether the startup rebuild finished, and how many entries it loaded.
    pub fn loaded(&self) -> Option<u64> {
        self.shared
            .loaded
            .load(Ordering::Acquire)
            .then(|| self.shared.loaded_entries.load(Ordering::Relaxed))
    }

    /// Notes a lookup's decision for the review: a hit, or a candidate a guard refused.
    pub fn remember(
        &self,
        plan: &SemanticPlan,
        outcome: SemanticOutcome,
        hit: Option<&SemanticHit>,
    ) {
        if !(outcome.is_hit() || matches!(outcome, SemanticOutcome::Rejected(_))) {
            return;
        }
        self.shared.review.remember(review::Reviewed {
            at_ms: now_ms(),
            tenant: plan.tenant.clone(),
            route: plan.route.clone(),
            outcome: outcome.label(),
            request_text: plan.text.clone(),
            entry: hit.map(|h| h.entry.clone()),
            entry_text: hit.map(|h| h.entry_text.clone()),
            similarity: hit.map(|h| h.similarity),
            threshold: plan.threshold,
            probability: hit.and_then(|h| h.score),
            marked: None,
        });
    }

    /// The newest decisions this replica made, of one tenant or all.
    pub fn reviews(&self, tenant: Option<&str>, limit: usize) -> Vec<review::Reviewed> {
        self.shared.review.recent(tenant, limit)
    }

    /// Live entries in the index (all tenants).
    pub fn indexed(&self) -> usize {
        self.shared.index.len()
    }

    /// Whether and how a request uses the semantic stage; `Err(reason)` if it does not.
    pub fn plan(
        &self,
        policy: &CachePolicy,
        semantic: &SemanticPolicy,
        mode: CacheMode,
        scope: &CacheScope<'_>,
        request: &ChatRequest,
    ) -> Result<SemanticPlan, SkipReason> {
        let controls = scope.controls;
        if controls.no_semantic {
            return Err(SkipReason::Request);
        }
        check_eligible(semantic, request)?;
        let namespace = controls.namespace.clone().unwrap_or_default();
        let prompt = scope.prompt;
        let key_scope = KeyScope {
            tenant: scope.tenant,
            namespace: &namespace,
            route: scope.route,
            targets: scope.targets,
            prompt: prompt.map(|p| p.semantic.as_str()),
        };
        let (text, key) = match prompt {
            // A prompt without turns of the client's: the free-text variables are what varies;
            // the template and every other variable are in the scope.
            Some(prompt) if !prompt.client_turns => {
                let text = prompt.free_text.as_deref().ok_or(SkipReason::NoFreeText)?;
                if text.trim().is_empty() {
                    return Err(SkipReason::Empty);
                }
                let mut without_messages = request.clone();
                without_messages.messages.clear();
                (
                    text.to_owned(),
                    semantic_scope(&key_scope, &without_messages, MODEL_ID),
                )
            }
            _ => (
                last_user_text(request)?,
                semantic_scope(&key_scope, request, MODEL_ID),
            ),
        };
        if text.len() > self.shared.embedder.max_text_bytes() {
            return Err(SkipReason::TooLong);
        }
        Ok(SemanticPlan {
            scope: key.0,
            text,
            threshold: semantic.threshold.unwrap_or(self.shared.default_threshold),
            read: mode.read(),
            write: mode.write(),
            tenant: scope.tenant.to_owned(),
            route: scope.route.to_owned(),
            namespace,
            ttl: controls.ttl.unwrap_or(policy.ttl),
            max_age: controls.max_age,
            cache_truncated: policy.cache_truncated,
            agreement: self.shared.agreement.for_route(semantic),
        })
    }

    pub async fn lookup(&self, plan: &SemanticPlan) -> Lookup {
        let started = Instant::now();
        let shared = &self.shared;
        let verifier = match &shared.judge {
            Judge::Calibrated(judge) => return self.lookup_calibrated(plan, started, judge).await,
            Judge::Verifier(verifier) => verifier,
        };
        let Searched {
            query,
            matches,
            now,
            ..
        } = match self.embed_and_search(plan, started, false).await {
            Ok(searched) => searched,
            Err(lookup) => return lookup,
        };
        let mut outcome = SemanticOutcome::Miss;
        for candidate in matches.iter().take(shared.candidates) {
            if candidate.similarity < plan.threshold {
                break;
            }
            let Some((record, age)) = self.usable_record(plan, candidate, now, &mut outcome).await
            else {
                continue;
            };
            if let Some(verifier) = verifier
                && let Err(rejection) = verifier.verify(&plan.text, &record.text).await
            {
                tracing::debug!(
                    ?rejection,
                    similarity = candidate.similarity,
                    "semantic candidate rejected"
                );
                shared.metrics.semantic_rejected(rejection.guard().label());
                if outcome == SemanticOutcome::Miss {
                    outcome = SemanticOutcome::Rejected(rejection.guard());
                }
                continue;
            }
            self.record_outcome(plan, started, SemanticOutcome::Hit);
            return Lookup::Hit(Box::new(semantic_hit(
                plan,
                candidate,
                record,
                age,
                SemanticOutcome::Hit,
            )));
        }
        if let Some(agreement) = plan.agreement
            && let Some(hit) = self.agreed_answer(plan, &matches, now, agreement).await
        {
            self.record_outcome(plan, started, hit.basis);
            return Lookup::Hit(Box::new(hit));
        }
        self.finish(plan, started, outcome, Some(query))
    }

    /// The candidate's stored record and age, if it may answer the request at its similarity.
    /// A record gone from the store leaves the index; one that feedback bars is counted (and
    /// becomes the lookup's `outcome` if nothing was refused before it).
    async fn usable_record(
        &self,
        plan: &SemanticPlan,
        candidate: &Match,
        now: u64,
        outcome: &mut SemanticOutcome,
    ) -> Option<(SemanticRecord, Duration)> {
        let shared = &self.shared;
        let Some(record) = self.read_record(&candidate.entry).await else {
            // Purged, evicted or expired in the store: the index follows lazily.
            shared.index.remove(&plan.scope, &candidate.entry);
            return None;
        };
        match usable(plan, &record, candidate.similarity, now) {
            Ok(age) => Some((record, age)),
            Err(Unusable::Feedback) => {
                if *outcome == SemanticOutcome::Miss {
                    *outcome = SemanticOutcome::Rejected(Guard::Feedback);
                }
                shared.metrics.semantic_rejected(Guard::Feedback.label());
                None
            }
            Err(Unusable::OutOfScope) => {
                tracing::error!(entry = %candidate.entry, "semantic entry outside its scope; not served");
                None
            }
            Err(Unusable::TooOld) => None,
        }
    }

    /// The request embedded (with its words in context if `words`) and its nearest entries;
    /// `Err` is the lookup's answer when there is nothing to search with or for (the embedding
    /// queue is full, embedding failed, or the request only writes).
    async fn embed_and_search(
        &self,
        plan: &SemanticPlan,
        started: Instant,
        words: bool,
    ) -> Result<Searched, Lookup> {
        let shared = &self.shared;
        let embedded = shared
            .embedder
            .embed_in(&plan.tenant, plan.text.clone(), words)
            .await;
        let query = match embedded {
            Ok(embedded) if embedded.truncated => {
                let skipped = SemanticOutcome::Skipped(SkipReason::TooLong);
                return Err(self.finish(plan, started, skipped, None));
            }
            Ok(embedded) => Arc::new(embedded),
            Err(EmbedError::Overloaded) => {
                return Err(self.finish(plan, started, SemanticOutcome::Overloaded, None));
            }
            Err(error) => {
                tracing::warn!(%error, "embedding failed; semantic stage skipped");
                return Err(self.finish(plan, started, SemanticOutcome::Error, None));
            }
        };
        if !plan.read {
            return Err(Lookup::Miss {
                outcome: SemanticOutcome::WriteOnly,
                query: Some(query),
                probe: None,
            });
        }
        let now = now_ms();
        let wanted = plan
            .agreement
            .map_or(shared.candidates, |a| a.neighbours.max(shared.candidates));
        let matches = shared.index.search(&plan.scope, &query.vector, wanted, now);
        Ok(Searched {
            query,
            matches,
            now,
        })
    }

    /// The calibrated decision: every usable candidate above the floor is judged by the model
    /// (entries' words in context embedded together, one batch); the one of highest probability
    /// is served if it reaches the cut-off and no candidate answered differently comes within
    /// the model's rival margin of it.
    async fn lookup_calibrated(
        &self,
        plan: &SemanticPlan,
        started: Instant,
        judge: &CalibratedJudge,
    ) -> Lookup {
        let shared = &self.shared;
        let Searched {
            query,
            matches,
            now,
        } = match self.embed_and_search(plan, started, true).await {
            Ok(searched) => searched,
            Err(lookup) => return lookup,
        };
        let mut outcome = SemanticOutcome::Miss;
        let mut usable_candidates = Vec::new();
        for candidate in matches.iter().take(shared.candidates) {
            if candidate.similarity < plan.threshold {
                break;
            }
            if let Some((record, age)) =
                self.usable_record(plan, candidate, now, &mut outcome).await
            {
                usable_candidates.push((candidate, record, age));
            }
        }
        let verdicts =
            futures::future::join_all(usable_candidates.iter().map(|(candidate, record, _)| {
                judge.judge(&plan.text, &query, record, candidate.similarity)
            }))
            .await;
        let mut scored: Vec<(f32, usize)> = Vec::new();
        for (index, verdict) in verdicts.into_iter().enumerate() {
            match verdict {
                Ok(PairVerdict::Scored(probability)) => scored.push((probability, index)),
                Ok(PairVerdict::Vetoed(guard)) => {
                    shared.metrics.semantic_rejected(guard.label());
                    if outcome == SemanticOutcome::Miss {
                        outcome = SemanticOutcome::Rejected(guard);
                    }
                }
                // The entry's words could not be embedded now (a full queue): it is not judged,
                // and a miss only costs an upstream call.
                Err(_) => {}
            }
        }
        let verification = &shared.verification;
        let offset = verification.offset();
        let floor = judge.cutoff - verification.band;
        // Neighbourhoods only learn from verification; without it, no answer is hashed.
        let neighbourhoods: Vec<Option<blake3::Hash>> = usable_candidates
            .iter()
            .map(|(_, record, _)| {
                verification
                    .enabled()
                    .then(|| verify::neighbourhood(record))
                    .flatten()
            })
            .collect();
        // The model's probabilities as the upstream taught each neighbourhood; the raw ones are
        // what the neighbourhoods learn from.
        let raw = scored.clone();
        for (probability, index) in &mut scored {
            let shift = verification.neighbourhood_shift(neighbourhoods[*index]);
            *probability = verify::adjusted(*probability, shift, floor);
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let cutoffs: Vec<f32> = usable_candidates
            .iter()
            .map(|(_, record, _)| {
                (verify::entry_cutoff(record, judge.cutoff) + offset).min(verify::CLOSED)
            })
            .collect();
        let cutoff_of = |i: usize| cutoffs[i];
        let verdict = judge_scores(&scored, judge.model.rival_margin, cutoff_of, |i| {
            answer_digest(&usable_candidates[i].1.response)
        });
        // Every candidate judged near its cut-off is a labelled pair once the upstream answers.
        let observed: Vec<Observed> = raw
            .iter()
            .filter(|&&(probability, _)| probability >= floor)
            .filter_map(|&(probability, i)| {
                Some(Observed {
                    neighbourhood: neighbourhoods[i]?,
                    answer: verify::answer_key(&usable_candidates[i].1.response)?,
                    probability,
                })
            })
            .collect();
        let probe = |kind: ProbeKind, entry: Option<(f32, usize)>| Probe {
            kind,
            entry: entry.map(|(probability, index)| ProbedEntry {
                path: usable_candidates[index].0.entry.to_string(),
                probability,
                cached: usable_candidates[index].1.response.clone(),
            }),
            candidates: observed.clone(),
        };
        let miss_probe = || {
            (verification.enabled() && !observed.is_empty()).then(|| probe(ProbeKind::Miss, None))
        };
        match verdict {
            Ok((probability, index)) => {
                let check = verification.sample().map(|slot| HitCheck {
                    probe: probe(ProbeKind::Hit, Some((probability, index))),
                    _slot: slot,
                });
                let (candidate, record, age) = usable_candidates.swap_remove(index);
                self.record_outcome(plan, started, SemanticOutcome::Hit);
                let mut hit = semantic_hit(plan, candidate, record, age, SemanticOutcome::Hit);
                hit.score = Some(probability);
                hit.check = check;
                Lookup::Hit(Box::new(hit))
            }
            Err(Some(Guard::Score))
                if verification.enabled()
                    && scored
                        .first()
                        .is_some_and(|&(p, i)| p >= cutoff_of(i) - verification.band) =>
            {
                shared.metrics.semantic_rejected(Guard::Score.label());
                let outcome = SemanticOutcome::Rejected(Guard::Score);
                let near_miss = Some(probe(ProbeKind::NearMiss, Some(scored[0])));
                let lookup = self
                    .agreed_or_miss(plan, started, &matches, now, outcome, query)
                    .await;
                with_probe(lookup, near_miss)
            }
            Err(Some(guard)) => {
                shared.metrics.semantic_rejected(guard.label());
                let outcome = SemanticOutcome::Rejected(guard);
                let lookup = self
                    .agreed_or_miss(plan, started, &matches, now, outcome, query)
                    .await;
                with_probe(lookup, miss_probe())
            }
            Err(None) => {
                let lookup = self
                    .agreed_or_miss(plan, started, &matches, now, outcome, query)
                    .await;
                with_probe(lookup, miss_probe())
            }
        }
    }

    async fn agreed_or_miss(
        &self,
        plan: &SemanticPlan,
        started: Instant,
        matches: &[Match],
        now: u64,
        outcome: SemanticOutcome,
        query: Arc<Embedded>,
    ) -> Lookup {
        if let Some(agreement) = plan.agreement
            && let Some(hit) = self.agreed_answer(plan, matches, now, agreement).await
        {
            self.record_outcome(plan, started, hit.basis);
            return Lookup::Hit(Box::new(hit));
        }
        self.finish(plan, started, outcome, Some(query))
    }

    /// The answer of the nearest entry if it and the next `neighbours - 1` were all given that
    /// very answer, are all alike enough, and all pass the rules against the request.
    async fn agreed_answer(
        &self,
        plan: &SemanticPlan,
        matches: &[Match],
        now: u64,
        agreement: Agreement,
    ) -> Option<SemanticHit> {
        let neighbours = matches.get(..agreement.neighbours)?;
        if neighbours
            .iter()
            .any(|m| m.similarity < agreement.min_similarity)
        {
            return None;
        }
        let mut agreed: Option<(blake3::Hash, SemanticRecord, Duration)> = None;
        let mut texts = Vec::with_capacity(neighbours.len());
        for candidate in neighbours {
            let record = self.read_record(&candidate.entry).await?;
            let age = usable(plan, &record, candidate.similarity, now).ok()?;
            let answer = answer_digest(&record.response)?;
            // Not counted in the rejection metric: the main pass counted its candidates already.
            if agreement.rules && RuleVerifier.check(&plan.text, &record.text).is_err() {
                return None;
            }
            texts.push(record.text.clone());
            match &agreed {
                Some((digest, ..)) if *digest != answer => return None,
                Some(_) => {}
                None => agreed = Some((answer, record, age)),
            }
        }
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        if agreement.rules && !within_agreement(&plan.text, &texts) {
            return None;
        }
        let (_, record, age) = agreed?;
        Some(semantic_hit(
            plan,
            &neighbours[0],
            record,
            age,
            SemanticOutcome::HitAgreement,
        ))
    }

    fn record_outcome(&self, plan: &SemanticPlan, started: Instant, outcome: SemanticOutcome) {
        self.shared.metrics.semantic_lookup(
            &plan.tenant,
            &plan.route,
            outcome.label(),
            started.elapsed(),
        );
    }

    fn finish(
        &self,
        plan: &SemanticPlan,
        started: Instant,
        outcome: SemanticOutcome,
        query: Option<Arc<Embedded>>,
    ) -> Lookup {
        self.record_outcome(plan, started, outcome);
        Lookup::Miss {
            outcome,
            query,
            probe: None,
        }
    }

    async fn read_record(&self, path: &str) -> Option<SemanticRecord> {
        read_record(self.shared.store.as_ref(), &self.shared.metrics, path).await
    }

    /// Stores the answer as the plan's text's new entry, off the response path, with the
    /// text's words in context when the lookup computed them (so a later lookup that meets
    /// the entry needs no forward pass of its own); `cutoff` is one learnt from the upstream
    /// (see `verify.rs`).
    pub fn store_behind(
        &self,
        plan: &SemanticPlan,
        query: Arc<Embedded>,
        target: &str,
        response: &Value,
        cutoff: Option<f32>,
    ) {
        if !plan.write
            || !crate::protocol::answer::Cacheable::of_value(response).allows(plan.cache_truncated)
        {
            return;
        }
        let id = plan.entry_id();
        let path = plan.path(&id);
        let mut record = SemanticRecord {
            created_at_ms: now_ms(),
            ttl_secs: plan.ttl.as_secs().max(1),
            tenant: plan.tenant.clone(),
            route: plan.route.clone(),
            namespace: plan.namespace.clone(),
            model: MODEL_ID.to_owned(),
            scope: hex(&plan.scope),
            text: plan.text.clone(),
            vector: query.vector.clone(),
            // Packed off the response path, below.
            words: None,
            threshold: None,
            wrong_reports: 0,
            cutoff,
            disagreed_at: None,
            target: target.to_owned(),
            response: response.clone(),
        };
        let shared = Arc::clone(&self.shared);
        let scope = plan.scope;
        let ttl = plan.ttl;
        tokio::spawn(async move {
            record.words = PackedWords::pack(&query);
            let Ok(bytes) = serde_json::to_vec(&record) else {
                return;
            };
            if let Err(error) = shared.store.put(&path, bytes, Some(ttl)).await {
                tracing::warn!(%error, "semantic cache write failed");
                shared.metrics.cache_error("semantic_write");
                return;
            }
            shared
                .index
                .insert(&scope, &record.vector, &path, record.expires_at_ms());
            shared.metrics.semantic_entries(shared.index.len());
            if shared.store.is_shared() {
                let event = FeedEvent {
                    origin: shared.origin,
                    path,
                };
                if let Ok(event) = serde_json::to_vec(&event)
                    && let Err(error) = shared.store.publish(FEED, event).await
                {
                    // Other replicas still find the entry after their next restart.
                    tracing::warn!(%error, "could not tell other replicas of a semantic entry");
                }
            }
        });
    }

    /// Compares the upstream's answer with the cached ones a probe holds, off the response
    /// path, and teaches the candidates' neighbourhoods, the entry served or just missed, and
    /// (for a sampled hit) the error budget what it showed.
    pub fn observe(&self, probe: Probe, response: &Value) {
        let Judge::Calibrated(judge) = &self.shared.judge else {
            return;
        };
        let (base, band) = (judge.cutoff, self.shared.verification.band);
        let floor = base - band;
        let fresh = verify::answer_key(response);
        let entry_agreed = probe
            .entry
            .as_ref()
            .map(|entry| verify::answers_agree(&entry.cached, response));
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let verification = &shared.verification;
            for candidate in &probe.candidates {
                let agreed = fresh == Some(candidate.answer);
                verification.learn_neighbourhood(
                    candidate.neighbourhood,
                    candidate.probability,
                    agreed,
                );
            }
            let (Some(entry), Some(agreed)) = (probe.entry, entry_agreed) else {
                return;
            };
            let error = match probe.kind {
                ProbeKind::Hit => Some(verification.count_hit(agreed)),
                ProbeKind::NearMiss | ProbeKind::Miss => None,
            };
            shared.metrics.semantic_verified(
                probe.kind.label(),
                agreed,
                error,
                verification.offset(),
            );
            let store = shared.store.as_ref();
            let Some(mut record) = read_record(store, &shared.metrics, &entry.path).await else {
                return;
            };
            if !verify::learn(&mut record, entry.probability, agreed, base, floor) {
                return;
            }
            let remaining = record.expires_at_ms().saturating_sub(now_ms());
            if remaining == 0 {
                return;
            }
            if let Ok(bytes) = serde_json::to_vec(&record)
                && let Err(error) = store
                    .put(&entry.path, bytes, Some(Duration::from_millis(remaining)))
                    .await
            {
                tracing::warn!(%error, "could not record what the upstream taught an entry");
            }
        });
    }

    /// A client's verdict on a semantic hit it was served. A wrong hit raises the entry's
    /// threshold above the similarity it was served at (or, without one, stops the entry from
    /// hitting semantically at all): the entry keeps answering closer paraphrases, but no
    /// longer the neighbourhood where it was wrong.
    pub async fn feedback(
        &self,
        tenant: &str,
        entry: &str,
        similarity: Option<f32>,
        correct: bool,
    ) -> Result<FeedbackOutcome, ApiError> {
        let parts: Vec<&str> = entry.split('/').collect();
        let valid = parts.len() == 3
            && parts.iter().all(|p| !p.is_empty())
            && parts[2].len() == 64
            && parts[2].chars().all(|c| c.is_ascii_hexdigit());
        if !valid {
            return Err(ApiError::invalid(
                "entry must be the value of x-reprise-cache-entry",
                Some("entry"),
            ));
        }
        if let Some(s) = similarity
            && !(-1.0..=1.0).contains(&s)
        {
            return Err(ApiError::invalid(
                "similarity must be between -1 and 1 (x-reprise-cache-similarity)",
                Some("similarity"),
            ));
        }
        let path = entry_path(tenant, entry);
        let store = self.shared.store.as_ref();
        let unavailable = |e: crate::store::StoreError| ApiError::CacheUnavailable(e.to_string());
        let Some(mut record) = self.read_record(&path).await else {
            return Err(ApiError::NotFound {
                message: format!("no semantic cache entry {entry:?} (expired or purged?)"),
                param: Some("entry"),
            });
        };
        self.shared
            .metrics
            .semantic_feedback(if correct { "correct" } else { "wrong" });
        self.shared.review.mark(tenant, entry, correct);
        if !correct {
            let raised = similarity.map_or(NEVER, |s| (s + FEEDBACK_MARGIN).min(NEVER));
            record.threshold = Some(record.threshold.map_or(raised, |t| t.max(raised)));
            record.wrong_reports += 1;
            let remaining = record.expires_at_ms().saturating_sub(now_ms());
            if remaining > 0 {
                let bytes = serde_json::to_vec(&record)
                    .map_err(|e| ApiError::CacheUnavailable(e.to_string()))?;
                store
                    .put(&path, bytes, Some(Duration::from_millis(remaining)))
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(FeedbackOutcome {
            entry: entry.to_owned(),
            threshold: record.threshold,
            wrong_reports: record.wrong_reports,
        })
    }
}

/// Which scored candidate (probability, index; best first) is served: the best if it reaches
/// its cut-off and no candidate with another answer comes within the rival margin. `Err` names
/// the guard that refused (`None`: nothing was scored).
fn judge_scores(
    scored: &[(f32, usize)],
    rival_margin: f32,
    cutoff: impl Fn(usize) -> f32,
    answer: impl Fn(usize) -> Option<blake3::Hash>,
) -> Result<(f32, usize), Option<Guard>> {
    let Some(&(best, index)) = scored.first() else {
        return Err(None);
    };
    if best < cutoff(index) {
        return Err(Some(Guard::Score));
    }
    let served = answer(index);
    let rival = rival_margin > 0.0
        && scored[1..].iter().any(|&(probability, other)| {
            probability >= best - rival_margin && (served.is_none() || answer(other) != served)
        });
    if rival {
        return Err(Some(Guard::Ambiguous));
    }
    Ok((best, index))
}

/// How `semantic.verifier` judges candidates; `Err` names the field at fault.
pub fn judge_from_config(
    config: &SemanticConfig,
    embedder: &Embedder,
) -> Result<Judge, crate::config::FieldError> {
    if config.verifier != VerifierKind::Calibrated {
        return Ok(Judge::Verifier(verifier_from_config(config, embedder)));
    }
    let model = match &config.model {
        Some(path) => ScoreModel::from_file(path),
        None => ScoreModel::shipped(),
    }
    .map_err(|e| crate::config::FieldError::new("semantic.model", e))?;
    let mut model = model;
    if let Some(margin) = config.rival_margin {
        model.rival_margin = margin;
    }
    Ok(Judge::Calibrated(Box::new(CalibratedJudge::new(
        model,
        config.max_false_hit_rate,
        embedder.clone(),
        config.cached_entries,
    ))))
}

/// The verifier `semantic.verifier` names; `None` for `off` (a plain threshold) and for
/// `calibrated`, which is not a veto chain (see [`judge_from_config`]).
pub fn verifier_from_config(
    config: &SemanticConfig,
    embedder: &Embedder,
) -> Option<Box<dyn Verifier>> {
    match config.verifier {
        VerifierKind::Rules => Some(Box::new(RuleVerifier)),
        VerifierKind::RulesAndWords => Some(Box::new(Chain(vec![
            Box::new(RuleVerifier),
            Box::new(WordVerifier::new(
                embedder.clone(),
                config.word_similarity,
                config.cached_words,
            )),
        ]))),
        VerifierKind::Off | VerifierKind::Calibrated => None,
    }
}

async fn read_record(store: &dyn Store, metrics: &Metrics, path: &str) -> Option<SemanticRecord> {
    let bytes = match store.get(path).await {
        Ok(bytes) => bytes?,
        Err(error) => {
            tracing::warn!(%error, "semantic cache lookup failed");
            metrics.cache_error("semantic_lookup");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(record) => Some(record),
        Err(error) => {
            tracing::warn!(%error, path, "unreadable semantic cache entry; ignored");
            metrics.cache_error("corrupt_entry");
            None
        }
    }
}

/// The store key of a tenant's entry `{route}/{namespace}/{id}`.
fn entry_path(tenant: &str, public_id: &str) -> String {
    let (scope, id) = public_id.rsplit_once('/').unwrap_or(("", public_id));
    format!("{BASE}{tenant}/{scope}/{MODEL_ID}/{id}")
}

fn hex(bytes: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*bytes).to_hex().to_string()
}

fn scope_from_hex(text: &str) -> Option<ScopeKey> {
    blake3::Hash::from_hex(text).ok().map(|h| *h.as_bytes())
}

/// The request-wide reasons not to answer semantically.
fn check_eligible(policy: &SemanticPolicy, request: &ChatRequest) -> Result<(), SkipReason> {
    if request
        .temperature
        .is_some_and(|t| t > policy.max_temperature)
    {
        return Err(SkipReason::Temperature);
    }
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) && !policy.with_tools {
        return Err(SkipReason::Tools);
    }
    if request
        .messages
        .iter()
        .any(|m| m.role == Role::Tool || m.role == Role::Function || m.tool_calls.is_some())
    {
        return Err(SkipReason::ToolCalls);
    }
    Ok(())
}

/// The text of the last turn, which must be the user's and text only.
fn last_user_text(request: &ChatRequest) -> Result<String, SkipReason> {
    let Some(last) = request.messages.last() else {
        return Err(SkipReason::NoUserTurn);
    };
    if last.role != Role::User {
        return Err(SkipReason::NoUserTurn);
    }
    let text = match &last.content {
        Some(Content::Text(text)) => text.clone(),
        Some(Content::Parts(parts)) => {
            // Images, audio and files are not embedded: a text-only match could hand one
            // picture's description to another.
            if parts
                .iter()
                .any(|p| p.get("type").and_then(Value::as_str) != Some("text"))
            {
                return Err(SkipReason::NonText);
            }
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        }
        None => return Err(SkipReason::NoUserTurn),
    };
    if text.trim().is_empty() {
        return Err(SkipReason::Empty);
    }
    Ok(text)
}

/// Loads the index from the store, then (with a shared store) follows the change feed, and
/// keeps the index tidy; ends when the cache is dropped.
async fn background(shared: Weak<Shared>, sync_interval: Duration) {
    let Some(cache) = shared.upgrade() else {
        return;
    };
    // The feed position is taken before the scan, so an entry written during the scan is seen
    // by one or the other (twice is harmless).
    let mut cursor = if cache.store.is_shared() {
        match cache.store.read_feed(FEED, None, 0).await {
            Ok(page) => Some(page.cursor),
            Err(error) => {
                tracing::warn!(%error, "semantic cache: cannot read the change feed yet");
                None
            }
        }
    } else {
        None
    };
    let loaded = rebuild(&cache).await;
    cache.loaded_entries.store(loaded, Ordering::Relaxed);
    cache.loaded.store(true, Ordering::Release);
    cache.metrics.semantic_entries(cache.index.len());
    tracing::info!(entries = loaded, "semantic cache index loaded");
    let shared_store = cache.store.is_shared();
    drop(cache);
    // Without a feed to follow, only maintenance needs waking up for.
    let tick = if shared_store {
        sync_interval
    } else {
        MAINTENANCE_INTERVAL
    };
    let mut last_maintenance = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let Some(cache) = shared.upgrade() else {
            return;
        };
        if shared_store {
            cursor = follow_feed(&cache, cursor).await;
        }
        if last_maintenance.elapsed() >= MAINTENANCE_INTERVAL {
            last_maintenance = Instant::now();
            let worker = Arc::clone(&cache);
            let _ = tokio::task::spawn_blocking(move || worker.index.maintain(now_ms())).await;
            cache.metrics.semantic_entries(cache.index.len());
        }
    }
}

/// Loads every live entry of the store into the index; how many. The store is read first and
/// only what the index needs (vector, key, expiry) is kept; the graph is then built on the
/// blocking pool over all cores, so a large index never stalls the runtime's workers.
async fn rebuild(cache: &Arc<Shared>) -> u64 {
    let now = now_ms();
    let dimensions = cache.embedder.dimensions();
    let mut entries = Vec::new();
    let mut visit = |path: String, bytes: Vec<u8>| {
        if let Ok(record) = serde_json::from_slice::<SemanticRecord>(&bytes)
            && let Some(entry) = index_entry(path, record, now, dimensions)
        {
            entries.push(entry);
        }
    };
    if let Err(error) = cache.store.scan_prefix(BASE, &mut visit).await {
        tracing::warn!(%error, "semantic cache: cannot load entries from the store; starting empty");
    }
    index_in_background(cache, entries).await as u64
}

/// What the index needs of a stored record, if it belongs in the index at all.
fn index_entry(
    path: String,
    record: SemanticRecord,
    now: u64,
    dimensions: usize,
) -> Option<IndexEntry> {
    if record.model != MODEL_ID
        || record.expires_at_ms() <= now
        || record.vector.len() != dimensions
    {
        return None;
    }
    Some(IndexEntry {
        scope: scope_from_hex(&record.scope)?,
        expires_at_ms: record.expires_at_ms(),
        vector: record.vector,
        entry: path,
    })
}

async fn index_in_background(cache: &Arc<Shared>, entries: Vec<IndexEntry>) -> usize {
    if entries.is_empty() {
        return 0;
    }
    let worker = Arc::clone(cache);
    tokio::task::spawn_blocking(move || worker.index.insert_many(entries))
        .await
        .unwrap_or(0)
}

/// Indexes what other replicas stored since `cursor`; the cursor to continue from.
async fn follow_feed(cache: &Arc<Shared>, cursor: Option<String>) -> Option<String> {
    let page = match cache.store.read_feed(FEED, cursor.as_deref(), 1000).await {
        Ok(page) => page,
        Err(error) => {
            tracing::debug!(%error, "semantic cache: change feed unreadable; retrying");
            return cursor;
        }
    };
    let now = now_ms();
    let mut entries = Vec::new();
    for event in page.events {
        let Ok(event) = serde_json::from_slice::<FeedEvent>(&event) else {
            continue;
        };
        if event.origin == cache.origin {
            continue;
        }
        if let Some(record) = read_record(cache.store.as_ref(), &cache.metrics, &event.path).await
            && let Some(entry) = index_entry(event.path, record, now, cache.embedder.dimensions())
        {
            entries.push(entry);
        }
    }
    index_in_background(cache, entries).await;
    cache.metrics.semantic_entries(cache.index.len());
    Some(page.cursor)
}
