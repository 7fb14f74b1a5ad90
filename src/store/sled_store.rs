//! The embedded store. sled's API is synchronous, so every call runs on tokio's blocking pool,
//! never on a runtime worker.
//!
//! Each value is stored as an 8-byte big-endian expiry (Unix milliseconds, 0 = never), an 8-byte
//! insertion number, then the payload. Expired values read as missing and are removed when met;
//! `put` flushes to disk before it returns, so an acknowledged write survives `kill -9`.
//!
//! Size bound: with `max_bytes`, the store keeps the total size of its keys and values under the
//! bound by evicting the oldest-inserted entries first (down to 90% of the bound, so evictions come
//! in batches). An age index (`insertion number ++ key`) finds them without scanning; index rows
//! left behind by overwritten entries are skipped and removed as eviction meets them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Admitted, Settle, Step, StepOutcome, Store, StoreError};

#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    by_age: sled::Tree,
    bytes: Arc<AtomicU64>,
    max_bytes: Option<u64>,
    /// `count_capped`'s counts: one process owns a sled store, so memory is where they belong
    /// (writing each to disk would cost a flush per request). Key → (resets at, count).
    counts: Arc<parking_lot::Mutex<Counts>>,
    /// `hold`'s budgets: what each has spent (read from disk on first use, written back on every
    /// release) and the holds of requests in flight, which die with the process as they should.
    budgets: Arc<parking_lot::Mutex<std::collections::HashMap<String, Budget>>>,
    spend_log: Arc<SpendLog>,
}

/// Group commit for spend: concurrent requests' spend is written and flushed together, one
/// fsync for all of them, instead of one each.
#[derive(Default)]
struct SpendLog {
    /// Spend not yet written, and the number of the last batch it joined.
    pending: parking_lot::Mutex<(u64, Spends)>,
    /// The last batch number that is on disk.
    flushed: AtomicU64,
    /// One writer at a time; the others wait for it, then find their spend written.
    writer: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Budget {
    spent: u64,
    holds: std::collections::HashMap<String, Hold>,
}

struct Hold {
    amount: u64,
    lapses: std::time::Instant,
    /// Spent when it lapses, and kept that long.
    spend_on_lapse: Option<Duration>,
}

/// Spend to write to disk: the counter, the amount added, how long it is kept.
type Spends = Vec<(String, u64, Duration)>;

impl Budget {
    fn held(&self) -> u64 {
        self.holds.values().map(|hold| hold.amount).sum()
    }

    /// Drops lapsed holds; those spent on lapse go to `spends`.
    fn prune(&mut self, key: &str, now: std::time::Instant, spends: &mut Spends) {
        let mut spent = 0;
        self.holds.retain(|_, hold| {
            let live = hold.lapses > now;
            if !live && let Some(keep) = hold.spend_on_lapse {
                spent += hold.amount;
                spends.push((key.to_owned(), hold.amount, keep));
            }
            live
        });
        self.spent = self.spent.saturating_add(spent);
    }
}

type Counts = std::collections::HashMap<String, (std::time::Instant, u64)>;

/// Applies one settlement in memory; spend to write goes to `spends`.
fn settle_in_memory(
    counts: &mut Counts,
    budgets: &mut std::collections::HashMap<String, Budget>,
    item: &Settle,
    now: std::time::Instant,
    spends: &mut Spends,
) {
    match item {
        Settle::Count { key, delta } => {
            if let Some(entry) = counts.get_mut(key)
                && entry.0 > now
            {
                entry.1 = entry.1.saturating_add_signed(*delta);
            }
        }
        Settle::Hold {
            key,
            holder,
            spend,
            keep,
        } => {
            let budget = budgets.entry(key.clone()).or_default();
            budget.holds.remove(holder);
            budget.spent = budget.spent.saturating_add(*spend);
            if *spend > 0 {
                spends.push((key.clone(), *spend, *keep));
            }
        }
    }
}

const HEADER: usize = 16;

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
    let (expiry, rest) = stored.split_first_chunk::<8>()?;
    let (_, payload) = rest.split_first_chunk::<8>()?;
    let expires_at = u64::from_be_bytes(*expiry);
    (expires_at == 0 || expires_at > now).then_some(payload)
}

