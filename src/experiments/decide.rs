//! From an experiment's evidence to its tests and, when one is conclusive, a decision.
//!
//! The first arm of the rollout is the control. Every other arm is tested:
//! - against each guardrail (error rate, p95 latency, a metric's bound): a breach takes the arm
//!   out, once the arm has [`GUARDRAIL_MIN_REQUESTS`] (20);
//! - against the control on the primary metric: a conclusive win makes it the candidate for
//!   promotion, a conclusive loss takes it out.
//!
//! Each test uses α = 1 - confidence; the primary comparisons share it (Bonferroni) when there
//! are several treatment arms. Rollbacks come before promotions: a winning arm that also breaches
//! a guardrail is taken out, not promoted.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use super::evidence::{ArmCounts, Shard, Sums};
use super::stats::{self, Moments};
use crate::prompts::experiment::{ExperimentSpec, MetricInfo};
use crate::prompts::labels::Arm;

/// The share of requests allowed above the p95 bound.
const ABOVE_P95: f64 = 0.05;
/// Requests an arm needs before a rate guardrail acts. The rate tests are exact from the first
/// request, but real failures come in bursts (cold connections, a deploy): three slow requests
/// out of three would already be conclusive, and should not take an arm out alone.
pub const GUARDRAIL_MIN_REQUESTS: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not conclusive yet.
    Continue,
    /// Fewer than `min_samples` on an arm.
    Waiting,
    Breach,
    Better,
    Worse,
    /// Already decided (possibly undone since by a rollback): not acted on again.
    Decided,
    /// The control's own figures; the control is never taken out.
    Control,
}

#[derive(Debug, Clone, Serialize)]
pub struct Test {
    pub version: u32,
    pub test: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    pub n: f64,
    /// The arm's rate or mean, or for `primary` its difference from the control's mean.
    pub estimate: f64,
    /// The guardrail's bound, or for `primary` the control's mean.
    pub against: f64,
    /// ln Λ of the sequential test; the test is conclusive at `threshold` = ln(1/α).
    pub log_likelihood_ratio: f64,
    pub threshold: f64,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Rollback,
    Promote,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub action: Action,
    pub version: u32,
    pub reason: String,
    pub test: Test,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub arms: Vec<Value>,
    pub tests: Vec<Test>,
    pub decision: Option<Decision>,
    /// For the primary metric: samples per arm that find a difference of `min_effect` with 80%
    /// and 95% probability (see [`stats::samples_for_power`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<Value>,
}

