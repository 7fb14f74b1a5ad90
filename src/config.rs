//! Typed configuration, loaded once at startup from TOML.
//!
//! Loading runs in three steps so that every error names the field it is about:
//! 1. parse the TOML text (syntax errors carry the line and column);
//! 2. substitute `${VAR}` / `${VAR:-default}` in string values, remembering the dotted path, so a
//!    missing variable is reported as `providers.openai.api_key: environment variable ... is not set`;
//! 3. deserialize with `serde_path_to_error` (unknown fields are rejected) and check cross references
//!    (a route naming a provider that does not exist, weights of zero, empty chains, ...).
//!
//! Secrets are `SecretString`, so neither `Debug` nor the `check-config` printout can reveal them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: invalid TOML: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Field {
        file: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub semantic: SemanticConfig,
    /// The versioned prompt store; off without this section.
    pub prompts: Option<PromptsConfig>,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub routes: BTreeMap<String, RouteConfig>,
    /// USD per million tokens by model (the target's model name, or `provider/model`), to
    /// estimate what cache hits saved.
    #[serde(default)]
    pub prices: BTreeMap<String, PriceConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input: f64,
    pub output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Requests with a larger body are refused with 413 before they are parsed.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after SIGTERM before the process exits anyway.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Upper bound on requests served at once; beyond it new requests wait for a free slot.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Threads serving requests. Unset: one per core (tokio's multi-threaded scheduler). 1: a
    /// single-threaded runtime without cross-thread wake-ups: less CPU per request, and on a
    /// machine with few cores no loss of throughput (see the README's benchmark section).
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body_bytes(),
            shutdown_grace: default_shutdown_grace(),
            max_in_flight: default_max_in_flight(),
            worker_threads: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_max_in_flight() -> usize {
    10_000
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `reprise=debug,tower_http=info`; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".to_owned()
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Protects `/v1/health/providers` and later admin endpoints. Without it they answer 403.
    pub admin_key: Option<SecretString>,
    #[serde(default)]
    pub keys: Vec<VirtualKeyConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualKeyConfig {
    pub key: SecretString,
    pub tenant: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Open after this many consecutive failures.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// ... or once this share of attempts in `window` failed (with at least `min_requests`).
    #[serde(default = "default_error_ratio")]
    pub error_ratio: f64,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_breaker_window", with = "humantime_serde")]
    pub window: Duration,
    /// How long an open breaker skips its target before one probe request is let through.
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            error_ratio: default_error_ratio(),
            min_requests: default_min_requests(),
            window: default_breaker_window(),
            cooldown: default_cooldown(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_error_ratio() -> f64 {
    0.5
}
fn default_min_requests() -> u32 {
    20
}
fn default_breaker_window() -> Duration {
    Duration::from_secs(30)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(30)
}

/// The response cache: where it lives and the defaults every route inherits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Where entries live: the embedded `sled` store, or `redis`, shared by several replicas.
    #[serde(default)]
    pub store: StoreKind,
    /// For `store = "redis"`: e.g. `redis://127.0.0.1:6379/0` (may come from `${REPRISE_REDIS_URL}`).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[serde(default = "default_redis_prefix")]
    pub redis_prefix: String,
    /// Directory of the embedded (sled) store.
    #[serde(default = "default_cache_path")]
    pub path: std::path::PathBuf,
    /// Memory for the store's page cache, in bytes.
    #[serde(default = "default_cache_memory_bytes")]
    pub memory_bytes: u64,
    /// Most bytes of entries the embedded store keeps; beyond it the oldest are evicted
    /// (Redis: use its own `maxmemory` policy).
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: u64,
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
    Sled,
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

/// The prompt store (`[prompts]`). Prompts live in the same store as the cache (`[cache]`'s
/// `store`, `path`, `redis_url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptsConfig {
    /// The folder of prompt files imported at startup (one folder per prompt id).
    #[serde(default = "default_prompts_dir")]
    pub dir: PathBuf,
    /// With Redis: how often to look for prompt changes made through another replica.
    #[serde(default = "default_prompt_sync", with = "humantime_serde")]
    pub sync_interval: Duration,
}

fn default_prompts_dir() -> PathBuf {
    "prompts".into()
}
fn default_prompt_sync() -> Duration {
    Duration::from_millis(250)
}

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
    /// The verification step after the similarity threshold: `rules` (numbers, times,
    /// negation, polarity, entities, slots), `rules+words` (the rules, then every unshared
    /// content word needs a counterpart of similar meaning) or `off` (plain threshold; for
    /// evaluation).
    #[serde(default)]
    pub verifier: VerifierKind,
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
    Rules,
    #[default]
    #[serde(rename = "rules+words")]
    RulesAndWords,
    Off,
}

impl SemanticConfig {
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
    /// Least cosine similarity of a semantic hit (default: [`DEFAULT_SEMANTIC_THRESHOLD`]).
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
fn check_cosine(field: String, value: Option<f32>) -> Result<(), (String, String)> {
    match value {
        Some(t) if !(t > 0.0 && t <= 1.0) => {
            Err((field, "must be in (0, 1] (a cosine similarity)".into()))
        }
        _ => Ok(()),
    }
}

const ONE_AGREEING_ENTRY: &str =
    "must be 0 (off) or at least 2 (one entry cannot agree with itself)";

/// Chosen by the evaluation in `eval/` (see the README): the guards make a lower threshold safe.
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
    pub threshold: f32,
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
                    threshold: self
                        .semantic_threshold
                        .or(defaults.semantic_threshold)
                        .unwrap_or(DEFAULT_SEMANTIC_THRESHOLD),
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

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any server speaking OpenAI's `/chat/completions`: OpenAI, DeepSeek, Mistral, Qwen/DashScope,
    /// Gemini's and OpenRouter's OpenAI endpoints, vLLM, Ollama.
    OpenAi,
    /// Anthropic's native Messages API.
    Anthropic,
    /// The built-in demo: answers inside the gateway by echoing the last user turn (no
    /// `base_url`, no key), so a fresh install serves requests without any provider account.
    Echo,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// For `openai`, the base up to and including `/v1` (requests go to `{base_url}/chat/completions`);
    /// for `anthropic`, the host (requests go to `{base_url}/v1/messages`).
    /// Not used by `echo`.
    #[serde(default)]
    pub base_url: Option<url::Url>,
    /// Left out: the provider needs no key (a local server such as Ollama). Present but empty
    /// (an unset `${OPENAI_API_KEY:-}`): a key is missing; startup warns and the provider's
    /// targets fail over at once with "no API key configured".
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Extra headers sent upstream on every request (e.g. OpenRouter's `HTTP-Referer`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Anthropic requires `max_tokens`; used when the client sent none.
    #[serde(default = "default_anthropic_max_tokens")]
    pub default_max_tokens: u32,
    #[serde(default = "default_anthropic_version")]
    pub anthropic_version: String,
    /// TCP connect timeout; a connect failure fails over without waiting for the attempt timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

fn default_anthropic_max_tokens() -> u32 {
    4096
}
fn default_anthropic_version() -> String {
    "2023-06-01".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Try targets in the listed order.
    #[default]
    Ordered,
    /// Pick the first target at random by weight, then fall back through the rest in weighted order.
    Weighted,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub strategy: Strategy,
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    /// When set, a request still unanswered after this delay is also sent to the next target and the
    /// first answer wins. This trades money (both calls may be billed) for tail latency.
    #[serde(default, with = "humantime_serde")]
    pub hedge_after: Option<Duration>,
    #[serde(default)]
    pub cache: RouteCacheConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub provider: String,
    pub model: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts on one target (1 = no retry on the same target) before failing over to the next.
    #[serde(default = "default_attempts_per_target")]
    pub attempts_per_target: u32,
    #[serde(default = "default_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A `Retry-After` longer than this is not waited for: the request fails over instead.
    #[serde(default = "default_max_retry_after", with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Retries and hedges may add at most this share of the route's traffic (over 10 s) ...
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
    /// ... plus this many per second, so a quiet route can still retry.
    #[serde(default = "default_budget_min_per_sec")]
    pub budget_min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts_per_target: default_attempts_per_target(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
            max_retry_after: default_max_retry_after(),
            budget_ratio: default_budget_ratio(),
            budget_min_per_sec: default_budget_min_per_sec(),
        }
    }
}

fn default_attempts_per_target() -> u32 {
    2
}
fn default_backoff_base() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(2)
}
fn default_max_retry_after() -> Duration {
    Duration::from_secs(5)
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_min_per_sec() -> u32 {
    5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// One non-streaming attempt, from sending to the whole answer.
    #[serde(default = "default_attempt_timeout", with = "humantime_serde")]
    pub attempt: Duration,
    /// A streaming attempt must deliver its first token within this, or it loses to the next target.
    #[serde(default = "default_first_token_timeout", with = "humantime_serde")]
    pub first_token: Duration,
    /// Once a stream runs, the longest silence between two chunks before it is ended with an error.
    #[serde(default = "default_stream_idle_timeout", with = "humantime_serde")]
    pub stream_idle: Duration,
    /// The whole request, all retries and failovers included (for a stream: until its first token).
    #[serde(default = "default_total_timeout", with = "humantime_serde")]
    pub total: Duration,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            attempt: default_attempt_timeout(),
            first_token: default_first_token_timeout(),
            stream_idle: default_stream_idle_timeout(),
            total: default_total_timeout(),
        }
    }
}

fn default_attempt_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_first_token_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_stream_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_total_timeout() -> Duration {
    Duration::from_secs(120)
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string(), &|name| {
            std::env::var(name).ok()
        })
    }

    /// `env` is injected so tests can check substitution without touching the process environment.
    pub fn from_toml_str(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let field_error = |field: String, message: String| ConfigError::Field {
            file: file.to_owned(),
            field,
            message,
        };
        substitute_env(&mut value, &mut String::new(), env)
            .map_err(|(field, message)| field_error(field, message))?;
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            field_error(field, e.into_inner().to_string())
        })?;
        config
            .validate()
            .map_err(|(field, message)| field_error(field, message))?;
        Ok(config)
    }

    /// What is valid but probably not meant: printed at startup and by `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        use secrecy::ExposeSecret;
        let mut warnings = Vec::new();
        let development = |key: &SecretString| key.expose_secret().starts_with("reprise-dev-");
        if self.auth.keys.iter().any(|k| development(&k.key))
            || self.auth.admin_key.as_ref().is_some_and(development)
        {
            warnings.push(
                "development keys in use (reprise-dev-...): set REPRISE_API_KEY and \
                 REPRISE_ADMIN_KEY before exposing this gateway"
                    .to_owned(),
            );
        }
        warnings.extend(
            self.providers
                .iter()
                .filter(|(_, p)| {
                    p.api_key
                        .as_ref()
                        .is_some_and(|k| k.expose_secret().is_empty())
                })
                .map(|(name, _)| {
                    format!(
                        "provider {name} has no API key (providers.{name}.api_key is empty): \
                     its targets are skipped until one is set"
                    )
                }),
        );
        let defaults = self.cache.defaults();
        let mut unpriced = BTreeMap::<&str, Vec<&str>>::new();
        for (name, route) in &self.routes {
            if !route.cache.resolve(&defaults).enabled {
                continue;
            }
            for target in &route.targets {
                let priced = self.prices.contains_key(&target.model)
                    || self
                        .prices
                        .contains_key(&format!("{}/{}", target.provider, target.model));
                let demo = self
                    .providers
                    .get(&target.provider)
                    .is_some_and(|p| p.kind == ProviderKind::Echo);
                if !priced && !demo {
                    unpriced.entry(&target.model).or_default().push(name);
                }
            }
        }
        for (model, routes) in unpriced {
            warnings.push(format!(
                "model {model} (cached on route {}) has no [prices] entry: its cache hits count \
                 as saving $0 in cost_saved_usd",
                routes.join(", ")
            ));
        }
        warnings
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.server.max_body_bytes == 0 {
            return Err(("server.max_body_bytes".into(), "must be above 0".into()));
        }
        if self.server.worker_threads == Some(0) {
            return Err((
                "server.worker_threads".into(),
                "must be at least 1 (leave it out for one per core)".into(),
            ));
        }
        if self.server.max_in_flight == 0 {
            return Err(("server.max_in_flight".into(), "must be above 0".into()));
        }
        if let Some(prompts) = &self.prompts
            && prompts.sync_interval.is_zero()
        {
            return Err(("prompts.sync_interval".into(), "must be above 0".into()));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(("log.level".into(), e.to_string()));
        }
        let mut seen_tenants_by_key = std::collections::HashSet::new();
        for (i, key) in self.auth.keys.iter().enumerate() {
            use secrecy::ExposeSecret;
            if key.key.expose_secret().is_empty() {
                return Err((format!("auth.keys[{i}].key"), "must not be empty".into()));
            }
            if key.tenant.is_empty() {
                return Err((format!("auth.keys[{i}].tenant"), "must not be empty".into()));
            }
            if !seen_tenants_by_key.insert(blake3::hash(key.key.expose_secret().as_bytes())) {
                return Err((
                    format!("auth.keys[{i}].key"),
                    "the same key is listed twice".into(),
                ));
            }
        }
        if let Some(admin) = &self.auth.admin_key {
            use secrecy::ExposeSecret;
            if admin.expose_secret().is_empty() {
                return Err(("auth.admin_key".into(), "must not be empty when set".into()));
            }
        }
        let check_cache =
            |field: String, cache: &RouteCacheConfig| -> Result<(), (String, String)> {
                if cache.ttl.is_some_and(|t| t.is_zero()) {
                    return Err((format!("{field}.ttl"), "must be above 0".into()));
                }
                if cache
                    .max_temperature
                    .is_some_and(|t| !(0.0..=2.0).contains(&t))
                {
                    return Err((
                        format!("{field}.max_temperature"),
                        "must be between 0 and 2".into(),
                    ));
                }
                if cache
                    .semantic_max_temperature
                    .is_some_and(|t| !(0.0..=2.0).contains(&t))
                {
                    return Err((
                        format!("{field}.semantic_max_temperature"),
                        "must be between 0 and 2".into(),
                    ));
                }
                check_cosine(
                    format!("{field}.semantic_threshold"),
                    cache.semantic_threshold,
                )?;
                check_cosine(
                    format!("{field}.semantic_agreement_similarity"),
                    cache.semantic_agreement_similarity,
                )?;
                if cache.semantic_answer_agreement == Some(1) {
                    return Err((
                        format!("{field}.semantic_answer_agreement"),
                        ONE_AGREEING_ENTRY.into(),
                    ));
                }
                Ok(())
            };
        check_cache("cache".into(), &self.cache.defaults())?;
        if self.cache.max_bytes < 1024 * 1024 {
            return Err(("cache.max_bytes".into(), "must be at least 1 MiB".into()));
        }
        for (model, price) in &self.prices {
            if !(price.input >= 0.0 && price.output >= 0.0) {
                return Err((
                    format!("prices.{model}"),
                    "prices must not be negative".into(),
                ));
            }
        }
        if self.cache.store == StoreKind::Redis {
            match &self.cache.redis_url {
                None => {
                    return Err((
                        "cache.redis_url".into(),
                        "is required with store = \"redis\"".into(),
                    ));
                }
                Some(url) if redis::Client::open(url.as_str()).is_err() => {
                    return Err((
                        "cache.redis_url".into(),
                        "is not a valid redis:// URL".into(),
                    ));
                }
                Some(_) => {}
            }
        }
        let defaults = self.cache.defaults();
        for (name, route) in &self.routes {
            check_cache(format!("routes.{name}.cache"), &route.cache)?;
            let policy = route.cache.resolve(&defaults);
            if policy.semantic.is_some() && !policy.enabled {
                return Err((
                    format!("routes.{name}.cache.semantic"),
                    "the semantic stage needs the cache: set enabled = true".into(),
                ));
            }
        }
        let s = &self.semantic;
        for (field, value) in [
            ("queue", s.queue),
            ("max_batch", s.max_batch),
            ("intra_threads", s.intra_threads),
            ("max_length", s.max_length),
            ("candidates", s.candidates),
            ("connections", s.connections),
            ("ef_construction", s.ef_construction),
            ("ef_search", s.ef_search),
            ("max_entries", s.max_entries),
            ("cached_words", s.cached_words),
        ] {
            if value == 0 {
                return Err((format!("semantic.{field}"), "must be above 0".into()));
            }
        }
        check_cosine("semantic.word_similarity".into(), Some(s.word_similarity))?;
        check_cosine(
            "semantic.agreement_similarity".into(),
            Some(s.agreement_similarity),
        )?;
        if s.answer_agreement == 1 {
            return Err((
                "semantic.answer_agreement".into(),
                ONE_AGREEING_ENTRY.into(),
            ));
        }
        if s.sync_interval.is_zero() {
            return Err(("semantic.sync_interval".into(), "must be above 0".into()));
        }
        for (i, key) in self.auth.keys.iter().enumerate() {
            if !key
                .tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                return Err((
                    format!("auth.keys[{i}].tenant"),
                    "may contain only letters, digits and - _ . :".into(),
                ));
            }
        }
        let b = &self.breaker;
        if b.consecutive_failures == 0 {
            return Err((
                "breaker.consecutive_failures".into(),
                "must be at least 1".into(),
            ));
        }
        if !(b.error_ratio > 0.0 && b.error_ratio <= 1.0) {
            return Err(("breaker.error_ratio".into(), "must be in (0, 1]".into()));
        }
        for (name, provider) in &self.providers {
            match (&provider.base_url, provider.kind) {
                (Some(_), ProviderKind::Echo) => {
                    return Err((
                        format!("providers.{name}.base_url"),
                        "the echo provider answers inside the gateway; leave base_url out".into(),
                    ));
                }
                (None, ProviderKind::OpenAi | ProviderKind::Anthropic) => {
                    return Err((format!("providers.{name}.base_url"), "required".into()));
                }
                (Some(url), _) if url.scheme() != "http" && url.scheme() != "https" => {
                    return Err((
                        format!("providers.{name}.base_url"),
                        format!("scheme must be http or https, not {}", url.scheme()),
                    ));
                }
                _ => {}
            }
            for header in provider.headers.keys() {
                if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err((
                        format!("providers.{name}.headers"),
                        format!("{header:?} is not a valid header name"),
                    ));
                }
            }
        }
        if self.routes.is_empty() {
            return Err(("routes".into(), "at least one route is needed".into()));
        }
        for (name, route) in &self.routes {
            let at = |field: &str| format!("routes.{name}.{field}");
            if route.targets.is_empty() {
                return Err((at("targets"), "a route needs at least one target".into()));
            }
            for (i, target) in route.targets.iter().enumerate() {
                if !self.providers.contains_key(&target.provider) {
                    let known: Vec<_> = self.providers.keys().map(String::as_str).collect();
                    return Err((
                        at(&format!("targets[{i}].provider")),
                        format!(
                            "unknown provider {:?} (known: {})",
                            target.provider,
                            known.join(", ")
                        ),
                    ));
                }
                if target.model.is_empty() {
                    return Err((
                        at(&format!("targets[{i}].model")),
                        "must not be empty".into(),
                    ));
                }
                if target.weight == 0 {
                    return Err((
                        at(&format!("targets[{i}].weight")),
                        "must be at least 1".into(),
                    ));
                }
            }
            if route.retry.attempts_per_target == 0 {
                return Err((at("retry.attempts_per_target"), "must be at least 1".into()));
            }
            if !(0.0..=10.0).contains(&route.retry.budget_ratio) {
                return Err((at("retry.budget_ratio"), "must be between 0 and 10".into()));
            }
            if route.retry.backoff_base > route.retry.backoff_max {
                return Err((
                    at("retry.backoff_base"),
                    "must not exceed retry.backoff_max".into(),
                ));
            }
            let t = &route.timeouts;
            for (field, value) in [
                ("timeouts.attempt", t.attempt),
                ("timeouts.first_token", t.first_token),
                ("timeouts.stream_idle", t.stream_idle),
                ("timeouts.total", t.total),
            ] {
                if value.is_zero() {
                    return Err((at(field), "must be above 0".into()));
                }
            }
            if route.hedge_after.is_some_and(|d| d.is_zero()) {
                return Err((
                    at("hedge_after"),
                    "must be above 0 (leave it out to disable hedging)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string of the tree. `$$` stands for a literal `$`.
fn substitute_env(
    value: &mut toml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = expand(s, env).map_err(|message| (path.clone(), message))?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                substitute_env(item, path, env)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                substitute_env(item, path, env)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(input: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated ${...} reference".to_owned())?;
            let reference = &body[..end];
            let (name, default) = match reference.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (reference, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid environment variable name {name:?}"));
            }
            match (env(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!("environment variable {name} is not set"));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [auth]
        admin_key = "${ADMIN}"
        keys = [{ key = "${KEY_A}", tenant = "a" }]
        [providers.openai]
        kind = "openai"
        base_url = "http://127.0.0.1:9/v1"
        api_key = "${OPENAI_KEY:-}"
        [routes.chat]
        targets = [{ provider = "openai", model = "gpt-4o-mini" }]
    "#;

    fn env(name: &str) -> Option<String> {
        match name {
            "ADMIN" => Some("adm".into()),
            "KEY_A" => Some("key-a".into()),
            _ => None,
        }
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let config = Config::from_toml_str(MINIMAL, "t.toml", &env).unwrap();
        assert_eq!(config.routes["chat"].retry.attempts_per_target, 2);
        assert_eq!(config.server.listen.port(), 8080);
    }

    #[test]
    fn missing_env_var_names_the_field() {
        let text = MINIMAL.replace("${KEY_A}", "${NOT_SET_ANYWHERE}");
        let err = Config::from_toml_str(&text, "t.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.keys[0].key"), "{err}");
        assert!(err.contains("NOT_SET_ANYWHERE"), "{err}");
    }

    #[test]
    fn unknown_provider_in_route_names_the_target() {
        let text = MINIMAL.replace("provider = \"openai\"", "provider = \"nope\"");
        let err = Config::from_toml_str(&text, "t.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes.chat.targets[0].provider"), "{err}");
    }

    #[test]
    fn unknown_field_and_wrong_type_name_the_path() {
        let text = MINIMAL.replace("[routes.chat]", "[routes.chat]\nhedge_afterr = \"1s\"");
        let err = Config::from_toml_str(&text, "t.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes.chat"), "{err}");
        assert!(err.contains("hedge_afterr"), "{err}");

        let text = MINIMAL.replace(
            "[routes.chat]",
            "[routes.chat.retry]\nattempts_per_target = \"x\"\n[routes.chat]",
        );
        let err = Config::from_toml_str(&text, "t.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("routes.chat.retry.attempts_per_target"),
            "{err}"
        );
    }

    #[test]
    fn route_cache_settings_override_the_defaults() {
        let text = MINIMAL.replace(
            "[routes.chat]",
            "[cache]\nenabled = true\nttl = \"10m\"\n[routes.chat.cache]\nttl = \"5s\"\ncache_truncated = true\n[routes.chat]",
        );
        let config = Config::from_toml_str(&text, "t.toml", &env).unwrap();
        let policy = config.routes["chat"]
            .cache
            .resolve(&config.cache.defaults());
        assert!(policy.enabled && policy.cache_truncated);
        assert_eq!(policy.ttl, Duration::from_secs(5));
        let bad = MINIMAL.replace("[routes.chat]", "[cache]\nenabeld = true\n[routes.chat]");
        let err = Config::from_toml_str(&bad, "t.toml", &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("enabeld"), "{err}");
    }

    #[test]
    fn semantic_settings_resolve_and_bad_ones_name_the_field() {
        let text = MINIMAL.replace(
            "[routes.chat]",
            "[cache]\nenabled = true\nsemantic = true\n[routes.chat.cache]\nsemantic_threshold = 0.9\n[routes.chat]",
        );
        let config = Config::from_toml_str(&text, "t.toml", &env).unwrap();
        let policy = config.routes["chat"]
            .cache
            .resolve(&config.cache.defaults());
        let semantic = policy.semantic.unwrap();
        assert_eq!(semantic.threshold, 0.9);
        assert!(!semantic.with_tools);
        // Unset, the route follows `[semantic]`'s answer agreement.
        assert_eq!(semantic.answer_agreement, None);
        assert_eq!(semantic.agreement_similarity, None);
        assert_eq!(config.semantic.verifier, VerifierKind::RulesAndWords);
        for (change, field) in [
            (
                "[routes.chat.cache]\nsemantic = true\n[routes.chat]",
                "routes.chat.cache.semantic",
            ),
            (
                "[cache]\nenabled = true\nsemantic = true\nsemantic_threshold = 1.5\n[routes.chat]",
                "cache.semantic_threshold",
            ),
            (
                "[semantic]\ncandidates = 0\n[routes.chat]",
                "semantic.candidates",
            ),
            (
                "[semantic]\nverifier = \"maybe\"\n[routes.chat]",
                "semantic.verifier",
            ),
            (
                "[semantic]\nword_similarity = 0\n[routes.chat]",
                "semantic.word_similarity",
            ),
            (
                "[semantic]\nanswer_agreement = 1\n[routes.chat]",
                "semantic.answer_agreement",
            ),
            (
                "[semantic]\nagreement_similarity = 1.5\n[routes.chat]",
                "semantic.agreement_similarity",
            ),
            (
                "[routes.chat.cache]\nsemantic_answer_agreement = 1\n[routes.chat]",
                "routes.chat.cache.semantic_answer_agreement",
            ),
            (
                "[cache]\nsemantic_agreement_similarity = 0\n[routes.chat]",
                "cache.semantic_agreement_similarity",
            ),
        ] {
            let err =
                Config::from_toml_str(&MINIMAL.replace("[routes.chat]", change), "t.toml", &env)
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn expansion_rules() {
        let env = |n: &str| (n == "A").then(|| "x".to_owned());
        assert_eq!(expand("${A}-${B:-d}", &env).unwrap(), "x-d");
        assert_eq!(expand("$$A and $5", &env).unwrap(), "$A and $5");
        assert!(expand("${A", &env).is_err());
        assert!(expand("${A B}", &env).is_err());
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let config = Config::from_toml_str(MINIMAL, "t.toml", &env).unwrap();
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("key-a") && !debug.contains("adm\""),
            "{debug}"
        );
    }
}
