//! Gateway keys made at run time (`/admin/keys`, `reprise keys ...`), next to the static keys of
//! `[auth]`. A key is shown once when it is made or rotated; the store keeps only its blake3
//! digest, so a leaked store leaks no usable key.
//!
//! Store layout (one `Store`, embedded or Redis, so replicas share it):
//! - `keys/v1/id/{id}`: the key's record, written by compare-and-swap (no update is lost);
//! - `keys/v1/hash/{digest}`: the id a secret belongs to. A rotated secret's entry expires with
//!   its grace period.
//!
//! Every replica keeps what it looked up for `[keys] cache_ttl` (500 ms by default), so a key
//! revoked on one replica is refused on all of them within that; the replica that made the change
//! forgets its copy at once.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::store::{Store, StoreError};

const PREFIX: &str = "keys/v1/";
const SECRET_PREFIX: &str = "rpr_";

/// A key as stored. The secret itself is never kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub tenant: String,
    /// The secret's first characters, to tell keys apart in lists and logs.
    pub prefix: String,
    /// Hex blake3 digest of the current secret.
    digest: String,
    /// The secret before the last rotation, accepted until `valid_until_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<Previous>,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// The models (route aliases) this key may use; `None`: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: KeyLimits,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// A key's (or a tenant's) limits; each unset one does not apply. All of them are counted once
/// across every replica sharing the store (see `limits`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (input and output) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests going upstream at the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    /// USD per day or month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::limits::Budget>,
}

impl KeyLimits {
    /// The first limit that cannot work, as (field, problem).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        let at_least_one = "must be at least 1 (leave it out for no limit)";
        if self.rpm == Some(0) {
            return Some(("rpm", at_least_one));
        }
        if self.tpm == Some(0) {
            return Some(("tpm", at_least_one));
        }
        if self.max_concurrent == Some(0) {
            return Some(("max_concurrent", at_least_one));
        }
        self.budget
            .as_ref()
            .and_then(crate::limits::Budget::problem)
            .map(|problem| ("budget", problem))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Previous {
    digest: String,
    valid_until_ms: u64,
}

impl KeyRecord {
    fn status(&self, now: u64) -> &'static str {
        if self.revoked_at_ms.is_some() {
            "revoked"
        } else if self.expires_at_ms.is_some_and(|at| at <= now) {
            "expired"
        } else {
            "active"
        }
    }

    /// Whether `digest` opens this key at `now`.
    fn accepts(&self, digest: &str, now: u64) -> bool {
        if self.status(now) != "active" {
            return false;
        }
        self.digest == digest
            || self
                .previous
                .as_ref()
                .is_some_and(|p| p.digest == digest && now < p.valid_until_ms)
    }

    /// What the admin API shows: never the digest.
    pub fn view(&self) -> Value {
        let now = now_ms();
        json!({
            "object": "key",
            "id": self.id,
            "name": self.name,
            "tenant": self.tenant,
            "prefix": self.prefix,
            "status": self.status(now),
            "created_at": rfc3339(self.created_at_ms),
            "expires_at": self.expires_at_ms.map(rfc3339),
            "revoked_at": self.revoked_at_ms.map(rfc3339),
            "previous_valid_until": self.previous.as_ref()
                .filter(|p| now < p.valid_until_ms)
                .map(|p| rfc3339(p.valid_until_ms)),
            "models": self.models,
            "limits": self.limits,
            "metadata": self.metadata,
        })
    }

    /// Whether this key may use the route `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// What a client may send to create or change a key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyChange {
    pub name: Option<String>,
    pub tenant: Option<String>,
    /// `null` lifts a restriction, a list sets one.
    #[serde(default, deserialize_with = "present")]
    pub models: Option<Option<Vec<String>>>,
    /// RFC 3339 time, or `null` for never.
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
    /// A duration from now (`"30d"`, `"12h"`), instead of `expires_at`.
    pub expires_in: Option<String>,
    /// Replaces the key's limits (`{}` lifts them all).
    pub limits: Option<KeyLimits>,
    pub metadata: Option<Map<String, Value>>,
}

/// Tells a field given as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A key made or rotated: its record and the secret, shown this once.
pub struct Issued {
    pub record: KeyRecord,
    pub secret: String,
}

