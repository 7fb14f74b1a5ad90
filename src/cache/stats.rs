//! Counters of each tenant's use of each route's cache since the gateway started, exact and
//! semantic alike: the stage counts every request's outcome here, once.

use std::collections::HashMap;
use std::sync::Arc;

use super::CacheStatus;
use crate::prices::PriceTable;
use crate::protocol::answer::AnswerFacts;
use crate::telemetry::Metrics;

/// Counters of one tenant's use of one route's cache, since the gateway started.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RouteStats {
    /// Exact hits.
    pub hits: u64,
    pub semantic_hits: u64,
    pub misses: u64,
    pub bypasses: u64,
    pub refreshes: u64,
    pub tokens_saved: u64,
    pub cost_saved_usd: f64,
}

pub struct CacheCounters {
    metrics: Arc<Metrics>,
    prices: Arc<PriceTable>,
    routes: parking_lot::Mutex<HashMap<(String, String), RouteStats>>,
}

impl CacheCounters {
    pub fn new(metrics: Arc<Metrics>, prices: Arc<PriceTable>) -> Self {
        Self {
            metrics,
            prices,
            routes: parking_lot::Mutex::default(),
        }
    }

    /// Counts one request's cache outcome (stats and metrics). For a hit, `answer` is the served
    /// response with the target that originally produced it. What the hit saved (USD).
    pub fn record(
        &self,
        tenant: &str,
        route: &str,
        status: CacheStatus,
        answer: Option<(&AnswerFacts, Option<&str>)>,
    ) -> f64 {
        let (tokens, cost) = match answer {
            Some((facts, target))
                if matches!(status, CacheStatus::Hit | CacheStatus::SemanticHit) =>
            {
                let (prompt, completion) = facts.tokens();
                let cost = self
                    .prices
                    .cost(target, facts.model.as_deref(), prompt, completion);
                (prompt + completion, cost)
            }
            _ => (0, 0.0),
        };
        self.metrics
            .cache_request(tenant, route, status.label(), tokens, cost);
        let mut routes = self.routes.lock();
        let entry = routes
            .entry((tenant.to_owned(), route.to_owned()))
            .or_default();
        match status {
            CacheStatus::Hit => entry.hits += 1,
            CacheStatus::SemanticHit => entry.semantic_hits += 1,
            CacheStatus::Miss => entry.misses += 1,
            CacheStatus::Bypass => entry.bypasses += 1,
            CacheStatus::Refresh => entry.refreshes += 1,
        }
        entry.tokens_saved += tokens;
        entry.cost_saved_usd += cost;
        cost
    }

    pub fn get(&self, tenant: &str, route: &str) -> RouteStats {
        self.routes
            .lock()
            .get(&(tenant.to_owned(), route.to_owned()))
            .cloned()
            .unwrap_or_default()
    }
}