pub fn evaluate(
    spec: &ExperimentSpec,
    arms: &[Arm],
    evidence: &Shard,
    decided: &[u32],
    metrics: &BTreeMap<String, MetricInfo>,
) -> Evaluation {
    let empty = ArmCounts::default();
    let counts = |version: u32| evidence.arms.get(&version).unwrap_or(&empty);
    let alpha = spec.alpha();
    let threshold = (1.0 / alpha).ln();
    let mut tests = Vec::new();
    for (index, arm) in arms.iter().enumerate() {
        let counts = counts(arm.version);
        let verdict_of = |conclusive: bool| {
            if index == 0 {
                Verdict::Control
            } else if decided.contains(&arm.version) {
                Verdict::Decided
            } else if conclusive {
                Verdict::Breach
            } else {
                Verdict::Continue
            }
        };
        let mut rate_test = |test, events: u64, trials: u64, bound: f64, metric| {
            let statistic = stats::rate_exceeds(events, trials, bound);
            let waiting = trials < GUARDRAIL_MIN_REQUESTS;
            let mut verdict = verdict_of(!waiting && statistic >= threshold);
            if waiting && verdict == Verdict::Continue {
                verdict = Verdict::Waiting;
            }
            tests.push(Test {
                version: arm.version,
                test,
                metric,
                n: trials as f64,
                estimate: ratio(events as f64, trials as f64),
                against: bound,
                log_likelihood_ratio: statistic,
                threshold,
                verdict,
            });
        };
        if let Some(bound) = spec.guardrails.max_error_rate {
            rate_test("error_rate", counts.errors, counts.requests, bound, None);
        }
        if spec.guardrails.max_p95_latency_ms.is_some() {
            rate_test("p95_latency", counts.slow, counts.requests, ABOVE_P95, None);
        }
        for (name, &bound) in &spec.guardrails.metric_bounds {
            let Some(&info) = metrics.get(name) else {
                continue;
            };
            let sums = counts.metrics.get(name).copied().unwrap_or_default();
            let n = sums.n.max(0.0);
            let mean = ratio(sums.sum, n);
            let statistic = if info.boolean {
                let (trials, events) = (n.round() as u64, sums.sum.max(0.0).round() as u64);
                if info.higher_is_better {
                    stats::rate_below(events, trials, bound)
                } else {
                    stats::rate_exceeds(events, trials, bound)
                }
            } else {
                let moments = moments_of(&sums, info);
                let oriented = if info.higher_is_better {
                    moments
                } else {
                    Moments {
                        mean: -moments.mean,
                        ..moments
                    }
                };
                let bound = if info.higher_is_better { bound } else { -bound };
                stats::mean_below(&oriented, bound, spec.min_effect_for(info))
            };
            let waiting = if info.boolean {
                n < GUARDRAIL_MIN_REQUESTS as f64
            } else {
                n < spec.min_samples as f64
            };
            let mut verdict = verdict_of(!waiting && statistic >= threshold);
            if waiting && verdict == Verdict::Continue {
                verdict = Verdict::Waiting;
            }
            tests.push(Test {
                version: arm.version,
                test: "metric_bound",
                metric: Some(name.clone()),
                n,
                estimate: mean,
                against: bound,
                log_likelihood_ratio: statistic,
                threshold,
                verdict,
            });
        }
    }
    let mut power = None;
    if let Some((primary, info)) = spec
        .primary
        .as_ref()
        .and_then(|p| metrics.get(p).map(|info| (p, *info)))
    {
        let min_effect = spec.min_effect_for(info);
        let treatments = arms.len().saturating_sub(1).max(1) as f64;
        let primary_threshold = (treatments / alpha).ln();
        let control_sums = counts(arms[0].version)
            .metrics
            .get(primary)
            .copied()
            .unwrap_or_default();
        let control = moments_of(&control_sums, info);
        power = power_of(&control, info, min_effect, alpha / treatments);
        for arm in &arms[1..] {
            let sums = counts(arm.version)
                .metrics
                .get(primary)
                .copied()
                .unwrap_or_default();
            let treatment = moments_of(&sums, info);
            let (statistic, difference) = stats::difference(&control, &treatment, min_effect);
            let enough =
                control.n >= spec.min_samples as f64 && treatment.n >= spec.min_samples as f64;
            let better = if info.higher_is_better {
                difference > 0.0
            } else {
                difference < 0.0
            };
            let verdict = if decided.contains(&arm.version) {
                Verdict::Decided
            } else if !enough {
                Verdict::Waiting
            } else if statistic < primary_threshold {
                Verdict::Continue
            } else if better {
                Verdict::Better
            } else {
                Verdict::Worse
            };
            tests.push(Test {
                version: arm.version,
                test: "primary",
                metric: Some(primary.clone()),
                n: treatment.n,
                estimate: difference,
                against: control.mean,
                log_likelihood_ratio: statistic,
                threshold: primary_threshold,
                verdict,
            });
        }
    }
    let decision = decide(&tests);
    let arms = arms
        .iter()
        .enumerate()
        .map(|(index, arm)| arm_report(index, arm, counts(arm.version), decided, metrics))
        .collect();
    Evaluation {
        arms,
        tests,
        decision,
        power,
    }
}

