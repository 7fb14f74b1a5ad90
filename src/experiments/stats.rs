//! Sequential tests that stay valid however often they are looked at.
//!
//! Each test gives the log of a likelihood ratio Λ whose expectation under the null hypothesis is
//! at most 1 at every sample count (a non-negative supermartingale). By Ville's inequality the
//! chance that Λ *ever* reaches 1/α while the null holds is at most α, so a monitor may check
//! after every request, or every minute, without inflating false decisions; a fixed-horizon
//! test checked that often would (Johari, Pekelis, Walsh: "Always valid inference", 2015/2022).
//!
//! - Rates against a bound (error rate, share of slow requests, a boolean metric's minimum) use
//!   the exact Bernoulli likelihood mixed over a uniform prior on the alternative side: valid at
//!   every `n`, no normal approximation.
//! - Means (a primary metric's difference between two arms, a number metric's minimum) use the
//!   normal-mixture SPRT (mSPRT) with the variance estimated from the data; it is valid as the
//!   estimate settles, which is why decisions wait for `min_samples` per arm.

use statrs::function::beta::{beta_reg, ln_beta};

/// ln Λ for "the rate exceeds `bound`" after `events` of `trials`.
///
/// The null is `p ≤ bound`; the alternative mixes `p` uniformly over `(bound, 1]`, so
/// Λ = ∫ (p/p₀)^k ((1-p)/(1-p₀))^(n-k) dp / (1-p₀), a supermartingale for every null `p`.
pub fn rate_exceeds(events: u64, trials: u64, bound: f64) -> f64 {
    if trials == 0 || !(0.0..1.0).contains(&bound) || bound <= 0.0 {
        return 0.0;
    }
    let k = events.min(trials) as f64;
    let n = trials as f64;
    // ∫_{p₀}^1 p^k (1-p)^(n-k) dp = B(k+1, n-k+1) · (1 - I_{p₀}(k+1, n-k+1))
    //                              = B(k+1, n-k+1) · I_{1-p₀}(n-k+1, k+1).
    let upper = beta_reg(n - k + 1.0, k + 1.0, 1.0 - bound);
    if upper <= 0.0 {
        return f64::NEG_INFINITY;
    }
    ln_beta(k + 1.0, n - k + 1.0) + upper.ln()
        - (1.0 - bound).ln()
        - k * bound.ln()
        - (n - k) * (1.0 - bound).ln()
}

/// ln Λ for "the rate is below `bound`" after `events` of `trials`: the mirror of
/// [`rate_exceeds`] (the non-events exceed `1 - bound`).
pub fn rate_below(events: u64, trials: u64, bound: f64) -> f64 {
    rate_exceeds(trials.saturating_sub(events), trials, 1.0 - bound)
}

/// ln Λ of the normal-mixture SPRT for an estimate `estimate` of an effect θ with sampling
/// variance `variance`, against θ = 0, mixing θ over N(0, τ²) with `tau_squared` = τ².
///
/// For θ̂ ~ N(θ, V): Λ = N(θ̂; 0, V+τ²) / N(θ̂; 0, V) = √(V/(V+τ²)) · exp(τ²θ̂² / (2V(V+τ²))).
/// It is two-sided; the sign of the estimate says which way a crossing points.
pub fn normal_mixture(estimate: f64, variance: f64, tau_squared: f64) -> f64 {
    if !(variance.is_finite() && estimate.is_finite()) || tau_squared <= 0.0 {
        return 0.0;
    }
    let variance = variance.max(1e-12);
    let total = variance + tau_squared;
    0.5 * (variance / total).ln() + tau_squared * estimate * estimate / (2.0 * variance * total)
}

/// Count, mean and sample variance of a metric on one arm.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: f64,
    pub mean: f64,
    pub variance: f64,
}

impl Moments {
    pub fn from_sums(n: f64, sum: f64, sum_squares: f64) -> Self {
        if n <= 0.0 {
            return Self::default();
        }
        let mean = sum / n;
        let variance = if n >= 2.0 {
            ((sum_squares - n * mean * mean) / (n - 1.0)).max(0.0)
        } else {
            0.0
        };
        Self { n, mean, variance }
    }

