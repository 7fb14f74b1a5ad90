//! `[cache]` and `[routes.NAME.cache]`: where cached answers live, and each route's cache
//! policy (its own settings over `[cache]`'s defaults), the semantic stage's included.

use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

/// The response cache: where it lives and the defaults every route inherits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Where entries live: the `embedded` store (in `path`), or `redis`, shared by several
    /// replicas. `sled`, the embedded store's name before 2026-12, still means `embedded`.
    #[serde(default)]
    pub store: StoreKind,
    /// For `store = "redis"`: e.g. `redis://127.0.0.1:6379/0` (may come from `${REPRISE_REDIS_URL}`).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[serde(default = "default_redis_prefix")]
    pub redis_prefix: String,
    /// Directory of the embedded store.
    #[serde(default = "default_cache_path")]
    pub path: std::path::PathBuf,
    /// Memory for the embedded store's block cache and write buffers, in bytes.
    #[serde(default = "default_cache_memory_bytes")]
    pub memory_bytes: u64,
    /// Most bytes of entries the embedded store keeps; beyond it the oldest are evicted
    /// (Redis: use its own `maxmemory` policy).
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: u64,
    /// An answer larger than this (as stored) is not cached: a few multi-megabyte answers would
    /// crowd out thousands of ordinary ones and cost their size in memory on every hit.
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: usize,
    /// Defaults for every route (see [`RouteCacheConfig`]).
    pub enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    pub max_temperature: Option<f64>,
    pub cache_truncated: Option<bool>,
    pub semantic: Option<bool>,
    pub semantic_threshold: Option<f32>,
    pub semantic_max_temperature: Option<f64>,
    pub semantic_with_tools: Option<bool>,
    pub semantic_answer_agreement: Option<usize>,
    pub semantic_agreement_similarity: Option<f32>,
}

impl CacheConfig {
    pub fn defaults(&self) -> RouteCacheConfig {
        RouteCacheConfig {
            enabled: self.enabled,
            ttl: self.ttl,
            max_temperature: self.max_temperature,
            cache_truncated: self.cache_truncated,
            semantic: self.semantic,
            semantic_threshold: self.semantic_threshold,
            semantic_max_temperature: self.semantic_max_temperature,
            semantic_with_tools: self.semantic_with_tools,
            semantic_answer_agreement: self.semantic_answer_agreement,
            semantic_agreement_similarity: self.semantic_agreement_similarity,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    #[serde(alias = "sled")]
    Embedded,
    Redis,
}

fn default_redis_prefix() -> String {
    "reprise:".to_owned()
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::default(),
            redis_url: None,
            redis_prefix: default_redis_prefix(),
            path: default_cache_path(),
            memory_bytes: default_cache_memory_bytes(),
            max_bytes: default_cache_max_bytes(),
            max_entry_bytes: default_max_entry_bytes(),
            enabled: None,
            ttl: None,
            max_temperature: None,
            cache_truncated: None,
            semantic: None,
            semantic_threshold: None,
            semantic_max_temperature: None,
            semantic_with_tools: None,
            semantic_answer_agreement: None,
            semantic_agreement_similarity: None,
        }
    }
}

fn default_cache_path() -> std::path::PathBuf {
    "data/reprise".into()
}
fn default_cache_memory_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_cache_max_bytes() -> u64 {
    1024 * 1024 * 1024
}
fn default_max_entry_bytes() -> usize {
    1024 * 1024
}

/// Cache policy. In `[cache]` it sets the defaults; in `[routes.NAME.cache]` any field overrides them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    /// Serve identical requests from the exact cache (default: off).
    pub enabled: Option<bool>,
    /// How long an entry lives (default: 1 hour).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Requests with a higher temperature are not cached: their callers want variety.
    pub max_temperature: Option<f64>,
    /// Also store answers cut off by `max_tokens` (`finish_reason: length`; default: no).
    pub cache_truncated: Option<bool>,
    /// Also answer requests that mean the same as an earlier one (default: off; needs `enabled`).
    pub semantic: Option<bool>,
    /// Least cosine similarity of a semantic hit (default: `DEFAULT_SEMANTIC_THRESHOLD`, 0.80).
    pub semantic_threshold: Option<f32>,
    /// Requests with a higher `temperature` skip the semantic stage (default: 1.0).
    pub semantic_max_temperature: Option<f64>,
    /// Requests that define tools may hit semantically (default: no: a tool call's arguments
    /// come from the exact wording).
    pub semantic_with_tools: Option<bool>,
    /// This route's `semantic.answer_agreement` (default: that setting). A route held to a strict
    /// `semantic_threshold` should set 0 here: agreement answers from `agreement_similarity` up.
    pub semantic_answer_agreement: Option<usize>,
    /// This route's `semantic.agreement_similarity` (default: that setting).
    pub semantic_agreement_similarity: Option<f32>,
}

/// A similarity setting, if set, must be a cosine a match can reach.
pub(super) fn check_cosine(field: String, value: Option<f32>) -> Result<(), FieldError> {
    match value {
        Some(t) if !(t > 0.0 && t <= 1.0) => Err(FieldError::new(
            field,
            "must be in (0, 1] (a cosine similarity)",
        )),
        _ => Ok(()),
    }
}

