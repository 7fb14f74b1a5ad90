//! Durable key-value storage behind one trait, so the caches and the prompt store never speak a
//! storage engine's language. The embedded store (fjall) is the default; Redis, shared by several gateway
//! replicas, implements the same trait.
//!
//! Keys are `/`-separated paths (`cache/v1/{tenant}/{route}/{namespace}/{key}`, laid out in
//! `cache/mod.rs`), so a purge by tenant, route or namespace is a prefix delete.

mod fjall_store;
mod redis_store;

use std::sync::Arc;
use std::time::Duration;

pub use fjall_store::FjallStore;
pub use redis_store::RedisStore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend answered with an error (I/O, corruption).
    #[error("store error: {0}")]
    Backend(String),
    /// Another handle holds the embedded store's file lock.
    #[error("store error: {0}")]
    Locked(String),
}

/// One limit an admission checks (see [`Store::admit`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Adds `amount` to the count under `key` if it stays within `cap`; the count starts afresh
    /// `window` after its first event (requests or tokens per minute).
    Count {
        key: Arc<str>,
        amount: u64,
        cap: u64,
        window: Duration,
    },
    /// Holds `amount` of the budget under `key` for the admission's holder if what is spent and
    /// held stays within `cap` (a concurrency limit holds 1; a budget the most a request can
    /// cost). A hold its holder never settles (a replica that died) lapses after `lease`: with
    /// `spend_on_lapse`, it then counts as spent, kept that long (a budget: money held for a
    /// request that may well have been answered is not given back); without, it is freed.
    Hold {
        key: Arc<str>,
        amount: u64,
        cap: u64,
        lease: Duration,
        spend_on_lapse: Option<Duration>,
    },
}

/// Where one step stands after an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepOutcome {
    /// Whether the step fits its cap.
    pub fits: bool,
    /// A count: its value (with this admission's amount if applied). A hold: what is spent.
    pub used: u64,
    /// A count: how long until it starts afresh (ms). A hold: what is held (with this one if
    /// applied).
    pub other: u64,
}

/// What [`Store::admit`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Admitted {
    /// The first group was applied (every step of it fit).
    pub first: bool,
    /// The second group was applied (the first was, and every step of the second fit).
    pub second: bool,
    /// The first group's outcomes, then the second's.
    pub steps: Vec<StepOutcome>,
}

/// What settling an admission changes (see [`Store::settle`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// Corrects a count by `delta` (never below zero) if its window is still open.
    Count { key: Arc<str>, delta: i64 },
    /// Drops `holder`'s hold and adds `spend` to what `key` has spent, kept for `keep` after
    /// its last change.
    Hold {
        key: Arc<str>,
        holder: Arc<str>,
        spend: u64,
        keep: Duration,
    },
}

/// What a budget has spent and holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Holding {
    pub spent: u64,
    pub held: u64,
}

/// One read of a change feed.
#[derive(Debug, Default)]
pub struct FeedPage {
    pub events: Vec<Vec<u8>>,
    pub cursor: String,
}

/// A write its caller does not wait for: `landed` is called once it is written, or failed.
pub struct BackgroundPut {
    pub key: String,
    pub value: Vec<u8>,
    pub ttl: Option<Duration>,
    pub landed: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

impl BackgroundPut {
    /// Writes it from a task of its own: for a store without a writer of its own.
    pub fn spawn(self, store: Arc<dyn Store>) {
        tokio::spawn(async move {
            let result = store.put(&self.key, self.value, self.ttl).await;
            (self.landed)(result);
        });
    }
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The value under `key`, or `None` if there is none or it has expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores `value` durably (it survives a crash of the process once this returns), expiring
    /// after `ttl` if given.
    async fn put(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>)
    -> Result<(), StoreError>;

    /// Writes `new` under `key` only if the value there is still `expected` (`None`: no value),
    /// atomically, durably like `put`; whether it did. This is how records that must not lose an
    /// update (the prompt store's) are written: read, change, swap, and on `false` start over.
    /// Values written this way never expire and are never evicted by a size bound.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError>;

    /// Removes `key`; whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Removes every key starting with `prefix`; how many there were.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError>;

    /// How many keys start with `prefix` (a scan: meant for admin statistics, not the hot path).
    async fn count_prefix(&self, prefix: &str) -> Result<u64, StoreError>;

    /// Hands every live `(key, value)` under `prefix` to `visit`, a batch at a time (memory stays
    /// bounded however many there are); how many. Meant for startup, not the hot path.
    async fn scan_prefix(
        &self,
        prefix: &str,
        visit: &mut (dyn FnMut(String, Vec<u8>) + Send),
    ) -> Result<u64, StoreError>;

    /// Appends `event` to `feed`, a change log every process sharing this store can read.
    /// A store only one process can open has no one to tell: the default keeps nothing.
    async fn publish(&self, feed: &str, event: Vec<u8>) -> Result<(), StoreError> {
        let _ = (feed, event);
        Ok(())
    }

    /// The events of `feed` published after `cursor`, oldest first (at most `limit`), and the
    /// cursor to continue from. `cursor = None` starts at the current end: no events, just the
    /// cursor.
    async fn read_feed(
        &self,
        feed: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<FeedPage, StoreError> {
        let _ = (feed, limit);
        Ok(FeedPage {
            events: Vec::new(),
            cursor: cursor.unwrap_or_default().to_owned(),
        })
    }

    /// Applies `settled` (earlier admissions' settlements, carried along to save a round trip),
    /// then the steps of `first` all together or none of them, then those of `second` the same
    /// way (only if `first` was applied), atomically among every process sharing the store: N
    /// replicas enforce a limit once, not N times, in one round trip. Holds are taken for
    /// `holder`. Counts are not durable (a count need not survive a restart); spend is.
    async fn admit(
        &self,
        settled: &[Settle],
        holder: &str,
        first: &[Step],
        second: &[Step],
    ) -> Result<Admitted, StoreError>;

    /// Settles earlier admissions in one step; returns once any spend is durable (it survives a
    /// crash).
    async fn settle(&self, items: &[Settle]) -> Result<(), StoreError>;

    /// What `key` has spent and holds now.
    async fn holding(&self, key: &str) -> Result<Holding, StoreError>;

    /// Whether other processes can write to this store (and so whether `read_feed` is worth
    /// polling).
    fn is_shared(&self) -> bool {
        false
    }

    /// Queues `write` to land without the caller waiting. A store that has no writer of its own
    /// to queue it to hands it back, to be written with [`BackgroundPut::spawn`].
    fn put_in_background(&self, write: BackgroundPut) -> Result<(), BackgroundPut> {
        Err(write)
    }

    /// A short name for logs and metrics.
    fn backend(&self) -> &'static str;
}
