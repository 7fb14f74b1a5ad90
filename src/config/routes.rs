//! `[routes.NAME]` and `[breaker]`: each model alias's chain of targets, its retries,
//! timeouts and hedging, and the circuit breaker every target gets.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::FieldError;
use super::cache::RouteCacheConfig;
use super::providers::ProviderConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// While the target had fewer than `min_requests` attempts in `window`: open after this many
    /// consecutive failures. At any volume: open after this many refused connections in a row.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// With at least `min_requests` recent attempts: open once this share of them failed.
    #[serde(default = "default_error_ratio")]
    pub error_ratio: f64,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_breaker_window", with = "humantime_serde")]
    pub window: Duration,
    /// How long an open breaker skips its target before traffic is let through again.
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
    /// After the cool-down the target's share of traffic grows from 10% to all of it over this.
    #[serde(default = "default_recovery", with = "humantime_serde")]
    pub recovery: Duration,
    /// When no target of a route admits a request, send it to one that is open only for its error
    /// rate rather than answering 503 (Envoy's panic mode). Refused connections or credentials
    /// still rule a target out.
    #[serde(default = "default_panic")]
    pub panic: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            error_ratio: default_error_ratio(),
            min_requests: default_min_requests(),
            window: default_breaker_window(),
            cooldown: default_cooldown(),
            recovery: default_recovery(),
            panic: default_panic(),
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
fn default_recovery() -> Duration {
    Duration::from_secs(10)
}
fn default_panic() -> bool {
    true
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
    /// What a budget holds for the answer of a request that sets no `max_tokens`.
    #[serde(default = "default_reserve_output_tokens")]
    pub reserve_output_tokens: u64,
}

fn default_reserve_output_tokens() -> u64 {
    4096
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

impl BreakerConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        if self.consecutive_failures == 0 {
            return Err(FieldError::new(
                "breaker.consecutive_failures",
                "must be at least 1",
            ));
        }
        if !(self.error_ratio > 0.0 && self.error_ratio <= 1.0) {
            return Err(FieldError::new("breaker.error_ratio", "must be in (0, 1]"));
        }
        if self.min_requests == 0 {
            return Err(FieldError::new(
                "breaker.min_requests",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl RouteConfig {
    pub(super) fn validate(
        &self,
        name: &str,
        providers: &BTreeMap<String, ProviderConfig>,
    ) -> Result<(), FieldError> {
        let at = |field: &str| format!("routes.{name}.{field}");
        if self.targets.is_empty() {
            return Err(FieldError::new(
                at("targets"),
                "a route needs at least one target",
            ));
        }
        for (i, target) in self.targets.iter().enumerate() {
            if !providers.contains_key(&target.provider) {
                let known: Vec<_> = providers.keys().map(String::as_str).collect();
                return Err(FieldError::new(
                    at(&format!("targets[{i}].provider")),
                    format!(
                        "unknown provider {:?} (known: {})",
                        target.provider,
                        known.join(", ")
                    ),
                ));
            }
            if target.model.is_empty() {
                return Err(FieldError::new(
                    at(&format!("targets[{i}].model")),
                    "must not be empty",
                ));
            }
            if target.weight == 0 {
                return Err(FieldError::new(
                    at(&format!("targets[{i}].weight")),
                    "must be at least 1",
                ));
            }
        }
        let retry = &self.retry;
        if retry.attempts_per_target == 0 {
            return Err(FieldError::new(
                at("retry.attempts_per_target"),
                "must be at least 1",
            ));
        }
        if !(0.0..=10.0).contains(&retry.budget_ratio) {
            return Err(FieldError::new(
                at("retry.budget_ratio"),
                "must be between 0 and 10",
            ));
        }
        if retry.backoff_base > retry.backoff_max {
            return Err(FieldError::new(
                at("retry.backoff_base"),
                "must not exceed retry.backoff_max",
            ));
        }
        let t = &self.timeouts;
        for (field, value) in [
            ("timeouts.attempt", t.attempt),
            ("timeouts.first_token", t.first_token),
            ("timeouts.stream_idle", t.stream_idle),
            ("timeouts.total", t.total),
        ] {
            if value.is_zero() {
                return Err(FieldError::new(at(field), "must be above 0"));
            }
        }
        if self.hedge_after.is_some_and(|d| d.is_zero()) {
            return Err(FieldError::new(
                at("hedge_after"),
                "must be above 0 (leave it out to disable hedging)",
            ));
        }
        Ok(())
    }
}