pub(super) const ONE_AGREEING_ENTRY: &str =
    "must be 0 (off) or at least 2 (one entry cannot agree with itself)";

/// The veto chains' (`rules`, `rules+words`, `off`) threshold where a route sets none, chosen by
/// the evaluation in `eval/`.
pub const DEFAULT_SEMANTIC_THRESHOLD: f32 = 0.80;

/// A route's cache policy with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct CachePolicy {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_temperature: Option<f64>,
    pub cache_truncated: bool,
    /// `None`: the route has no semantic stage.
    pub semantic: Option<SemanticPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SemanticPolicy {
    /// The candidates' least cosine; `None`: the verifier's own (the calibrated model's floor,
    /// or [`DEFAULT_SEMANTIC_THRESHOLD`] for the veto chains).
    pub threshold: Option<f32>,
    pub max_temperature: f64,
    pub with_tools: bool,
    /// Overrides of `[semantic]`'s `answer_agreement` and `agreement_similarity`.
    pub answer_agreement: Option<usize>,
    pub agreement_similarity: Option<f32>,
}

impl RouteCacheConfig {
    pub fn resolve(&self, defaults: &RouteCacheConfig) -> CachePolicy {
        CachePolicy {
            enabled: self.enabled.or(defaults.enabled).unwrap_or(false),
            ttl: self
                .ttl
                .or(defaults.ttl)
                .unwrap_or(Duration::from_secs(3600)),
            max_temperature: self.max_temperature.or(defaults.max_temperature),
            cache_truncated: self
                .cache_truncated
                .or(defaults.cache_truncated)
                .unwrap_or(false),
            semantic: self
                .semantic
                .or(defaults.semantic)
                .unwrap_or(false)
                .then(|| SemanticPolicy {
                    threshold: self.semantic_threshold.or(defaults.semantic_threshold),
                    max_temperature: self
                        .semantic_max_temperature
                        .or(defaults.semantic_max_temperature)
                        .unwrap_or(1.0),
                    with_tools: self
                        .semantic_with_tools
                        .or(defaults.semantic_with_tools)
                        .unwrap_or(false),
                    answer_agreement: self
                        .semantic_answer_agreement
                        .or(defaults.semantic_answer_agreement),
                    agreement_similarity: self
                        .semantic_agreement_similarity
                        .or(defaults.semantic_agreement_similarity),
                }),
        }
    }
}

impl RouteCacheConfig {
    /// `field` is where this policy sits: `cache` or `routes.NAME.cache`.
    fn validate(&self, field: &str) -> Result<(), FieldError> {
        if self.ttl.is_some_and(|t| t.is_zero()) {
            return Err(FieldError::new(format!("{field}.ttl"), "must be above 0"));
        }
        for (name, value) in [
            ("max_temperature", self.max_temperature),
            ("semantic_max_temperature", self.semantic_max_temperature),
        ] {
            if value.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
                return Err(FieldError::new(
                    format!("{field}.{name}"),
                    "must be between 0 and 2",
                ));
            }
        }
        check_cosine(
            format!("{field}.semantic_threshold"),
            self.semantic_threshold,
        )?;
        check_cosine(
            format!("{field}.semantic_agreement_similarity"),
            self.semantic_agreement_similarity,
        )?;
        if self.semantic_answer_agreement == Some(1) {
            return Err(FieldError::new(
                format!("{field}.semantic_answer_agreement"),
                ONE_AGREEING_ENTRY,
            ));
        }
        Ok(())
    }
}

impl CacheConfig {
    /// `[cache]` itself, and every route's policy over it.
    pub(super) fn validate<'a>(
        &self,
        routes: impl IntoIterator<Item = (&'a str, &'a RouteCacheConfig)>,
    ) -> Result<(), FieldError> {
        let defaults = self.defaults();
        defaults.validate("cache")?;
        if self.max_bytes < 1024 * 1024 {
            return Err(FieldError::new("cache.max_bytes", "must be at least 1 MiB"));
        }
        if self.max_entry_bytes == 0 {
            return Err(FieldError::new("cache.max_entry_bytes", "must be above 0"));
        }
        if self.store == StoreKind::Redis {
            // An unset `${REPRISE_REDIS_URL:-}` expands to "": as good as absent.
            match self.redis_url.as_deref().filter(|url| !url.is_empty()) {
                None => {
                    return Err(FieldError::new(
                        "cache.redis_url",
                        "is required with store = \"redis\"",
                    ));
                }
                Some(url) if redis::Client::open(url).is_err() => {
                    return Err(FieldError::new(
                        "cache.redis_url",
                        "is not a valid redis:// URL",
                    ));
                }
                Some(_) => {}
            }
        }
        for (name, route_cache) in routes {
            let field = format!("routes.{name}.cache");
            route_cache.validate(&field)?;
            let policy = route_cache.resolve(&defaults);
            if policy.semantic.is_some() && !policy.enabled {
                return Err(FieldError::new(
                    format!("{field}.semantic"),
                    "the semantic stage needs the cache: set enabled = true",
                ));
            }
        }
        Ok(())
    }
}