fn decide(tests: &[Test]) -> Option<Decision> {
    let rollback = tests
        .iter()
        .find(|t| matches!(t.verdict, Verdict::Breach | Verdict::Worse));
    if let Some(test) = rollback {
        let reason = match (test.test, &test.metric) {
            ("primary", Some(metric)) => format!(
                "version {} is worse than the control on {metric} ({:+.4})",
                test.version, test.estimate
            ),
            ("error_rate", _) => format!(
                "version {}'s error rate {:.4} is above the guardrail {}",
                test.version, test.estimate, test.against
            ),
            ("p95_latency", _) => format!(
                "more than 5% of version {}'s requests ({:.4}) are slower than the p95 guardrail",
                test.version, test.estimate
            ),
            (_, metric) => format!(
                "version {}'s {} mean {:.4} is past its guardrail {}",
                test.version,
                metric.as_deref().unwrap_or("metric"),
                test.estimate,
                test.against
            ),
        };
        return Some(Decision {
            action: Action::Rollback,
            version: test.version,
            reason,
            test: test.clone(),
        });
    }
    let winner = tests
        .iter()
        .filter(|t| t.verdict == Verdict::Better)
        .max_by(|a, b| a.estimate.abs().total_cmp(&b.estimate.abs()))?;
    Some(Decision {
        action: Action::Promote,
        version: winner.version,
        reason: format!(
            "version {} beats the control on {} ({:+.4} against {:.4})",
            winner.version,
            winner.metric.as_deref().unwrap_or("the primary metric"),
            winner.estimate,
            winner.against
        ),
        test: winner.clone(),
    })
}

fn moments_of(sums: &Sums, info: MetricInfo) -> Moments {
    let n = sums.n.max(0.0);
    if info.boolean {
        Moments::bernoulli(n, sums.sum.clamp(0.0, n))
    } else {
        Moments::from_sums(n, sums.sum, sums.sum_squares)
    }
}

fn power_of(control: &Moments, info: MetricInfo, min_effect: f64, alpha: f64) -> Option<Value> {
    let variance_sum = if info.boolean {
        // Before any feedback, the least favourable rate.
        let p = if control.n >= 1.0 { control.mean } else { 0.5 };
        let q = (p + min_effect).clamp(0.0, 1.0);
        (p * (1.0 - p) + q * (1.0 - q)).max(1e-6)
    } else if control.n >= 2.0 {
        2.0 * control.variance
    } else {
        return None;
    };
    let at = |power| stats::samples_for_power(min_effect, variance_sum, min_effect, alpha, power);
    Some(json!({
        "effect": min_effect,
        "samples_per_arm_80": at(0.8),
        "samples_per_arm_95": at(0.95),
    }))
}

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

