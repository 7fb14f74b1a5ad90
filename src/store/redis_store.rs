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

use super::{Admitted, FeedPage, Settle, Step, StepOutcome, Store, StoreError};

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

/// Settles earlier admissions, then admits one request: every limit of a request in one round
/// trip, counted once for every replica. A hold lives in a hash (holder → amount) with its lapse
/// time in a sorted set, so a replica that died mid-request frees its holds after the lease
/// (or, for a budget, counts them as spent) rather than never. Amounts go to INCRBY and HSET as
/// the strings they came as: Lua would print a large number as 1e+15.
///
/// ARGV: holder, the number of settlements, then per settlement `kind holder value keep-ms`
/// (kind `c`: correct a count by value; `h`: release a hold and spend value), then per step
/// `kind group amount cap ms keep-ms` (`c`: count within a window of ms; `h`: hold for a lease
/// of ms, spent on lapse if keep-ms > 0). A count has one key; a hold three (spent, holds,
/// lapses).
static ADMIT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
    local now
    local function clock()
        if not now then
            local time = redis.call('TIME')
            now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
        end
        return now
    end
    local k, a = 1, 3
    for _ = 1, tonumber(ARGV[2]) do
        local kind, holder, value, keep = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
        a = a + 4
        if kind == 'c' then
            if tonumber(value) ~= 0 and redis.call('EXISTS', KEYS[k]) == 1 then
                if redis.call('INCRBY', KEYS[k], value) < 0 then
                    redis.call('SET', KEYS[k], 0, 'KEEPTTL')
                end
            end
            k = k + 1
        else
            redis.call('HDEL', KEYS[k + 1], holder)
            redis.call('ZREM', KEYS[k + 2], holder)
            if tonumber(value) > 0 then
                redis.call('INCRBY', KEYS[k], value)
                redis.call('PEXPIRE', KEYS[k], keep)
            end
            k = k + 3
        end
    end
    local holder = ARGV[1]
    local steps = {}
    local ok = {true, true}
    while a <= #ARGV do
        local s = {kind = ARGV[a], group = tonumber(ARGV[a + 1]), raw = ARGV[a + 2],
            amount = tonumber(ARGV[a + 2]), cap = tonumber(ARGV[a + 3]), ms = ARGV[a + 4],
            keep = ARGV[a + 5], key = k}
        a = a + 6
        if s.kind == 'c' then
            -- Counted at once (one call instead of a read and a write); taken back below if
            -- its group does not fit.
            s.used = redis.call('INCRBY', KEYS[k], s.raw)
            s.ttl = redis.call('PTTL', KEYS[k])
            if s.ttl < 0 then
                redis.call('PEXPIRE', KEYS[k], s.ms)
                s.ttl = tonumber(s.ms)
            end
            s.fits = s.used <= s.cap
            k = k + 1
        else
            local lapsed = redis.call('ZRANGEBYSCORE', KEYS[k + 2], '-inf', clock())
            for _, h in ipairs(lapsed) do
                local amount = redis.call('HGET', KEYS[k + 1], h)
                if amount and tonumber(s.keep) > 0 then
                    redis.call('INCRBY', KEYS[k], amount)
                    redis.call('PEXPIRE', KEYS[k], s.keep)
                end
                redis.call('HDEL', KEYS[k + 1], h)
            end
            if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', clock()) end
            s.held = 0
            for _, v in ipairs(redis.call('HVALS', KEYS[k + 1])) do s.held = s.held + tonumber(v) end
            s.spent = tonumber(redis.call('GET', KEYS[k]) or '0')
            s.fits = s.spent + s.held + s.amount <= s.cap
            k = k + 3
        end
        if not s.fits then ok[s.group] = false end
        table.insert(steps, s)
    end
    if not ok[1] then ok[2] = false end
    local out = {ok[1] and 1 or 0, ok[2] and 1 or 0}
    for _, s in ipairs(steps) do
        local key = KEYS[s.key]
        if s.kind == 'c' then
            if not ok[s.group] then
                s.used = redis.call('DECRBY', key, s.raw)
            end
            table.insert(out, s.fits and 1 or 0)
            table.insert(out, s.used)
            table.insert(out, s.ttl)
        else
            if ok[s.group] then
                redis.call('HSET', KEYS[s.key + 1], holder, s.raw)
                redis.call('ZADD', KEYS[s.key + 2], clock() + tonumber(s.ms), holder)
                -- Holds that turn into spend must outlive their lease until someone spends them.
                local life = tonumber(s.ms) + tonumber(s.keep)
                redis.call('PEXPIRE', KEYS[s.key + 1], life)
                redis.call('PEXPIRE', KEYS[s.key + 2], life)
                s.held = s.held + s.amount
            end
            table.insert(out, s.fits and 1 or 0)
            table.insert(out, s.spent)
            table.insert(out, s.held)
        end
    end
    return out",
    )
});

