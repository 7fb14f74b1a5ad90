//! `[semantic]`: the semantic cache's embedding model, index and verifier.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::FieldError;
use super::cache::{ONE_AGREEING_ENTRY, check_cosine};

/// The semantic cache's model and index (`[semantic]`); which routes use it is cache policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemanticConfig {
    /// Holds all-MiniLM-L6-v2 as ONNX with its tokenizer files
    /// (`scripts/fetch-embedding-model.sh` puts them here).
    #[serde(default = "default_model_dir")]
    pub model_dir: PathBuf,
    /// The ONNX Runtime library, 1.24 or later (default: the one the fetch script puts in
    /// `model_dir`).
    pub onnxruntime: Option<PathBuf>,
    /// Embeddings waiting at most; beyond it the semantic stage is skipped (and counted).
    #[serde(default = "default_embed_queue")]
    pub queue: usize,
    #[serde(default = "default_embed_batch")]
    pub max_batch: usize,
    #[serde(default = "default_embed_threads")]
    pub intra_threads: usize,
    /// Tokens embedded per text; a longer last turn is truncated.
    #[serde(default = "default_embed_max_length")]
    pub max_length: usize,
    /// Nearest entries checked per lookup, best first, until one passes the guards.
    #[serde(default = "default_candidates")]
    pub candidates: usize,
    /// How a candidate is judged: `calibrated` (default: one probability from a model fitted
    /// on labelled pairs, held to `max_false_hit_rate`, after the rules' vetoes), `rules`
    /// (numbers, times, negation, polarity, entities, slots, each a veto, above the route's
    /// threshold), `rules+words` (the rules, then every unshared content word needs a
    /// counterpart of similar meaning) or `off` (plain threshold; for evaluation).
    #[serde(default)]
    pub verifier: VerifierKind,
    /// `calibrated`: the share of requests that should miss but are served which the operator
    /// accepts (wrong answers among served repeats are held to twice it). The shipped model's
    /// operating points, measured on domains held out of its fit, map it to a cut-off.
    #[serde(default = "default_max_false_hit_rate")]
    pub max_false_hit_rate: f64,
    /// `calibrated`: a model file written by `scripts/fit_semantic_model.py` instead of the one
    /// built in.
    pub model: Option<PathBuf>,
    /// `calibrated`: the best candidate is refused when another, answered differently, scored
    /// within this of it (default: the model's, 0.5). Answers are compared word for word, so a
    /// backend that writes every answer afresh sees rivals everywhere: 0 switches it off.
    pub rival_margin: Option<f32>,
    /// `calibrated`: the share of served hits also sent upstream behind the answer, to compare
    /// the fresh answer with the cached one (off by default: each costs an upstream call).
    /// Every candidate judged within `verify_band` below the cut-off or above it, on hits
    /// checked and on misses (which go upstream anyway, so at no cost), teaches its
    /// neighbourhood (the entries holding the same answer) whether the upstream answers alike,
    /// which opens or closes it. While the checked hits show, with 95% confidence, an error
    /// above `verify_max_error`, every cut-off is raised a step.
    #[serde(default)]
    pub verify_share: f64,
    #[serde(default = "default_verify_band")]
    pub verify_band: f32,
    /// Default: twice `max_false_hit_rate` (the budget for wrong answers among served repeats).
    pub verify_max_error: Option<f64>,
    /// `calibrated`: entries stored without their words in context (written by an older
    /// version) whose words are kept in memory once embedded (about 12 KiB each).
    #[serde(default = "default_cached_entries")]
    pub cached_entries: usize,
    /// `rules+words`: the cosine at which two words count as counterparts.
    #[serde(default = "default_word_similarity")]
    pub word_similarity: f32,
    /// `rules+words`: word vectors kept in memory (1.5 KiB each).
    #[serde(default = "default_cached_words")]
    pub cached_words: usize,
    /// Off (0) by default. With N >= 2: a request whose N nearest entries (each at least
    /// `agreement_similarity` alike) were all answered with the very same text is answered with
    /// it too, after the rules but without the word check or the route's threshold. It learns
    /// from the upstream which wordings it treats alike, so it suits backends whose answer is
    /// set by the intent (FAQ and support bots, templated replies); leave it off where one
    /// answer stands for many different questions (classifiers, yes/no prompts).
    #[serde(default)]
    pub answer_agreement: usize,
    #[serde(default = "default_agreement_similarity")]
    pub agreement_similarity: f32,
    /// HNSW links per node; more links, better recall, more memory.
    #[serde(default = "default_hnsw_connections")]
    pub connections: usize,
    #[serde(default = "default_hnsw_ef_construction")]
    pub ef_construction: usize,
    #[serde(default = "default_hnsw_ef_search")]
    pub ef_search: usize,
    /// Entries the in-memory index holds at most (all tenants); beyond it the oldest are
    /// dropped from the index (they stay in the store until their TTL).
    #[serde(default = "default_semantic_max_entries")]
    pub max_entries: usize,
    /// With Redis: how often entries written by other replicas are picked up.
    #[serde(default = "default_sync_interval", with = "humantime_serde")]
    pub sync_interval: Duration,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VerifierKind {
    #[default]
    Calibrated,
    Rules,
    #[serde(rename = "rules+words")]
    RulesAndWords,
    Off,
}