fn arm_report(
    index: usize,
    arm: &Arm,
    counts: &ArmCounts,
    decided: &[u32],
    metrics: &BTreeMap<String, MetricInfo>,
) -> Value {
    let mut feedback = serde_json::Map::new();
    for (name, sums) in &counts.metrics {
        let Some(&info) = metrics.get(name) else {
            continue;
        };
        let moments = moments_of(sums, info);
        let mut row = json!({"n": moments.n, "mean": moments.mean});
        if let Some(half) = moments.half_ci95() {
            row["ci95"] = json!([moments.mean - half, moments.mean + half]);
        }
        if let Some(cached) = counts.cached_metrics.get(name) {
            row["cached"] = json!({"n": cached.n, "mean": ratio(cached.sum, cached.n)});
        }
        feedback.insert(name.clone(), row);
    }
    let served = counts.requests + counts.cached;
    json!({
        "version": arm.version,
        "weight": arm.weight,
        "role": if index == 0 { "control" } else { "treatment" },
        "decided": decided.contains(&arm.version),
        "requests": counts.requests,
        "cached": counts.cached,
        "cache_hit_ratio": ratio(counts.cached as f64, served as f64),
        "errors": counts.errors,
        "error_rate": ratio(counts.errors as f64, counts.requests as f64),
        "latency_p50_ms": counts.latency_quantile_ms(0.5),
        "latency_p95_ms": counts.latency_quantile_ms(0.95),
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "cost_usd": counts.cost_usd,
        "feedback": feedback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::experiment::Guardrails;

    fn spec(primary: Option<&str>, guardrails: Guardrails) -> ExperimentSpec {
        ExperimentSpec {
            id: "production-r1".into(),
            started_at: String::new(),
            primary: primary.map(str::to_owned),
            confidence: 0.95,
            min_effect: None,
            min_samples: 100,
            promote: Default::default(),
            guardrails,
        }
    }

    fn arms() -> Vec<Arm> {
        vec![
            Arm {
                version: 1,
                weight: 50,
            },
            Arm {
                version: 2,
                weight: 50,
            },
        ]
    }

    fn counts(requests: u64, errors: u64, metric: &str, n: f64, successes: f64) -> ArmCounts {
        let mut counts = ArmCounts {
            requests,
            errors,
            ..ArmCounts::default()
        };
        counts.metrics.insert(
            metric.to_owned(),
            Sums {
                n,
                sum: successes,
                sum_squares: successes,
            },
        );
        counts
    }

    fn evidence(control: ArmCounts, treatment: ArmCounts) -> Shard {
        Shard {
            arms: [(1, control), (2, treatment)].into_iter().collect(),
        }
    }

    fn metrics(higher_is_better: bool) -> BTreeMap<String, MetricInfo> {
        [(
            "resolved".to_owned(),
            MetricInfo {
                boolean: true,
                higher_is_better,
            },
        )]
        .into_iter()
        .collect()
    }

    #[test]
    fn a_winner_that_breaches_a_guardrail_is_rolled_back_not_promoted() {
        let guardrails = Guardrails {
            max_error_rate: Some(0.05),
            ..Guardrails::default()
        };
        let shard = evidence(
            counts(1000, 10, "resolved", 1000.0, 500.0),
            counts(1000, 200, "resolved", 1000.0, 800.0),
        );
        let evaluation = evaluate(
            &spec(Some("resolved"), guardrails),
            &arms(),
            &shard,
            &[],
            &metrics(true),
        );
        let decision = evaluation.decision.unwrap();
        assert_eq!((decision.action, decision.version), (Action::Rollback, 2));
        assert_eq!(decision.test.test, "error_rate");
        assert!(
            evaluation
                .tests
                .iter()
                .any(|t| t.verdict == Verdict::Better)
        );
    }

    #[test]
    fn means_wait_for_min_samples_and_a_decided_arm_is_left_alone() {
        let shard = evidence(
            counts(90, 0, "resolved", 90.0, 10.0),
            counts(90, 0, "resolved", 90.0, 80.0),
        );
        let design = spec(Some("resolved"), Guardrails::default());
        let evaluation = evaluate(&design, &arms(), &shard, &[], &metrics(true));
        assert!(evaluation.decision.is_none());
        assert_eq!(evaluation.tests[0].verdict, Verdict::Waiting);

        let shard = evidence(
            counts(200, 0, "resolved", 200.0, 20.0),
            counts(200, 0, "resolved", 200.0, 180.0),
        );
        let evaluation = evaluate(&design, &arms(), &shard, &[], &metrics(true));
        assert_eq!(evaluation.decision.unwrap().action, Action::Promote);
        let evaluation = evaluate(&design, &arms(), &shard, &[2], &metrics(true));
        assert!(evaluation.decision.is_none());
        assert_eq!(evaluation.tests[0].verdict, Verdict::Decided);
    }

    #[test]
    fn where_lower_is_better_a_lower_mean_wins_and_a_higher_one_loses() {
        let design = spec(Some("resolved"), Guardrails::default());
        let lower = evidence(
            counts(500, 0, "resolved", 500.0, 250.0),
            counts(500, 0, "resolved", 500.0, 100.0),
        );
        let decision = evaluate(&design, &arms(), &lower, &[], &metrics(false))
            .decision
            .unwrap();
        assert_eq!(decision.action, Action::Promote);
        let decision = evaluate(&design, &arms(), &lower, &[], &metrics(true))
            .decision
            .unwrap();
        assert_eq!(decision.action, Action::Rollback);
        assert!(
            decision.reason.contains("worse than the control"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn the_control_is_never_taken_out() {
        let guardrails = Guardrails {
            max_error_rate: Some(0.05),
            ..Guardrails::default()
        };
        let shard = evidence(
            counts(500, 250, "resolved", 0.0, 0.0),
            counts(500, 0, "resolved", 0.0, 0.0),
        );
        let evaluation = evaluate(
            &spec(None, guardrails),
            &arms(),
            &shard,
            &[],
            &metrics(true),
        );
        assert!(evaluation.decision.is_none());
        assert_eq!(evaluation.tests[0].verdict, Verdict::Control);
    }
}