impl RedisStore {
    /// A hold's three keys: what is spent, the holds, their lapse times.
    fn hold_keys(&self, invocation: &mut redis::ScriptInvocation<'_>, key: &str) {
        let full = self.key(key);
        invocation
            .key(&full)
            .key(format!("{full}#holds"))
            .key(format!("{full}#lapses"));
    }

    fn settle_args(&self, invocation: &mut redis::ScriptInvocation<'_>, item: &Settle) {
        match item {
            Settle::Count { key, delta } => {
                invocation.key(self.key(key));
                invocation.arg("c").arg("").arg(*delta).arg(0);
            }
            Settle::Hold {
                key,
                holder,
                spend,
                keep,
            } => {
                self.hold_keys(invocation, key);
                invocation
                    .arg("h")
                    .arg(&**holder)
                    .arg(*spend)
                    .arg(keep.as_millis() as u64);
            }
        }
    }

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

    async fn admit(
        &self,
        settled: &[Settle],
        holder: &str,
        first: &[Step],
        second: &[Step],
    ) -> Result<Admitted, StoreError> {
        let mut invocation = ADMIT.prepare_invoke();
        invocation.arg(holder).arg(settled.len());
        for item in settled {
            self.settle_args(&mut invocation, item);
        }
        for (group, steps) in [(1, first), (2, second)] {
            for step in steps {
                match step {
                    Step::Count {
                        key,
                        amount,
                        cap,
                        window,
                    } => {
                        invocation.key(self.key(key));
                        invocation
                            .arg("c")
                            .arg(group)
                            .arg(*amount)
                            .arg(*cap)
                            .arg(window.as_millis() as u64)
                            .arg(0);
                    }
                    Step::Hold {
                        key,
                        amount,
                        cap,
                        lease,
                        spend_on_lapse,
                    } => {
                        self.hold_keys(&mut invocation, key);
                        invocation
                            .arg("h")
                            .arg(group)
                            .arg(*amount)
                            .arg(*cap)
                            .arg(lease.as_millis() as u64)
                            .arg(spend_on_lapse.map_or(0, |keep| keep.as_millis() as u64));
                    }
                }
            }
        }
        let mut connection = self.connection().await?;
        let out: Vec<u64> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(backend_error)?;
        let steps = out
            .get(2..)
            .unwrap_or_default()
            .chunks_exact(3)
            .map(|step| StepOutcome {
                fits: step[0] == 1,
                used: step[1],
                other: step[2],
            })
            .collect();
        Ok(Admitted {
            first: out.first() == Some(&1),
            second: out.get(1) == Some(&1),
            steps,
        })
    }

    async fn settle(&self, items: &[Settle]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        self.admit(items, "", &[], &[]).await.map(drop)
    }

    /// Read only: a lapsed hold is counted as spent, as the next admission will make it.
    async fn holding(&self, key: &str) -> Result<crate::store::Holding, StoreError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
            local held = 0
            local amounts = redis.call('HGETALL', KEYS[2])
            for i = 1, #amounts, 2 do
                local lapses = redis.call('ZSCORE', KEYS[3], amounts[i])
                if lapses and tonumber(lapses) > now then
                    held = held + tonumber(amounts[i + 1])
                else
                    spent = spent + tonumber(amounts[i + 1])
                end
            end
            return {spent, held}",
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
        Ok(crate::store::Holding { spent, held })
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
