//! What the calibrated decision knows about a (request, cached entry) pair: the sentence
//! similarity, how well each content word of one text is explained by the other's words in
//! context (the token vectors of the same forward pass, aligned greedily as BERTScore does), and
//! the evidence the rules find (another number, date, name or slot value on both sides, a
//! negation or polarity flip, a slot one side drops). Each is a number the fitted model weighs;
//! none refuses on its own.
//!
//! The same function computes the features at lookup time and in `examples/semantic_pairs.rs`,
//! which writes the labelled pairs the model is fitted on (`scripts/fit_semantic_model.py`).

use std::collections::BTreeSet;

use super::rules::{
    TIME_WORDS, direction_flip, entities, is_content_word, negation_flip, numbers, polarity,
    singular, substitution, times, words,
};
use crate::embed::Embedded;

/// Feature names in the order of [`PairFeatures::values`]; the model file lists them too and a
/// model with other names is refused at load.
pub const FEATURE_NAMES: &[&str] = &[
    "cosine",
    "align_mean",
    "align_min",
    "unshared_align_min",
    "unshared_words",
    "unshared_both_sides",
    "jaccard",
    "numbers_differ",
    "numbers_one_side",
    "times_differ",
    "times_one_side",
    "negation_flip",
    "polarity_flip",
    "entities_differ",
    "entity_one_side",
    "substitution",
    "content_length_gap",
    "extra_one_side",
    "extra_align_min",
    "swap_similarity",
];

/// Evidence on both sides that the texts ask for different things: a pair with one of these is
/// refused whatever its score. They are rules, not fitted: another number, another date or time,
/// a number or a date (other than today) that one side drops, a negation of what the other
/// asserts, the other side of a polarity pair.
pub const VETOES: &[&str] = &[
    "numbers_differ",
    "numbers_one_side",
    "times_differ",
    "times_one_side",
    "negation_flip",
    "polarity_flip",
];

#[derive(Debug, Clone, PartialEq)]
pub struct PairFeatures {
    values: Vec<f32>,
}

impl PairFeatures {
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The first veto the pair carries, if any.
    pub fn veto(&self) -> Option<&'static str> {
        VETOES
            .iter()
            .copied()
            .find(|name| self.get(name).is_some_and(|v| v > 0.0))
    }

    pub fn get(&self, name: &str) -> Option<f32> {
        let index = FEATURE_NAMES.iter().position(|n| *n == name)?;
        self.values.get(index).copied()
    }
}

/// A text's words with their vectors in context, apostrophes joined back ("don ' t" → "dont",
/// "atm ' s" → "atms") so that the words are the rules' words.
struct ContextWords {
    words: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

impl ContextWords {
    fn from(embedded: &Embedded) -> Self {
        let mut words: Vec<String> = Vec::with_capacity(embedded.words.len());
        let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(embedded.words.len());
        let mut join_next = false;
        for (index, word) in embedded.words.iter().enumerate() {
            let vector = embedded.word_vector(index);
            if word == "'" || word == "’" {
                join_next = !words.is_empty();
                continue;
            }
            match (join_next, words.last_mut(), vectors.last_mut()) {
                (true, Some(last_word), Some(last_vector)) => {
                    last_word.push_str(word);
                    last_vector
                        .iter_mut()
                        .zip(vector)
                        .for_each(|(a, b)| *a += b);
                    normalise(last_vector);
                }
                _ => {
                    words.push(word.clone());
                    vectors.push(vector.to_vec());
                }
            }
            join_next = false;
        }
        Self { words, vectors }
    }

    /// Indices of the content words (not grammar, numbers, negations or times).
    fn content(&self) -> Vec<usize> {
        (0..self.words.len())
            .filter(|&i| {
                let word = &self.words[i];
                word.chars().any(char::is_alphanumeric)
                    && is_content_word(word)
                    && !TIME_WORDS.contains(&word.as_str())
            })
            .collect()
    }

