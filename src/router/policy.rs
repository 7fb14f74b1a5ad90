//! What to do after a failed attempt, how long to wait, and how many retries a route may afford.
//! Each decision is one pure function or small type, tested on its own.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;

use crate::providers::{ProviderError, TimeoutKind};

/// Where the request goes after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The request itself is at fault (400, 413, 422, content policy): the client gets the upstream's
    /// answer as is, and no other target is bothered with it.
    ReturnToClient,
    /// A transient failure: the same target may be tried again after a backoff (or the upstream's
    /// `Retry-After`), then the next one.
    Retry { retry_after: Option<Duration> },
    /// This target cannot serve the request now: go straight to the next target.
    Failover,
}

/// What the failure says about the target's health, for its circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthSignal {
    /// The target answered properly; the request was the problem.
    Healthy,
    Failure,
    /// No connection could be made: refused, unresolvable or timed out while connecting.
    Unreachable,
    /// The target's credentials are refused (401/403): no request can succeed until the config is
    /// fixed, so the breaker opens at once.
    Unusable,
    /// Says nothing about the target (it cannot express this request, e.g. `n > 1` on Anthropic).
    Neutral,
}

pub fn classify(error: &ProviderError) -> (Disposition, HealthSignal) {
    use Disposition::*;
    use HealthSignal::*;
    match error {
        ProviderError::Connect(_) => (Failover, Unreachable),
        ProviderError::InvalidResponse(_) => (Failover, Failure),
        ProviderError::Transport(_) | ProviderError::StreamBroken(_) => {
            (Retry { retry_after: None }, Failure)
        }
        // A slow target loses the request to the next one rather than getting more of the deadline.
        ProviderError::Timeout(
            TimeoutKind::Attempt | TimeoutKind::FirstToken | TimeoutKind::StreamIdle,
        ) => (Failover, Failure),
        ProviderError::Untranslatable(_) | ProviderError::Unsupported(_) => (Failover, Neutral),
        // A config matter, reported at startup and in the error; the breaker cannot mend it.
        ProviderError::MissingKey(_) => (Failover, Neutral),
        ProviderError::Status {
            status,
            retry_after,
            ..
        } => match *status {
            401 | 403 => (Failover, Unusable),
            // A model unknown to this provider is a target misconfiguration, not the client's fault.
            404 => (Failover, Failure),
            408 | 409 | 425 | 429 => (
                Retry {
                    retry_after: *retry_after,
                },
                Failure,
            ),
            500..=599 => (
                Retry {
                    retry_after: *retry_after,
                },
                Failure,
            ),
            _ => (ReturnToClient, Healthy),
        },
    }
}

/// Exponential backoff with "equal jitter": half the delay is fixed, half random, so retries of many
/// clients spread out without any of them retrying almost at once.
pub fn backoff(base: Duration, max: Duration, retry_index: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << retry_index.min(16)).min(max);
    let half = exp / 2;
    let jitter = rand::rng().random_range(0.0..=1.0);
    half + half.mul_f64(jitter)
}

/// Two counters over a sliding window of one-second buckets.
#[derive(Debug)]
pub struct WindowCounter {
    origin: Instant,
    buckets: Vec<(u64, u64, u64)>,
}

impl WindowCounter {
    pub fn new(window: Duration) -> Self {
        let len = window.as_secs().clamp(1, 3600) as usize;
        Self {
            origin: Instant::now(),
            buckets: vec![(u64::MAX, 0, 0); len],
        }
    }

    fn bucket(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let second = now.duration_since(self.origin).as_secs();
        let len = self.buckets.len() as u64;
        let slot = &mut self.buckets[(second % len) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    pub fn add(&mut self, now: Instant, a: u64, b: u64) {
        let slot = self.bucket(now);
        slot.1 += a;
        slot.2 += b;
    }

    /// The sums over the most recent whole seconds that hold at least `min_total` (or the whole
    /// window if it holds fewer): a rate over recent traffic at volume, over the window when quiet.
    pub fn recent_sums(&self, now: Instant, min_total: u64) -> (u64, u64) {
        let second = now.duration_since(self.origin).as_secs();
        let len = self.buckets.len() as u64;
        let (mut a, mut b) = (0, 0);
        for back in 0..len.min(second + 1) {
            let at = second - back;
            let (stamp, x, y) = self.buckets[(at % len) as usize];
            if stamp == at {
                a += x;
                b += y;
            }
            if a + b >= min_total {
                break;
            }
        }
        (a, b)
    }

    pub fn sums(&self, now: Instant) -> (u64, u64) {
        let second = now.duration_since(self.origin).as_secs();
        let len = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|(s, _, _)| *s != u64::MAX && *s + len > second)
            .fold((0, 0), |(a, b), (_, x, y)| (a + x, b + y))
    }
}

/// Caps retries and hedges at `ratio` of the route's requests plus `min_per_sec`, over 10 s, so an
/// upstream outage cannot multiply the load the gateway sends (the retry-storm problem).
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: u32,
    counter: Mutex<WindowCounter>,
}

