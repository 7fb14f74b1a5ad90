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
        amount: u64,
        cap: u64,
        window: Duration,
    ) -> Result<crate::store::Counted, StoreError> {
        // One script: the check and the increment are one step for every replica.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
            local count = tonumber(redis.call('GET', KEYS[1]) or '0')
            local amount = tonumber(ARGV[1])
            local counted = 0
            if count + amount <= tonumber(ARGV[2]) then
                count = redis.call('INCRBY', KEYS[1], amount)
                counted = 1
                if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
            end
            local ttl = redis.call('PTTL', KEYS[1])
            if ttl < 0 then ttl = 0 end
            return {counted, count, ttl}",
            )
        });
        let mut connection = self.connection().await?;
        let (counted, count, ttl): (i64, u64, u64) = SCRIPT
            .key(self.key(key))
            .arg(amount)
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

    async fn adjust_count(&self, key: &str, delta: i64) -> Result<(), StoreError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
            if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
            if redis.call('INCRBY', KEYS[1], ARGV[1]) < 0 then
                redis.call('SET', KEYS[1], 0, 'KEEPTTL')
            end
            return 1",
            )
        });
        let mut connection = self.connection().await?;
        let _: i64 = SCRIPT
            .key(self.key(key))
            .arg(delta)
            .invoke_async(&mut connection)
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    async fn hold(
        &self,
        key: &str,
        holder: &str,
        amount: u64,
        cap: u64,
        lease: Duration,
    ) -> Result<crate::store::Holding, StoreError> {
        // Holds live in a hash (holder → amount) with their lapse times in a sorted set, so a
        // replica that died mid-request frees its holds after the lease, not never.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            local lapsed = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
            for _, holder in ipairs(lapsed) do redis.call('HDEL', KEYS[2], holder) end
            if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
            local held = 0
            for _, amount in ipairs(redis.call('HVALS', KEYS[2])) do held = held + tonumber(amount) end
            local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
            local amount = tonumber(ARGV[2])
            if spent + held + amount > tonumber(ARGV[3]) then return {0, spent, held} end
            redis.call('HSET', KEYS[2], ARGV[1], amount)
            redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
            redis.call('PEXPIRE', KEYS[2], ARGV[4])
            redis.call('PEXPIRE', KEYS[3], ARGV[4])
            return {1, spent, held + amount}",
            )
        });
        let mut connection = self.connection().await?;
        let full = self.key(key);
        let (granted, spent, held): (i64, u64, u64) = SCRIPT
            .key(&full)
            .key(format!("{full}#holds"))
            .key(format!("{full}#lapses"))
            .arg(holder)
            .arg(amount)
            .arg(cap)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut connection)
            .await
            .map_err(backend_error)?;
        Ok(crate::store::Holding {
            granted: granted == 1,
            spent,
            held,
        })
    }

    async fn release(
        &self,
        key: &str,
        holder: &str,
        spend: u64,
        keep: Duration,
    ) -> Result<(), StoreError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
            redis.call('HDEL', KEYS[2], ARGV[1])
            redis.call('ZREM', KEYS[3], ARGV[1])
            if tonumber(ARGV[2]) > 0 then
                redis.call('INCRBY', KEYS[1], ARGV[2])
                redis.call('PEXPIRE', KEYS[1], ARGV[3])
            end
            return 1",
            )
        });
        let mut connection = self.connection().await?;
        let full = self.key(key);
        let _: i64 = SCRIPT
            .key(&full)
            .key(format!("{full}#holds"))
            .key(format!("{full}#lapses"))
            .arg(holder)
            .arg(spend)
            .arg(keep.as_millis() as u64)
            .invoke_async(&mut connection)
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    async fn holding(&self, key: &str) -> Result<crate::store::Holding, StoreError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            local held = 0
            local amounts = redis.call('HGETALL', KEYS[2])
            for i = 1, #amounts, 2 do
                local lapses = redis.call('ZSCORE', KEYS[3], amounts[i])
                if lapses and tonumber(lapses) > now then held = held + tonumber(amounts[i + 1]) end
            end
            return {tonumber(redis.call('GET', KEYS[1]) or '0'), held}",
            )
        });
        let mut connection = self.connection().await?;
        let full = self.key(key);
        let (spent, held): (u64, u64) = SCRIPT
            .key(&full)
            .key(format!("{full}#holds"))
            .key(format!("{full}#lapses"))
            .invoke_async(&mut connection)
            .await
            .map_err(backend_error)?;
        Ok(crate::store::Holding {
            granted: true,
            spent,
            held,
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
