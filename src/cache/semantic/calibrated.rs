//! The calibrated decision: instead of a hand-set cosine threshold and a chain of vetoes, one
//! probability that a cached entry's answer also answers the request, from a logistic model over
//! the pair's features (`features.rs`), fitted on labelled pairs by
//! `scripts/fit_semantic_model.py` (`make fit`) and shipped as `model.json`.
//!
//! The operator sets the risk instead of a cosine: `semantic.max_false_hit_rate`. The model file
//! carries its operating points, measured on domains each held out of its own fit, and the
//! lowest cut-off whose false-hit rate (and twice it for wrong answers among served repeats)
//! holds there, at that cut-off and every higher one, is the one used.
//!
//! Three things refuse whatever the score: a veto of the rules (another number or date on both
//! sides, a number or date one side drops, a negation of what the other asserts, the other side
//! of a polarity pair); and ambiguity, two entries that both match but were answered differently
//! (`rival_margin`): the wording then does not tell which answer is meant.

use std::path::Path;
use std::sync::{Arc, LazyLock};

use serde::Deserialize;

use super::SemanticRecord;
use super::features::{FEATURE_NAMES, PairFeatures, VETOES, pair_features};
use super::outcome::Guard;
use crate::embed::{EmbedError, Embedded, Embedder};

const SHIPPED: &str = include_str!("model.json");

#[derive(Debug, Clone, Deserialize)]
pub struct OperatingPoint {
    pub cutoff: f32,
    pub false_hit_rate: f64,
    pub wrong_rate: f64,
    pub hit_rate: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ScoreModel {
    features: Vec<String>,
    vetoes: Vec<String>,
    mean: Vec<f32>,
    scale: Vec<f32>,
    weights: Vec<f32>,
    bias: f32,
    /// Candidates less similar than this are not scored (the pairs it was fitted on start here).
    pub min_similarity: f32,
    pub rival_margin: f32,
    operating_points: Vec<OperatingPoint>,
}

static SHIPPED_MODEL: LazyLock<Result<ScoreModel, String>> =
    LazyLock::new(|| ScoreModel::parse(SHIPPED));

impl ScoreModel {
    /// The model fitted on the development data and shipped in the binary.
    pub fn shipped() -> Result<ScoreModel, String> {
        SHIPPED_MODEL.clone()
    }

    pub fn from_file(path: &Path) -> Result<ScoreModel, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<ScoreModel, String> {
        let model: ScoreModel = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if model.features != FEATURE_NAMES {
            return Err(format!(
                "the model's features {:?} are not this build's {FEATURE_NAMES:?}; refit it with `make fit`",
                model.features
            ));
        }
        if model.vetoes != VETOES {
            return Err(format!(
                "the model's vetoes {:?} are not this build's {VETOES:?}; refit it with `make fit`",
                model.vetoes
            ));
        }
        let n = FEATURE_NAMES.len();
        if model.mean.len() != n || model.scale.len() != n || model.weights.len() != n {
            return Err(format!("mean, scale and weights need {n} values each"));
        }
        if model.operating_points.is_empty() {
            return Err("no operating points".into());
        }
        Ok(model)
    }

    /// The probability that the candidate's answer answers the request.
    pub fn probability(&self, features: &PairFeatures) -> f32 {
        let z: f32 = features
            .values()
            .iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .zip(&self.weights)
            .map(|(((x, mean), scale), weight)| (x - mean) / scale * weight)
            .sum::<f32>()
            + self.bias;
        1.0 / (1.0 + (-z).exp())
    }

    /// The lowest cut-off at which the held-out false-hit rate is within `max_false_hit_rate`
    /// and the wrong rate among served repeats within twice it, there and at every higher cut-off;
    /// the highest cut-off if none is.
    pub fn operating_point(&self, max_false_hit_rate: f64) -> &OperatingPoint {
        let mut points = self.operating_points.iter().collect::<Vec<_>>();
        points.sort_by(|a, b| a.cutoff.total_cmp(&b.cutoff));
        let highest = points[points.len() - 1];
        points
            .iter()
            .rev()
            .take_while(|p| {
                p.false_hit_rate <= max_false_hit_rate && p.wrong_rate <= 2.0 * max_false_hit_rate
            })
            .last()
            .copied()
            .unwrap_or(highest)
    }
}

/// The guard a veto stands for.
pub fn veto_guard(veto: &str) -> Guard {
    match veto {
        "numbers_differ" | "numbers_one_side" => Guard::Numbers,
        "times_differ" | "times_one_side" => Guard::Times,
        "negation_flip" => Guard::Negation,
        _ => Guard::Polarity,
    }
}

/// What the model makes of one (request, entry) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PairVerdict {
    Vetoed(Guard),
    Scored(f32),
}

/// The model, its cut-off, and the entries' words in context (kept for the entries that match
/// often: a repeated intent meets the same entry again and again).
pub struct CalibratedJudge {
    pub model: ScoreModel,
    pub cutoff: f32,
    embedder: Embedder,
    entry_words: quick_cache::sync::Cache<String, Arc<Embedded>>,
}

impl CalibratedJudge {
    pub fn new(
        model: ScoreModel,
        max_false_hit_rate: f64,
        embedder: Embedder,
        cached: usize,
    ) -> Self {
        let cutoff = model.operating_point(max_false_hit_rate).cutoff;
        Self {
            model,
            cutoff,
            embedder,
            entry_words: quick_cache::sync::Cache::new(cached.max(1)),
        }
    }

    /// The pair's verdict: a veto, or the probability that the entry's answer answers the
    /// request.
    pub async fn judge(
        &self,
        query: &str,
        query_words: &Embedded,
        entry: &SemanticRecord,
        similarity: f32,
    ) -> Result<PairVerdict, EmbedError> {
        let entry_words = self.entry_words(entry).await?;
        let features = pair_features(query, query_words, &entry.text, &entry_words, similarity);
        Ok(match features.veto() {
            Some(veto) => PairVerdict::Vetoed(veto_guard(veto)),
            None => PairVerdict::Scored(self.model.probability(&features)),
        })
    }

    /// An entry's words in context: stored with it, or from memory, or (an entry written
    /// without them) from one forward pass of its text.
    pub async fn entry_words(&self, entry: &SemanticRecord) -> Result<Arc<Embedded>, EmbedError> {
        if let Some(words) = entry.words.as_ref().and_then(|w| w.unpack(&entry.vector)) {
            return Ok(Arc::new(words));
        }
        if let Some(words) = self.entry_words.get(&entry.text) {
            return Ok(words);
        }
        let words = Arc::new(
            self.embedder
                .embed_in(&entry.tenant, entry.text.clone(), true)
                .await?,
        );
        self.entry_words.insert(entry.text.clone(), words.clone());
        Ok(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_model_loads_and_stricter_rates_never_lower_the_cut_off() {
        let model = ScoreModel::shipped().expect("model.json matches this build's features");
        let mut last = 0.0;
        for rate in [0.2, 0.05, 0.02, 0.01, 0.005, 0.001] {
            let point = model.operating_point(rate);
            assert!(point.cutoff >= last, "rate {rate}: {point:?}");
            last = point.cutoff;
        }
        let point = model.operating_point(0.01);
        assert!(point.false_hit_rate <= 0.01 && point.wrong_rate <= 0.02);
    }
}