/// The age-index row of a stored value: its insertion number, then the key.
fn age_row(key: &[u8], stored: &[u8]) -> Option<Vec<u8>> {
    let sequence = stored.get(8..HEADER)?;
    let mut row = Vec::with_capacity(8 + key.len());
    row.extend_from_slice(sequence);
    row.extend_from_slice(key);
    Some(row)
}

fn size_of(key: &[u8], stored: &[u8]) -> u64 {
    (key.len() + stored.len()) as u64
}

/// What a blocking call needs besides the database.
#[derive(Clone)]
struct Books {
    by_age: sled::Tree,
    bytes: Arc<AtomicU64>,
}

impl Books {
    /// Accounts for an entry that left the store (deleted, expired, overwritten).
    fn forget(&self, key: &[u8], stored: &[u8]) {
        let size = size_of(key, stored);
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(size))
            });
        if let Some(row) = age_row(key, stored) {
            let _ = self.by_age.remove(row);
        }
    }

    /// Removes the oldest entries until the data is at most `target` bytes; how many.
    fn evict(&self, db: &sled::Db, target: u64) -> Result<u64, StoreError> {
        let mut evicted = 0;
        for row in self.by_age.iter().keys() {
            if self.bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            let row = row.map_err(backend_error)?;
            self.by_age.remove(&row).map_err(backend_error)?;
            let (sequence, key) = row.split_at(8.min(row.len()));
            // Only if the entry is still the one this row was written for.
            if let Some(stored) = db.get(key).map_err(backend_error)?
                && stored.get(8..HEADER) == Some(sequence)
                && db
                    .compare_and_swap(key, Some(&stored), None::<&[u8]>)
                    .map_err(backend_error)?
                    .is_ok()
            {
                self.forget(key, &stored);
                evicted += 1;
            }
        }
        Ok(evicted)
    }
}

impl SledStore {
    /// Opens (or creates) the database at `path`; `cache_bytes` bounds sled's page cache in
    /// memory, `max_bytes` (if any) the data kept.
    pub fn open(path: &Path, cache_bytes: u64, max_bytes: Option<u64>) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(io.to_string())
                }
                other => backend_error(other),
            })?;
        let by_age = db.open_tree("by-age").map_err(backend_error)?;
        let mut bytes = 0;
        for entry in db.iter() {
            let (key, stored) = entry.map_err(backend_error)?;
            bytes += size_of(&key, &stored);
        }
        Ok(Self {
            db,
            by_age,
            bytes: Arc::new(AtomicU64::new(bytes)),
            max_bytes,
            counts: Arc::default(),
            budgets: Arc::default(),
            spend_log: Arc::default(),
        })
    }

    /// `open`, waiting up to `wait` for the file lock: a process that just exited (or a gateway
    /// stopped in this process, whose writes are finishing) lets go of it a moment later.
    pub async fn open_when_free(
        path: &Path,
        cache_bytes: u64,
        max_bytes: Option<u64>,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Self::open(path, cache_bytes, max_bytes) {
                Err(StoreError::Locked(_)) if tokio::time::Instant::now() < deadline => {
                    // Asynchronously: the work that holds the lock may need this very thread.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Bytes of keys and values held now (approximate while writes race).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&sled::Db, &Books) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let books = Books {
            by_age: self.by_age.clone(),
            bytes: Arc::clone(&self.bytes),
        };
        tokio::task::spawn_blocking(move || work(&db, &books))
            .await
            .map_err(backend_error)?
    }
}

