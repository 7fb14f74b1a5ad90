//! The embedded store, on fjall (a log-structured engine). Its writes can wait (a write stall
//! while compaction catches up), so every write runs on tokio's blocking pool, never on a
//! runtime worker; a lookup runs where it is asked.
//!
//! Each value is stored as an 8-byte big-endian expiry (Unix milliseconds, 0 = never), an 8-byte
//! insertion number, then the payload. Expired values read as missing and are removed when met.
//!
//! Durability comes in two strengths. `put` returns once the write is in the operating system's
//! hands (fjall's journal, written before the call returns): it survives `kill -9` of the
//! process, which is all a cached answer needs, at a few microseconds instead of an fsync.
//! Records that must not be lost even to a power cut (prompt versions through
//! `compare_and_swap`, spend, deletions) are fsynced before they return.
//!
//! Size bound: with `max_bytes`, the store keeps the total size of its keys and values under the
//! bound by evicting the oldest-inserted entries first (down to 90% of the bound, so evictions come
//! in batches). An age index (`insertion number ++ key`, its own keyspace) finds them without
//! scanning.
//!
//! Layout: the database lives in `{path}/fjall`. A directory that holds a store written by
//! earlier releases (sled 0.34) is migrated on first open (see [`migrate_from_sled`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{Admitted, BackgroundPut, Settle, Step, StepOutcome, Store, StoreError};

#[derive(Clone)]
pub struct FjallStore {
    parts: Parts,
    max_bytes: Option<u64>,
    /// `count_capped`'s counts: one process owns an embedded store, so memory is where they
    /// belong (writing each to disk would cost a write per request). Key → (resets at, count).
    counts: Arc<parking_lot::Mutex<Counts>>,
    /// `hold`'s budgets: what each has spent (read from disk on first use, written back on every
    /// release) and the holds of requests in flight, which die with the process as they should.
    budgets: Arc<parking_lot::Mutex<std::collections::HashMap<String, Budget>>>,
    spend_log: Arc<SpendLog>,
    /// `put`'s queue to the entry writer.
    entries: std::sync::mpsc::SyncSender<EntryWrite>,
}

/// One `put` waiting for the entry writer.
struct EntryWrite {
    key: String,
    value: Vec<u8>,
    expires_at: u64,
    landed: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

/// How many `put`s may wait for the entry writer; beyond it a `put` writes on the blocking pool
/// itself, so memory stays bounded and nothing is dropped.
const ENTRY_QUEUE: usize = 1024;
/// The most entries one journal write carries.
const ENTRY_BATCH: usize = 128;
/// How long the entry writer waits for more after a batch before it sleeps on the queue. While
/// it waits, a `put` only queues; once it sleeps on the queue, every `put` that finds it asleep
/// pays a system call to wake it, and under load that was one wake-up per entry or two.
const ENTRY_LINGER: Duration = Duration::from_millis(1);

/// What a blocking call works on.
#[derive(Clone)]
struct Parts {
    db: Database,
    data: Keyspace,
    by_age: Keyspace,
    /// Bytes of keys and values held.
    bytes: Arc<AtomicU64>,
    /// The next insertion number.
    sequence: Arc<AtomicU64>,
    /// Held across every read-change-write of `data`, so that the books (bytes, age rows) follow
    /// exactly the values that replaced one another, and a compare-and-swap is atomic.
    writer: Arc<parking_lot::Mutex<()>>,
}

/// Group commit for spend: concurrent requests' spend is written and fsynced together, one
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
            if let Some(entry) = counts.get_mut(&**key)
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
            let budget = budget_of(budgets, key);
            budget.holds.remove(&**holder);
            budget.spent = budget.spent.saturating_add(*spend);
            if *spend > 0 {
                spends.push((key.to_string(), *spend, *keep));
            }
        }
    }
}

