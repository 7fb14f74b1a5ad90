//! The exact cache stage: decide whether a request may read and write the cache, look it up, and
//! store answers off the response path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::entry::{Entry, is_cacheable, usage_counts};
use super::flight::{Flights, Joined, Leader};
use super::key::{KeyScope, chat_key};
use crate::config::CachePolicy;
use crate::error::ApiError;
use crate::protocol::openai::ChatRequest;
use crate::store::Store;
use crate::telemetry::Metrics;

/// What the client asked of the cache for one request (headers; see the README).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheControls {
    pub requested: Requested,
    /// `Cache-Control: no-store`: the answer must not be stored.
    pub no_store: bool,
    /// `Cache-Control: max-age=N`: an entry older than this is not served.
    pub max_age: Option<Duration>,
    /// `x-reprise-cache-ttl`: how long this answer may be kept, instead of the route's TTL.
    pub ttl: Option<Duration>,
    /// `x-reprise-cache-namespace`: a separate cache within the tenant's.
    pub namespace: Option<String>,
    /// `x-reprise-cache-semantic: off`: exact matches only, for this request.
    pub no_semantic: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Requested {
    #[default]
    Normal,
    /// Neither read nor write the cache.
    Bypass,
    /// Do not read; call upstream and overwrite the entry (`Cache-Control: no-cache` too).
    Refresh,
}

impl CacheControls {
    /// Reads the cache headers. Errors name the header, as `param`.
    pub fn from_headers(headers: &axum::http::HeaderMap) -> Result<Self, ApiError> {
        let text = |name: &str| -> Result<Option<&str>, ApiError> {
            match headers.get(name) {
                None => Ok(None),
                Some(value) => value.to_str().map(|v| Some(v.trim())).map_err(|_| {
                    ApiError::invalid(format!("header {name} is not valid text"), Some(name))
                }),
            }
        };
        let mut controls = Self::default();
        for directive in text("cache-control")?.unwrap_or("").split(',') {
            let directive = directive.trim().to_ascii_lowercase();
            match directive.split_once('=') {
                None if directive == "no-store" => controls.no_store = true,
                None if directive == "no-cache" => controls.requested = Requested::Refresh,
                Some(("max-age", seconds)) => {
                    let seconds: u64 = seconds.trim().parse().map_err(|_| {
                        ApiError::invalid(
                            "Cache-Control max-age must be whole seconds",
                            Some("cache-control"),
                        )
                    })?;
                    controls.max_age = Some(Duration::from_secs(seconds));
                }
                // Other directives (private, no-transform, ...) say nothing to a gateway cache.
                _ => {}
            }
        }
        match text("x-reprise-cache-mode")? {
            None | Some("") | Some("default") => {}
            Some("bypass") => controls.requested = Requested::Bypass,
            Some("refresh") => controls.requested = Requested::Refresh,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "x-reprise-cache-mode must be bypass, refresh or default, not {other:?}"
                    ),
                    Some("x-reprise-cache-mode"),
                ));
            }
        }
        if let Some(ttl) = text("x-reprise-cache-ttl")? {
            let seconds: u64 = ttl.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                ApiError::invalid(
                    "x-reprise-cache-ttl must be a positive number of seconds",
                    Some("x-reprise-cache-ttl"),
                )
            })?;
            controls.ttl = Some(Duration::from_secs(seconds));
        }
        match text("x-reprise-cache-semantic")? {
            None | Some("") | Some("on") => {}
            Some("off") => controls.no_semantic = true,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("x-reprise-cache-semantic must be on or off, not {other:?}"),
                    Some("x-reprise-cache-semantic"),
                ));
            }
        }
        if let Some(namespace) = text("x-reprise-cache-namespace")? {
            let valid = !namespace.is_empty()
                && namespace.len() <= 64
                && namespace
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            if !valid {
                return Err(ApiError::invalid(
                    "x-reprise-cache-namespace must be 1-64 letters, digits or - _ . :",
                    Some("x-reprise-cache-namespace"),
                ));
            }
            controls.namespace = Some(namespace.to_owned());
        }
        Ok(controls)
    }
}

/// How one request uses the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    ReadWrite,
    /// Refresh: skip the lookup, store the new answer.
    WriteOnly,
    /// `no-store`: may be served from the cache, but its answer is not stored.
    ReadOnly,
}

impl CacheMode {
    pub fn read(self) -> bool {
        matches!(self, CacheMode::ReadWrite | CacheMode::ReadOnly)
    }

    pub fn write(self) -> bool {
        matches!(self, CacheMode::ReadWrite | CacheMode::WriteOnly)
    }
}

/// The outcome reported in `x-reprise-cache` and in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    SemanticHit,
    Miss,
    Bypass,
    Refresh,
}

impl CacheStatus {
    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::SemanticHit => "semantic-hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Refresh => "refresh",
        }
    }
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
    prices: Arc<PriceTable>,
    stats: Arc<parking_lot::Mutex<HashMap<(String, String), RouteStats>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Route aliases may contain `/`, which separates the parts of a store key.
