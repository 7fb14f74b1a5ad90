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
//!   the checked hits show, with 95% confidence, an error above the budget
//!   (`verify_max_error`), every cut-off is raised a step.
//! * A near miss (the best candidate within `verify_band` below its cut-off) goes upstream
//!   anyway, so comparing its answer costs nothing. Agreement lowers that entry's cut-off to the
//!   probability seen, unless the upstream ever disagreed at or above it, and the request's own
//!   new entry is born with that cut-off.
//! * Every comparison also teaches the neighbourhoods of the candidates judged above the
//!   cut-off or within `verify_band` below it, whether the request hit or missed: a miss goes
//!   upstream anyway, so each of its candidates is a free labelled pair (its probability, and
//!   whether the upstream answered as that candidate's entry does). A neighbourhood is every
//!   entry of the scope holding the same answer; for a bot that answers by intent, the
//!   intent's other wordings. Its evidence fits one shift of the model's log-odds (a logistic
//!   recalibration, with a prior that keeps a few comparisons from moving it far), and every
//!   candidate of the neighbourhood is judged, and weighed against its rivals, at its shifted
//!   probability: the cache opens where the upstream answers alike at lower probabilities
//!   than the model expects and closes where it answers differently at higher ones. For a
//!   backend that writes every answer afresh the neighbourhood is the entry alone, and every
//!   comparison disagrees, so it closes.
//!
//! Answers agree when their texts are equal once case, punctuation and spacing are set aside.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::SemanticRecord;

/// The least checks the global offset is moved on, and the most it waits for a conclusion:
/// past `MAX_WINDOW` checks without one, the error is about at the budget and counting starts
/// again.
const MIN_WINDOW: u32 = 40;
const MAX_WINDOW: u32 = 400;
/// One-sided 95% confidence (normal quantile) for the error's bounds.
const CONFIDENCE_Z: f64 = 1.645;
const RAISE_STEP: f32 = 0.02;
const LOWER_STEP: f32 = 0.01;
const MAX_OFFSET: f32 = 0.3;
/// Above any probability: an entry the upstream contradicted at 1.0 stops hitting.
pub(super) const CLOSED: f32 = 1.01;
/// A disagreement raises the entry's cut-off this far above the probability it happened at.
const DISAGREEMENT_MARGIN: f32 = 0.01;
/// Answers whose neighbourhood has evidence, across scopes; the least recently used are
/// forgotten (their entries keep what they learnt themselves).
const NEIGHBOURHOODS: usize = 65_536;
/// Comparisons a neighbourhood remembers; the oldest give way, so it follows a backend whose
/// answers change.
const REMEMBERED: usize = 64;
/// The prior's standard deviation of a neighbourhood's log-odds shift: one comparison moves
/// it by less than one, a consistent dozen by several.
const PRIOR_SPREAD: f32 = 1.0;
/// Hits checked behind their answer at once; a sample taken while this many are out is served
/// unchecked, so verification never queues upstream calls behind a burst of hits.
const CHECKS_IN_FLIGHT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// A served hit whose request was also sent upstream.
    Hit,
    /// A candidate just below its cut-off; the request went upstream anyway.
    NearMiss,
    /// A miss with candidates near the cut-off, which only their neighbourhoods learn from.
    Miss,
}

impl ProbeKind {
    pub fn label(self) -> &'static str {
        match self {
            ProbeKind::Hit => "hit",
            ProbeKind::NearMiss => "near_miss",
            ProbeKind::Miss => "miss",
        }
    }
}

/// What to compare the upstream's answer with once it arrives.
#[derive(Debug, Clone)]
pub struct Probe {
    pub(super) kind: ProbeKind,
    /// The entry served (a hit) or just missed (a near miss), which learns for itself.
    pub(super) entry: Option<ProbedEntry>,
    /// The candidates judged near the cut-off, which teach their neighbourhoods.
    pub(super) candidates: Vec<Observed>,
}

#[derive(Debug, Clone)]
pub struct ProbedEntry {
    pub(super) path: String,
    pub(super) probability: f32,
    pub(super) cached: Value,
}

/// A candidate of a lookup, as its neighbourhood learns from it.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub(super) neighbourhood: blake3::Hash,
    /// Its answer (see [`answer_key`]).
    pub(super) answer: blake3::Hash,
    pub(super) probability: f32,
}

