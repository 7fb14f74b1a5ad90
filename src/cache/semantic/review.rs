//! The semantic stage's recent decisions, for the console's cache review: each hit with the
//! request's text next to the text of the entry that answered it, and each refusal with the
//! guard that refused. Kept in memory on this replica, newest first, the last [`KEPT`] of them:
//! a reviewer looks at what happened lately, and the texts are already in the cache's store.

use std::collections::VecDeque;

use parking_lot::Mutex;
use serde::Serialize;

const KEPT: usize = 500;

#[derive(Debug, Clone, Serialize)]
pub struct Reviewed {
    pub at_ms: u64,
    pub tenant: String,
    pub route: String,
    /// `hit`, `hit-agreement` or `rejected-GUARD`.
    pub outcome: &'static str,
    pub request_text: String,
    /// A hit's entry (`x-reprise-cache-entry`), its text and the similarity it was served at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
    /// The least similarity a candidate needed on this route.
    pub threshold: f32,
    /// `calibrated`: the probability the model gave the served entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probability: Option<f32>,
    /// Set once someone said whether the hit was right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marked: Option<&'static str>,
}

#[derive(Debug, Default)]
pub struct Review {
    recent: Mutex<VecDeque<Reviewed>>,
}

impl Review {
    pub fn remember(&self, reviewed: Reviewed) {
        let mut recent = self.recent.lock();
        if recent.len() == KEPT {
            recent.pop_back();
        }
        recent.push_front(reviewed);
    }

    /// The newest `limit` decisions, of one tenant or all.
    pub fn recent(&self, tenant: Option<&str>, limit: usize) -> Vec<Reviewed> {
        self.recent
            .lock()
            .iter()
            .filter(|r| tenant.is_none_or(|t| r.tenant == t))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Notes feedback on the hits of `entry` this replica served to `tenant`.
    pub fn mark(&self, tenant: &str, entry: &str, correct: bool) {
        for reviewed in self.recent.lock().iter_mut() {
            if reviewed.tenant == tenant && reviewed.entry.as_deref() == Some(entry) {
                reviewed.marked = Some(if correct { "correct" } else { "wrong" });
            }
        }
    }
}
