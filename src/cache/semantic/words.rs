//! The content-word check: every content word that one text has and the other lacks must have a
//! counterpart of similar meaning among the other text's words. Sentence embeddings blur a
//! sentence into one point, so "when does the Elm store close" and "what is the number of the
//! Elm store" land close together (the store dominates both); their unshared words, "close" and
//! "number", are far apart on their own. A paraphrase differs in words that mean alike
//! ("closest" / "nearest", "hours" / "times"), says with a content word what the other says with
//! a grammar word ("at what time" / "when") or adds a word that the other's words already imply
//! ("how far is the closest store" / "the closest store"); grammar alone is not compared.
//!
//! Words are embedded alone with the sentence model and kept in a bounded cache: the vocabulary
//! of a chatbot's traffic is small, so after warm-up a check costs a few dot products.

use std::sync::Arc;

use async_trait::async_trait;

use super::rules::{content_words, counterpart_words};
use super::verifier::{Rejection, Verifier};
use crate::embed::Embedder;

type WordVector = (String, Arc<Vec<f32>>);

pub struct WordVerifier {
    embedder: Embedder,
    vectors: quick_cache::sync::Cache<String, Arc<Vec<f32>>>,
    /// Cosine at or above which two words count as counterparts.
    min_similarity: f32,
}

impl WordVerifier {
    pub fn new(embedder: Embedder, min_similarity: f32, cached_words: usize) -> Self {
        Self {
            embedder,
            vectors: quick_cache::sync::Cache::new(cached_words.max(1)),
            min_similarity,
        }
    }

    /// `None` if the word cannot be embedded now (the queue is full): the check then fails
    /// closed, since a miss costs only an upstream call.
    async fn vector(&self, word: &str) -> Option<Arc<Vec<f32>>> {
        if let Some(vector) = self.vectors.get(word) {
            return Some(vector);
        }
        let vector = Arc::new(self.embedder.embed(word.to_owned()).await.ok()?);
        self.vectors.insert(word.to_owned(), vector.clone());
        Some(vector)
    }

    /// Embedded concurrently, so that the embedding thread takes them as one batch.
    async fn vectors(&self, words: Vec<&String>) -> Option<Vec<WordVector>> {
        let vectors = futures::future::join_all(words.iter().map(|w| self.vector(w))).await;
        words
            .into_iter()
            .zip(vectors)
            .map(|(word, vector)| vector.map(|v| (word.clone(), v)))
            .collect()
    }

    /// The words of `words` without a counterpart in `others`.
    fn unexplained(&self, words: &[WordVector], others: &[WordVector]) -> Vec<WordVector> {
        words
            .iter()
            .filter(|(_, vector)| self.nearest(vector, others).1 < self.min_similarity)
            .cloned()
            .collect()
    }

    /// The first word of `words` without a counterpart in `others`, with its nearest other.
    fn first_unexplained(
        &self,
        words: &[WordVector],
        others: &[WordVector],
    ) -> Option<(String, String)> {
        words.iter().find_map(|(word, vector)| {
            let (nearest, similarity) = self.nearest(vector, others);
            (similarity < self.min_similarity).then(|| (word.clone(), nearest))
        })
    }

    /// The word of `others` nearest to `vector`, and its cosine (-inf if there is none).
    fn nearest(&self, vector: &[f32], others: &[WordVector]) -> (String, f32) {
        others
            .iter()
            .map(|(other, v)| (other, dot(vector, v)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or((String::new(), f32::NEG_INFINITY), |(other, similarity)| {
                (other.clone(), similarity)
            })
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[async_trait]
impl Verifier for WordVerifier {
    async fn verify(&self, query: &str, candidate: &str) -> Result<(), Rejection> {
        let (query_words, candidate_words) = (content_words(query), content_words(candidate));
        let query_only: Vec<&String> = query_words.difference(&candidate_words).collect();
        let candidate_only: Vec<&String> = candidate_words.difference(&query_words).collect();
        if query_only.is_empty() && candidate_only.is_empty() {
            return Ok(());
        }
        let fail_closed = || Rejection::Content {
            query: String::new(),
            candidate: String::new(),
        };
        let (Some(query_vectors), Some(candidate_vectors)) =
            futures::join!(self.vectors(query_only), self.vectors(candidate_only))
        else {
            return Err(fail_closed());
        };
        // Most paraphrases differ in words that explain each other; only a word left over needs
        // the rest of the other text (its grammar and shared words), embedded on demand.
        let query_left = self.unexplained(&query_vectors, &candidate_vectors);
        let candidate_left = self.unexplained(&candidate_vectors, &query_vectors);
        if query_left.is_empty() && candidate_left.is_empty() {
            return Ok(());
        }
        let pool = |text: &str, needed: bool| {
            let words = if needed {
                counterpart_words(text)
            } else {
                Default::default()
            };
            async move { self.vectors(words.iter().collect()).await }
        };
        let (Some(query_pool), Some(candidate_pool)) = futures::join!(
            pool(query, !candidate_left.is_empty()),
            pool(candidate, !query_left.is_empty())
        ) else {
            return Err(fail_closed());
        };
        if let Some((query, candidate)) = self.first_unexplained(&query_left, &candidate_pool) {
            return Err(Rejection::Content { query, candidate });
        }
        if let Some((candidate, query)) = self.first_unexplained(&candidate_left, &query_pool) {
            return Err(Rejection::Content { query, candidate });
        }
        Ok(())
    }
}