    /// The variance of a 0/1 metric, kept off zero while an arm has seen only one outcome (a
    /// variance of zero would make any difference look certain).
    pub fn bernoulli(n: f64, successes: f64) -> Self {
        if n <= 0.0 {
            return Self::default();
        }
        let smoothed = (successes + 0.5) / (n + 1.0);
        Self {
            n,
            mean: successes / n,
            variance: smoothed * (1.0 - smoothed),
        }
    }

    /// The half width of a 95% interval of the mean (normal approximation).
    pub fn half_ci95(&self) -> Option<f64> {
        (self.n >= 2.0).then(|| 1.96 * (self.variance / self.n).sqrt())
    }
}

/// ln Λ that `treatment`'s mean differs from `control`'s.
pub fn difference(control: &Moments, treatment: &Moments, min_effect: f64) -> (f64, f64) {
    let estimate = treatment.mean - control.mean;
    let variance =
        control.variance / control.n.max(1.0) + treatment.variance / treatment.n.max(1.0);
    (
        normal_mixture(estimate, variance, min_effect * min_effect),
        estimate,
    )
}

/// ln Λ that a mean is below `bound` (one sample, plug-in variance).
pub fn mean_below(moments: &Moments, bound: f64, min_effect: f64) -> f64 {
    let estimate = moments.mean - bound;
    if estimate >= 0.0 {
        return f64::NEG_INFINITY;
    }
    normal_mixture(
        estimate,
        moments.variance / moments.n.max(1.0),
        min_effect * min_effect,
    )
}

/// The standard normal quantile.
pub fn normal_quantile(p: f64) -> f64 {
    statrs::function::erf::erfc_inv(2.0 * (1.0 - p)) * std::f64::consts::SQRT_2
}

