//! What an experiment on a rollout declares: its primary metric, guardrails and how sure a
//! decision must be. It is part of the rollout's label target, so starting, adjusting and undoing
//! it go through the prompt store's audited label changes; `crate::experiments` gathers its
//! evidence, runs its tests and asks the store to act on them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// Given by the gateway when the experiment starts; kept while only weights change.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    /// The feedback metric a treatment arm must beat the control (the first arm) on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// 1 - the chance of a wrong decision per test, however often the evidence is looked at.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// The smallest difference worth finding, in the metric's units (0.05 = five points of a
    /// boolean metric); it tunes the test's power toward differences of that size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_effect: Option<f64>,
    /// Samples each arm needs before a mean is compared (rate guardrails are exact and need none).
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// `auto`: a winning arm is promoted as soon as the test says so; `manual`: it waits for
    /// `POST .../experiments/{label}/promote`.
    #[serde(default)]
    pub promote: Promote,
    #[serde(default, skip_serializing_if = "Guardrails::is_empty")]
    pub guardrails: Guardrails,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Promote {
    Auto,
    #[default]
    Manual,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guardrails {
    /// Share of an arm's upstream-answered requests that may fail (status 5xx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// The arm's p95 latency bound: more than 5% of its requests slower than this breaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_latency_ms: Option<u64>,
    /// Per feedback metric, the lowest mean an arm may have (for a metric where lower is better,
    /// the highest).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metric_bounds: BTreeMap<String, f64>,
}

impl Guardrails {
    pub fn is_empty(&self) -> bool {
        self.max_error_rate.is_none()
            && self.max_p95_latency_ms.is_none()
            && self.metric_bounds.is_empty()
    }
}

fn default_confidence() -> f64 {
    0.95
}
fn default_min_samples() -> u64 {
    100
}

/// What a request served through an experiment's rollout is counted under.
#[derive(Debug)]
pub struct ExperimentTag {
    pub prompt: String,
    pub label: String,
    pub id: String,
    /// The p95 guardrail: requests slower than this count against it.
    pub slow_above: Option<Duration>,
}

/// An experiment is its prompt, label and id; the tag is what counts are kept under.
impl PartialEq for ExperimentTag {
    fn eq(&self, other: &Self) -> bool {
        (&self.prompt, &self.label, &self.id) == (&other.prompt, &other.label, &other.id)
    }
}

impl Eq for ExperimentTag {}

impl std::hash::Hash for ExperimentTag {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.prompt, &self.label, &self.id).hash(state);
    }
}

/// What an experiment decided about an arm, as the prompt store applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The arm is taken out; its users go to the control.
    Rollback,
    /// The label points at the arm.
    Promote,
}

/// A decision for the prompt store to apply: an arm of an experiment, what to do with it, and
/// the evidence for the audit trail.
#[derive(Debug, Clone)]
pub struct Decided {
    pub experiment: String,
    pub version: u32,
    pub outcome: Outcome,
    pub evidence: serde_json::Value,
}

/// What the gateway knows of a declared feedback metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    pub boolean: bool,
    pub higher_is_better: bool,
}

impl ExperimentSpec {
    /// The default `min_effect` of a boolean metric: five points.
    pub const BOOLEAN_MIN_EFFECT: f64 = 0.05;

    pub fn alpha(&self) -> f64 {
        1.0 - self.confidence
    }

    /// Checks the declaration against the declared metrics; the error names the field.
    pub fn check(&self, metrics: &BTreeMap<String, MetricInfo>) -> Result<(), (String, String)> {
        let fail = |field: &str, message: String| Err((format!("experiment.{field}"), message));
        if !(0.5..1.0).contains(&self.confidence) {
            return fail("confidence", "must be at least 0.5 and below 1".into());
        }
        if self.min_samples < 10 {
            return fail("min_samples", "must be at least 10".into());
        }
        if let Some(effect) = self.min_effect
            && !(effect.is_finite() && effect > 0.0)
        {
            return fail("min_effect", "must be a positive number".into());
        }
        let known = || metrics.keys().cloned().collect::<Vec<_>>().join(", ");
        let mut needs_effect = false;
        if let Some(primary) = &self.primary {
            let Some(info) = metrics.get(primary) else {
                return fail(
                    "primary",
                    format!(
                        "`{primary}` is not a declared feedback metric (declared: {})",
                        known()
                    ),
                );
            };
            needs_effect |= !info.boolean;
        }
        if let Some(rate) = self.guardrails.max_error_rate
            && !(rate > 0.0 && rate < 1.0)
        {
            return fail(
                "guardrails.max_error_rate",
                "must be between 0 and 1".into(),
            );
        }
        if self.guardrails.max_p95_latency_ms == Some(0) {
            return fail("guardrails.max_p95_latency_ms", "must be above 0".into());
        }
        for (name, bound) in &self.guardrails.metric_bounds {
            let Some(info) = metrics.get(name) else {
                return fail(
                    &format!("guardrails.metric_bounds.{name}"),
                    format!(
                        "`{name}` is not a declared feedback metric (declared: {})",
                        known()
                    ),
                );
            };
            if info.boolean && !(*bound > 0.0 && *bound < 1.0) {
                return fail(
                    &format!("guardrails.metric_bounds.{name}"),
                    "a boolean metric's bound is a rate between 0 and 1".into(),
                );
            }
            needs_effect |= !info.boolean;
        }
        if needs_effect && self.min_effect.is_none() {
            return fail(
                "min_effect",
                "required with a number metric: the smallest difference worth finding, in its units"
                    .into(),
            );
        }
        Ok(())
    }

    /// The same experiment apart from its id and start, so changing only the weights keeps it.
    pub fn same_design(&self, other: &ExperimentSpec) -> bool {
        let strip = |spec: &ExperimentSpec| ExperimentSpec {
            id: String::new(),
            started_at: String::new(),
            ..spec.clone()
        };
        strip(self) == strip(other)
    }

    pub fn min_effect_for(&self, info: MetricInfo) -> f64 {
        self.min_effect.unwrap_or(if info.boolean {
            Self::BOOLEAN_MIN_EFFECT
        } else {
            1.0
        })
    }
}