/// A served hit to check against the upstream behind its answer; holding it holds one of the
/// few check slots.
#[derive(Debug)]
pub struct HitCheck {
    pub(crate) probe: Probe,
    pub(super) _slot: OwnedSemaphorePermit,
}

/// What the upstream showed about a neighbourhood: its latest comparisons, as the model's
/// log-odds and whether the upstream agreed, and the shift of log-odds they fit.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    comparisons: VecDeque<(f32, bool)>,
    shift: f32,
}

impl Evidence {
    pub fn add(&mut self, probability: f32, agreed: bool) {
        if self.comparisons.len() == REMEMBERED {
            self.comparisons.pop_front();
        }
        self.comparisons.push_back((logit(probability), agreed));
        self.shift = fit_shift(&self.comparisons);
    }

    /// How far the upstream's answers move the model's log-odds in this neighbourhood.
    pub fn shift(&self) -> f32 {
        self.shift
    }
}

/// A candidate's probability as its neighbourhood's evidence moves it. Evidence may lower a
/// probability anywhere, but raises only those at or above `floor`: agreement opens a
/// neighbourhood to wordings near its cut-off, not to any wording at all.
pub fn adjusted(probability: f32, shift: f32, floor: f32) -> f32 {
    if shift == 0.0 || (shift > 0.0 && probability < floor) {
        return probability;
    }
    sigmoid(logit(probability) + shift)
}

/// Probabilities of exactly 0 or 1 would have infinite log-odds.
fn logit(probability: f32) -> f32 {
    let p = probability.clamp(1e-4, 1.0 - 1e-4);
    (p / (1.0 - p)).ln()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The shift `b` of maximum posterior for "the upstream agrees with probability
/// sigmoid(log-odds + b)", under a normal prior of mean 0 and `PRIOR_SPREAD`: Newton's method
/// on a concave function of one variable, which converges in a few steps.
fn fit_shift(comparisons: &VecDeque<(f32, bool)>) -> f32 {
    let precision = 1.0 / (PRIOR_SPREAD * PRIOR_SPREAD);
    let mut shift = 0.0f32;
    for _ in 0..25 {
        let (mut gradient, mut curvature) = (-shift * precision, precision);
        for &(log_odds, agreed) in comparisons {
            let p = sigmoid(log_odds + shift);
            gradient += f32::from(u8::from(agreed)) - p;
            curvature += p * (1.0 - p);
        }
        let step = gradient / curvature;
        shift += step;
        if step.abs() < 1e-4 {
            break;
        }
    }
    shift
}

pub struct Verification {
    pub share: f64,
    pub band: f32,
    pub max_error: f64,
    offset_bits: AtomicU32,
    window: Mutex<Window>,
    neighbourhoods: quick_cache::sync::Cache<blake3::Hash, Evidence>,
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

    /// The shift of a neighbourhood's evidence (see [`adjusted`]); 0 without evidence.
    pub fn neighbourhood_shift(&self, key: Option<blake3::Hash>) -> f32 {
        key.and_then(|key| self.neighbourhoods.get(&key))
            .map_or(0.0, |evidence| evidence.shift())
    }

    /// Adds one comparison to a neighbourhood's evidence.
    pub fn learn_neighbourhood(&self, key: blake3::Hash, probability: f32, agreed: bool) {
        let mut evidence = self.neighbourhoods.get(&key).unwrap_or_default();
        evidence.add(probability, agreed);
        self.neighbourhoods.insert(key, evidence);
    }

    /// Counts a checked hit and moves the global offset once the checks since it last moved
    /// are conclusive: up a step when the error is above the budget with 95% confidence, down
    /// a step when it is below it with the same confidence. A sequential decision on bounds
    /// rather than on each window's ratio: one contradiction among 40 checks is a 2.5% ratio,
    /// but no evidence that the error exceeds a 2% budget.
    /// Returns the error ratio over every checked hit so far.
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
        let (low, high) = wilson_bounds(window.disagreed, window.verified);
        let offset = self.offset();
        let next = if window.verified >= MIN_WINDOW && low > self.max_error {
            Some((offset + RAISE_STEP).min(MAX_OFFSET))
        } else if offset > 0.0 && high < self.max_error {
            Some((offset - LOWER_STEP).max(0.0))
        } else {
            None
        };
        if let Some(next) = next {
            self.offset_bits.store(next.to_bits(), Ordering::Relaxed);
        }
        if next.is_some() || window.verified >= MAX_WINDOW {
            window.verified = 0;
            window.disagreed = 0;
        }
        window.total_disagreed as f64 / window.total_verified as f64
    }
}

