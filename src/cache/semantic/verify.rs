//! Learning from the upstream within an error budget, in the spirit of vCache: the fitted model
//! knows wordings, not the backend behind the route, and only the upstream can say whether it
//! answers two wordings alike.
//!
//! * A share (`verify_share`) of the uncertain would-be hits (those within `verify_band` above
//!   their cut-off; confident ones are always served) is not served: the request goes upstream,
//!   and its fresh answer is compared with the entry's. Disagreement raises that entry's cut-off
//!   above the probability it was about to be served at. The samples also estimate the error
//!   of served hits from above (the uncertain ones are the likeliest to be wrong), and while
//!   that estimate is above the budget (`verify_max_error`) every cut-off is raised a step.
//! * A near miss (the best candidate within `verify_band` below its cut-off) goes upstream
//!   anyway, so comparing its answer costs nothing. Agreement lowers that entry's cut-off to the
//!   probability seen, unless the upstream ever disagreed at or above it, and the request's own
//!   new entry is born with that cut-off: the cache opens where the upstream answers alike and
//!   stays shut where it does not.
//!
//! Answers agree when their texts are equal once case, punctuation and spacing are set aside.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use super::SemanticRecord;

/// Verified would-be hits per adjustment of the global offset.
const WINDOW: u32 = 40;
const RAISE_STEP: f32 = 0.02;
const LOWER_STEP: f32 = 0.01;
const MAX_OFFSET: f32 = 0.3;
/// Above any probability: an entry the upstream contradicted at 1.0 stops hitting.
pub(super) const CLOSED: f32 = 1.01;
/// A disagreement raises the entry's cut-off this far above the probability it happened at.
const DISAGREEMENT_MARGIN: f32 = 0.01;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// A would-be hit sent upstream instead of served.
    Hit,
    /// A candidate just below its cut-off; the request went upstream anyway.
    NearMiss,
}

impl ProbeKind {
    pub fn label(self) -> &'static str {
        match self {
            ProbeKind::Hit => "hit",
            ProbeKind::NearMiss => "near_miss",
        }
    }
}

/// What to compare the upstream's answer with once it arrives.
#[derive(Debug, Clone)]
pub struct Probe {
    pub(super) path: String,
    pub(super) probability: f32,
    pub(super) kind: ProbeKind,
    pub(super) cached: Value,
}

pub struct Verification {
    pub share: f64,
    pub band: f32,
    pub max_error: f64,
    offset_bits: AtomicU32,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    verified: u32,
    disagreed: u32,
    total_verified: u64,
    total_disagreed: u64,
}

