//! The request log's storage: records as JSON lines appended to segment files, oldest segment
//! deleted first.
//!
//! Why not a key-value store: a request log is written in time order, read newest first, and
//! trimmed from the old end. Whole segments make the size bound exact (sled's files grew to four
//! times the bound it was trimmed to, and never shrank; see `docs/observability.md`), a write is
//! one `write` call per batch (a `kill -9` loses nothing the writer has written), and a query
//! skips every segment whose time span or tenants cannot match.
//!
//! Layout in the log's directory:
//! - `{created ms}-{n}.jsonl`: one record per line, in the order requests finished;
//! - `{created ms}-{n}.meta`: written when a segment is closed: its time span (by arrival),
//!   record count and tenants, so opening the log reads only the segment it crashed in.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::RequestRecord;

/// What the log knows of one segment without reading it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Segment {
    #[serde(skip)]
    pub path: PathBuf,
    /// The earliest and latest arrival (`at_ms`) of its records.
    pub first_ms: u64,
    pub last_ms: u64,
    pub records: u64,
    pub bytes: u64,
    pub tenants: HashSet<String>,
}

impl Segment {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            first_ms: u64::MAX,
            last_ms: 0,
            records: 0,
            bytes: 0,
            tenants: HashSet::new(),
        }
    }

    fn add(&mut self, at_ms: u64, tenant: &str, bytes: usize) {
        self.first_ms = self.first_ms.min(at_ms);
        self.last_ms = self.last_ms.max(at_ms);
        self.records += 1;
        self.bytes += bytes as u64;
        if !self.tenants.contains(tenant) {
            self.tenants.insert(tenant.to_owned());
        }
    }

    /// Whether a record that arrived within `since..=until` (from `tenant`) may be in it.
    pub fn may_hold(&self, since: u64, until: u64, tenant: Option<&str>) -> bool {
        self.records > 0
            && self.last_ms >= since
            && self.first_ms <= until
            && tenant.is_none_or(|t| self.tenants.contains(t))
    }

    fn meta_path(&self) -> PathBuf {
        self.path.with_extension("meta")
    }

    /// Reads a segment whose summary was not written (the one a crash left open).
    fn scan(path: PathBuf) -> std::io::Result<Self> {
        let bytes = std::fs::read(&path)?;
        let mut segment = Self::new(path);
        for line in bytes.split(|b| *b == b'\n') {
            if let Ok(record) = serde_json::from_slice::<RequestRecord>(line) {
                segment.add(record.at_ms, &record.tenant, line.len() + 1);
            }
        }
        segment.bytes = bytes.len() as u64;
        Ok(segment)
    }
}

/// Records waiting for the writer: their JSON lines back to back, and per line what the
/// segment's summary needs.
#[derive(Default)]
pub struct Queue {
    pending: parking_lot::Mutex<Pending>,
    /// The log was dropped: the writer writes what is left and stops.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Arrival time, tenant and length of each line.
    lines: Vec<(u64, Arc<str>, usize)>,
}

impl Queue {
    /// Appends `line` unless `capacity` lines are already waiting.
    pub fn push(&self, line: &[u8], at_ms: u64, tenant: &Arc<str>, capacity: usize) -> bool {
        let mut pending = self.pending.lock();
        if pending.lines.len() >= capacity {
            return false;
        }
        pending.bytes.extend_from_slice(line);
        pending.lines.push((at_ms, Arc::clone(tenant), line.len()));
        true
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Swaps what is waiting with `spare` (emptied, its allocation kept for the next turn).
    fn take(&self, spare: &mut Pending) {
        spare.bytes.clear();
        spare.lines.clear();
        std::mem::swap(&mut *self.pending.lock(), spare);
    }
}

/// The segments, oldest first; the last is the one being written.
pub type Segments = Arc<RwLock<Vec<Segment>>>;

/// Sizes: a segment is closed past `segment_bytes`, and the oldest go once the log is past
/// `max_bytes`.
pub struct Bounds {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub segment_bytes: u64,
}

impl Bounds {
    pub fn new(max_bytes: u64, max_age: Duration) -> Self {
        Self {
            max_bytes,
            max_age,
            // Small enough that dropping one costs a thirty-second of the log, large enough
            // that the directory stays short.
            segment_bytes: (max_bytes / 32).clamp(256 << 10, 16 << 20),
        }
    }
}

/// Opens the log's directory: the summaries of closed segments, a scan of any segment left
/// without one, and a fresh segment to write.
pub fn open(dir: &Path) -> std::io::Result<(Segments, File)> {
    std::fs::create_dir_all(dir)?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    names.sort();
    let mut segments = Vec::with_capacity(names.len() + 1);
    for path in names {
        let summary = std::fs::read(path.with_extension("meta"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Segment>(&bytes).ok());
        let segment = match summary {
            Some(mut segment) => {
                segment.path = path;
                segment
            }
            None => {
                let segment = Segment::scan(path)?;
                write_summary(&segment);
                segment
            }
        };
        if segment.records == 0 {
            // A segment opened and never written (a start with no requests).
            remove(&segment);
            continue;
        }
        segments.push(segment);
    }
    let (segment, file) = create(dir, segments.last())?;
    segments.push(segment);
    Ok((Arc::new(RwLock::new(segments)), file))
}

/// A new segment named after now, after `previous` in name order.
fn create(dir: &Path, previous: Option<&Segment>) -> std::io::Result<(Segment, File)> {
    let mut n = 0u32;
    loop {
        let name = format!("{:016}-{n:04}.jsonl", super::now_ms());
        let path = dir.join(name);
        let after_previous = previous.is_none_or(|p| path > p.path);
        if after_previous && !path.exists() {
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            return Ok((Segment::new(path), file));
        }
        n += 1;
    }
}

fn write_summary(segment: &Segment) {
    if let Ok(bytes) = serde_json::to_vec(segment)
        && let Err(error) = std::fs::write(segment.meta_path(), bytes)
    {
        tracing::warn!(%error, "cannot write a request log segment's summary");
    }
}

fn remove(segment: &Segment) {
    for path in [segment.path.clone(), segment.meta_path()] {
        if let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, "cannot remove a request log segment");
        }
    }
}

