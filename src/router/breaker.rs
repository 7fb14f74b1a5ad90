//! A circuit breaker per upstream target: closed, open after N consecutive failures or an error
//! ratio over a window, half-open (one probe) after a cool-down.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use super::policy::{HealthSignal, WindowCounter};
use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
    window: WindowCounter,
    last_error: Option<String>,
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

/// Leave to send one attempt. A half-open breaker hands out one probe permit at a time; a probe
/// permit dropped without an outcome (its request was cancelled) frees the probe slot again.
#[must_use]
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    settled: bool,
}

impl Permit {
    pub fn settle(mut self, signal: HealthSignal, error: Option<String>) {
        self.settled = true;
        self.breaker.record(signal, error);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut inner = self.breaker.inner.lock();
            if inner.state == (State::HalfOpen { probing: true }) {
                inner.state = State::HalfOpen { probing: false };
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    pub state: &'static str,
    pub consecutive_failures: u32,
    pub window_successes: u64,
    pub window_failures: u64,
    /// Seconds until an open breaker lets a probe through.
    pub retry_in_secs: Option<f64>,
    pub last_error: Option<String>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Arc<Self> {
        let window = WindowCounter::new(config.window);
        Arc::new(Self {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
                window,
                last_error: None,
            }),
        })
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut inner = self.inner.lock();
        let probe = match inner.state {
            State::Closed => false,
            State::Open { until } if Instant::now() >= until => {
                inner.state = State::HalfOpen { probing: true };
                true
            }
            State::Open { .. } | State::HalfOpen { probing: true } => return None,
            State::HalfOpen { probing: false } => {
                inner.state = State::HalfOpen { probing: true };
                true
            }
        };
        Some(Permit {
            breaker: Arc::clone(self),
            probe,
            settled: false,
        })
    }

    /// Also used for failures seen after a stream was handed to the client, outside any permit.
    pub fn record(&self, signal: HealthSignal, error: Option<String>) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        match signal {
            HealthSignal::Neutral => {
                if inner.state == (State::HalfOpen { probing: true }) {
                    inner.state = State::HalfOpen { probing: false };
                }
            }
            HealthSignal::Healthy => {
                inner.window.add(now, 1, 0);
                inner.consecutive_failures = 0;
                if matches!(inner.state, State::HalfOpen { .. }) {
                    inner.state = State::Closed;
                    inner.window = WindowCounter::new(self.config.window);
                }
            }
            HealthSignal::Failure | HealthSignal::Unusable => {
                inner.window.add(now, 0, 1);
                inner.consecutive_failures += 1;
                inner.last_error = error;
                let (ok, failed) = inner.window.sums(now);
                let total = ok + failed;
                let ratio_tripped = total >= u64::from(self.config.min_requests)
                    && failed as f64 / total as f64 >= self.config.error_ratio;
                let trip = signal == HealthSignal::Unusable
                    || matches!(inner.state, State::HalfOpen { .. })
                    || inner.consecutive_failures >= self.config.consecutive_failures
                    || ratio_tripped;
                if trip {
                    inner.state = State::Open {
                        until: now + self.config.cooldown,
                    };
                }
            }
        }
    }

    /// 0 closed, 1 half-open, 2 open: the `reprise_breaker_state` gauge.
    pub fn state_code(&self) -> i64 {
        match self.inner.lock().state {
            State::Closed => 0,
            State::HalfOpen { .. } => 1,
            State::Open { .. } => 2,
        }
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let inner = self.inner.lock();
        let (window_successes, window_failures) = inner.window.sums(now);
        let (state, retry_in_secs) = match inner.state {
            State::Closed => ("closed", None),
            State::HalfOpen { .. } => ("half_open", None),
            State::Open { until } if now >= until => ("half_open", Some(0.0)),
            State::Open { until } => ("open", Some((until - now).as_secs_f64())),
        };
        BreakerSnapshot {
            state,
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
    use std::time::Duration;

    fn breaker(cooldown_ms: u64) -> Arc<Breaker> {
        Breaker::new(BreakerConfig {
            consecutive_failures: 3,
            error_ratio: 0.5,
            min_requests: 10,
            window: Duration::from_secs(30),
            cooldown: Duration::from_millis(cooldown_ms),
        })
    }

    fn fail(b: &Arc<Breaker>) {
        b.try_acquire()
            .unwrap()
            .settle(HealthSignal::Failure, Some("boom".into()));
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let b = breaker(50);
        fail(&b);
        fail(&b);
        assert!(b.try_acquire().is_some());
        fail(&b);
        assert!(b.try_acquire().is_none(), "open after 3 failures");
        std::thread::sleep(Duration::from_millis(60));
        let probe = b.try_acquire().expect("half-open probe");
        assert!(b.try_acquire().is_none(), "only one probe at a time");
        drop(probe);
        let probe = b.try_acquire().expect("a cancelled probe frees the slot");
        probe.settle(HealthSignal::Healthy, None);
        assert_eq!(b.snapshot().state, "closed");
    }

    #[test]
    fn failed_probe_reopens_and_unusable_opens_at_once() {
        let b = breaker(20);
        b.try_acquire()
            .unwrap()
            .settle(HealthSignal::Unusable, Some("401".into()));
        assert_eq!(b.snapshot().state, "open");
        std::thread::sleep(Duration::from_millis(30));
        fail(&b);
        assert_eq!(b.snapshot().state, "open");
    }

    #[test]
    fn opens_on_error_ratio_once_the_window_has_enough_attempts() {
        let b = breaker(1000);
        // Alternating success and failure never makes 3 failures in a row; the 50% ratio trips
        // the breaker exactly when the window reaches min_requests (10 attempts).
        for round in 1..=5 {
            b.try_acquire().unwrap().settle(HealthSignal::Healthy, None);
            assert_eq!(b.snapshot().state, "closed", "round {round}");
            fail(&b);
        }
        assert_eq!(b.snapshot().state, "open");
        assert_eq!(b.snapshot().window_failures, 5);
    }
}