/// `key`'s budget, made empty on first use: the key is copied only then (it is looked up on
/// every admission and settlement).
fn budget_of<'m>(
    budgets: &'m mut std::collections::HashMap<String, Budget>,
    key: &str,
) -> &'m mut Budget {
    if !budgets.contains_key(key) {
        budgets.insert(key.to_owned(), Budget::default());
    }
    budgets
        .get_mut(key)
        .unwrap_or_else(|| unreachable!("inserted above"))
}

const HEADER: usize = 16;

/// When a value written now with `ttl` expires (0: never).
fn expiry(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |ttl| now_ms().saturating_add(ttl.as_millis() as u64))
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
    let (expiry, rest) = stored.split_first_chunk::<8>()?;
    let (_, payload) = rest.split_first_chunk::<8>()?;
    let expires_at = u64::from_be_bytes(*expiry);
    (expires_at == 0 || expires_at > now).then_some(payload)
}

/// The age-index row of a stored value: its insertion number, then the key. Records (insertion
/// number 0) have none: the size bound never evicts them.
fn age_row(key: &[u8], stored: &[u8]) -> Option<Vec<u8>> {
    let sequence = stored.get(8..HEADER)?;
    if sequence == [0; 8] {
        return None;
    }
    let mut row = Vec::with_capacity(8 + key.len());
    row.extend_from_slice(sequence);
    row.extend_from_slice(key);
    Some(row)
}

fn size_of(key: &[u8], stored: &[u8]) -> u64 {
    (key.len() + stored.len()) as u64
}

fn stored_value(expires_at: u64, sequence: u64, payload: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(HEADER + payload.len());
    stored.extend_from_slice(&expires_at.to_be_bytes());
    stored.extend_from_slice(&sequence.to_be_bytes());
    stored.extend_from_slice(payload);
    stored
}

impl Parts {
    /// Accounts for an entry that leaves the store (deleted, expired, overwritten) and queues
    /// the removal of its age row.
    fn forget(&self, batch: &mut fjall::OwnedWriteBatch, key: &[u8], stored: &[u8]) {
        let size = size_of(key, stored);
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(size))
            });
        if let Some(row) = age_row(key, stored) {
            batch.remove(&self.by_age, row);
        }
    }

    /// Removes the oldest entries until the data is at most `target` bytes; how many. Called
    /// with `writer` held.
    fn evict(&self, target: u64) -> Result<u64, StoreError> {
        let mut evicted = 0;
        let mut batch = self.db.batch();
        for row in self.by_age.iter() {
            if self.bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            let row = row.key().map_err(backend_error)?;
            batch.remove(&self.by_age, row.clone());
            let (sequence, key) = row.split_at(8.min(row.len()));
            // Only if the entry is still the one this row was written for.
            if let Some(stored) = self.data.get(key).map_err(backend_error)?
                && stored.get(8..HEADER) == Some(sequence)
            {
                batch.remove(&self.data, key);
                let size = size_of(key, &stored);
                let _ = self
                    .bytes
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                        Some(b.saturating_sub(size))
                    });
                evicted += 1;
            }
        }
        batch.commit().map_err(backend_error)?;
        Ok(evicted)
    }
}