    /// The best cosine of word `index` with any word of `other` (its grammar words included:
    /// "when" explains "time").
    fn best_counterpart(&self, index: usize, other: &ContextWords) -> f32 {
        other
            .vectors
            .iter()
            .map(|v| dot(&self.vectors[index], v))
            .fold(f32::NEG_INFINITY, f32::max)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

fn flag(condition: bool) -> f32 {
    if condition { 1.0 } else { 0.0 }
}

/// The pair's features; `similarity` is the sentence vectors' cosine.
pub fn pair_features(
    query: &str,
    query_embedded: &Embedded,
    candidate: &str,
    candidate_embedded: &Embedded,
    similarity: f32,
) -> PairFeatures {
    let (qw, cw) = (
        ContextWords::from(query_embedded),
        ContextWords::from(candidate_embedded),
    );
    let (q_content, c_content) = (qw.content(), cw.content());
    let lemma = |w: &ContextWords, i: usize| singular(&w.words[i]);
    let q_lemmas: BTreeSet<String> = q_content.iter().map(|&i| lemma(&qw, i)).collect();
    let c_lemmas: BTreeSet<String> = c_content.iter().map(|&i| lemma(&cw, i)).collect();

    let q_scores: Vec<f32> = q_content
        .iter()
        .map(|&i| qw.best_counterpart(i, &cw))
        .collect();
    let c_scores: Vec<f32> = c_content
        .iter()
        .map(|&i| cw.best_counterpart(i, &qw))
        .collect();
    let mean = |scores: &[f32]| {
        if scores.is_empty() {
            1.0
        } else {
            scores.iter().sum::<f32>() / scores.len() as f32
        }
    };
    let (q_mean, c_mean) = (mean(&q_scores), mean(&c_scores));
    let align_mean = if q_mean + c_mean > 0.0 {
        2.0 * q_mean * c_mean / (q_mean + c_mean)
    } else {
        0.0
    };
    let align_min = q_scores
        .iter()
        .chain(&c_scores)
        .copied()
        .fold(1.0f32, f32::min);
    // Words one side has and the other lacks as such: how well the other side explains them.
    let unshared =
        |content: &[usize], scores: &[f32], w: &ContextWords, other: &BTreeSet<String>| {
            content
                .iter()
                .zip(scores)
                .filter(|&(&i, _)| !other.contains(&lemma(w, i)))
                .map(|(_, &score)| score)
                .collect::<Vec<f32>>()
        };
    let q_unshared = unshared(&q_content, &q_scores, &qw, &c_lemmas);
    let c_unshared = unshared(&c_content, &c_scores, &cw, &q_lemmas);
    let unshared_align_min = q_unshared
        .iter()
        .chain(&c_unshared)
        .copied()
        .fold(1.0f32, f32::min);
    // A side that adds words the other lacks entirely ("resume audiobook playback" / "resume
    // playback"): how well the shorter side explains them.
    let extra_align_min = if q_unshared.is_empty() != c_unshared.is_empty() {
        unshared_align_min
    } else {
        1.0
    };
    // One word swapped for another on each side: how alike the swapped words are ("times" /
    // "schedule" are, "Fremont" / "Oakland" less so).
    let swap_similarity = q_content
        .iter()
        .filter(|&&i| !c_lemmas.contains(&lemma(&qw, i)))
        .flat_map(|&i| {
            c_content
                .iter()
                .filter(|&&j| !q_lemmas.contains(&lemma(&cw, j)))
                .map(move |&j| (i, j))
        })
        .map(|(i, j)| dot(&qw.vectors[i], &cw.vectors[j]))
        .fold(0.0f32, f32::max);
    let union = q_lemmas.union(&c_lemmas).count();
    let jaccard = if union == 0 {
        1.0
    } else {
        q_lemmas.intersection(&c_lemmas).count() as f32 / union as f32
    };

    let (q, c) = (words(query), words(candidate));
    let (qn, cn) = (numbers(&q), numbers(&c));
    let (qt, ct) = (times(&q), times(&c));
    let (qp, cp) = (polarity(&q), polarity(&c));
    let polarity_flip = qp.iter().any(|(pair, (sides, _))| {
        cp.get(pair)
            .is_some_and(|(other_sides, _)| other_sides != sides)
    }) || direction_flip(&q, &c).is_some();
    let (qe, ce) = (entities(query), entities(candidate));
    let words_of = |w: &[String]| w.iter().map(|w| singular(w)).collect::<BTreeSet<String>>();
    let (q_words, c_words) = (words_of(&q), words_of(&c));
    // A name counts as shared if the other text has it too, capitalised or not.
    let q_names = qe
        .iter()
        .filter(|n| !ce.contains(*n) && !c_words.contains(*n))
        .count();
    let c_names = ce
        .iter()
        .filter(|n| !qe.contains(*n) && !q_words.contains(*n))
        .count();

    let values = vec![
        similarity,
        align_mean,
        align_min,
        unshared_align_min,
        (q_unshared.len() + c_unshared.len()).min(6) as f32,
        flag(!q_unshared.is_empty() && !c_unshared.is_empty()),
        jaccard,
        flag(!qn.is_empty() && !cn.is_empty() && qn != cn),
        flag(qn.is_empty() != cn.is_empty()),
        flag(!qt.is_empty() && !ct.is_empty() && qt != ct),
        flag(beyond_present(&qt) != beyond_present(&ct)),
        flag(negation_flip(&q, &c)),
        flag(polarity_flip),
        flag(q_names > 0 && c_names > 0),
        flag((q_names > 0) != (c_names > 0)),
        flag(substitution(&q, &c).is_some()),
        (q_lemmas.len() as f32 - c_lemmas.len() as f32)
            .abs()
            .min(6.0),
        flag(q_unshared.is_empty() != c_unshared.is_empty()),
        extra_align_min,
        swap_similarity,
    ];
    debug_assert_eq!(values.len(), FEATURE_NAMES.len());
    PairFeatures { values }
}

/// Whether the times name more than the present: a question without a time asks about now, so
/// "is it open today" and "is it open" ask the same, and "is it open tomorrow" does not.
fn beyond_present(times: &[String]) -> bool {
    times.iter().any(|t| t != "today")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of `text` as the embedder splits them, each with a vector of its own: the
    /// rule-based features read the words, not the vectors.
    fn embedded(text: &str) -> Embedded {
        let words = words(text);
        let dimensions = 4;
        let word_vectors = (0..words.len())
            .flat_map(|i| (0..dimensions).map(move |d| f32::from(u8::from(d == i % dimensions))))
            .collect();
        Embedded {
            truncated: false,
            vector: vec![0.5; dimensions],
            words,
            word_vectors,
        }
    }

    #[test]
    fn a_trip_the_other_way_is_a_polarity_veto() {
        let a = "I need a bus to Long Beach";
        let b = "find me a bus from Long Beach";
        let features = pair_features(a, &embedded(a), b, &embedded(b), 0.9);
        assert_eq!(features.veto(), Some("polarity_flip"));
    }
}
