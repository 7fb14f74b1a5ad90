//! A circuit breaker per upstream target, built so that a degraded target keeps serving what it
//! can and only a broken one is skipped:
//!
//! - **Closed → open on evidence that scales with volume.** Once the target has had
//!   `min_requests` recent attempts, only the error *rate* of the most recent ones decides (a run of
//!   five failures happens by chance every few thousand calls at a 20% error rate, and at volume that
//!   is every second). Consecutive failures decide only below that volume, where a rate means little.
//!   Credentials refused (401/403) open at once; so do `consecutive_failures` refused connections in
//!   a row, whatever the volume, so a target that is really down is skipped within a second.
//! - **Open → recovering after `cooldown`**: a share of traffic that grows linearly over `recovery`
//!   goes through (slow start rather than one probe); the error rate since recovery began reopens
//!   it, reaching the end of `recovery` without that closes it.
//! - **Panic**: when no target of a route admits a request, the router may still send it to a target
//!   that is open only for its error rate ([`Breaker::panic_permit`]), as Envoy's panic threshold
//!   does. A target that refuses connections or credentials is not such a target.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;

use super::policy::{HealthSignal, WindowCounter};
use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed,
    Open { until: Instant, cause: Cause },
    Recovering { since: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Too many failures: the target may still answer some requests.
    Failing,
    /// Connections or credentials refused: no request can succeed.
    Broken,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
    consecutive_unreachable: u32,
    window: WindowCounter,
    last_error: Option<String>,
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

/// Leave to send one attempt; its outcome goes back to the breaker through [`Permit::settle`].
#[must_use]
pub struct Permit {
    breaker: Arc<Breaker>,
}

impl Permit {
    pub fn settle(self, signal: HealthSignal, error: Option<String>) {
        self.breaker.record(signal, error);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    pub state: &'static str,
    /// The share of requests the breaker lets through now: 1 closed, 0 open, rising while recovering.
    pub admitting: f64,
    pub consecutive_failures: u32,
    pub window_successes: u64,
    pub window_failures: u64,
    /// Seconds until an open breaker starts letting traffic through again.
    pub retry_in_secs: Option<f64>,
    pub last_error: Option<String>,
}

/// Standard deviations of confidence before a failure rate counts as over the threshold: the
/// chance that a target failing at a lower rate trips is about 0.1% per judgement.
const CONFIDENCE_Z: f64 = 3.0;

/// Whether `failed` of `total` shows, with `CONFIDENCE_Z` confidence, a failure rate of at least
/// `ratio`: the lower end of the Wilson score interval. A rate over a few dozen attempts is
/// noisy (six failures in twenty happen often at 20%); this keeps chance from opening a breaker
/// while a target that fails everything still opens it within twenty attempts.
fn surely_at_least(failed: u64, total: u64, ratio: f64) -> bool {
    if total == 0 {
        return false;
    }
    let n = total as f64;
    let p = failed as f64 / n;
    let z2 = CONFIDENCE_Z * CONFIDENCE_Z;
    let centre = p + z2 / (2.0 * n);
    let spread = CONFIDENCE_Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    (centre - spread) / (1.0 + z2 / n) >= ratio
}

/// The share a recovering target gets at the very start of its recovery.
const RECOVERY_START_SHARE: f64 = 0.1;

/// Connection failures in a row after which a target counts as down for panic routing.
const DOWN_AFTER_UNREACHABLE: u32 = 2;

impl Breaker {
    pub fn new(config: BreakerConfig) -> Arc<Self> {
        let window = WindowCounter::new(config.window);
        Arc::new(Self {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
                consecutive_unreachable: 0,
                window,
                last_error: None,
            }),
        })
    }

    fn recovering_share(&self, since: Instant, now: Instant) -> f64 {
        let recovery = self.config.recovery.as_secs_f64();
        if recovery <= 0.0 {
            return 1.0;
        }
        let progress = now.duration_since(since).as_secs_f64() / recovery;
        (RECOVERY_START_SHARE + (1.0 - RECOVERY_START_SHARE) * progress).min(1.0)
    }

    /// Moves an expired open state to recovering and a finished recovery to closed.
    fn advance(&self, inner: &mut Inner, now: Instant) {
        match inner.state {
            State::Open { until, .. } if now >= until => {
                inner.state = State::Recovering { since: now };
                inner.window = WindowCounter::new(self.config.window);
            }
            State::Recovering { since } if now.duration_since(since) >= self.config.recovery => {
                inner.state = State::Closed;
            }
            _ => {}
        }
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let before = inner.state;
        self.advance(&mut inner, now);
        let admit = match inner.state {
            State::Closed => true,
            State::Open { .. } => false,
            // The first request of a recovery always goes, so a quiet route still recovers.
            State::Recovering { .. } if before != inner.state => true,
            State::Recovering { since } => {
                rand::rng().random_bool(self.recovering_share(since, now))
            }
        };
        drop(inner);
        admit.then(|| Permit {
            breaker: Arc::clone(self),
        })
    }

    /// A permit for a route that has nothing else to try: granted to a target that is degraded,
    /// one that answered some requests within the window, unless its credentials or its last
    /// connections were refused.
    pub fn panic_permit(self: &Arc<Self>) -> Option<Permit> {
        let inner = self.inner.lock();
        let (successes, _) = inner.window.sums(Instant::now());
        let broken = successes == 0
            || matches!(
                inner.state,
                State::Open {
                    cause: Cause::Broken,
                    ..
                }
            )
            || inner.consecutive_unreachable >= DOWN_AFTER_UNREACHABLE;
        drop(inner);
        (!broken).then(|| Permit {
            breaker: Arc::clone(self),
        })
    }

    /// Also used for failures seen after a stream was handed to the client, outside any permit.
    pub fn record(&self, signal: HealthSignal, error: Option<String>) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        self.advance(&mut inner, now);
        match signal {
            HealthSignal::Neutral => {}
            HealthSignal::Healthy => {
                inner.window.add(now, 1, 0);
                inner.consecutive_failures = 0;
                inner.consecutive_unreachable = 0;
            }
            HealthSignal::Failure | HealthSignal::Unreachable | HealthSignal::Unusable => {
                inner.window.add(now, 0, 1);
                inner.consecutive_failures += 1;
                if signal == HealthSignal::Unreachable {
                    inner.consecutive_unreachable += 1;
                } else {
                    inner.consecutive_unreachable = 0;
                }
                inner.last_error = error;
                if let Some(cause) = self.trips(&inner, signal, now) {
                    inner.state = State::Open {
                        until: now + self.config.cooldown,
                        cause,
                    };
                }
            }
        }
    }

    /// Whether this failure opens the breaker, and why.
    fn trips(&self, inner: &Inner, signal: HealthSignal, now: Instant) -> Option<Cause> {
        if signal == HealthSignal::Unusable
            || inner.consecutive_unreachable >= self.config.consecutive_failures
        {
            return Some(Cause::Broken);
        }
        let failing = match inner.state {
            // Already open: later failures (of panic traffic) neither extend nor restart it.
            State::Open { .. } => false,
            // Recovery is judged on every outcome since it began: failures before any success
            // mean the target is still down; after that, the rate decides.
            State::Recovering { .. } => {
                let (ok, failed) = inner.window.sums(now);
                ok == 0 || surely_at_least(failed, ok + failed, self.config.error_ratio)
            }
            State::Closed => {
                let min = u64::from(self.config.min_requests);
                let (ok, failed) = inner.window.recent_sums(now, min);
                if ok + failed >= min {
                    surely_at_least(failed, ok + failed, self.config.error_ratio)
                } else {
                    inner.consecutive_failures >= self.config.consecutive_failures
                }
            }
        };
        failing.then_some(Cause::Failing)
    }

    /// How long until the breaker lets traffic through again; zero unless it is open.
    pub fn retry_in(&self) -> Duration {
        let now = Instant::now();
        match self.inner.lock().state {
            State::Open { until, .. } => until.saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    /// 0 closed, 1 recovering (half-open), 2 open: the `reprise_breaker_state` gauge.
    pub fn state_code(&self) -> i64 {
        match self.inner.lock().state {
            State::Closed => 0,
            State::Recovering { .. } => 1,
            State::Open { .. } => 2,
        }
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let inner = self.inner.lock();
        let (window_successes, window_failures) = inner.window.sums(now);
        let (state, admitting, retry_in_secs) = match inner.state {
            State::Closed => ("closed", 1.0, None),
            State::Recovering { since } => {
                if now.duration_since(since) >= self.config.recovery {
                    ("closed", 1.0, None)
                } else {
                    ("half_open", self.recovering_share(since, now), None)
                }
            }
            State::Open { until, .. } if now >= until => {
                ("half_open", RECOVERY_START_SHARE, Some(0.0))
            }
            State::Open { until, .. } => ("open", 0.0, Some((until - now).as_secs_f64())),
        };
        BreakerSnapshot {
            state,
            admitting,
            consecutive_failures: inner.consecutive_failures,
            window_successes,
            window_failures,
            retry_in_secs,
            last_error: inner.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cooldown_ms: u64, recovery_ms: u64) -> Arc<Breaker> {
        Breaker::new(BreakerConfig {
            consecutive_failures: 3,
            error_ratio: 0.5,
            min_requests: 10,
            window: Duration::from_secs(30),
            cooldown: Duration::from_millis(cooldown_ms),
            recovery: Duration::from_millis(recovery_ms),
            panic: true,
        })
    }

    fn outcome(b: &Arc<Breaker>, signal: HealthSignal) {
        b.try_acquire()
            .expect("admitted")
            .settle(signal, Some("boom".into()));
    }

    #[test]
    fn at_low_volume_consecutive_failures_open_it_and_recovery_starts_with_one_request() {
        let b = breaker(50, 0);
        outcome(&b, HealthSignal::Failure);
        outcome(&b, HealthSignal::Failure);
        outcome(&b, HealthSignal::Failure);
        assert!(b.try_acquire().is_none(), "open after 3 failures");
        assert!(b.retry_in() > Duration::ZERO);
        std::thread::sleep(Duration::from_millis(60));
        outcome(&b, HealthSignal::Healthy);
        assert_eq!(b.snapshot().state, "closed");
    }

    #[test]
    fn at_volume_a_run_of_failures_does_not_open_it_but_the_error_rate_does() {
        let b = breaker(1000, 0);
        for _ in 0..40 {
            outcome(&b, HealthSignal::Healthy);
        }
        for _ in 0..8 {
            outcome(&b, HealthSignal::Failure);
        }
        assert_eq!(b.snapshot().state, "closed", "8 in a row among 48 is 17%");
        let mut failures = 8;
        while b.snapshot().state == "closed" {
            outcome(&b, HealthSignal::Failure);
            failures += 1;
        }
        // Opens only once the rate is surely over one half: not at 40 of 80, well before 40 of 200.
        assert!(
            (60..120).contains(&failures),
            "opened at {failures} of {}",
            failures + 40
        );
    }

    #[test]
    fn a_small_sample_over_the_ratio_by_chance_does_not_open_it() {
        assert!(
            !surely_at_least(11, 20, 0.5),
            "11 of 20 at a 20% rate is chance"
        );
        assert!(surely_at_least(20, 20, 0.5), "20 of 20 is not");
        assert!(!surely_at_least(0, 0, 0.5));
    }

    #[test]
    fn a_target_that_answered_nothing_in_the_window_is_not_used_in_panic() {
        let b = breaker(1000, 0);
        for _ in 0..3 {
            outcome(&b, HealthSignal::Failure);
        }
        assert_eq!(b.snapshot().state, "open");
        assert!(b.panic_permit().is_none());
    }

    #[test]
    fn refused_connections_open_it_at_any_volume_and_rule_out_panic() {
        let b = breaker(1000, 0);
        for _ in 0..1000 {
            outcome(&b, HealthSignal::Healthy);
        }
        for _ in 0..3 {
            outcome(&b, HealthSignal::Unreachable);
        }
        assert_eq!(b.snapshot().state, "open");
        assert!(b.panic_permit().is_none());
    }

    #[test]
    fn a_failing_target_may_serve_in_panic_and_recovers_gradually() {
        let b = breaker(20, 400);
        outcome(&b, HealthSignal::Healthy);
        for _ in 0..3 {
            outcome(&b, HealthSignal::Failure);
        }
        assert!(b.try_acquire().is_none());
        b.panic_permit()
            .expect("only failing: panic may use it")
            .settle(HealthSignal::Failure, None);
        std::thread::sleep(Duration::from_millis(30));
        outcome(&b, HealthSignal::Healthy);
        let snapshot = b.snapshot();
        assert_eq!(snapshot.state, "half_open");
        assert!(snapshot.admitting < 0.5, "{}", snapshot.admitting);
        let admitted = (0..1000).filter(|_| b.try_acquire().is_some()).count();
        assert!((50..500).contains(&admitted), "{admitted} of 1000");
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(b.snapshot().state, "closed");
        assert!(b.try_acquire().is_some());
    }

    #[test]
    fn a_failure_early_in_recovery_reopens_and_unusable_opens_at_once() {
        let b = breaker(20, 1000);
        outcome(&b, HealthSignal::Healthy);
        outcome(&b, HealthSignal::Unusable);
        assert_eq!(b.snapshot().state, "open");
        assert!(
            b.panic_permit().is_none(),
            "refused credentials never serve"
        );
        std::thread::sleep(Duration::from_millis(30));
        outcome(&b, HealthSignal::Failure);
        assert_eq!(b.snapshot().state, "open");
    }
}