/// Owns the segment being written; runs on a thread of its own (file writes block).
pub struct Writer {
    pub dir: PathBuf,
    pub file: File,
    pub segments: Segments,
    pub bounds: Bounds,
    /// Records stored (written to the file), for `drain`.
    pub stored: Arc<AtomicU64>,
    pub synced_at: Instant,
    pub dirty: bool,
}

/// How often written records are also forced to disk: what a power loss (not a `kill -9`)
/// can take.
pub const SYNC_EVERY: Duration = Duration::from_millis(200);

/// How often the writer takes what is queued. Waking it per record cost a context switch per
/// request (on two cores, +39 µs at concurrency 1 and 15% of the throughput at 32); a record now
/// waits up to this long in the queue, which is what a `kill -9` can lose.
pub const WRITE_EVERY: Duration = Duration::from_millis(25);

impl Writer {
    /// Writes what is queued every `WRITE_EVERY` until the log is closed.
    pub fn run(mut self, queue: &Queue) {
        let mut batch = Pending::default();
        let mut checked_age = Instant::now();
        loop {
            std::thread::sleep(WRITE_EVERY);
            let closing = queue.closed.load(Ordering::Acquire);
            queue.take(&mut batch);
            if !batch.lines.is_empty() {
                self.write(&batch);
            }
            if self.dirty && self.synced_at.elapsed() >= SYNC_EVERY {
                self.sync();
            }
            if checked_age.elapsed() >= Duration::from_secs(1) {
                checked_age = Instant::now();
                self.trim(0);
            }
            if closing {
                break;
            }
        }
        self.sync();
        if let Some(current) = self.segments.read().last() {
            write_summary(current);
        }
    }

    fn sync(&mut self) {
        if let Err(error) = self.file.sync_data() {
            tracing::warn!(%error, "cannot sync the request log");
        }
        self.dirty = false;
        self.synced_at = Instant::now();
    }

    fn write(&mut self, batch: &Pending) {
        // Room first, so the files never pass the bound, however large the batch.
        self.trim(batch.bytes.len() as u64);
        if let Err(error) = self.file.write_all(&batch.bytes) {
            tracing::warn!(%error, "cannot write to the request log; its records are dropped");
        } else {
            let mut segments = self.segments.write();
            if let Some(current) = segments.last_mut() {
                for (at_ms, tenant, bytes) in &batch.lines {
                    current.add(*at_ms, tenant, *bytes);
                }
            }
            self.dirty = true;
        }
        self.stored
            .fetch_add(batch.lines.len() as u64, Ordering::Release);
        let full = self
            .segments
            .read()
            .last()
            .is_some_and(|s| s.bytes >= self.bounds.segment_bytes);
        if full {
            self.roll();
        }
    }

    /// Closes the current segment and starts the next.
    fn roll(&mut self) {
        self.sync();
        let previous = self.segments.read().last().cloned();
        if let Some(previous) = &previous {
            write_summary(previous);
        }
        match create(&self.dir, previous.as_ref()) {
            Ok((segment, file)) => {
                self.file = file;
                self.segments.write().push(segment);
            }
            Err(error) => tracing::warn!(%error, "cannot start a request log segment"),
        }
    }

    /// Deletes the oldest closed segments while the log, with `incoming` bytes more, would be
    /// past its size, or they are past their age.
    fn trim(&mut self, incoming: u64) {
        let cutoff = super::now_ms().saturating_sub(self.bounds.max_age.as_millis() as u64);
        let mut removed = Vec::new();
        {
            let mut segments = self.segments.write();
            let mut total: u64 = segments.iter().map(|s| s.bytes).sum::<u64>() + incoming;
            while segments.len() > 1 {
                let oldest = &segments[0];
                let expired = oldest.records > 0 && oldest.last_ms < cutoff;
                if total <= self.bounds.max_bytes && !expired {
                    break;
                }
                total -= oldest.bytes;
                removed.push(segments.remove(0));
            }
        }
        for segment in &removed {
            remove(segment);
        }
    }
}
