//! Learning from the upstream within an error budget, in the spirit of vCache: the fitted model
//! knows wordings, not the backend behind the route, and only the upstream can say whether it
//! answers two wordings alike.
//!
//! * A share (`verify_share`) of served hits, drawn uniformly whatever their probability, is
//!   also sent upstream behind the answer, and the fresh answer is compared with the entry's.
//!   Checking behind a hit rather than instead of it costs the same upstream call but neither
//!   the hit nor any latency, and a uniform sample measures exactly what the budget bounds: the
//!   error of answers served.
//!   Disagreement raises that entry's cut-off above the probability it was served at, and while
//!   the sampled error is above the budget (`verify_max_error`) every cut-off is raised a step.
//! * A near miss (the best candidate within `verify_band` below its cut-off) goes upstream
//!   anyway, so comparing its answer costs nothing. Agreement lowers that entry's cut-off to the
//!   probability seen, unless the upstream ever disagreed at or above it, and the request's own
//!   new entry is born with that cut-off.
//! * What an entry learns, its neighbourhood learns too: every entry of the scope holding the
//!   same answer (for a bot that answers by intent, the intent's other wordings) opens to the
//!   probability the upstream agreed at, unless the upstream disagreed with that answer at or
//!   above it. For a backend that writes every answer afresh the neighbourhood is the entry
//!   alone. So the cache opens where the upstream answers alike and stays shut where it does not.
//!
//! Answers agree when their texts are equal once case, punctuation and spacing are set aside.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
/// Answers whose neighbourhood has learnt a cut-off, across scopes; the least recently used
/// are forgotten (their entries keep what they learnt themselves).
const NEIGHBOURHOODS: usize = 65_536;
/// Hits checked behind their answer at once; a sample taken while this many are out is served
/// unchecked, so verification never queues upstream calls behind a burst of hits.
const CHECKS_IN_FLIGHT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// A served hit whose request was also sent upstream.
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
    /// The entry's neighbourhood: its scope and answer (see [`neighbourhood`]).
    pub(super) neighbourhood: Option<blake3::Hash>,
}

/// A served hit to check against the upstream behind its answer; holding it holds one of the
/// few check slots.
#[derive(Debug)]
pub struct HitCheck {
    pub(crate) probe: Probe,
    pub(super) _slot: OwnedSemaphorePermit,
}

/// What the upstream taught an entry or a neighbourhood: the cut-off agreement opened it to,
/// and the highest probability it was contradicted at.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Learnt {
    pub cutoff: Option<f32>,
    pub disagreed_at: Option<f32>,
}

pub struct Verification {
    pub share: f64,
    pub band: f32,
    pub max_error: f64,
    offset_bits: AtomicU32,
    window: Mutex<Window>,
    neighbourhoods: quick_cache::sync::Cache<blake3::Hash, Learnt>,
    check_slots: Arc<Semaphore>,
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
            neighbourhoods: quick_cache::sync::Cache::new(NEIGHBOURHOODS),
            check_slots: Arc::new(Semaphore::new(CHECKS_IN_FLIGHT)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.share > 0.0
    }

    /// How far the observed error has raised every cut-off.
    pub fn offset(&self) -> f32 {
        f32::from_bits(self.offset_bits.load(Ordering::Relaxed))
    }

    /// A check slot if this hit is to be checked against the upstream behind its answer.
    pub fn sample(&self) -> Option<OwnedSemaphorePermit> {
        let sampled = self.enabled() && rand::random::<f64>() < self.share;
        sampled
            .then(|| Arc::clone(&self.check_slots).try_acquire_owned().ok())
            .flatten()
    }

    /// The cut-off a neighbourhood has learnt, if any.
    pub fn neighbourhood(&self, key: Option<blake3::Hash>) -> Learnt {
        key.and_then(|key| self.neighbourhoods.get(&key))
            .unwrap_or_default()
    }