impl Parts {
    /// Writes entries in one batch (one journal write), then evicts if the data outgrew
    /// `max_bytes`.
    fn write_entries(
        &self,
        writes: &[(&str, &[u8], u64)],
        max_bytes: Option<u64>,
    ) -> Result<(), StoreError> {
        {
            let _writer = self.writer.lock();
            let mut batch = self.db.batch();
            for (index, (key, value, expires_at)) in writes.iter().enumerate() {
                // A batch's items share one sequence number, so a key must appear in it once:
                // of a key written twice, the later value is the one kept, as if it came next.
                if writes[index + 1..].iter().any(|later| later.0 == *key) {
                    continue;
                }
                let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
                let stored = stored_value(*expires_at, sequence, value);
                if let Some(old) = self.data.get(key).map_err(backend_error)? {
                    self.forget(&mut batch, key.as_bytes(), &old);
                }
                if let Some(row) = age_row(key.as_bytes(), &stored) {
                    batch.insert(&self.by_age, row, []);
                }
                self.bytes
                    .fetch_add(size_of(key.as_bytes(), &stored), Ordering::Relaxed);
                batch.insert(&self.data, key.as_bytes(), stored);
            }
            // Written to the journal before it returns (the OS holds it): survives kill -9.
            batch.commit().map_err(backend_error)?;
        }
        if let Some(max) = max_bytes
            && self.bytes.load(Ordering::Relaxed) > max
        {
            let _writer = self.writer.lock();
            let evicted = self.evict(max / 10 * 9)?;
            tracing::debug!(
                evicted,
                "cache store over its size bound: evicted the oldest entries"
            );
        }
        Ok(())
    }
}

/// The entry writer: one thread takes what `put`s queued, many to a batch. Under load it does
/// not sleep between batches, so a cached answer's write costs no thread wake-up of its own and
/// shares its journal write. It ends when the store's last handle is dropped.
fn write_entries_queued(
    parts: Parts,
    max_bytes: Option<u64>,
    queue: std::sync::mpsc::Receiver<EntryWrite>,
) {
    let mut writes = Vec::with_capacity(ENTRY_BATCH);
    while let Ok(first) = queue.recv() {
        let mut next = Some(first);
        while let Some(first) = next.take() {
            writes.push(first);
            while writes.len() < ENTRY_BATCH
                && let Ok(next) = queue.try_recv()
            {
                writes.push(next);
            }
            let entries: Vec<(&str, &[u8], u64)> = writes
                .iter()
                .map(|w| (w.key.as_str(), w.value.as_slice(), w.expires_at))
                .collect();
            let result = parts.write_entries(&entries, max_bytes);
            drop(entries);
            for write in writes.drain(..) {
                (write.landed)(result.clone());
            }
            std::thread::sleep(ENTRY_LINGER);
            next = queue.try_recv().ok();
        }
    }
}