pub fn escape_segment(segment: &str) -> String {
    segment.replace('%', "%25").replace('/', "%2F")
}

const NO_NAMESPACE: &str = "-";

pub fn namespace_segment(namespace: &str) -> &str {
    if namespace.is_empty() {
        NO_NAMESPACE
    } else {
        namespace
    }
}

/// `cache/v1/{tenant}/{route}/{namespace}/{key}`: the order makes "everything of a tenant" and
/// "everything of a tenant's route" single prefixes.
pub fn entry_path(tenant: &str, route: &str, namespace: &str, key_hex: &str) -> String {
    let namespace = if namespace.is_empty() {
        NO_NAMESPACE
    } else {
        namespace
    };
    format!(
        "cache/v1/{tenant}/{}/{namespace}/{key_hex}",
        escape_segment(route)
    )
}

/// The store prefix holding what a purge or a count selects. A namespace without a route is not
/// one prefix: callers pass each route.
pub fn prefix(tenant: Option<&str>, route: Option<&str>, namespace: Option<&str>) -> String {
    prefix_under("cache/v1/", tenant, route, namespace)
}

/// [`prefix`] for another kind of entry laid out the same way under `base`.
pub fn prefix_under(
    base: &str,
    tenant: Option<&str>,
    route: Option<&str>,
    namespace: Option<&str>,
) -> String {
    let mut prefix = String::from(base);
    let Some(tenant) = tenant else { return prefix };
    prefix.push_str(tenant);
    prefix.push('/');
    let Some(route) = route else { return prefix };
    prefix.push_str(&escape_segment(route));
    prefix.push('/');
    if let Some(namespace) = namespace {
        prefix.push_str(if namespace.is_empty() {
            NO_NAMESPACE
        } else {
            namespace
        });
        prefix.push('/');
    }
    prefix
}

/// Prices in USD per million tokens, to estimate what cache hits saved.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

/// USD per million tokens by model, to estimate what an answer cost (or a hit saved).
#[derive(Debug, Default)]
pub struct PriceTable(pub HashMap<String, Price>);

impl PriceTable {
    /// The price of the model that produced `response`: by the target's model name, else by the
    /// model the upstream reported.
    fn price(&self, target: Option<&str>, response: &Value) -> Option<Price> {
        let target_model = target
            .and_then(|t| t.split_once('/'))
            .map(|(_, model)| model);
        target_model
            .and_then(|m| self.0.get(m))
            .or_else(|| target.and_then(|t| self.0.get(t)))
            .or_else(|| {
                response
                    .get("model")
                    .and_then(Value::as_str)
                    .and_then(|m| self.0.get(m))
            })
            .copied()
    }

    /// The estimated cost of `prompt` input and `completion` output tokens (0 without a price).
    pub fn cost(
        &self,
        target: Option<&str>,
        response: &Value,
        prompt: u64,
        completion: u64,
    ) -> f64 {
        self.price(target, response).map_or(0.0, |p| {
            (prompt as f64 * p.input + completion as f64 * p.output) / 1e6
        })
    }
}

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

impl ExactCache {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, prices: Arc<PriceTable>) -> Self {
        Self {
            store,
            metrics,
            flights: Arc::default(),
            prices,
            stats: Arc::default(),
        }
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Counts one request's cache outcome (stats and metrics). For a hit, `answer` is the served
    /// response with the target that originally produced it.
    pub fn record(
        &self,
        tenant: &str,
        route: &str,
        status: CacheStatus,
        answer: Option<(&Value, Option<&str>)>,
    ) {
        let (tokens, cost) = match answer {
            Some((response, target))
                if matches!(status, CacheStatus::Hit | CacheStatus::SemanticHit) =>
            {
                let (prompt, completion) = usage_counts(response);
                let cost = self.prices.cost(target, response, prompt, completion);
                (prompt + completion, cost)
            }
            _ => (0, 0.0),
        };
        self.metrics
            .cache_request(tenant, route, status.label(), tokens, cost);
        let mut stats = self.stats.lock();
        let entry = stats
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
    }

