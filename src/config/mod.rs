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

mod auth;
mod cache;
mod env;
mod prompts;
mod providers;
mod routes;
mod semantic;
mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

pub use auth::{AuthConfig, KeysConfig, LimitsConfig, TenantConfig, VirtualKeyConfig};
pub use cache::{
    CacheConfig, CachePolicy, DEFAULT_SEMANTIC_THRESHOLD, RouteCacheConfig, SemanticPolicy,
    StoreKind,
};
pub use prompts::{ExperimentsConfig, FeedbackConfig, MetricConfig, MetricKind, PromptsConfig};
pub use providers::{ProviderConfig, ProviderKind};
pub use routes::{BreakerConfig, RetryConfig, RouteConfig, Strategy, TargetConfig, TimeoutConfig};
pub use semantic::{SemanticConfig, VerifierKind};
pub use server::{
    LogConfig, LogFormat, MetricsConfig, OtlpConfig, PayloadConfig, RequestLogConfig, ServerConfig,
};

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

/// A value that is well-formed but wrong, with the dotted path of its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// One record per API request, on this replica; off without this section.
    pub request_log: Option<RequestLogConfig>,
    /// Spans to an OpenTelemetry collector; off without this section.
    pub otlp: Option<OtlpConfig>,
    pub auth: AuthConfig,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub semantic: SemanticConfig,
    /// The versioned prompt store; off without this section.
    pub prompts: Option<PromptsConfig>,
    /// Metrics clients report on prompt requests; off without this section.
    pub feedback: Option<FeedbackConfig>,
    /// Gateway keys made at run time; off without this section.
    pub keys: Option<KeysConfig>,
    /// Limits per tenant.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// How limits and budgets hold what a request takes.
    #[serde(default)]
    pub limits: LimitsConfig,
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
        env::substitute_env(&mut value, &mut String::new(), env)
            .map_err(|(field, message)| field_error(field, message))?;
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            field_error(field, e.into_inner().to_string())
        })?;
        config
            .validate()
            .map_err(|e| field_error(e.field, e.message))?;
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
        let unpriced = self.unpriced_cached_models();
        for (model, routes) in unpriced {
            warnings.push(format!(
                "model {model} (cached on route {}) has no [prices] entry: its cache hits count \
                 as saving $0 in cost_saved_usd",
                routes.join(", ")
            ));
        }
        warnings
    }

    /// Models that cached routes send to but `[prices]` does not price (the demo's echo aside),
    /// with those routes: their hits are counted as saving nothing.
    pub fn unpriced_cached_models(&self) -> BTreeMap<String, Vec<String>> {
        let defaults = self.cache.defaults();
        let mut unpriced = BTreeMap::<String, Vec<String>>::new();
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
                    unpriced
                        .entry(target.model.clone())
                        .or_default()
                        .push(name.clone());
                }
            }
        }
        unpriced
    }

    /// Each section checks itself; what spans sections (a route naming a provider, a route's
    /// cache policy over `[cache]`) is checked by the section that holds the reference.
    fn validate(&self) -> Result<(), FieldError> {
        self.server.validate()?;
        self.log.validate()?;
        self.metrics.validate(&self.server)?;
        if let Some(keys) = &self.keys {
            keys.validate()?;
        }
        for (name, tenant) in &self.tenants {
            tenant.validate(name)?;
        }
        self.limits.validate()?;
        if let Some(log) = &self.request_log {
            log.validate(self.routes.keys().map(String::as_str))?;
        }
        if let Some(otlp) = &self.otlp {
            otlp.validate()?;
        }
        self.auth.validate()?;
        self.breaker.validate()?;
        self.cache.validate(
            self.routes
                .iter()
                .map(|(name, r)| (name.as_str(), &r.cache)),
        )?;
        self.semantic.validate()?;
        if let Some(prompts) = &self.prompts {
            prompts.validate()?;
        }
        if let Some(feedback) = &self.feedback {
            feedback.validate(self.prompts.is_some())?;
        }
        for (model, price) in &self.prices {
            if !(price.input >= 0.0 && price.output >= 0.0) {
                return Err(FieldError::new(
                    format!("prices.{model}"),
                    "prices must not be negative",
                ));
            }
        }
        for (name, provider) in &self.providers {
            provider.validate(name)?;
        }
        if self.routes.is_empty() {
            return Err(FieldError::new("routes", "at least one route is needed"));
        }
        for (name, route) in &self.routes {
            route.validate(name, &self.providers)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::env::expand;
    use super::*;
    use std::time::Duration;

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
    fn the_embedded_stores_earlier_name_still_means_it() {
        for name in ["embedded", "sled"] {
            let text = format!("{MINIMAL}\n[cache]\nstore = \"{name}\"\n");
            let config = Config::from_toml_str(&text, "t.toml", &env).unwrap();
            assert_eq!(config.cache.store, StoreKind::Embedded, "{name}");
        }
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
        assert_eq!(semantic.threshold, Some(0.9));
        assert!(!semantic.with_tools);
        // Unset, the route follows `[semantic]`'s answer agreement.
        assert_eq!(semantic.answer_agreement, None);
        assert_eq!(semantic.agreement_similarity, None);
        assert_eq!(config.semantic.verifier, VerifierKind::Calibrated);
        assert_eq!(config.semantic.max_false_hit_rate, 0.01);
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
                "[semantic]\nmax_false_hit_rate = 0\n[routes.chat]",
                "semantic.max_false_hit_rate",
            ),
            (
                "[semantic]\nmax_false_hit_rate = 1.5\n[routes.chat]",
                "semantic.max_false_hit_rate",
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
