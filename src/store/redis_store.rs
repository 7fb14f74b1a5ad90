//! The shared store, for several gateway replicas: Redis through the `redis` crate's async
//! `ConnectionManager` (one multiplexed connection that reconnects by itself).
//!
//! Keys get a configurable prefix; TTLs are Redis expiries (`SET ... PX`). If Redis cannot be
//! reached at startup the gateway still starts: the first connection is made lazily, at most once
//! a second, and every failure is a `StoreError` that the caches turn into a miss.

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use redis::streams::StreamRangeReply;

use super::{FeedPage, Store, StoreError};

pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    connection: Mutex<Connection>,
}

struct Connection {
    manager: Option<ConnectionManager>,
    last_attempt: Option<Instant>,
}

const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(500);
/// Events a change feed keeps (Redis trims older ones).
const FEED_LENGTH: usize = 100_000;

fn backend_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// Redis glob characters in a prefix are matched literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisStore {
    /// Checks the URL; does not connect yet.
    pub fn new(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Ok(Self {
            client: redis::Client::open(url).map_err(backend_error)?,
            prefix: prefix.to_owned(),
            connection: Mutex::new(Connection {
                manager: None,
                last_attempt: None,
            }),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut connection = self.connection.lock().await;
        if let Some(manager) = &connection.manager {
            return Ok(manager.clone());
        }
        if connection
            .last_attempt
            .is_some_and(|at| at.elapsed() < RECONNECT_INTERVAL)
        {
            return Err(StoreError::Backend(
                "redis is unreachable (retrying)".into(),
            ));
        }
        connection.last_attempt = Some(Instant::now());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(RECONNECT_INTERVAL);
        let manager = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(backend_error)?;
        connection.manager = Some(manager.clone());
        Ok(manager)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Every key under `prefix`, in SCAN batches (SCAN does not block Redis like KEYS would).
    async fn scan(&self, prefix: &str) -> Result<Vec<Vec<String>>, StoreError> {
        let mut connection = self.connection().await?;
        let pattern = format!("{}*", glob_escape(&self.key(prefix)));
        let mut cursor: u64 = 0;
        let mut batches = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .map_err(backend_error)?;
            if !keys.is_empty() {
                batches.push(keys);
            }
            if next == 0 {
                return Ok(batches);
            }
            cursor = next;
        }
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut connection = self.connection().await?;
        connection.get(self.key(key)).await.map_err(backend_error)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let key = self.key(key);
        match ttl {
            Some(ttl) => {
                let millis = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
                connection.pset_ex::<_, _, ()>(key, value, millis).await
            }
            None => connection.set::<_, _, ()>(key, value).await,
        }
        .map_err(backend_error)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        // A script runs atomically in Redis: no other client's write lands between the compare
        // and the set. `SET` without `PX` clears any expiry.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
            local current = redis.call('GET', KEYS[1])
            if ARGV[1] == '0' then
                if current then return 0 end
            elseif current ~= ARGV[2] then
                return 0
            end
            redis.call('SET', KEYS[1], ARGV[3])
            return 1",
            )
        });
        let mut connection = self.connection().await?;
        let swapped: i64 = SCRIPT
            .key(self.key(key))
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(new)
            .invoke_async(&mut connection)
            .await
            .map_err(backend_error)?;
        Ok(swapped == 1)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection().await?;
        let removed: u64 = connection.del(self.key(key)).await.map_err(backend_error)?;
        Ok(removed > 0)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut connection = self.connection().await?;
        for keys in self.scan(prefix).await? {
            removed += redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<u64>(&mut connection)
                .await
                .map_err(backend_error)?;
        }
        Ok(removed)
    }

    async fn count_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        Ok(self
            .scan(prefix)
            .await?
            .iter()
            .map(|keys| keys.len() as u64)
            .sum())
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        visit: &mut (dyn FnMut(String, Vec<u8>) + Send),
    ) -> Result<u64, StoreError> {
        let mut connection = self.connection().await?;
        let mut visited = 0;
        for keys in self.scan(prefix).await? {
            let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .map_err(backend_error)?;
            for (key, value) in keys.into_iter().zip(values) {
                // A key that expired between SCAN and MGET reads as nil.
                let (Some(value), Some(key)) = (value, key.strip_prefix(&self.prefix)) else {
                    continue;
                };
                visit(key.to_owned(), value);
                visited += 1;
            }
        }
        Ok(visited)
    }

    async fn publish(&self, feed: &str, event: Vec<u8>) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        // Readers are at most a few sync intervals behind: a bounded stream is plenty, and an
        // approximate trim (`~`) costs nothing.
        redis::cmd("XADD")
            .arg(self.key(feed))
            .arg("MAXLEN")
            .arg("~")
            .arg(FEED_LENGTH)
            .arg("*")
            .arg("e")
            .arg(event)
            .query_async::<String>(&mut connection)
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    async fn read_feed(
        &self,
        feed: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<FeedPage, StoreError> {
        let mut connection = self.connection().await?;
        let key = self.key(feed);
        let Some(cursor) = cursor else {
            let last: StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut connection)
                .await
                .map_err(backend_error)?;
            return Ok(FeedPage {
                events: Vec::new(),
                cursor: last
                    .ids
                    .first()
                    .map_or_else(|| "0-0".to_owned(), |entry| entry.id.clone()),
            });
        };
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg(format!("({cursor}"))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut connection)
            .await
            .map_err(backend_error)?;
        let cursor = page
            .ids
            .last()
            .map_or_else(|| cursor.to_owned(), |entry| entry.id.clone());
        let events = page
            .ids
            .iter()
            .filter_map(|entry| entry.get::<Vec<u8>>("e"))
            .collect();
        Ok(FeedPage { events, cursor })
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn count_capped(
        &self,
        key: &str,
        cap: u64,
        window: Duration,
    ) -> Result<crate::store::Counted, StoreError> {
        // One script: the check and the increment are one step for every replica.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
            local count = tonumber(redis.call('GET', KEYS[1]) or '0')
            local counted = 0
            if count < tonumber(ARGV[1]) then
                count = redis.call('INCR', KEYS[1])
                counted = 1
                if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
            end
            local ttl = redis.call('PTTL', KEYS[1])
            if ttl < 0 then ttl = 0 end
            return {counted, count, ttl}",
            )
        });
        let mut connection = self.connection().await?;
        let (counted, count, ttl): (i64, u64, u64) = SCRIPT
            .key(self.key(key))
            .arg(cap)
            .arg(window.as_millis() as u64)
            .invoke_async(&mut connection)
            .await
            .map_err(backend_error)?;
        Ok(crate::store::Counted {
            counted: counted == 1,
            count,
            resets_in: Duration::from_millis(ttl),
        })
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn a_bad_url_is_refused() {
        assert!(RedisStore::new("not a url", "p:").is_err());
    }
}