    pub fn stats(&self, tenant: &str, route: &str) -> RouteStats {
        self.stats
            .lock()
            .get(&(tenant.to_owned(), route.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Joins the single flight for this key after a miss. Only requests that both read and write
    /// take part: a refresh must call upstream, and a no-store request must not lead.
    pub fn join_flight(&self, plan: &Plan) -> Option<Joined> {
        (plan.mode == CacheMode::ReadWrite).then(|| self.flights.join(&plan.path))
    }

    /// `Err(status)` when this request does not use the cache at all (and what to report).
    #[allow(clippy::too_many_arguments)]
    pub fn plan(
        &self,
        policy: &CachePolicy,
        controls: &CacheControls,
        tenant: &str,
        route: &str,
        targets: &[String],
        prompt: Option<&str>,
        request: &ChatRequest,
    ) -> Result<Plan, Option<CacheStatus>> {
        if !policy.enabled {
            return Err(None);
        }
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
        let namespace = controls.namespace.as_deref().unwrap_or("");
        let key = chat_key(
            &KeyScope {
                tenant,
                namespace,
                route,
                targets,
                prompt,
            },
            request,
        );
        let key_hex = key.to_hex();
        Ok(Plan {
            mode,
            path: entry_path(tenant, route, namespace, &key_hex),
            key_hex,
            ttl: controls.ttl.unwrap_or(policy.ttl),
            max_age: controls.max_age,
            cache_truncated: policy.cache_truncated,
            tenant: tenant.to_owned(),
            route: route.to_owned(),
        })
    }

    /// The stored answer and its age, if there is a usable one. A store failure or an unreadable
    /// entry is a miss (logged and counted), never an error for the client.
    pub async fn get(&self, plan: &Plan) -> Option<(Entry, Duration)> {
        let bytes = match self.store.get(&plan.path).await {
            Ok(bytes) => bytes?,
            Err(error) => {
                tracing::warn!(%error, backend = self.store.backend(), "cache lookup failed; serving from upstream");
                self.metrics.cache_error("lookup");
                return None;
            }
        };
        let entry: Entry = match serde_json::from_slice(&bytes) {
            Ok(entry) => entry,
            Err(error) => {
                tracing::warn!(%error, path = %plan.path, "unreadable cache entry; treating it as a miss");
                self.metrics.cache_error("corrupt_entry");
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
        Some((entry, age))
    }

    /// Stores `response` in the background if it may be cached: the client does not wait for it.
    /// A flight `leader` hands the answer to its followers now and closes once the write landed;
    /// an answer that may not be cached is not shared either.
    pub fn store_behind(&self, plan: &Plan, target: &str, response: Value, leader: Option<Leader>) {
        if !plan.mode.write() || !is_cacheable(&response, plan.cache_truncated) {
            return;
        }
        let landing = leader.map(|leader| leader.publish(Arc::new(response.clone())));
        let (prompt_tokens, completion_tokens) = usage_counts(&response);
        let entry = Entry {
            created_at_ms: now_ms(),
            ttl_secs: Some(plan.ttl.as_secs()),
            tenant: plan.tenant.clone(),
            route: plan.route.clone(),
            target: target.to_owned(),
            prompt_tokens,
            completion_tokens,
            response,
        };
        let Ok(bytes) = serde_json::to_vec(&entry) else {
            return;
        };
        let store = Arc::clone(&self.store);
        let metrics = Arc::clone(&self.metrics);
        let path = plan.path.clone();
        let ttl = plan.ttl;
        tokio::spawn(async move {
            let _landing = landing;
            match store.put(&path, bytes, Some(ttl)).await {
                Ok(()) => metrics.cache_written(),
                Err(error) => {
                    tracing::warn!(%error, "cache write failed");
                    metrics.cache_error("write");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn controls_from_headers() {
        let c = CacheControls::from_headers(&headers(&[("cache-control", "no-store, max-age=60")]))
            .unwrap();
        assert!(c.no_store);
        assert_eq!(c.max_age, Some(Duration::from_secs(60)));
        let c = CacheControls::from_headers(&headers(&[("cache-control", "no-cache")])).unwrap();
        assert_eq!(c.requested, Requested::Refresh);
        let c = CacheControls::from_headers(&headers(&[
            ("x-reprise-cache-mode", "bypass"),
            ("x-reprise-cache-ttl", "30"),
            ("x-reprise-cache-namespace", "exp-1"),
        ]))
        .unwrap();
        assert_eq!(
            (c.requested, c.ttl, c.namespace.as_deref()),
            (
                Requested::Bypass,
                Some(Duration::from_secs(30)),
                Some("exp-1")
            )
        );
        for bad in [
            ("x-reprise-cache-mode", "sometimes"),
            ("x-reprise-cache-ttl", "0"),
            ("x-reprise-cache-namespace", "a/b"),
            ("cache-control", "max-age=soon"),
        ] {
            assert!(
                CacheControls::from_headers(&headers(&[bad])).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn modes() {
        assert!(CacheMode::ReadWrite.read() && CacheMode::ReadWrite.write());
        assert!(!CacheMode::WriteOnly.read() && CacheMode::WriteOnly.write());
        assert!(CacheMode::ReadOnly.read() && !CacheMode::ReadOnly.write());
        assert_eq!(escape_segment("openai/gpt-4o%"), "openai%2Fgpt-4o%25");
        let path = entry_path("t", "openai/gpt", "", "abc");
        assert_eq!(path, "cache/v1/t/openai%2Fgpt/-/abc");
        assert!(path.starts_with(&prefix(Some("t"), Some("openai/gpt"), Some(""))));
        assert!(path.starts_with(&prefix(Some("t"), Some("openai/gpt"), None)));
        assert!(path.starts_with(&prefix(Some("t"), None, None)));
        assert!(!path.starts_with(&prefix(Some("t"), Some("openai/gpt"), Some("ns"))));
        assert!(
            !path.starts_with(&prefix(Some("t2"), None, None)),
            "tenant t2 is not a prefix of t"
        );
    }
}