impl FjallStore {
    /// Opens (or creates) the database in the directory `path`; `cache_bytes` bounds its memory
    /// (block cache and write buffers), `max_bytes` (if any) the data kept.
    pub fn open(path: &Path, cache_bytes: u64, max_bytes: Option<u64>) -> Result<Self, StoreError> {
        let home = path.join("fjall");
        if !home.exists() && is_sled_store(path) {
            migrate_from_sled(path, &home)?;
        }
        remove_sled_files(path);
        // A write buffer fills before it is written out as a table, and a few can wait their
        // turn: a sixteenth of the budget each keeps them all inside it with the block cache.
        let write_buffer = (cache_bytes / 16).max(1 << 20);
        let db = Database::builder(&home)
            .cache_size(cache_bytes.saturating_sub(write_buffer * 5).max(1 << 20))
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => StoreError::Locked(format!(
                    "another process holds the store at {}",
                    path.display()
                )),
                other => backend_error(other),
            })?;
        let options = move || KeyspaceCreateOptions::default().max_memtable_size(write_buffer);
        let data = db.keyspace("data", options).map_err(backend_error)?;
        let by_age = db.keyspace("by-age", options).map_err(backend_error)?;
        let mut bytes = 0;
        for entry in data.iter() {
            let (key, stored) = entry.into_inner().map_err(backend_error)?;
            bytes += size_of(&key, &stored);
        }
        let next = match by_age.last_key_value() {
            Some(row) => {
                let row = row.key().map_err(backend_error)?;
                row.first_chunk::<8>().map_or(0, |n| u64::from_be_bytes(*n))
            }
            None => 0,
        };
        let parts = Parts {
            db,
            data,
            by_age,
            bytes: Arc::new(AtomicU64::new(bytes)),
            sequence: Arc::new(AtomicU64::new(next + 1)),
            writer: Arc::default(),
        };
        let (entries, queue) = std::sync::mpsc::sync_channel(ENTRY_QUEUE);
        let writer_parts = parts.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_entries_queued(writer_parts, max_bytes, queue))
            .map_err(backend_error)?;
        Ok(Self {
            parts,
            max_bytes,
            counts: Arc::default(),
            budgets: Arc::default(),
            spend_log: Arc::default(),
            entries,
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
        self.parts.bytes.load(Ordering::Relaxed)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Parts) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let parts = self.parts.clone();
        tokio::task::spawn_blocking(move || work(&parts))
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

impl FjallStore {
    /// Adds spend to the counters on disk, durably (one fsync for all of them).
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
            .blocking(move |parts| {
                let now = now_ms();
                let _writer = parts.writer.lock();
                let mut batch = parts.db.batch().durability(Some(PersistMode::SyncAll));
                let mut totals = std::collections::HashMap::<&str, (u64, u64)>::new();
                for (key, spend, keep) in &spends {
                    let expires_at = now.saturating_add(keep.as_millis() as u64);
                    let total = match totals.get(key.as_str()) {
                        Some((total, _)) => *total,
                        None => {
                            let stored = parts.data.get(key).map_err(backend_error)?;
                            if stored.is_none() {
                                parts
                                    .bytes
                                    .fetch_add((key.len() + HEADER + 8) as u64, Ordering::Relaxed);
                            }
                            spent_value(stored.as_deref(), now)
                        }
                    };
                    totals.insert(key, (total.saturating_add(*spend), expires_at));
                }
                for (key, (total, expires_at)) in totals {
                    // Insertion number 0: the size bound never evicts what was spent.
                    let stored = stored_value(expires_at, 0, &total.to_be_bytes());
                    batch.insert(&parts.data, key, stored);
                }
                batch.commit().map_err(backend_error)
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
            .blocking(move |parts| {
                let stored = parts.data.get(owned.as_bytes()).map_err(backend_error)?;
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

#[async_trait::async_trait]
impl Store for FjallStore {
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
                                .get(&**key)
                                .filter(|(resets_at, _)| *resets_at > now)
                                .map_or(0, |(_, count)| *count);
                            count.saturating_add(*amount) <= *cap
                        }
                        Step::Hold {
                            key, amount, cap, ..
                        } => {
                            let budget = budget_of(&mut budgets, key);
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
                            let entry = match counts.get_mut(&**key) {
                                Some(entry) => entry,
                                None => counts.entry(key.to_string()).or_insert((now + *window, 0)),
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
                            let budget = budget_of(&mut budgets, key);
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
            let budget = budget_of(&mut budgets, key);
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
        // Read on the calling thread: a lookup is a walk of the write buffers and the block
        // cache, a few microseconds, where handing it to the blocking pool and back cost a thread
        // wake-up each way (tens of microseconds on every cached request). Only a block evicted
        // from that cache (`cache.memory_bytes`) is read from disk here.
        let Some(stored) = self.parts.data.get(key).map_err(backend_error)? else {
            return Ok(None);
        };
        if let Some(payload) = live_payload(&stored, now_ms()) {
            return Ok(Some(payload.to_vec()));
        }
        let key = key.to_owned();
        self.blocking(move |parts| {
            let _writer = parts.writer.lock();
            // Only remove what we read: a concurrent put of a fresh value must survive.
            let current = parts.data.get(&key).map_err(backend_error)?;
            if current.as_deref() == Some(&stored[..]) {
                let mut batch = parts.db.batch();
                batch.remove(&parts.data, key.as_bytes());
                parts.forget(&mut batch, key.as_bytes(), &stored);
                batch.commit().map_err(backend_error)?;
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
        let (written, landed) = tokio::sync::oneshot::channel();
        let write = BackgroundPut {
            key: key.to_owned(),
            value,
            ttl,
            landed: Box::new(move |result| {
                let _ = written.send(result);
            }),
        };
        match self.put_in_background(write) {
            Ok(()) => landed.await.map_err(backend_error)?,
            Err(write) => {
                let max_bytes = self.max_bytes;
                let expires_at = expiry(write.ttl);
                self.blocking(move |parts| {
                    parts.write_entries(&[(&write.key, &write.value, expires_at)], max_bytes)
                })
                .await
            }
        }
    }

    fn put_in_background(&self, write: BackgroundPut) -> Result<(), BackgroundPut> {
        let BackgroundPut {
            key,
            value,
            ttl,
            landed,
        } = write;
        let queued = EntryWrite {
            key,
            value,
            expires_at: expiry(ttl),
            landed,
        };
        self.entries.try_send(queued).map_err(|error| {
            let (std::sync::mpsc::TrySendError::Full(back)
            | std::sync::mpsc::TrySendError::Disconnected(back)) = error;
            BackgroundPut {
                key: back.key,
                value: back.value,
                ttl,
                landed: back.landed,
            }
        })
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let key = key.to_owned();
        let expected = expected.map(<[u8]>::to_vec);
        self.blocking(move |parts| {
            let key = key.as_bytes();
            let _writer = parts.writer.lock();
            let current = parts.data.get(key).map_err(backend_error)?;
            let current_payload = current.as_deref().and_then(|c| live_payload(c, now_ms()));
            if current_payload != expected.as_deref() {
                return Ok(false);
            }
            // Insertion number 0 and no age-index row: the size bound never evicts a record.
            let stored = stored_value(0, 0, &new);
            let mut batch = parts.db.batch().durability(Some(PersistMode::SyncAll));
            if let Some(old) = &current {
                parts.forget(&mut batch, key, old);
            }
            parts
                .bytes
                .fetch_add(size_of(key, &stored), Ordering::Relaxed);
            batch.insert(&parts.data, key, stored);
            batch.commit().map_err(backend_error)?;
            Ok(true)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.blocking(move |parts| {
            let key = key.as_bytes();
            let _writer = parts.writer.lock();
            let Some(old) = parts.data.get(key).map_err(backend_error)? else {
                return Ok(false);
            };
            let mut batch = parts.db.batch().durability(Some(PersistMode::SyncAll));
            batch.remove(&parts.data, key);
            parts.forget(&mut batch, key, &old);
            batch.commit().map_err(backend_error)?;
            Ok(true)
        })
        .await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        const BATCH: usize = 1024;
        let prefix = prefix.to_owned();
        self.blocking(move |parts| {
            let mut removed = 0;
            loop {
                // A batch at a time, so that a purge of millions of entries stays bounded in
                // memory and lets writers in between.
                let _writer = parts.writer.lock();
                let mut batch = parts.db.batch().durability(Some(PersistMode::SyncAll));
                let mut found = 0;
                for entry in parts.data.prefix(prefix.as_bytes()).take(BATCH) {
                    let (key, old) = entry.into_inner().map_err(backend_error)?;
                    batch.remove(&parts.data, key.clone());
                    parts.forget(&mut batch, &key, &old);
                    found += 1;
                }
                batch.commit().map_err(backend_error)?;
                removed += found;
                if found < BATCH as u64 {
                    return Ok(removed);
                }
            }
        })
        .await
    }

    async fn count_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |parts| {
            let now = now_ms();
            let mut count = 0;
            for entry in parts.data.prefix(prefix.as_bytes()) {
                if live_payload(&entry.value().map_err(backend_error)?, now).is_some() {
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
            let (batch, last) = self
                .blocking(move |parts| {
                    let now = now_ms();
                    let range = match &from {
                        Some(key) => parts.data.range::<&[u8], _>((
                            std::ops::Bound::Excluded(key.as_slice()),
                            std::ops::Bound::Unbounded,
                        )),
                        None => parts.data.range::<&[u8], _>(prefix.as_bytes()..),
                    };
                    let mut batch = Vec::with_capacity(BATCH);
                    let mut last = None;
                    for entry in range {
                        let (key, stored) = entry.into_inner().map_err(backend_error)?;
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
        "embedded"
    }
}

/// Whether `path` holds a store written by releases before 2026-12 (sled 0.34): its `conf`
/// file starts with sled's settings, so a stranger's files of the same names are left alone.
fn is_sled_store(path: &Path) -> bool {
    path.join("db").is_file()
        && std::fs::read(path.join("conf"))
            .is_ok_and(|conf| conf.starts_with(b"segment_size: ") && conf.len() < 4096)
}

/// Copies a sled 0.34 store's values (the same stored format: expiry, insertion number,
/// payload) into a new database at `home`, built aside and renamed into place once complete and
/// fsynced, so a crash part way leaves the old store to migrate again. The age index is rebuilt
/// from the values.
pub fn migrate_from_sled(path: &Path, home: &Path) -> Result<u64, StoreError> {
    let partial = partial_path(home);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(backend_error)?;
    }
    let old = sled::Config::new().path(path).open().map_err(|e| match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Locked(format!(
                "another process holds the store at {}",
                path.display()
            ))
        }
        other => backend_error(other),
    })?;
    let now = now_ms();
    let mut copied = 0;
    {
        let db = Database::builder(&partial).open().map_err(backend_error)?;
        let data = db
            .keyspace("data", KeyspaceCreateOptions::default)
            .map_err(backend_error)?;
        let by_age = db
            .keyspace("by-age", KeyspaceCreateOptions::default)
            .map_err(backend_error)?;
        let mut batch = db.batch();
        for entry in old.iter() {
            let (key, stored) = entry.map_err(backend_error)?;
            if live_payload(&stored, now).is_none() {
                continue;
            }
            if let Some(row) = age_row(&key, &stored) {
                batch.insert(&by_age, row, []);
            }
            batch.insert(&data, &*key, &*stored);
            copied += 1;
            if batch.len() >= 2048 {
                std::mem::replace(&mut batch, db.batch())
                    .commit()
                    .map_err(backend_error)?;
            }
        }
        batch.commit().map_err(backend_error)?;
        db.persist(PersistMode::SyncAll).map_err(backend_error)?;
    }
    drop(old);
    std::fs::rename(&partial, home).map_err(backend_error)?;
    tracing::info!(
        entries = copied,
        "migrated the embedded store from sled 0.34; its files are removed"
    );
    Ok(copied)
}

fn partial_path(home: &Path) -> PathBuf {
    home.with_extension("partial")
}

/// Removes what is left of a migrated sled store (only its own file names): the new database is
/// complete once it is in place.
fn remove_sled_files(path: &Path) {
    if !path.join("fjall").exists() || !is_sled_store(path) {
        return;
    }
    for name in ["conf", "db"] {
        let _ = std::fs::remove_file(path.join(name));
    }
    let _ = std::fs::remove_dir_all(path.join("blobs"));
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("snap.") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FjallStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(&dir.path().join("db"), 1 << 20, None).unwrap();
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
    async fn a_large_prefix_is_deleted_in_batches() {
        let (_dir, store) = store();
        for i in 0..2_500 {
            store
                .put(&format!("cache/a/{i:05}"), b"x".to_vec(), None)
                .await
                .unwrap();
        }
        store.put("cache/b/1", b"y".to_vec(), None).await.unwrap();
        assert_eq!(store.delete_prefix("cache/a/").await.unwrap(), 2_500);
        assert_eq!(store.count_prefix("cache/").await.unwrap(), 1);
    }

    /// Concurrent writes of one key can share a batch: the books must still count it once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_of_one_key_leave_one_entry_in_the_books() {
        let (_dir, store) = store();
        let writes = (0..400u32).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .put(&format!("k{}", i % 3), i.to_be_bytes().to_vec(), None)
                    .await
                    .unwrap();
            })
        });
        for write in futures::future::join_all(writes).await {
            write.unwrap();
        }
        assert_eq!(store.count_prefix("k").await.unwrap(), 3);
        assert_eq!(store.bytes(), 3 * (2 + HEADER as u64 + 4));
        assert_eq!(store.parts.by_age.iter().count(), 3, "one age row each");
        for key in ["k0", "k1", "k2"] {
            assert!(store.delete(key).await.unwrap());
        }
        assert_eq!(store.bytes(), 0);
        assert_eq!(store.parts.by_age.iter().count(), 0);
    }

    #[tokio::test]
    async fn entries_expire() {
        let (_dir, store) = store();
        store
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
            let store = FjallStore::open(&path, 1 << 20, None).unwrap();
            store.put("k", b"durable".to_vec(), None).await.unwrap();
        }
        let store = FjallStore::open_when_free(&path, 1 << 20, None, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            store.get("k").await.unwrap().as_deref(),
            Some(&b"durable"[..])
        );
    }

    #[tokio::test]
    async fn the_size_bound_evicts_the_oldest_entries_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = FjallStore::open(&path, 1 << 20, Some(4_000)).unwrap();
        store
            .compare_and_swap("record", None, vec![b'r'; 100])
            .await
            .unwrap();
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
        assert!(store.get("record").await.unwrap().is_some(), "records stay");
        let kept = store.count_prefix("k").await.unwrap();
        assert!((10..=19).contains(&kept), "{kept} entries kept");
        let bytes = store.bytes();
        drop(store);
        let reopened =
            FjallStore::open_when_free(&path, 1 << 20, Some(4_000), Duration::from_secs(5))
                .await
                .unwrap();
        assert_eq!(reopened.bytes(), bytes, "the size is recomputed on open");
        // Insertion numbers go on after a restart: what is written now is the newest.
        reopened.put("k50", vec![b'z'; 200], None).await.unwrap();
        for i in 51..70 {
            reopened
                .put(&format!("k{i:02}"), vec![b'x'; 200], None)
                .await
                .unwrap();
        }
        assert!(reopened.get("k69").await.unwrap().is_some());
        assert!(reopened.get("k49").await.unwrap().is_none());
        assert!(reopened.delete("k69").await.unwrap());
    }

    #[tokio::test]
    async fn a_store_written_by_sled_is_migrated_on_first_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let old = sled::open(&path).unwrap();
            old.insert("prompts/reply", stored_value(0, 0, b"record"))
                .unwrap();
            old.insert("cache/a", stored_value(0, 7, b"answer"))
                .unwrap();
            old.insert("cache/gone", stored_value(1, 8, b"expired"))
                .unwrap();
            old.flush().unwrap();
        }
        let store = FjallStore::open(&path, 1 << 20, Some(10_000)).unwrap();
        assert_eq!(
            store.get("prompts/reply").await.unwrap().as_deref(),
            Some(&b"record"[..])
        );
        assert_eq!(
            store.get("cache/a").await.unwrap().as_deref(),
            Some(&b"answer"[..])
        );
        assert_eq!(store.get("cache/gone").await.unwrap(), None);
        assert!(!is_sled_store(&path), "the old files are removed");
        // The age index came along: new entries are younger than the migrated one.
        assert_eq!(store.parts.sequence.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn files_that_only_share_sleds_names_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("conf"), "mine = true\n").unwrap();
        std::fs::write(path.join("db"), "not a database").unwrap();
        let store = FjallStore::open(&path, 1 << 20, None).unwrap();
        drop(store);
        assert_eq!(
            std::fs::read_to_string(path.join("db")).unwrap(),
            "not a database"
        );
        assert!(path.join("conf").exists());
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
