//! The content-word check: every content word that one text has and the other lacks must have a
//! counterpart of similar meaning among the other's unshared words. Sentence embeddings blur a
//! sentence into one point, so "when does the Elm store close" and "what is the number of the
//! Elm store" land close together (the store dominates both); their unshared words, "close" and
//! "number", are far apart on their own. A paraphrase differs in words that mean alike
//! ("closest" / "nearest", "hours" / "times") or in grammar, which is not compared.
//!
//! Words are embedded alone with the sentence model and kept in a bounded cache: the vocabulary
//! of a chatbot's traffic is small, so after warm-up a check costs a few dot products.

use std::sync::Arc;

use async_trait::async_trait;

use super::verify::{Rejection, Verifier, content_words};
use crate::embed::Embedder;

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
    async fn vectors(&self, words: Vec<&String>) -> Option<Vec<(String, Arc<Vec<f32>>)>> {
        let vectors = futures::future::join_all(words.iter().map(|w| self.vector(w))).await;
        words
            .into_iter()
            .zip(vectors)
            .map(|(word, vector)| vector.map(|v| (word.clone(), v)))
            .collect()
    }

    /// The first word of `words` without a counterpart in `others`, with its nearest other.
    fn unexplained(
        &self,
        words: &[(String, Arc<Vec<f32>>)],
        others: &[(String, Arc<Vec<f32>>)],
    ) -> Option<(String, String)> {
        words.iter().find_map(|(word, vector)| {
            let nearest = others
                .iter()
                .map(|(other, v)| (other, dot(vector, v)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match nearest {
                Some((_, similarity)) if similarity >= self.min_similarity => None,
                Some((other, _)) => Some((word.clone(), other.clone())),
                None => Some((word.clone(), String::new())),
            }
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
        let (Some(query_vectors), Some(candidate_vectors)) =
            futures::join!(self.vectors(query_only), self.vectors(candidate_only))
        else {
            return Err(Rejection::Content {
                query: String::new(),
                candidate: String::new(),
            });
        };
        if let Some((query, candidate)) = self.unexplained(&query_vectors, &candidate_vectors) {
            return Err(Rejection::Content { query, candidate });
        }
        if let Some((candidate, query)) = self.unexplained(&candidate_vectors, &query_vectors) {
            return Err(Rejection::Content { query, candidate });
        }
        Ok(())
    }
}