/// The Wilson score interval of `failures` in `trials`, at `CONFIDENCE_Z` on each side.
fn wilson_bounds(failures: u32, trials: u32) -> (f64, f64) {
    let (n, z) = (f64::from(trials), CONFIDENCE_Z);
    let p = f64::from(failures) / n;
    let centre = p + z * z / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    let denominator = 1.0 + z * z / n;
    (
        ((centre - spread) / denominator).max(0.0),
        ((centre + spread) / denominator).min(1.0),
    )
}

/// The cut-off a near miss's agreement teaches: the request's own entry is born with it.
pub fn learnt_cutoff(probe: &Probe, response: &Value) -> Option<f32> {
    let entry = probe.entry.as_ref()?;
    (probe.kind == ProbeKind::NearMiss && answers_agree(&entry.cached, response))
        .then_some(entry.probability)
}

/// The neighbourhood an entry belongs to: its tenant, route, namespace and scope, and the
/// answer it holds. `None` for an answer without text, which agrees with nothing.
pub fn neighbourhood(record: &SemanticRecord) -> Option<blake3::Hash> {
    let answer = answer_key(&record.response)?;
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
    hasher.update(answer.as_bytes());
    Some(hasher.finalize())
}

/// An answer's text with case, punctuation and spacing set aside, hashed: two answers agree
/// when their keys are equal. `None` for an answer without text (tool calls only).
pub fn answer_key(response: &Value) -> Option<blake3::Hash> {
    let text = normalised(response["choices"][0]["message"]["content"].as_str()?)?;
    Some(blake3::hash(text.as_bytes()))
}

/// The cut-off an entry is served at: its own, learnt from the upstream, or `base`; never at or
/// below a probability the upstream contradicted it at.
pub fn entry_cutoff(record: &SemanticRecord, base: f32) -> f32 {
    let own = record.cutoff.unwrap_or(base);
    match record.disagreed_at {
        Some(d) => own.max((d + DISAGREEMENT_MARGIN).min(CLOSED)),
        None => own,
    }
}

