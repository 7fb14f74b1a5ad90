//! What an experiment counts per arm. Each process keeps running totals for the experiments it
//! serves and writes them to the shared store as its own shard; a reader sums the shards.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency buckets grow by 10%: a percentile read from them is at most 10% above the truth.
const BUCKET_GROWTH: f64 = 1.1;

/// Counts of one arm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArmCounts {
    /// Requests answered by an upstream (fresh samples of this version).
    pub requests: u64,
    /// Requests answered from the cache: replays of an earlier answer, kept apart.
    pub cached: u64,
    /// Fresh requests that failed (5xx).
    pub errors: u64,
    /// Fresh requests slower than the experiment's latency guardrail.
    pub slow: u64,
    /// Fresh requests' latency, by bucket (see [`bucket_of`]).
    pub latency: BTreeMap<u16, u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    /// Feedback on fresh answers, per metric.
    pub metrics: BTreeMap<String, Sums>,
    /// Feedback on cached answers, per metric.
    pub cached_metrics: BTreeMap<String, Sums>,
}

/// Count, sum and sum of squares; a replaced report is taken out, so a shard's count can fall
/// below zero when the report it replaces was counted by another process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sums {
    pub n: f64,
    pub sum: f64,
    pub sum_squares: f64,
}

impl Sums {
    pub fn add(&mut self, value: f64, sign: f64) {
        self.n += sign;
        self.sum += sign * value;
        self.sum_squares += sign * value * value;
    }

    fn merge(&mut self, other: &Sums) {
        self.n += other.n;
        self.sum += other.sum;
        self.sum_squares += other.sum_squares;
    }
}

pub fn bucket_of(latency: Duration) -> u16 {
    let ms = latency.as_secs_f64() * 1e3;
    if ms <= 1.0 {
        return 0;
    }
    (ms.ln() / BUCKET_GROWTH.ln())
        .ceil()
        .min(f64::from(u16::MAX)) as u16
}

fn bucket_upper_ms(bucket: u16) -> f64 {
    BUCKET_GROWTH.powi(i32::from(bucket))
}

impl ArmCounts {
    pub fn merge(&mut self, other: &ArmCounts) {
        self.requests += other.requests;
        self.cached += other.cached;
        self.errors += other.errors;
        self.slow += other.slow;
        for (bucket, count) in &other.latency {
            *self.latency.entry(*bucket).or_default() += count;
        }
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cost_usd += other.cost_usd;
        for (name, sums) in &other.metrics {
            self.metrics.entry(name.clone()).or_default().merge(sums);
        }
        for (name, sums) in &other.cached_metrics {
            self.cached_metrics
                .entry(name.clone())
                .or_default()
                .merge(sums);
        }
    }

    /// The latency under which `quantile` of fresh requests fell, in ms (a bucket's upper edge).
    pub fn latency_quantile_ms(&self, quantile: f64) -> Option<f64> {
        let total: u64 = self.latency.values().sum();
        if total == 0 {
            return None;
        }
        let rank = (quantile * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in &self.latency {
            seen += count;
            if seen >= rank {
                return Some((bucket_upper_ms(*bucket) * 10.0).round() / 10.0);
            }
        }
        None
    }
}

/// One process's totals of one experiment, per arm version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub arms: BTreeMap<u32, ArmCounts>,
}

impl Shard {
    pub fn merge(&mut self, other: &Shard) {
        for (version, counts) in &other.arms {
            self.arms.entry(*version).or_default().merge(counts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_within_a_bucket_of_the_truth() {
        let mut arm = ArmCounts::default();
        for ms in 1..=1000_u64 {
            *arm.latency
                .entry(bucket_of(Duration::from_millis(ms)))
                .or_default() += 1;
        }
        let p50 = arm.latency_quantile_ms(0.5).unwrap();
        let p95 = arm.latency_quantile_ms(0.95).unwrap();
        assert!((500.0..=550.0).contains(&p50), "{p50}");
        assert!((950.0..=1045.0).contains(&p95), "{p95}");
    }
}
