//! The exact cache: decide whether a request may read and write it, look it up, coalesce
//! identical misses into one upstream call, and store answers off the response path.

mod flight;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;

pub use flight::{Joined, Leader};

use super::entry::Entry;
use super::key::{KeyScope, chat_key};
use super::{CacheMode, CacheScope, CacheStatus, Requested, entry_path, now_ms};
use crate::config::CachePolicy;
use crate::protocol::answer::Answer;
use crate::protocol::openai::ChatRequest;
use crate::store::{BackgroundPut, Store};
use crate::telemetry::Metrics;
use flight::Flights;

/// A stored answer found for a request.
pub struct Stored {
    pub answer: Answer,
    /// The target that produced it.
    pub target: String,
    pub age: Duration,
}

/// The cache's decision for one request that may use it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: CacheMode,
    pub path: String,
    /// The entry's key, reported in `x-reprise-cache-key` so a client can purge exactly it.
    pub key_hex: String,
    ttl: Duration,
    max_age: Option<Duration>,
    cache_truncated: bool,
    tenant: String,
    route: String,
}

impl Plan {
    /// The status to report if the lookup does not hit.
    pub fn status_without_hit(&self) -> CacheStatus {
        match self.mode {
            CacheMode::WriteOnly => CacheStatus::Refresh,
            CacheMode::ReadWrite | CacheMode::ReadOnly => CacheStatus::Miss,
        }
    }
}

#[derive(Clone)]
pub struct ExactCache {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    flights: Arc<Flights>,
    max_entry_bytes: usize,
}

impl ExactCache {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, max_entry_bytes: usize) -> Self {
        Self {
            store,
            metrics,
            flights: Arc::default(),
            max_entry_bytes,
        }
    }

    /// Whether an answer is too large to be cached (by the exact or the semantic cache).
    pub fn too_large(&self, response: &Answer) -> bool {
        let too_large = response.bytes().len() > self.max_entry_bytes;
        if too_large {
            self.metrics.cache_write_skipped("too_large");
        }
        too_large
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Joins the single flight for this key after a miss. Only requests that both read and write
    /// take part: a refresh must call upstream, and a no-store request must not lead.
    pub fn join_flight(&self, plan: &Plan) -> Option<Joined> {
        (plan.mode == CacheMode::ReadWrite).then(|| self.flights.join(&plan.path))
    }

    /// `Err(status)` when this request does not use the cache at all (and what to report).
    pub fn plan(
        &self,
        policy: &CachePolicy,
        scope: &CacheScope<'_>,
        request: &ChatRequest,
    ) -> Result<Plan, Option<CacheStatus>> {
        if !policy.enabled {
            return Err(None);
        }
        let controls = scope.controls;
        if controls.requested == Requested::Bypass {
            return Err(Some(CacheStatus::Bypass));
        }
        if let (Some(limit), Some(t)) = (policy.max_temperature, request.temperature)
            && t > limit
        {
            return Err(Some(CacheStatus::Bypass));
        }
        let mode = match (controls.requested, controls.no_store) {
            (Requested::Refresh, true) => return Err(Some(CacheStatus::Bypass)),
            (Requested::Refresh, false) => CacheMode::WriteOnly,
            (_, true) => CacheMode::ReadOnly,
            _ => CacheMode::ReadWrite,
        };
        let namespace = scope.namespace();
        let key = chat_key(
            &KeyScope {
                tenant: scope.tenant,
                namespace,
                route: scope.route,
                targets: scope.targets,
                prompt: scope.prompt.map(|p| p.exact.as_str()),
            },
            request,
        );
        let key_hex = key.to_hex();
        Ok(Plan {
            mode,
            path: entry_path(scope.tenant, scope.route, namespace, &key_hex),
            key_hex,
            ttl: controls.ttl.unwrap_or(policy.ttl),
            max_age: controls.max_age,
            cache_truncated: policy.cache_truncated,
            tenant: scope.tenant.to_owned(),
            route: scope.route.to_owned(),
        })
    }

    /// The stored answer and its age, if there is a usable one. A store failure or an unreadable
    /// entry is a miss (logged and counted), never an error for the client.
    pub async fn get(&self, plan: &Plan) -> Option<Stored> {
        let bytes = match self.store.get(&plan.path).await {
            Ok(bytes) => bytes::Bytes::from(bytes?),
            Err(error) => {
                tracing::warn!(%error, backend = self.store.backend(), "cache lookup failed; serving from upstream");
                self.metrics.cache_error("lookup");
                return None;
            }
        };
        let unreadable = |error: serde_json::Error| {
            tracing::warn!(%error, path = %plan.path, "unreadable cache entry; treating it as a miss");
            self.metrics.cache_error("corrupt_entry");
        };
        let entry: Entry<'_> = match serde_json::from_slice(&bytes) {
            Ok(entry) => entry,
            Err(error) => {
                unreadable(error);
                return None;
            }
        };
        // The path already scopes the tenant; this guards against a key collision or a bug.
        if entry.tenant != plan.tenant {
            tracing::error!(path = %plan.path, "cache entry of another tenant under this key; not served");
            return None;
        }
        let age = Duration::from_millis(now_ms().saturating_sub(entry.created_at_ms));
        if plan.max_age.is_some_and(|max| age > max) {
            return None;
        }
        // Served as the text it was stored as, sharing the entry's buffer.
        let answer = match Answer::from_bytes(bytes.slice_ref(entry.response.get().as_bytes())) {
            Ok(answer) => answer,
            Err(error) => {
                unreadable(error);
                return None;
            }
        };
        Some(Stored {
            answer,
            target: entry.target.into_owned(),
            age,
        })
    }

    /// Stores `response` in the background if it may be cached: the client does not wait for it.
    /// A flight `leader` hands the answer to its followers now and closes once the write landed;
    /// an answer that may not be cached is not shared either.
    pub fn store_behind(
        &self,
        plan: &Plan,
        target: &str,
        response: Answer,
        leader: Option<Leader>,
    ) {
        if !plan.mode.write() || !response.facts().cacheable.allows(plan.cache_truncated) {
            return;
        }
        let landing = leader.map(|leader| leader.publish(response.clone()));
        let (prompt_tokens, completion_tokens) = response.facts().tokens();
        let entry = Entry {
            created_at_ms: now_ms(),
            ttl_secs: Some(plan.ttl.as_secs()),
            tenant: Cow::Borrowed(&plan.tenant),
            route: Cow::Borrowed(&plan.route),
            target: Cow::Borrowed(target),
            prompt_tokens,
            completion_tokens,
            response: RawValue::NULL,
        };
        let Some(value) = entry.into_bytes_answering(response.bytes()) else {
            return;
        };
        let metrics = Arc::clone(&self.metrics);
        let write = BackgroundPut {
            key: plan.path.clone(),
            value,
            ttl: Some(plan.ttl),
            // Runs where the write landed (the embedded store's writer thread): the flight stays
            // open until then.
            landed: Box::new(move |result| {
                drop(landing);
                match result {
                    Ok(()) => metrics.cache_written(),
                    Err(error) => {
                        tracing::warn!(%error, "cache write failed");
                        metrics.cache_error("write");
                    }
                }
            }),
        };
        if let Err(write) = self.store.put_in_background(write) {
            write.spawn(Arc::clone(&self.store));
        }
    }
}