pub struct KeyStore {
    store: Arc<dyn Store>,
    /// digest → the record it opened (or `None`: no key), and when that was read.
    seen: quick_cache::sync::Cache<String, (Instant, Option<Arc<KeyRecord>>)>,
    trust_for: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn digest(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

fn unavailable(error: StoreError) -> ApiError {
    ApiError::StoreUnavailable(error.to_string())
}

fn corrupt(id: &str) -> ApiError {
    ApiError::StoreUnavailable(format!("the record of key {id} cannot be read"))
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}

fn valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

impl KeyStore {
    pub fn new(store: Arc<dyn Store>, trust_for: Duration) -> Self {
        Self {
            store,
            seen: quick_cache::sync::Cache::new(100_000),
            trust_for,
        }
    }

    /// The active key a presented secret opens, if any.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Arc<KeyRecord>>, ApiError> {
        if !secret.starts_with(SECRET_PREFIX) {
            return Ok(None);
        }
        let digest = digest(secret);
        let now = now_ms();
        if let Some((read_at, record)) = self.seen.get(&digest)
            && read_at.elapsed() < self.trust_for
        {
            return Ok(record.filter(|r| r.accepts(&digest, now)));
        }
        let record = match self.id_of(&digest).await? {
            Some(id) => self.read(&id).await?.map(Arc::new),
            None => None,
        };
        self.seen
            .insert(digest.clone(), (Instant::now(), record.clone()));
        Ok(record.filter(|r| r.accepts(&digest, now)))
    }

    /// Points the record's current secret at it.
    async fn index(&self, record: &KeyRecord) -> Result<(), ApiError> {
        self.store
            .put(
                &format!("{PREFIX}hash/{}", record.digest),
                record.id.clone().into_bytes(),
                None,
            )
            .await
            .map_err(unavailable)
    }

    async fn id_of(&self, digest: &str) -> Result<Option<String>, ApiError> {
        let id = self
            .store
            .get(&format!("{PREFIX}hash/{digest}"))
            .await
            .map_err(unavailable)?;
        Ok(id.and_then(|id| String::from_utf8(id).ok()))
    }

    async fn read_raw(&self, id: &str) -> Result<Option<(Vec<u8>, KeyRecord)>, ApiError> {
        let Some(bytes) = self
            .store
            .get(&format!("{PREFIX}id/{id}"))
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let record = serde_json::from_slice(&bytes).map_err(|_| corrupt(id))?;
        Ok(Some((bytes, record)))
    }

    async fn read(&self, id: &str) -> Result<Option<KeyRecord>, ApiError> {
        Ok(self.read_raw(id).await?.map(|(_, record)| record))
    }

    pub async fn get(&self, id: &str) -> Result<KeyRecord, ApiError> {
        self.read(id).await?.ok_or_else(|| not_found(id))
    }

    pub async fn list(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, ApiError> {
        let mut records = Vec::new();
        self.store
            .scan_prefix(&format!("{PREFIX}id/"), &mut |_, bytes| {
                if let Ok(record) = serde_json::from_slice::<KeyRecord>(&bytes) {
                    records.push(record);
                }
            })
            .await
            .map_err(unavailable)?;
        records.retain(|r| tenant.is_none_or(|t| r.tenant == t));
        records.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(records)
    }

    pub async fn create(&self, change: KeyChange) -> Result<Issued, ApiError> {
        let name = change
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| ApiError::invalid("a key needs a name", Some("name")))?;
        let tenant = change
            .tenant
            .clone()
            .ok_or_else(|| ApiError::invalid("a key needs a tenant", Some("tenant")))?;
        let now = now_ms();
        let mut record = KeyRecord {
            id: format!("key_{}", random_hex(8)),
            name,
            tenant,
            prefix: String::new(),
            digest: String::new(),
            previous: None,
            created_at_ms: now,
            expires_at_ms: None,
            revoked_at_ms: None,
            models: None,
            limits: KeyLimits::default(),
            metadata: Map::new(),
        };
        apply(&mut record, change, now)?;
        let secret = new_secret(&mut record);
        self.index(&record).await?;
        let bytes = serde_json::to_vec(&record).map_err(|_| corrupt(&record.id))?;
        let created = self
            .store
            .compare_and_swap(&format!("{PREFIX}id/{}", record.id), None, bytes)
            .await
            .map_err(unavailable)?;
        if !created {
            return Err(ApiError::Conflict {
                message: "a key with this id exists; try again".into(),
                param: None,
            });
        }
        Ok(Issued { record, secret })
    }

    /// Reads the record, changes it with `edit`, and swaps it in; on a concurrent change, again.
    async fn modify(
        &self,
        id: &str,
        mut edit: impl FnMut(&mut KeyRecord, u64) -> Result<(), ApiError>,
    ) -> Result<KeyRecord, ApiError> {
        loop {
            let (current, mut record) = self.read_raw(id).await?.ok_or_else(|| not_found(id))?;
            let now = now_ms();
            edit(&mut record, now)?;
            let bytes = serde_json::to_vec(&record).map_err(|_| corrupt(id))?;
            let swapped = self
                .store
                .compare_and_swap(&format!("{PREFIX}id/{id}"), Some(&current), bytes)
                .await
                .map_err(unavailable)?;
            if swapped {
                self.forget(&record);
                return Ok(record);
            }
        }
    }

    /// This replica's copies of the key go at once; other replicas' within `cache_ttl`.
    fn forget(&self, record: &KeyRecord) {
        self.seen.remove(&record.digest);
        if let Some(previous) = &record.previous {
            self.seen.remove(&previous.digest);
        }
    }

    pub async fn update(&self, id: &str, change: KeyChange) -> Result<KeyRecord, ApiError> {
        if change.tenant.is_some() {
            return Err(ApiError::invalid(
                "a key's tenant cannot change: make a new key",
                Some("tenant"),
            ));
        }
        let mut change = Some(change);
        self.modify(id, |record, now| match change.take() {
            Some(change) => apply(record, change, now),
            None => Ok(()),
        })
        .await
    }

    pub async fn revoke(&self, id: &str) -> Result<KeyRecord, ApiError> {
        self.modify(id, |record, now| {
            record.revoked_at_ms.get_or_insert(now);
            Ok(())
        })
        .await
    }

    /// A new secret; the old one keeps working for `grace`.
    pub async fn rotate(&self, id: &str, grace: Duration) -> Result<Issued, ApiError> {
        let mut secret = String::new();
        let record = self
            .modify(id, |record, now| {
                if record.status(now) != "active" {
                    return Err(ApiError::invalid(
                        format!("key {id} is {}: it cannot be rotated", record.status(now)),
                        None,
                    ));
                }
                let old = record.digest.clone();
                secret = new_secret(record);
                record.previous = (!grace.is_zero()).then(|| Previous {
                    digest: old,
                    valid_until_ms: now + grace.as_millis() as u64,
                });
                Ok(())
            })
            .await?;
        self.index(&record).await?;
        Ok(Issued { record, secret })
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("no key {id}"),
        param: None,
    }
}

fn new_secret(record: &mut KeyRecord) -> String {
    let secret = format!("{SECRET_PREFIX}{}", random_hex(24));
    record.digest = digest(&secret);
    record.prefix = secret[..SECRET_PREFIX.len() + 6].to_owned();
    secret
}

fn apply(record: &mut KeyRecord, change: KeyChange, now: u64) -> Result<(), ApiError> {
    if let Some(name) = change.name {
        if name.trim().is_empty() {
            return Err(ApiError::invalid(
                "the name must not be empty",
                Some("name"),
            ));
        }
        record.name = name;
    }
    if let Some(tenant) = change.tenant {
        if !valid_tenant(&tenant) {
            return Err(ApiError::invalid(
                "a tenant may contain only letters, digits and - _ . :",
                Some("tenant"),
            ));
        }
        record.tenant = tenant;
    }
    if let Some(models) = change.models {
        if models.as_ref().is_some_and(Vec::is_empty) {
            return Err(ApiError::invalid(
                "an empty list would allow no model; use null for all",
                Some("models"),
            ));
        }
        record.models = models;
    }
    match (change.expires_at, change.expires_in) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give expires_at or expires_in, not both",
                Some("expires_in"),
            ));
        }
        (Some(None), None) => record.expires_at_ms = None,
        (Some(Some(at)), None) => {
            let at = humantime::parse_rfc3339_weak(&at).map_err(|e| {
                ApiError::invalid(format!("expires_at: {e} (RFC 3339)"), Some("expires_at"))
            })?;
            let at = at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            record.expires_at_ms = Some(at);
        }
        (None, Some(within)) => {
            let within = humantime::parse_duration(&within)
                .map_err(|e| ApiError::invalid(format!("expires_in: {e}"), Some("expires_in")))?;
            record.expires_at_ms = Some(now + within.as_millis() as u64);
        }
        (None, None) => {}
    }
    if let Some(limits) = change.limits {
        if let Some((field, problem)) = limits.problem() {
            let param = format!("limits.{field}");
            return Err(ApiError::invalid(
                format!("{param}: {problem}"),
                Some(&param),
            ));
        }
        record.limits = limits;
    }
    if let Some(metadata) = change.metadata {
        record.metadata = metadata;
    }
    Ok(())
}