    /// Teaches a neighbourhood what one comparison showed (see [`learn`]).
    pub fn learn_neighbourhood(
        &self,
        key: blake3::Hash,
        probability: f32,
        agreed: bool,
        base: f32,
        floor: f32,
    ) {
        let mut learnt = self.neighbourhood(Some(key));
        learn(&mut learnt, probability, agreed, base, floor);
        self.neighbourhoods.insert(key, learnt);
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

/// The neighbourhood an entry belongs to: its tenant, route, namespace and scope, and the
/// answer it holds. `None` for an answer without text, which agrees with nothing.
pub fn neighbourhood(record: &SemanticRecord) -> Option<blake3::Hash> {
    let text = record.response["choices"][0]["message"]["content"].as_str()?;
    let mut hasher = blake3::Hasher::new();
    for part in [
        &record.tenant,
        &record.route,
        &record.namespace,
        &record.scope,
    ] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.update(normalised(text)?.as_bytes());
    Some(hasher.finalize())
}

/// The cut-off an entry is served at: the lower of its own and its neighbourhood's, `base`
/// where neither learnt one, and never at or below a probability the upstream contradicted
/// the entry itself at.
pub fn entry_cutoff(record: &SemanticRecord, neighbourhood: Learnt, base: f32) -> f32 {
    let own = record.cutoff.unwrap_or(base);
    let opened = neighbourhood.cutoff.map_or(own, |c| own.min(c));
    match record.disagreed_at {
        Some(d) => opened.max((d + DISAGREEMENT_MARGIN).min(CLOSED)),
        None => opened,
    }
}

/// What one comparison teaches an entry or a neighbourhood: a disagreement at `probability`
/// closes it up to just above it; an agreement below its cut-off opens it down to
/// `probability` (never below `floor`), unless the upstream disagreed at or above that
/// probability before.
pub fn learn(learnt: &mut Learnt, probability: f32, agreed: bool, base: f32, floor: f32) {
    let current = learnt.cutoff.unwrap_or(base);
    if agreed {
        let contradicted = learnt.disagreed_at.is_some_and(|d| d >= probability);
        if !contradicted && probability < current {
            learnt.cutoff = Some(probability.max(floor));
        }
    } else {
        learnt.disagreed_at = Some(
            learnt
                .disagreed_at
                .map_or(probability, |d| d.max(probability)),
        );
        learnt.cutoff = Some(current.max((probability + DISAGREEMENT_MARGIN).min(CLOSED)));
    }
}

/// Case, punctuation and spacing set aside; `None` for a text without words.
fn normalised(text: &str) -> Option<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

/// Whether two answers say the same: their texts equal once case, punctuation and spacing are
/// set aside. An answer without text (tool calls only) agrees with nothing.
pub fn answers_agree(a: &Value, b: &Value) -> bool {
    let text = |v: &Value| normalised(v["choices"][0]["message"]["content"].as_str()?);
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
    fn agreement_opens_and_disagreement_closes_for_good() {
        let mut l = Learnt::default();
        learn(&mut l, 0.7, true, 0.83, 0.6);
        assert_eq!(l.cutoff, Some(0.7));
        learn(&mut l, 0.75, false, 0.83, 0.6);
        assert_eq!(l.cutoff, Some(0.76));
        // An agreement below a disagreement cannot open it again.
        learn(&mut l, 0.72, true, 0.83, 0.6);
        assert_eq!(l.cutoff, Some(0.76));
        learn(&mut l, 0.5, true, 0.83, 0.6);
        assert_eq!(l.cutoff, Some(0.76));
        // Never below the floor.
        let mut l = Learnt::default();
        learn(&mut l, 0.4, true, 0.83, 0.6);
        assert_eq!(l.cutoff, Some(0.6));
    }

    #[test]
    fn a_neighbourhood_opens_its_entries_unless_one_was_contradicted_itself() {
        let mut r = record();
        let opened = Learnt {
            cutoff: Some(0.7),
            disagreed_at: None,
        };
        assert_eq!(entry_cutoff(&r, Learnt::default(), 0.83), 0.83);
        assert_eq!(entry_cutoff(&r, opened, 0.83), 0.7);
        r.disagreed_at = Some(0.75);
        assert_eq!(entry_cutoff(&r, opened, 0.83), 0.76);
        // A neighbourhood that closed does not close an entry that learnt nothing.
        let closed = Learnt {
            cutoff: Some(0.9),
            disagreed_at: Some(0.89),
        };
        assert_eq!(entry_cutoff(&record(), closed, 0.83), 0.83);
    }

    #[test]
    fn neighbourhoods_are_the_same_answer_in_the_same_scope_and_tenant() {
        let a = record();
        let mut same = record();
        same.text = "another wording".into();
        same.response = answer("A!");
        assert_eq!(neighbourhood(&a), neighbourhood(&same));
        let mut other_tenant = record();
        other_tenant.tenant = "u".into();
        assert_ne!(neighbourhood(&a), neighbourhood(&other_tenant));
        let mut other_answer = record();
        other_answer.response = answer("b");
        assert_ne!(neighbourhood(&a), neighbourhood(&other_answer));
        let mut no_text = record();
        no_text.response = json!({"choices": [{"message": {"tool_calls": []}}]});
        assert_eq!(neighbourhood(&no_text), None);
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
