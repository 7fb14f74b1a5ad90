//! Gateway API keys (virtual keys) and the admin key.
//!
//! Keys are kept only as blake3 hashes: lookup is a hash-map probe on the digest, so the time it
//! takes does not depend on how much of a guessed key matches, and no plaintext key sits in memory.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::HeaderMap;
use secrecy::ExposeSecret;

use crate::config::{AuthConfig, MetricsConfig};
use crate::error::ApiError;

pub struct Auth {
    tenants_by_key_hash: HashMap<[u8; 32], Arc<str>>,
    admin_key_hash: Option<[u8; 32]>,
    /// `[metrics] token`: with it, `/metrics` needs this token or the admin key.
    metrics_token_hash: Option<[u8; 32]>,
}

fn digest(key: &str) -> [u8; 32] {
    *blake3::hash(key.as_bytes()).as_bytes()
}

/// The key from `Authorization: Bearer ...` (OpenAI SDKs) or `x-api-key` (Anthropic SDKs).
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, key) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim());
    }
    headers.get("x-api-key")?.to_str().ok().map(str::trim)
}

impl Auth {
    pub fn from_config(config: &AuthConfig, metrics: &MetricsConfig) -> Self {
        Self {
            metrics_token_hash: metrics.token.as_ref().map(|t| digest(t.expose_secret())),
            tenants_by_key_hash: config
                .keys
                .iter()
                .map(|k| (digest(k.key.expose_secret()), Arc::from(k.tenant.as_str())))
                .collect(),
            admin_key_hash: config.admin_key.as_ref().map(|k| digest(k.expose_secret())),
        }
    }

    /// The tenant of a key from `[auth]`.
    pub fn static_tenant(&self, key: &str) -> Option<Arc<str>> {
        self.tenants_by_key_hash.get(&digest(key)).cloned()
    }

    pub fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let expected = self.admin_key_hash.ok_or(ApiError::AdminOnly)?;
        let key = presented_key(headers).ok_or(ApiError::Unauthorized)?;
        if digest(key) == expected {
            Ok(())
        } else {
            Err(ApiError::AdminOnly)
        }
    }

    /// Whether these headers may read `/metrics`: anyone when no token is configured.
    pub fn metrics_reader(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = self.metrics_token_hash else {
            return Ok(());
        };
        let presented = presented_key(headers).map(digest);
        if presented.is_some_and(|key| key == token || Some(key) == self.admin_key_hash) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}
