//! The semantic cache's vector index: one HNSW graph (hnsw_rs) per scope. A scope is everything
//! that must match exactly for a semantic hit (tenant, route, system prompt, earlier turns, ...),
//! so a search can only ever return entries of its own scope, by construction.
//!
//! hnsw_rs cannot delete points: a removed entry is a tombstone that searches skip.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hnsw_rs::anndists::dist::distances::DistCosine;
use hnsw_rs::hnsw::Hnsw;
use parking_lot::RwLock;

pub type ScopeKey = [u8; 32];

/// Graph parameters, kept with the index (they decide recall and memory).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexParams {
    /// Links per node (hnsw "M").
    pub connections: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
    /// Expected entries per scope; a sizing hint, not a limit.
    pub expected_entries: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        Self {
            connections: 16,
            ef_construction: 200,
            ef_search: 64,
            expected_entries: 10_000,
        }
    }
}

struct Scope {
    graph: Hnsw<'static, f32, DistCosine>,
    /// Point id → entry id (the cache entry's store key).
    entries: RwLock<Vec<Arc<str>>>,
    removed: RwLock<HashSet<usize>>,
}

#[derive(Default)]
pub struct SemanticIndex {
    params: IndexParams,
    scopes: RwLock<HashMap<ScopeKey, Arc<Scope>>>,
}

/// A search result: the entry and its cosine similarity to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub entry: Arc<str>,
    pub similarity: f32,
}

impl SemanticIndex {
    pub fn new(params: IndexParams) -> Self {
        Self {
            params,
            scopes: RwLock::default(),
        }
    }

    fn scope(&self, key: &ScopeKey) -> Arc<Scope> {
        if let Some(scope) = self.scopes.read().get(key) {
            return Arc::clone(scope);
        }
        let mut scopes = self.scopes.write();
        let params = self.params;
        Arc::clone(scopes.entry(*key).or_insert_with(|| {
            Arc::new(Scope {
                graph: Hnsw::new(
                    params.connections,
                    params.expected_entries,
                    16,
                    params.ef_construction,
                    DistCosine,
                ),
                entries: RwLock::default(),
                removed: RwLock::default(),
            })
        }))
    }

    pub fn insert(&self, scope: &ScopeKey, vector: &[f32], entry: &str) {
        let scope = self.scope(scope);
        let id = {
            let mut entries = scope.entries.write();
            entries.push(Arc::from(entry));
            entries.len() - 1
        };
        scope.graph.insert_slice((vector, id));
    }

    /// Up to `k` live entries of `scope` nearest to `vector`, most similar first.
    pub fn search(&self, scope: &ScopeKey, vector: &[f32], k: usize) -> Vec<Match> {
        let Some(scope) = self.scopes.read().get(scope).cloned() else {
            return Vec::new();
        };
        let removed = scope.removed.read().clone();
        // Ask for more than k so that tombstones do not starve the answer.
        let wanted = k + removed.len().min(k * 4);
        let neighbours = scope
            .graph
            .search(vector, wanted, self.params.ef_search.max(wanted));
        let entries = scope.entries.read();
        let mut matches: Vec<Match> = neighbours
            .into_iter()
            .filter(|n| !removed.contains(&n.d_id))
            .filter_map(|n| {
                entries.get(n.d_id).map(|entry| Match {
                    entry: Arc::clone(entry),
                    similarity: 1.0 - n.distance,
                })
            })
            .collect();
        matches.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        matches.truncate(k);
        matches
    }

    /// Stops `entry` from matching in `scope`; whether it was there.
    pub fn remove(&self, scope: &ScopeKey, entry: &str) -> bool {
        let Some(scope) = self.scopes.read().get(scope).cloned() else {
            return false;
        };
        let ids: Vec<usize> = scope
            .entries
            .read()
            .iter()
            .enumerate()
            .filter(|(_, e)| &***e == entry)
            .map(|(id, _)| id)
            .collect();
        let mut removed = scope.removed.write();
        let mut any = false;
        for id in ids {
            any |= removed.insert(id);
        }
        any
    }

    /// Live entries over all scopes.
    pub fn len(&self) -> usize {
        self.scopes
            .read()
            .values()
            .map(|s| s.entries.read().len() - s.removed.read().len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random unit vectors (xorshift), so the test needs no model.
    fn vectors(count: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut state = seed | 1;
        (0..count)
            .map(|_| {
                let v: Vec<f32> = (0..dim)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state % 2000) as f32 / 1000.0 - 1.0
                    })
                    .collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / norm).collect()
            })
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn finds_the_nearest_entries_with_high_recall() {
        let params = IndexParams {
            ef_construction: 100,
            expected_entries: 1_000,
            ..IndexParams::default()
        };
        let index = SemanticIndex::new(params);
        let scope = [1u8; 32];
        let data = vectors(1_000, 32, 7);
        for (i, v) in data.iter().enumerate() {
            index.insert(&scope, v, &format!("e{i}"));
        }
        let mut hits = 0;
        for q in &vectors(100, 32, 99) {
            let exact = (0..data.len())
                .max_by(|&a, &b| dot(q, &data[a]).total_cmp(&dot(q, &data[b])))
                .unwrap();
            let found = &index.search(&scope, q, 1)[0];
            let found_at: usize = found.entry[1..].parse().unwrap();
            assert!(
                (found.similarity - dot(q, &data[found_at])).abs() < 1e-4,
                "similarity is the true cosine"
            );
            if found_at == exact {
                hits += 1;
            }
        }
        assert!(hits >= 95, "top-1 recall {hits}/100");
        let me = &index.search(&scope, &data[5], 1)[0];
        assert_eq!(
            (&*me.entry, (me.similarity - 1.0).abs() < 1e-4),
            ("e5", true)
        );
    }

    #[test]
    fn scopes_never_see_each_other_and_removed_entries_stop_matching() {
        let index = SemanticIndex::new(IndexParams::default());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let data = vectors(20, 16, 3);
        index.insert(&a, &data[0], "only-in-a");
        index.insert(&b, &data[1], "only-in-b");
        assert!(
            index
                .search(&b, &data[0], 5)
                .iter()
                .all(|m| &*m.entry != "only-in-a")
        );
        assert!(
            index.search(&[9u8; 32], &data[0], 5).is_empty(),
            "an unknown scope has no entries"
        );
        assert!(index.remove(&a, "only-in-a"));
        assert!(index.search(&a, &data[0], 5).is_empty());
        assert!(!index.remove(&a, "never-there"));
        assert_eq!(index.len(), 1);
    }
}