impl Verification {
    pub fn new(share: f64, band: f32, max_error: f64) -> Self {
        Self {
            share,
            band,
            max_error,
            offset_bits: AtomicU32::new(0f32.to_bits()),
            window: Mutex::new(Window::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.share > 0.0
    }

    /// How far the observed error has raised every cut-off.
    pub fn offset(&self) -> f32 {
        f32::from_bits(self.offset_bits.load(Ordering::Relaxed))
    }

    /// Whether this would-be hit, at `probability` against its `cutoff`, is checked against
    /// the upstream instead of served.
    pub fn sample(&self, probability: f32, cutoff: f32) -> bool {
        self.enabled() && probability < cutoff + self.band && rand::random::<f64>() < self.share
    }

    /// Counts a verified would-be hit and moves the global offset when a window is full: up a
    /// step while the window's error is above the budget, down while it is under half of it.
    /// Returns the error ratio over every verified hit so far.
    pub fn count_hit(&self, agreed: bool) -> f64 {
        let mut window = self
            .window
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        window.verified += 1;
        window.total_verified += 1;
        if !agreed {
            window.disagreed += 1;
            window.total_disagreed += 1;
        }
        if window.verified >= WINDOW {
            let error = f64::from(window.disagreed) / f64::from(window.verified);
            let offset = self.offset();
            let next = if error > self.max_error {
                (offset + RAISE_STEP).min(MAX_OFFSET)
            } else if error < self.max_error / 2.0 {
                (offset - LOWER_STEP).max(0.0)
            } else {
                offset
            };
            self.offset_bits.store(next.to_bits(), Ordering::Relaxed);
            window.verified = 0;
            window.disagreed = 0;
        }
        window.total_disagreed as f64 / window.total_verified as f64
    }
}

/// The cut-off a near miss's agreement teaches: the request's own entry is born with it.
pub fn learnt_cutoff(probe: &Probe, response: &Value) -> Option<f32> {
    (probe.kind == ProbeKind::NearMiss && answers_agree(&probe.cached, response))
        .then_some(probe.probability)
}

/// The entry's own cut-off if the upstream has taught it one, else `base`.
pub fn entry_cutoff(record: &SemanticRecord, base: f32) -> f32 {
    record.cutoff.unwrap_or(base)
}

/// What one comparison teaches the entry: a disagreement at `probability` closes it up to just
/// above it; an agreement below its cut-off opens it down to `probability` (never below
/// `floor`), unless the upstream disagreed at or above that probability before.
pub fn learn(record: &mut SemanticRecord, probability: f32, agreed: bool, base: f32, floor: f32) {
    let current = entry_cutoff(record, base);
    if agreed {
        let contradicted = record.disagreed_at.is_some_and(|d| d >= probability);
        if !contradicted && probability < current {
            record.cutoff = Some(probability.max(floor));
        }
    } else {
        record.disagreed_at = Some(
            record
                .disagreed_at
                .map_or(probability, |d| d.max(probability)),
        );
        record.cutoff = Some(current.max((probability + DISAGREEMENT_MARGIN).min(CLOSED)));
    }
}

/// Whether two answers say the same: their texts equal once case, punctuation and spacing are
/// set aside. An answer without text (tool calls only) agrees with nothing.
pub fn answers_agree(a: &Value, b: &Value) -> bool {
    let text = |v: &Value| -> Option<String> {
        let content = v["choices"][0]["message"]["content"].as_str()?;
        let words: Vec<String> = content
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        (!words.is_empty()).then(|| words.join(" "))
    };
    matches!((text(a), text(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(text: &str) -> Value {
        json!({"choices": [{"message": {"role": "assistant", "content": text}}]})
    }

    fn record() -> SemanticRecord {
        serde_json::from_value(json!({
            "created_at_ms": 0, "ttl_secs": 60, "tenant": "t", "route": "r", "namespace": "",
            "model": "m", "scope": "00", "text": "q", "vector": "", "target": "x",
            "response": answer("a"),
        }))
        .unwrap()
    }

    #[test]
    fn answers_agree_apart_from_case_punctuation_and_spacing() {
        assert!(answers_agree(
            &answer("The store opens at 9."),
            &answer("the store  opens at 9")
        ));
        assert!(!answers_agree(
            &answer("The store opens at 9."),
            &answer("The store opens at 10.")
        ));
        assert!(!answers_agree(&json!({}), &json!({})));
    }

    #[test]
    fn agreement_opens_an_entry_and_disagreement_closes_it_for_good() {
        let mut r = record();
        learn(&mut r, 0.7, true, 0.83, 0.6);
        assert_eq!(entry_cutoff(&r, 0.83), 0.7);
        learn(&mut r, 0.75, false, 0.83, 0.6);
        assert_eq!(entry_cutoff(&r, 0.83), 0.76);
        // An agreement below a disagreement cannot open it again.
        learn(&mut r, 0.72, true, 0.83, 0.6);
        assert_eq!(entry_cutoff(&r, 0.83), 0.76);
        learn(&mut r, 0.5, true, 0.83, 0.6);
        assert_eq!(entry_cutoff(&r, 0.83), 0.76);
    }

    #[test]
    fn the_offset_rises_while_the_error_is_over_budget_and_falls_back_under_it() {
        let v = Verification::new(0.1, 0.15, 0.02);
        for i in 0..WINDOW {
            v.count_hit(i % 10 != 0);
        }
        assert_eq!(v.offset(), RAISE_STEP);
        for _ in 0..WINDOW {
            v.count_hit(true);
        }
        assert!((v.offset() - (RAISE_STEP - LOWER_STEP)).abs() < 1e-6);
    }
}
