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
    /// Signs console sessions (derived from the admin key: rotating the key ends every session).
    console_key: Option<[u8; 32]>,
    /// Sessions signed out before they expired: (nonce, expiry in Unix seconds).
    signed_out: parking_lot::Mutex<HashMap<String, u64>>,
    /// `[metrics] token`: with it, `/metrics` needs this token or the admin key.
    metrics_token_hash: Option<[u8; 32]>,
}

const CONSOLE_CONTEXT: &str = "reprise 2026-12 console session signing key";
pub const CONSOLE_COOKIE: &str = "reprise_console";
pub const CSRF_HEADER: &str = "x-reprise-csrf";
/// How long a console sign-in lasts.
pub const CONSOLE_SESSION: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            console_key: config
                .admin_key
                .as_ref()
                .map(|k| blake3::derive_key(CONSOLE_CONTEXT, k.expose_secret().as_bytes())),
            signed_out: parking_lot::Mutex::default(),
        }
    }

    /// The tenant of a key from `[auth]`.
    pub fn static_tenant(&self, key: &str) -> Option<Arc<str>> {
        self.tenants_by_key_hash.get(&digest(key)).cloned()
    }

    /// The admin key, or a console session whose request carries the session's CSRF token
    /// (`x-reprise-csrf`): a cookie alone, which a browser attaches to any request, is not
    /// enough.
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let expected = self.admin_key_hash.ok_or(ApiError::AdminOnly)?;
        let Some(key) = presented_key(headers) else {
            return match self.console_session(headers) {
                Some(session)
                    if headers
                        .get(CSRF_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|token| {
                            self.csrf_token(&session).as_deref() == Some(token)
                        }) =>
                {
                    Ok(())
                }
                // A signed-in browser's request without the page's token: possibly forged.
                Some(_) => Err(ApiError::AdminOnly),
                None => Err(ApiError::Unauthorized),
            };
        };
        if digest(key) == expected {
            Ok(())
        } else {
            Err(ApiError::AdminOnly)
        }
    }

    /// Whether `key` is the admin key (the console's sign-in).
    pub fn is_admin_key(&self, key: &str) -> bool {
        self.admin_key_hash
            .is_some_and(|expected| digest(key) == expected)
    }

    /// A new console session's cookie value: `expiry.nonce.signature`.
    pub fn new_console_session(&self) -> Option<String> {
        let key = self.console_key?;
        let expires = unix_now() + CONSOLE_SESSION.as_secs();
        let nonce = format!("{:032x}", rand::random::<u128>());
        let body = format!("{expires}.{nonce}");
        let signature = blake3::keyed_hash(&key, body.as_bytes()).to_hex();
        Some(format!("{body}.{signature}"))
    }

    /// The request's console session cookie, if it is genuine, unexpired and not signed out.
    pub fn console_session(&self, headers: &HeaderMap) -> Option<String> {
        let key = self.console_key?;
        let value = headers
            .get_all(axum::http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| pair.trim().strip_prefix(CONSOLE_COOKIE)?.strip_prefix('='))?;
        let (body, signature) = value.rsplit_once('.')?;
        let expected = blake3::keyed_hash(&key, body.as_bytes());
        // blake3's Hash compares in constant time.
        if blake3::Hash::from_hex(signature).ok()? != expected {
            return None;
        }
        let (expires, nonce) = body.split_once('.')?;
        if expires.parse::<u64>().ok()? <= unix_now() || self.signed_out.lock().contains_key(nonce)
        {
            return None;
        }
        Some(value.to_owned())
    }

    /// The CSRF token of a session: derived from it, so nothing is stored.
    pub fn csrf_token(&self, session: &str) -> Option<String> {
        let key = self.console_key?;
        let mut hasher = blake3::Hasher::new_keyed(&key);
        hasher.update(b"csrf\0");
        hasher.update(session.as_bytes());
        Some(hasher.finalize().to_hex().to_string())
    }

    /// Ends a session before its expiry (on this replica; others honour it until it expires).
    pub fn sign_out(&self, session: &str) {
        let mut parts = session.split('.');
        let (Some(expires), Some(nonce)) = (parts.next(), parts.next()) else {
            return;
        };
        let now = unix_now();
        let mut signed_out = self.signed_out.lock();
        signed_out.retain(|_, expiry| *expiry > now);
        signed_out.insert(nonce.to_owned(), expires.parse().unwrap_or(now));
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