/// The amount a spent counter holds, if it is live.
fn spent_value(stored: Option<&[u8]>, now: u64) -> u64 {
    stored
        .and_then(|stored| live_payload(stored, now))
        .and_then(|payload| payload.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

impl SledStore {
    /// Adds spend to the counters on disk, durably (one flush for all of them).
    async fn persist(&self, spends: Spends) -> Result<(), StoreError> {
        if spends.is_empty() {
            return Ok(());
        }
        let log = &self.spend_log;
        let batch = {
            let mut pending = log.pending.lock();
            pending.1.extend(spends);
            pending.0 += 1;
            pending.0
        };
        let _writer = log.writer.lock().await;
        if log.flushed.load(Ordering::Acquire) >= batch {
            return Ok(());
        }
        let (last, spends) = {
            let mut pending = log.pending.lock();
            (pending.0, std::mem::take(&mut pending.1))
        };
        let kept = spends.clone();
        let written = self
            .blocking(move |db, books| {
                let now = now_ms();
                for (key, spend, keep) in &spends {
                    let expires_at = now.saturating_add(keep.as_millis() as u64);
                    let previous = db
                        .fetch_and_update(key.as_bytes(), |old| {
                            let total = spent_value(old, now).saturating_add(*spend);
                            // Insertion number 0: the size bound never evicts what was spent.
                            let mut stored = Vec::with_capacity(HEADER + 8);
                            stored.extend_from_slice(&expires_at.to_be_bytes());
                            stored.extend_from_slice(&0u64.to_be_bytes());
                            stored.extend_from_slice(&total.to_be_bytes());
                            Some(stored)
                        })
                        .map_err(backend_error)?;
                    if previous.is_none() {
                        books
                            .bytes
                            .fetch_add((key.len() + HEADER + 8) as u64, Ordering::Relaxed);
                    }
                }
                durable(db)
            })
            .await;
        match written {
            Ok(()) => {
                log.flushed.store(last, Ordering::Release);
                Ok(())
            }
            Err(error) => {
                // Left for the next writer; this caller learns its spend is not yet durable.
                log.pending.lock().1.extend(kept);
                Err(error)
            }
        }
    }

    /// Makes sure `key`'s budget is in memory: on first use, what it spent is read from disk.
    async fn load_budget(&self, key: &str) -> Result<(), StoreError> {
        if self.budgets.lock().contains_key(key) {
            return Ok(());
        }
        let owned = key.to_owned();
        let spent = self
            .blocking(move |db, _| {
                let stored = db.get(owned.as_bytes()).map_err(backend_error)?;
                Ok(spent_value(stored.as_deref(), now_ms()))
            })
            .await?;
        // Never evicted: an admission relies on what it loaded staying loaded, and there is one
        // small entry per budget and period touched since the start.
        let mut budgets = self.budgets.lock();
        budgets.entry(key.to_owned()).or_insert(Budget {
            spent,
            holds: Default::default(),
        });
        Ok(())
    }
}

/// Waits until what was written is on disk. sled 0.34's `flush_async` would wait on a thread of
/// sled's own small pool, which also writes the log: enough concurrent writers park every
/// thread of it and nothing is ever written (spacejam/sled#1308). A blocking flush waits on
/// the calling thread, one of tokio's blocking pool.
fn durable(db: &sled::Db) -> Result<(), StoreError> {
    db.flush().map(drop).map_err(backend_error)
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn admit(
        &self,
        settled: &[Settle],
        holder: &str,
        first: &[Step],
        second: &[Step],
    ) -> Result<Admitted, StoreError> {
        for step in first.iter().chain(second) {
            if let Step::Hold { key, .. } = step {
                self.load_budget(key).await?;
            }
        }
        for item in settled {
            if let Settle::Hold { key, .. } = item {
                self.load_budget(key).await?;
            }
        }
        let now = std::time::Instant::now();
        let mut spends = Spends::new();
        let admitted = {
            // Always counts, then budgets: one order, so two admissions cannot deadlock.
            let mut counts = self.counts.lock();
            let mut budgets = self.budgets.lock();
            if counts.len() > 100_000 {
                counts.retain(|_, (resets_at, _)| *resets_at > now);
            }
            for item in settled {
                settle_in_memory(&mut counts, &mut budgets, item, now, &mut spends);
            }
            let mut admitted = Admitted::default();
            for (group, steps) in [first, second].into_iter().enumerate() {
                let may_apply = group == 0 || admitted.first;
                let fits: Vec<bool> = steps
                    .iter()
                    .map(|step| match step {
                        Step::Count {
                            key, amount, cap, ..
                        } => {
                            let count = counts
                                .get(key)
                                .filter(|(resets_at, _)| *resets_at > now)
                                .map_or(0, |(_, count)| *count);
                            count.saturating_add(*amount) <= *cap
                        }
                        Step::Hold {
                            key, amount, cap, ..
                        } => {
                            let budget = budgets.entry(key.clone()).or_default();
                            budget.prune(key, now, &mut spends);
                            budget
                                .spent
                                .saturating_add(budget.held())
                                .saturating_add(*amount)
                                <= *cap
                        }
                    })
                    .collect();
                let apply = may_apply && fits.iter().all(|fits| *fits);
                for (step, fits) in steps.iter().zip(fits) {
                    let outcome = match step {
                        Step::Count {
                            key,
                            amount,
                            window,
                            ..
                        } => {
                            let entry = match counts.get_mut(key) {
                                Some(entry) => entry,
                                None => counts.entry(key.clone()).or_insert((now + *window, 0)),
                            };
                            if entry.0 <= now {
                                *entry = (now + *window, 0);
                            }
                            if apply {
                                entry.1 += amount;
                            }
                            StepOutcome {
                                fits,
                                used: entry.1,
                                other: (entry.0 - now).as_millis() as u64,
                            }
                        }
                        Step::Hold {
                            key,
                            amount,
                            lease,
                            spend_on_lapse,
                            ..
                        } => {
                            let budget = budgets.entry(key.clone()).or_default();
                            if apply {
                                budget.holds.insert(
                                    holder.to_owned(),
                                    Hold {
                                        amount: *amount,
                                        lapses: now + *lease,
                                        spend_on_lapse: *spend_on_lapse,
                                    },
                                );
                            }
                            StepOutcome {
                                fits,
                                used: budget.spent,
                                other: budget.held(),
                            }
                        }
                    };
                    admitted.steps.push(outcome);
                }
                if group == 0 {
                    admitted.first = apply;
                } else {
                    admitted.second = apply;
                }
            }
            admitted
        };
        self.persist(spends).await?;
        Ok(admitted)
    }

    async fn settle(&self, items: &[Settle]) -> Result<(), StoreError> {
        for item in items {
            if let Settle::Hold { key, .. } = item {
                self.load_budget(key).await?;
            }
        }
        let mut spends = Spends::new();
        {
            let now = std::time::Instant::now();
            let mut counts = self.counts.lock();
            let mut budgets = self.budgets.lock();
            for item in items {
                settle_in_memory(&mut counts, &mut budgets, item, now, &mut spends);
            }
        }
        self.persist(spends).await
    }

    async fn holding(&self, key: &str) -> Result<crate::store::Holding, StoreError> {
        self.load_budget(key).await?;
        let now = std::time::Instant::now();
        let mut spends = Spends::new();
        let holding = {
            let mut budgets = self.budgets.lock();
            let budget = budgets.entry(key.to_owned()).or_default();
            budget.prune(key, now, &mut spends);
            crate::store::Holding {
                spent: budget.spent,
                held: budget.held(),
            }
        };
        self.persist(spends).await?;
        Ok(holding)
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        // Read on the calling thread: a lookup is a walk of sled's in-memory page cache, a few
        // microseconds, where handing it to the blocking pool and back cost a thread wake-up each
        // way (tens of microseconds on every cached request). Only a page evicted from that cache
        // (`cache.memory_bytes`) is read from disk here.
        let Some(stored) = self.db.get(key.as_bytes()).map_err(backend_error)? else {
            return Ok(None);
        };
        if let Some(payload) = live_payload(&stored, now_ms()) {
            return Ok(Some(payload.to_vec()));
        }
        let key = key.to_owned();
        self.blocking(move |db, books| {
            // Only remove what we read: a concurrent put of a fresh value must survive.
            if let Ok(Ok(())) = db.compare_and_swap(key.as_bytes(), Some(&stored), None::<&[u8]>) {
                books.forget(key.as_bytes(), &stored);
            }
            Ok(None)
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
        let key = key.to_owned();
        let max_bytes = self.max_bytes;
        self.blocking(move |db, books| {
            let sequence = db.generate_id().map_err(backend_error)?;
            let mut stored = Vec::with_capacity(HEADER + value.len());
            stored.extend_from_slice(&expires_at.to_be_bytes());
            stored.extend_from_slice(&sequence.to_be_bytes());
            stored.extend_from_slice(&value);
            let key = key.as_bytes();
            if let Some(row) = age_row(key, &stored) {
                books.by_age.insert(row, &[]).map_err(backend_error)?;
            }
            books
                .bytes
                .fetch_add(size_of(key, &stored), Ordering::Relaxed);
            if let Some(old) = db.insert(key, stored).map_err(backend_error)? {
                books.forget(key, &old);
            }
            if let Some(max) = max_bytes
                && books.bytes.load(Ordering::Relaxed) > max
            {
                let evicted = books.evict(db, max / 10 * 9)?;
                tracing::debug!(
                    evicted,
                    "cache store over its size bound: evicted the oldest entries"
                );
            }
            durable(db)
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let key = key.to_owned();
        let expected = expected.map(<[u8]>::to_vec);
        let swapped = self
            .blocking(move |db, books| {
                let current = db.get(key.as_bytes()).map_err(backend_error)?;
                let current_payload = current.as_deref().and_then(|c| live_payload(c, now_ms()));
                if current_payload != expected.as_deref() {
                    return Ok(false);
                }
                // Insertion number 0 and no age-index row: the size bound never evicts a record.
                let mut stored = Vec::with_capacity(HEADER + new.len());
                stored.extend_from_slice(&0u64.to_be_bytes());
                stored.extend_from_slice(&0u64.to_be_bytes());
                stored.extend_from_slice(&new);
                let swapped = db
                    .compare_and_swap(key.as_bytes(), current.as_deref(), Some(stored.as_slice()))
                    .map_err(backend_error)?
                    .is_ok();
                if swapped {
                    if let Some(old) = &current {
                        books.forget(key.as_bytes(), old);
                    }
                    books
                        .bytes
                        .fetch_add(size_of(key.as_bytes(), &stored), Ordering::Relaxed);
                }
                if swapped {
                    durable(db)?;
                }
                Ok(swapped)
            })
            .await?;
        Ok(swapped)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        let existed = self
            .blocking(move |db, books| {
                let old = db.remove(key.as_bytes()).map_err(backend_error)?;
                if let Some(old) = &old {
                    books.forget(key.as_bytes(), old);
                }
                durable(db)?;
                Ok(old.is_some())
            })
            .await?;
        Ok(existed)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let prefix = prefix.to_owned();
        let removed = self
            .blocking(move |db, books| {
                let mut removed = 0;
                for entry in db.scan_prefix(prefix.as_bytes()).keys() {
                    let key = entry.map_err(backend_error)?;
                    if let Some(old) = db.remove(&key).map_err(backend_error)? {
                        books.forget(&key, &old);
                        removed += 1;
                    }
                }
                durable(db)?;
                Ok(removed)
            })
            .await?;
        Ok(removed)
    }

    async fn count_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |db, _| {
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

    async fn scan_prefix(
        &self,
        prefix: &str,
        visit: &mut (dyn FnMut(String, Vec<u8>) + Send),
    ) -> Result<u64, StoreError> {
        const BATCH: usize = 1024;
        let mut after: Option<Vec<u8>> = None;
        let mut visited = 0;
        loop {
            let prefix = prefix.to_owned();
            let from = after.take();
            let batch = self
                .blocking(move |db, _| {
                    let now = now_ms();
                    let range = match &from {
                        Some(key) => db.range::<&[u8], _>((
                            std::ops::Bound::Excluded(key.as_slice()),
                            std::ops::Bound::Unbounded,
                        )),
                        None => db.range::<&[u8], _>(prefix.as_bytes()..),
                    };
                    let mut batch = Vec::with_capacity(BATCH);
                    let mut last = None;
                    for entry in range {
                        let (key, stored) = entry.map_err(backend_error)?;
                        if !key.starts_with(prefix.as_bytes()) || batch.len() == BATCH {
                            break;
                        }
                        last = Some(key.to_vec());
                        if let (Some(payload), Ok(key)) =
                            (live_payload(&stored, now), std::str::from_utf8(&key))
                        {
                            batch.push((key.to_owned(), payload.to_vec()));
                        }
                    }
                    Ok((batch, last))
                })
                .await?;
            let (batch, last) = batch;
            for (key, value) in batch {
                visit(key, value);
                visited += 1;
            }
            match last {
                Some(last) => after = Some(last),
                None => return Ok(visited),
            }
        }
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
        let store = SledStore::open(&dir.path().join("db"), 1 << 20, None).unwrap();
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
            // Long enough that a busy machine's slow flush does not expire it before the read.
            .put("k", b"v".to_vec(), Some(Duration::from_millis(1500)))
            .await
            .unwrap();
        assert!(store.get("k").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert_eq!(store.get("k").await.unwrap(), None);
        assert_eq!(
            store.bytes(),
            0,
            "an expired entry leaves the books when removed"
        );
    }

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = SledStore::open(&path, 1 << 20, None).unwrap();
            store.put("k", b"durable".to_vec(), None).await.unwrap();
        }
        // sled's flusher thread lets go of the file lock shortly after the last handle drops.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let store = loop {
            match SledStore::open(&path, 1 << 20, None) {
                Ok(store) => break store,
                Err(error) if std::time::Instant::now() > deadline => panic!("{error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        assert_eq!(
            store.get("k").await.unwrap().as_deref(),
            Some(&b"durable"[..])
        );
    }

    #[tokio::test]
    async fn the_size_bound_evicts_the_oldest_entries_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = SledStore::open(&path, 1 << 20, Some(4_000)).unwrap();
        for i in 0..50 {
            store
                .put(&format!("k{i:02}"), vec![b'x'; 200], None)
                .await
                .unwrap();
            assert!(store.bytes() <= 4_000, "after {i}: {}", store.bytes());
        }
        // An overwrite replaces the entry: it is counted once.
        store.put("k49", vec![b'y'; 200], None).await.unwrap();
        assert!(
            store.get("k00").await.unwrap().is_none(),
            "the oldest went first"
        );
        assert_eq!(store.get("k49").await.unwrap(), Some(vec![b'y'; 200]));
        assert!(store.get("k48").await.unwrap().is_some());
        let kept = store.count_prefix("k").await.unwrap();
        assert!((10..=19).contains(&kept), "{kept} entries kept");
        let bytes = store.bytes();
        drop(store);
        let reopened = SledStore::open(&path, 1 << 20, Some(4_000)).unwrap();
        assert_eq!(reopened.bytes(), bytes, "the size is recomputed on open");
        assert!(reopened.delete("k49").await.unwrap());
        assert!(reopened.bytes() < bytes);
    }

    #[test]
    fn short_or_expired_values_read_as_missing() {
        assert_eq!(live_payload(b"short", 10), None);
        let mut stored = 5u64.to_be_bytes().to_vec();
        stored.extend_from_slice(&1u64.to_be_bytes());
        stored.extend_from_slice(b"x");
        assert_eq!(live_payload(&stored, 10), None);
        assert_eq!(live_payload(&stored, 4), Some(&b"x"[..]));
    }
}
