//! `[prompts]`: the versioned prompt store; off without this section.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

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
    /// How experiments on rollouts gather their evidence and act on it.
    #[serde(default)]
    pub experiments: ExperimentsConfig,
}

/// `[prompts.experiments]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentsConfig {
    /// How often each replica runs the experiments' tests and acts on a conclusive one. The
    /// tests stay valid however often they are checked; this only sets how soon a decision
    /// follows the evidence.
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub check_interval: Duration,
    /// How often each replica writes its counts to the shared store (a crash loses at most
    /// this much of the counts, never a feedback report).
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
}

impl Default for ExperimentsConfig {
    fn default() -> Self {
        Self {
            check_interval: default_check_interval(),
            flush_interval: default_flush_interval(),
        }
    }
}

fn default_check_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_prompts_dir() -> PathBuf {
    "prompts".into()
}
fn default_prompt_sync() -> Duration {
    Duration::from_millis(250)
}

impl PromptsConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        if self.sync_interval.is_zero() {
            return Err(FieldError::new("prompts.sync_interval", "must be above 0"));
        }
        if self.experiments.check_interval < Duration::from_millis(10) {
            return Err(FieldError::new(
                "prompts.experiments.check_interval",
                "must be at least 10ms",
            ));
        }
        if self.experiments.flush_interval < Duration::from_millis(10) {
            return Err(FieldError::new(
                "prompts.experiments.flush_interval",
                "must be at least 10ms",
            ));
        }
        Ok(())
    }
}

/// `[feedback]`: the metrics clients report on prompt requests (`POST /v1/feedback`); off
/// without this section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    #[serde(default)]
    pub metrics: std::collections::BTreeMap<String, MetricConfig>,
    /// How long a request can still be scored, and its feedback kept.
    #[serde(default = "default_feedback_retention", with = "humantime_serde")]
    pub retention: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    #[serde(rename = "type")]
    pub kind: MetricKind,
    /// Whether a larger value is the better outcome (a success, a rating).
    #[serde(default = "default_true")]
    pub higher_is_better: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    Boolean,
    Number,
}

fn default_true() -> bool {
    true
}
fn default_feedback_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}

impl FeedbackConfig {
    pub(super) fn validate(&self, has_prompts: bool) -> Result<(), FieldError> {
        if !has_prompts {
            return Err(FieldError::new(
                "feedback",
                "scores prompt requests, so it needs [prompts]",
            ));
        }
        if self.metrics.is_empty() {
            return Err(FieldError::new(
                "feedback.metrics",
                "declare at least one metric",
            ));
        }
        for name in self.metrics.keys() {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !valid {
                return Err(FieldError::new(
                    format!("feedback.metrics.{name}"),
                    "a metric name is 1-64 letters, digits, `_`, `-` or `.`",
                ));
            }
        }
        if self.retention < Duration::from_secs(1) {
            return Err(FieldError::new("feedback.retention", "must be at least 1s"));
        }
        Ok(())
    }
}
