//! `[auth]`: the admin key and the gateway keys, each mapped to a tenant.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::FieldError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Protects `/v1/health/providers` and later admin endpoints. Without it they answer 403.
    pub admin_key: Option<SecretString>,
    #[serde(default)]
    pub keys: Vec<VirtualKeyConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualKeyConfig {
    pub key: SecretString,
    pub tenant: String,
}

impl AuthConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        let mut seen = std::collections::HashSet::new();
        for (i, key) in self.keys.iter().enumerate() {
            let field = |name: &str| format!("auth.keys[{i}].{name}");
            if key.key.expose_secret().is_empty() {
                return Err(FieldError::new(field("key"), "must not be empty"));
            }
            if key.tenant.is_empty() {
                return Err(FieldError::new(field("tenant"), "must not be empty"));
            }
            if !key
                .tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                return Err(FieldError::new(
                    field("tenant"),
                    "may contain only letters, digits and - _ . :",
                ));
            }
            if !seen.insert(blake3::hash(key.key.expose_secret().as_bytes())) {
                return Err(FieldError::new(
                    field("key"),
                    "the same key is listed twice",
                ));
            }
        }
        if self
            .admin_key
            .as_ref()
            .is_some_and(|admin| admin.expose_secret().is_empty())
        {
            return Err(FieldError::new(
                "auth.admin_key",
                "must not be empty when set",
            ));
        }
        Ok(())
    }
}

/// `[keys]`: gateway keys made at run time through `/admin/keys` (kept in the store); off
/// without this section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// How long a replica trusts a key it looked up: a key revoked on another replica is refused
    /// here within this.
    #[serde(default = "default_key_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: std::time::Duration,
}

fn default_key_cache_ttl() -> std::time::Duration {
    std::time::Duration::from_millis(500)
}

impl KeysConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        if self.cache_ttl > std::time::Duration::from_secs(1) {
            return Err(FieldError::new(
                "keys.cache_ttl",
                "must be at most 1s (a revoked key must be refused everywhere within a second)",
            ));
        }
        Ok(())
    }
}

/// `[tenants.NAME]`: limits every key of a tenant shares (static and run-time ones).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Requests per minute for the whole tenant, counted once across replicas sharing a store.
    pub rpm: Option<u64>,
    /// Tokens (input and output) per minute.
    pub tpm: Option<u64>,
    /// Requests of the tenant going upstream at the same time.
    pub max_concurrent: Option<u64>,
    /// USD per day or month: `budget = { usd = 100, period = "month", soft = 0.8 }`.
    pub budget: Option<crate::limits::Budget>,
}

impl TenantConfig {
    pub fn limits(&self) -> crate::keys::KeyLimits {
        crate::keys::KeyLimits {
            rpm: self.rpm,
            tpm: self.tpm,
            max_concurrent: self.max_concurrent,
            budget: self.budget.clone(),
        }
    }

    pub(super) fn validate(&self, name: &str) -> Result<(), FieldError> {
        match self.limits().problem() {
            Some((field, problem)) => {
                Err(FieldError::new(format!("tenants.{name}.{field}"), problem))
            }
            None => Ok(()),
        }
    }
}

/// `[limits]`: how the limits of keys and tenants hold what a request takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// How long a concurrency slot or a budget hold outlives a replica that died holding it:
    /// then the slot is free again and the budget hold counts as spent. Longer than any request
    /// (a stream included) may take, since a live request's hold must not lapse under it.
    #[serde(default = "default_hold_lease", with = "humantime_serde")]
    pub hold_lease: std::time::Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            hold_lease: default_hold_lease(),
        }
    }
}

fn default_hold_lease() -> std::time::Duration {
    std::time::Duration::from_secs(15 * 60)
}

impl LimitsConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        if self.hold_lease < std::time::Duration::from_secs(1) {
            return Err(FieldError::new(
                "limits.hold_lease",
                "must be at least 1s (longer than any request may take)",
            ));
        }
        Ok(())
    }
}