/// What one comparison teaches an entry (its `cutoff` and `disagreed_at`): a disagreement at
/// `probability` closes it up to just above it; an agreement below its cut-off opens it down
/// to `probability` (never below `floor`), unless the upstream disagreed at or above that
/// probability before. Returns whether the entry changed.
pub fn learn(
    entry: &mut SemanticRecord,
    probability: f32,
    agreed: bool,
    base: f32,
    floor: f32,
) -> bool {
    let before = (entry.cutoff, entry.disagreed_at);
    let current = entry.cutoff.unwrap_or(base);
    if agreed {
        let contradicted = entry.disagreed_at.is_some_and(|d| d >= probability);
        if !contradicted && probability < current {
            entry.cutoff = Some(probability.max(floor));
        }
    } else {
        entry.disagreed_at = Some(
            entry
                .disagreed_at
                .map_or(probability, |d| d.max(probability)),
        );
        entry.cutoff = Some(current.max((probability + DISAGREEMENT_MARGIN).min(CLOSED)));
    }
    (entry.cutoff, entry.disagreed_at) != before
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
    matches!((answer_key(a), answer_key(b)), (Some(x), Some(y)) if x == y)
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
        let mut r = record();
        assert!(learn(&mut r, 0.7, true, 0.83, 0.6));
        assert_eq!(r.cutoff, Some(0.7));
        assert!(learn(&mut r, 0.75, false, 0.83, 0.6));
        assert_eq!((r.cutoff, r.disagreed_at), (Some(0.76), Some(0.75)));
        // An agreement below a disagreement cannot open it again.
        assert!(!learn(&mut r, 0.72, true, 0.83, 0.6));
        assert_eq!(r.cutoff, Some(0.76));
        assert!(!learn(&mut r, 0.5, true, 0.83, 0.6));
        assert_eq!(r.cutoff, Some(0.76));
        // Never below the floor.
        let mut r = record();
        learn(&mut r, 0.4, true, 0.83, 0.6);
        assert_eq!(r.cutoff, Some(0.6));
    }

    #[test]
    fn an_entry_is_served_at_its_own_cut_off_and_never_where_it_was_contradicted() {
        let mut r = record();
        assert_eq!(entry_cutoff(&r, 0.83), 0.83);
        r.cutoff = Some(0.72);
        assert_eq!(entry_cutoff(&r, 0.83), 0.72);
        r.disagreed_at = Some(0.75);
        assert_eq!(entry_cutoff(&r, 0.83), 0.76);
    }

    fn cutoff_after(evidence: &Evidence, base: f32, floor: f32) -> f32 {
        // The least probability the evidence lifts to `base`, found on a fine grid.
        (0..=1000)
            .map(|i| i as f32 / 1000.0)
            .find(|&p| adjusted(p, evidence.shift(), floor) >= base)
            .unwrap_or(1.0)
    }

    #[test]
    fn evidence_opens_where_the_upstream_agrees_below_the_cut_off_and_closes_where_it_does_not() {
        let (base, floor) = (0.84, 0.69);
        assert_eq!(Evidence::default().shift(), 0.0);
        assert_eq!(adjusted(0.8, 0.0, floor), 0.8);
        // One agreement moves little; a consistent run opens towards where it agreed.
        let mut opening = Evidence::default();
        opening.add(0.75, true);
        let after_one = cutoff_after(&opening, base, floor);
        assert!(after_one < base && after_one > 0.8, "{after_one}");
        for _ in 0..11 {
            opening.add(0.75, true);
        }
        let after_twelve = cutoff_after(&opening, base, floor);
        assert!(after_twelve < 0.76, "{after_twelve}");
        // Never below the floor.
        for _ in 0..50 {
            opening.add(0.7, true);
        }
        assert_eq!(cutoff_after(&opening, base, floor), floor);
        // Disagreements at high probability close it above the model's cut-off, and lower
        // its entries as rivals too.
        let mut closing = Evidence::default();
        for _ in 0..3 {
            closing.add(0.9, false);
        }
        assert!(cutoff_after(&closing, base, floor) > 0.9);
        assert!(adjusted(0.5, closing.shift(), floor) < 0.3);
        // Mixed evidence where the model expects it (agreeing about as often as it says)
        // leaves the cut-off about where it was.
        let mut calibrated = Evidence::default();
        for i in 0..40 {
            calibrated.add(0.8, i % 5 != 0);
        }
        let kept = cutoff_after(&calibrated, base, floor);
        assert!((kept - base).abs() < 0.03, "{kept}");
    }

    #[test]
    fn a_neighbourhood_remembers_its_latest_comparisons() {
        let (base, floor) = (0.84, 0.5);
        let mut evidence = Evidence::default();
        for _ in 0..REMEMBERED {
            evidence.add(0.9, false);
        }
        assert!(cutoff_after(&evidence, base, floor) > 0.95);
        for _ in 0..REMEMBERED {
            evidence.add(0.7, true);
        }
        assert!(cutoff_after(&evidence, base, floor) < 0.7);
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
    fn the_offset_rises_when_the_error_is_surely_over_budget_and_falls_when_surely_under() {
        let v = Verification::new(0.1, 0.15, 0.02);
        // One contradiction in 40 is no evidence against a 2% budget.
        for i in 0..40 {
            v.count_hit(i != 0);
        }
        assert_eq!(v.offset(), 0.0);
        // A few more contradictions are.
        let contradictions = (1..=10).find(|_| {
            v.count_hit(false);
            v.offset() > 0.0
        });
        assert!(contradictions.is_some_and(|n| n <= 3), "{contradictions:?}");
        assert_eq!(v.offset(), RAISE_STEP);
        // Clean checks bring it back down once they are enough to bound the error under 2%.
        for _ in 0..120 {
            v.count_hit(true);
        }
        assert_eq!(v.offset(), RAISE_STEP);
        for _ in 0..40 {
            v.count_hit(true);
        }
        assert!((v.offset() - (RAISE_STEP - LOWER_STEP)).abs() < 1e-6);
    }

    #[test]
    fn wilson_bounds_hold_the_ratio_and_narrow_with_more_trials() {
        let (low, high) = wilson_bounds(5, 100);
        assert!(low < 0.05 && 0.05 < high);
        let (low_more, high_more) = wilson_bounds(50, 1000);
        assert!(low < low_more && high_more < high);
        assert_eq!(wilson_bounds(0, 10).0, 0.0);
    }
}