/// Samples per arm after which the difference test has reached its threshold with probability
/// at least `power`, when the true difference is `effect` and the two arms' per-sample
/// variances sum to `variance_sum`.
///
/// The test crosses by `n` if it is past the threshold *at* `n`, so this is an upper bound on
/// the sequential test's need: the smallest `n` whose `power`-quantile estimate,
/// `effect - z(power) · √(variance_sum / n)`, already gives ln Λ ≥ ln(1/α).
pub fn samples_for_power(
    effect: f64,
    variance_sum: f64,
    min_effect: f64,
    alpha: f64,
    power: f64,
) -> Option<u64> {
    if effect <= 0.0 || variance_sum <= 0.0 || !(0.0..1.0).contains(&alpha) {
        return None;
    }
    let threshold = (1.0 / alpha).ln();
    let z = normal_quantile(power);
    let crosses = |n: u64| {
        let variance = variance_sum / n as f64;
        let low = effect - z * variance.sqrt();
        low > 0.0 && normal_mixture(low, variance, min_effect * min_effect) >= threshold
    };
    let (mut low, mut high) = (1_u64, 2_u64);
    while !crosses(high) {
        low = high;
        high *= 2;
        if high > 1 << 40 {
            return None;
        }
    }
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if crosses(middle) {
            high = middle;
        } else {
            low = middle;
        }
    }
    Some(high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const ALPHA: f64 = 0.05;

    #[test]
    fn the_rate_test_matches_a_direct_integration() {
        let (k, n, p0) = (7_u64, 40_u64, 0.1);
        let steps = 200_000;
        let mut integral = 0.0;
        for i in 0..steps {
            let p = p0 + (1.0 - p0) * (i as f64 + 0.5) / steps as f64;
            let ratio = (p / p0).powi(k as i32) * ((1.0 - p) / (1.0 - p0)).powi((n - k) as i32);
            integral += ratio / steps as f64;
        }
        assert!((rate_exceeds(k, n, p0) - integral.ln()).abs() < 1e-6);
        assert_eq!(rate_exceeds(0, 0, p0), 0.0);
        // Five hundred clean requests: the evidence points the other way (Λ ≈ 1/501).
        assert!(rate_exceeds(0, 500, p0) < -6.0);
    }

    /// Type I error over a long horizon, looked at after every sample: at the boundary of the
    /// null, the rate test crosses in at most α of runs.
    #[test]
    fn the_rate_test_checked_after_every_sample_keeps_its_level() {
        let mut rng = StdRng::seed_from_u64(7);
        let runs = 400;
        let mut crossed = 0;
        for _ in 0..runs {
            let mut events = 0;
            for n in 1..=2_000 {
                events += u64::from(rng.random_bool(0.05));
                if rate_exceeds(events, n, 0.05) >= (1.0 / ALPHA).ln() {
                    crossed += 1;
                    break;
                }
            }
        }
        eprintln!("rate test at the bound: {crossed} of {runs} runs crossed");
        assert!(crossed <= runs * 5 / 100, "{crossed} of {runs}");
    }

    /// An A/A comparison of success rates, looked at every 20 samples per arm up to 5,000:
    /// false decisions either way stay under α.
    #[test]
    fn the_difference_test_on_identical_arms_keeps_its_level() {
        let mut rng = StdRng::seed_from_u64(11);
        let runs = 300;
        let mut wrong = 0;
        for _ in 0..runs {
            let (mut a, mut b) = (0.0, 0.0);
            for n in 1..=5_000 {
                a += f64::from(u8::from(rng.random_bool(0.55)));
                b += f64::from(u8::from(rng.random_bool(0.55)));
                if n >= 100 && n % 20 == 0 {
                    let n = n as f64;
                    let (statistic, _) =
                        difference(&Moments::bernoulli(n, a), &Moments::bernoulli(n, b), 0.05);
                    if statistic >= (1.0 / ALPHA).ln() {
                        wrong += 1;
                        break;
                    }
                }
            }
        }
        eprintln!("A/A at 55%: {wrong} of {runs} runs decided");
        assert!(wrong <= runs * 5 / 100, "{wrong} of {runs}");
    }

    /// 60% against 55%: the power calculation's sample count is enough in at least 80% of runs.
    #[test]
    fn the_power_calculation_holds_for_sixty_against_fifty_five_percent() {
        let variance_sum = 0.6 * 0.4 + 0.55 * 0.45;
        let needed = samples_for_power(0.05, variance_sum, 0.05, ALPHA, 0.8).unwrap();
        assert!((1_500..20_000).contains(&needed), "{needed}");
        let mut rng = StdRng::seed_from_u64(3);
        let runs = 200;
        let mut promoted = 0;
        for _ in 0..runs {
            let (mut a, mut b) = (0.0, 0.0);
            for n in 1..=needed {
                a += f64::from(u8::from(rng.random_bool(0.55)));
                b += f64::from(u8::from(rng.random_bool(0.60)));
                if n >= 100 && n % 20 == 0 {
                    let n = n as f64;
                    let (statistic, estimate) =
                        difference(&Moments::bernoulli(n, a), &Moments::bernoulli(n, b), 0.05);
                    if statistic >= (1.0 / ALPHA).ln() {
                        promoted += u32::from(estimate > 0.0);
                        break;
                    }
                }
            }
        }
        eprintln!("60% vs 55%: {promoted} of {runs} promoted within {needed} per arm");
        assert!(promoted >= runs * 80 / 100, "{promoted} of {runs}");
    }

    #[test]
    fn twenty_percent_errors_against_a_five_percent_bound_cross_within_a_few_hundred_requests() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut crossings = Vec::new();
        for _ in 0..200 {
            let mut errors = 0;
            let crossed = (1..=300).find(|&n| {
                errors += u64::from(rng.random_bool(0.2));
                rate_exceeds(errors, n, 0.05) >= (1.0 / ALPHA).ln()
            });
            crossings.push(crossed.expect("no crossing within 300 requests"));
        }
        crossings.sort_unstable();
        let median = crossings[crossings.len() / 2];
        eprintln!(
            "20% errors: median {median}, slowest {:?}",
            crossings.last()
        );
        assert!(median <= 100, "median {median}");
        assert!(crossings[crossings.len() - 1] <= 250, "{crossings:?}");
    }

    #[test]
    fn the_quantile_is_the_normal_one() {
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!((normal_quantile(0.8) - 0.841_621).abs() < 1e-5);
    }
}