const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// The share of the retry budget only retries without an alternative target may use.
const LAST_CHANCE_RESERVE: f64 = 0.25;

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        Self {
            ratio,
            min_per_sec,
            counter: Mutex::new(WindowCounter::new(BUDGET_WINDOW)),
        }
    }

    pub fn record_request(&self) {
        self.counter.lock().add(Instant::now(), 1, 0);
    }

    /// Takes one retry from the budget if there is one left. A retry that has another target to
    /// fail over to instead may use only part of the budget: the rest is kept for retries that
    /// are a request's last chance. Otherwise, when every target fails a share of calls, the
    /// first target's retries (as many as the budget allows) take it all, and the last target's
    /// never get any: a fifth of failures on two targets then lost 4% of requests instead of 0.3%.
    pub fn try_spend(&self, last_chance: bool) -> bool {
        let now = Instant::now();
        let mut counter = self.counter.lock();
        let (requests, retries) = counter.sums(now);
        let mut allowed =
            self.min_per_sec as f64 * BUDGET_WINDOW.as_secs_f64() + self.ratio * requests as f64;
        if !last_chance {
            allowed *= 1.0 - LAST_CHANCE_RESERVE;
        }
        if (retries as f64) < allowed {
            counter.add(now, 0, 1);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UpstreamError;

    fn status(status: u16) -> ProviderError {
        ProviderError::Status {
            status,
            retry_after: None,
            error: UpstreamError::from_body(b""),
        }
    }

    #[test]
    fn client_errors_go_back_and_server_errors_retry() {
        for code in [400, 413, 422] {
            assert_eq!(
                classify(&status(code)).0,
                Disposition::ReturnToClient,
                "{code}"
            );
        }
        for code in [429, 500, 502, 503, 504, 529] {
            assert!(
                matches!(classify(&status(code)).0, Disposition::Retry { .. }),
                "{code}"
            );
        }
        assert_eq!(
            classify(&status(401)),
            (Disposition::Failover, HealthSignal::Unusable)
        );
        assert_eq!(classify(&status(403)).1, HealthSignal::Unusable);
        assert_eq!(
            classify(&ProviderError::Connect("x".into())),
            (Disposition::Failover, HealthSignal::Unreachable)
        );
        assert_eq!(
            classify(&ProviderError::Timeout(TimeoutKind::FirstToken)),
            (Disposition::Failover, HealthSignal::Failure)
        );
        assert_eq!(
            classify(&ProviderError::Untranslatable("n".into())).1,
            HealthSignal::Neutral
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for i in 0..10 {
            let d = backoff(base, max, i);
            let exp = (base * 2u32.pow(i)).min(max);
            assert!(d >= exp / 2 && d <= exp, "{i}: {d:?}");
        }
    }

    #[test]
    fn budget_allows_floor_plus_ratio() {
        let budget = RetryBudget::new(0.5, 0);
        for _ in 0..10 {
            budget.record_request();
        }
        let granted = (0..20).filter(|_| budget.try_spend(true)).count();
        assert_eq!(granted, 5);
        let floor = RetryBudget::new(0.0, 1);
        assert_eq!((0..20).filter(|_| floor.try_spend(true)).count(), 10);
    }

    #[test]
    fn a_quarter_of_the_budget_is_kept_for_retries_without_an_alternative() {
        let budget = RetryBudget::new(0.0, 2);
        let with_alternative = (0..20).filter(|_| budget.try_spend(false)).count();
        assert_eq!(with_alternative, 15, "three quarters of 20");
        let last_chance = (0..20).filter(|_| budget.try_spend(true)).count();
        assert_eq!(last_chance, 5, "the reserved quarter");
    }
}