impl SemanticConfig {
    pub fn verify_max_error(&self) -> f64 {
        self.verify_max_error
            .unwrap_or(2.0 * self.max_false_hit_rate)
    }

    pub fn onnxruntime_path(&self) -> PathBuf {
        self.onnxruntime
            .clone()
            .unwrap_or_else(|| self.model_dir.join("libonnxruntime.so.1.32.0"))
    }
}

impl Default for SemanticConfig {
    fn default() -> Self {
        Self {
            model_dir: default_model_dir(),
            onnxruntime: None,
            queue: default_embed_queue(),
            max_batch: default_embed_batch(),
            intra_threads: default_embed_threads(),
            max_length: default_embed_max_length(),
            candidates: default_candidates(),
            verifier: VerifierKind::default(),
            max_false_hit_rate: default_max_false_hit_rate(),
            model: None,
            rival_margin: None,
            cached_entries: default_cached_entries(),
            verify_share: 0.0,
            verify_band: default_verify_band(),
            verify_max_error: None,
            word_similarity: default_word_similarity(),
            cached_words: default_cached_words(),
            answer_agreement: 0,
            agreement_similarity: default_agreement_similarity(),
            connections: default_hnsw_connections(),
            ef_construction: default_hnsw_ef_construction(),
            ef_search: default_hnsw_ef_search(),
            max_entries: default_semantic_max_entries(),
            sync_interval: default_sync_interval(),
        }
    }
}

fn default_model_dir() -> PathBuf {
    "models/all-MiniLM-L6-v2".into()
}
fn default_embed_queue() -> usize {
    256
}
fn default_embed_batch() -> usize {
    32
}
/// Two threads embed one short text in ~3.7 ms where one takes ~5.6 ms (measured on a 2-core
/// EPYC); beyond four the gain on texts this short is lost to synchronisation.
fn default_embed_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}
fn default_embed_max_length() -> usize {
    128
}
fn default_word_similarity() -> f32 {
    0.5
}
fn default_agreement_similarity() -> f32 {
    0.6
}
fn default_max_false_hit_rate() -> f64 {
    0.01
}
fn default_verify_band() -> f32 {
    0.15
}
fn default_cached_entries() -> usize {
    4096
}
fn default_cached_words() -> usize {
    20_000
}
fn default_candidates() -> usize {
    4
}
fn default_hnsw_connections() -> usize {
    16
}
fn default_hnsw_ef_construction() -> usize {
    100
}
fn default_hnsw_ef_search() -> usize {
    64
}
fn default_semantic_max_entries() -> usize {
    1_000_000
}
fn default_sync_interval() -> Duration {
    Duration::from_millis(250)
}

impl SemanticConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        for (field, value) in [
            ("queue", self.queue),
            ("max_batch", self.max_batch),
            ("intra_threads", self.intra_threads),
            ("max_length", self.max_length),
            ("candidates", self.candidates),
            ("connections", self.connections),
            ("ef_construction", self.ef_construction),
            ("ef_search", self.ef_search),
            ("max_entries", self.max_entries),
            ("cached_words", self.cached_words),
            ("cached_entries", self.cached_entries),
        ] {
            if value == 0 {
                return Err(FieldError::new(
                    format!("semantic.{field}"),
                    "must be above 0",
                ));
            }
        }
        check_cosine(
            "semantic.word_similarity".into(),
            Some(self.word_similarity),
        )?;
        check_cosine(
            "semantic.agreement_similarity".into(),
            Some(self.agreement_similarity),
        )?;
        if self.answer_agreement == 1 {
            return Err(FieldError::new(
                "semantic.answer_agreement",
                ONE_AGREEING_ENTRY,
            ));
        }
        if !(self.max_false_hit_rate > 0.0 && self.max_false_hit_rate < 1.0) {
            return Err(FieldError::new(
                "semantic.max_false_hit_rate",
                "must be above 0 and below 1 (a share of requests, 0.01 is 1%)",
            ));
        }
        if self.rival_margin.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
            return Err(FieldError::new(
                "semantic.rival_margin",
                "must be between 0 (off) and 1 (a span of probability)",
            ));
        }
        if !(0.0..=1.0).contains(&self.verify_share) {
            return Err(FieldError::new(
                "semantic.verify_share",
                "must be between 0 and 1 (a share of would-be hits)",
            ));
        }
        if !(0.0..1.0).contains(&self.verify_band) {
            return Err(FieldError::new(
                "semantic.verify_band",
                "must be at least 0 and below 1 (a span of probability)",
            ));
        }
        if !(self.verify_max_error() > 0.0 && self.verify_max_error() < 1.0) {
            return Err(FieldError::new(
                "semantic.verify_max_error",
                "must be above 0 and below 1 (a share of verified hits)",
            ));
        }
        if self.sync_interval.is_zero() {
            return Err(FieldError::new("semantic.sync_interval", "must be above 0"));
        }
        Ok(())
    }
}
