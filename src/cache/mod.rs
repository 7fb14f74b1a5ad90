//! Response caches, behind one front door: [`CacheStage`] (in `stage.rs`) is all the pipeline
//! sees. Behind it, the exact cache (`exact/`) answers a request identical, in the canonical
//! sense of `key.rs`, to an earlier one of the same tenant, route and namespace; the semantic
//! cache (`semantic/`) one that means the same and passes its guards.
//!
//! This file holds the vocabulary both caches share: what the client asked of the cache
//! ([`CacheControls`]), how a request uses it ([`CacheMode`]), what happened ([`CacheStatus`]),
//! whose cache it is ([`CacheScope`]), and how entries are laid out in the store.

mod entry;
mod exact;
mod key;
pub mod semantic;
mod stage;
mod stats;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::ApiError;

pub use entry::{StreamAssembler, replay_chunks};
pub use key::{CacheKey, KeyScope, chat_key};
pub use stage::{
    CacheLookup, CacheReport, CacheStage, CacheStatsRow, PendingWrite, PurgeSelector, UpstreamCheck,
};
pub use stats::RouteStats;

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

/// Whose cache a request reads and writes, and how: everything but the request itself.
#[derive(Debug, Clone, Copy)]
pub struct CacheScope<'a> {
    pub tenant: &'a str,
    pub route: &'a str,
    /// The route's targets: a change of upstream models is a change of answers.
    pub targets: &'a [String],
    /// The client's cache headers, the namespace among them.
    pub controls: &'a CacheControls,
    pub prompt: Option<&'a PromptScope>,
}

impl CacheScope<'_> {
    pub fn namespace(&self) -> &str {
        self.controls.namespace.as_deref().unwrap_or("")
    }
}

/// What a request rendered from a prompt version adds to its cache scopes.
#[derive(Debug, Clone, Default)]
pub struct PromptScope {
    /// The version and every variable: part of the exact key.
    pub exact: String,
    /// The version and the variables that must match exactly: part of the semantic scope.
    pub semantic: String,
    /// The free-text variables' values: embedded instead of the rendered last turn.
    pub free_text: Option<String>,
    /// Whether the client added turns after the template's; then its last turn is embedded.
    pub client_turns: bool,
}

pub(crate) fn now_ms() -> u64 {
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
