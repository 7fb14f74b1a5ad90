//! What every verifier shares: the [`Verifier`] trait, the [`Rejection`] it reports, and a
//! [`Chain`] of verifiers. The rules (`rules.rs`) and the word check (`words.rs`) implement it;
//! neither knows the other.

use async_trait::async_trait;

/// Why a candidate was rejected, with the words that decided it (for debug logs); its
/// low-cardinality guard, for headers and metrics, is `Rejection::guard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The texts mention different numbers, amounts or quantities.
    Numbers {
        query: Vec<String>,
        candidate: Vec<String>,
    },
    /// The texts name different dates or times ("today" vs "tomorrow", "Monday" vs "Friday").
    Times {
        query: Vec<String>,
        candidate: Vec<String>,
    },
    /// One text is negated and the other is not.
    Negation,
    /// The texts take opposite sides of a polarity pair (on/off, enable/disable, ...).
    Polarity { query: String, candidate: String },
    /// The texts name different entities (names, places, products, ids, codes).
    Entities {
        query: Vec<String>,
        candidate: Vec<String>,
    },
    /// The texts are one template with a different content word in one slot ("from savings to
    /// checking" vs "from credit to checking", "hours of the Elm store" vs "... the Oak store"):
    /// the slot is what the answer is about. Lowercase names, which the entity rule cannot see,
    /// are caught here.
    Substitution { query: String, candidate: String },
    /// A content word of one text has no counterpart of similar meaning in the other ("when
    /// does it close" vs "what is its number"): the texts ask about different things. An
    /// empty side means the word has no counterpart at all.
    Content { query: String, candidate: String },
}

/// Asynchronous because a model-based verifier runs a model (off the async workers).
#[async_trait]
pub trait Verifier: Send + Sync {
    /// `Ok(())` if an answer to `candidate` may answer `query`.
    async fn verify(&self, query: &str, candidate: &str) -> Result<(), Rejection>;
}

/// Verifiers in turn, cheapest first: the first rejection stands.
pub struct Chain(pub Vec<Box<dyn Verifier>>);

#[async_trait]
impl Verifier for Chain {
    async fn verify(&self, query: &str, candidate: &str) -> Result<(), Rejection> {
        for verifier in &self.0 {
            verifier.verify(query, candidate).await?;
        }
        Ok(())
    }
}
