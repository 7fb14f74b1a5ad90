//! The embedded store. sled's API is synchronous, so every call runs on tokio's blocking pool,
//! never on a runtime worker.
//!
//! Each value is stored as an 8-byte big-endian expiry (Unix milliseconds, 0 = never) followed by
//! the payload. Expired values read as missing and are removed when met; `put` flushes to disk
//! before it returns, so an acknowledged write survives `kill -9`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Store, StoreError};

#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn backend_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// Splits a stored value into its payload, or `None` if it expired or is too short to be ours.
fn live_payload(stored: &[u8], now: u64) -> Option<&[u8]> {
    let (expiry, payload) = stored.split_first_chunk::<8>()?;
    let expires_at = u64::from_be_bytes(*expiry);
    (expires_at == 0 || expires_at > now).then_some(payload)
}

impl SledStore {
    /// Opens (or creates) the database at `path`; `cache_bytes` bounds sled's page cache in memory.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(backend_error)?;
        Ok(Self { db })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&sled::Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(backend_error)?
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let Some(stored) = db.get(key.as_bytes()).map_err(backend_error)? else {
                return Ok(None);
            };
            match live_payload(&stored, now_ms()) {
                Some(payload) => Ok(Some(payload.to_vec())),
                None => {
                    // Only remove what we read: a concurrent put of a fresh value must survive.
                    let _ = db.compare_and_swap(key.as_bytes(), Some(stored), None::<&[u8]>);
                    Ok(None)
                }
            }
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let expires_at = ttl.map_or(0, |ttl| now_ms().saturating_add(ttl.as_millis() as u64));
        let mut stored = Vec::with_capacity(8 + value.len());
        stored.extend_from_slice(&expires_at.to_be_bytes());
        stored.extend_from_slice(&value);
        let key = key.to_owned();
        self.blocking(move |db| {
            db.insert(key.as_bytes(), stored).map_err(backend_error)?;
            Ok(())
        })
        .await?;
        self.db.flush_async().await.map_err(backend_error)?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        let existed = self
            .blocking(move |db| Ok(db.remove(key.as_bytes()).map_err(backend_error)?.is_some()))
            .await?;
        self.db.flush_async().await.map_err(backend_error)?;
        Ok(existed)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let prefix = prefix.to_owned();
        let removed = self
            .blocking(move |db| {
                let mut removed = 0;
                for entry in db.scan_prefix(prefix.as_bytes()).keys() {
                    let key = entry.map_err(backend_error)?;
                    if db.remove(&key).map_err(backend_error)?.is_some() {
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .await?;
        self.db.flush_async().await.map_err(backend_error)?;
        Ok(removed)
    }

    async fn count_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |db| {
            let now = now_ms();
            let mut count = 0;
            for entry in db.scan_prefix(prefix.as_bytes()).values() {
                if live_payload(&entry.map_err(backend_error)?, now).is_some() {
                    count += 1;
                }
            }
            Ok(count)
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "sled"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db"), 1 << 20).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn put_get_delete_and_prefix_delete() {
        let (_dir, store) = store();
        store.put("cache/a/1", b"one".to_vec(), None).await.unwrap();
        store.put("cache/a/2", b"two".to_vec(), None).await.unwrap();
        store
            .put("cache/b/1", b"three".to_vec(), None)
            .await
            .unwrap();
        assert_eq!(
            store.get("cache/a/1").await.unwrap().as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(store.get("cache/zz").await.unwrap(), None);
        assert!(store.delete("cache/a/1").await.unwrap());
        assert!(!store.delete("cache/a/1").await.unwrap());
        assert_eq!(store.delete_prefix("cache/a/").await.unwrap(), 1);
        assert_eq!(
            store.get("cache/b/1").await.unwrap().as_deref(),
            Some(&b"three"[..])
        );
    }

    #[tokio::test]
    async fn entries_expire() {
        let (_dir, store) = store();
        store
            .put("k", b"v".to_vec(), Some(Duration::from_millis(50)))
            .await
            .unwrap();
        assert!(store.get("k").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(store.get("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = SledStore::open(&path, 1 << 20).unwrap();
            store.put("k", b"durable".to_vec(), None).await.unwrap();
        }
        let store = SledStore::open(&path, 1 << 20).unwrap();
        assert_eq!(
            store.get("k").await.unwrap().as_deref(),
            Some(&b"durable"[..])
        );
    }

    #[test]
    fn short_or_expired_values_read_as_missing() {
        assert_eq!(live_payload(b"short", 10), None);
        let mut stored = 5u64.to_be_bytes().to_vec();
        stored.extend_from_slice(b"x");
        assert_eq!(live_payload(&stored, 10), None);
        assert_eq!(live_payload(&stored, 4), Some(&b"x"[..]));
    }
}
