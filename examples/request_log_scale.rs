//! The request log at scale, for `docs/observability.md` (run by `make bench`):
//!
//! 1. fills a log with 1,000,000 records spread over the last day across 100 tenants, then
//!    times queries through the same code as `GET /admin/requests` (one tenant's last hour,
//!    the whole log's last hour, a filter that matches nothing in an hour, one id);
//! 2. writes into a log bounded at 64 MiB far faster than any gateway would, sampling its size
//!    on disk, to show retention keeps it within the bound.
//!
//!   cargo run --release --example request_log_scale [RECORDS]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reprise::config::RequestLogConfig;
use reprise::request_log::{RequestLog, RequestQuery, RequestRecord};
use reprise::telemetry::Metrics;

const TENANTS: u64 = 100;

fn config(path: &std::path::Path, max_bytes: u64) -> RequestLogConfig {
    let text = format!(
        "path = \"{}\"\nmax_bytes = {max_bytes}\nqueue = 100000\n",
        path.display()
    );
    toml::from_str(&text).unwrap()
}

fn record(i: u64, at_ms: u64) -> RequestRecord {
    RequestRecord {
        id: uuid::Uuid::new_v4().to_string(),
        at_ms,
        endpoint: "chat_completions".into(),
        tenant: format!("tenant-{}", i % TENANTS).into(),
        key: Some(format!("key_{:08x}", i % 1000)),
        route: Some(["chat", "support", "summarise"][(i % 3) as usize].into()),
        cache: Some(if i.is_multiple_of(4) { "hit" } else { "miss" }.into()),
        target: Some("openai/gpt-4o-mini".into()),
        attempts: 1,
        status: if i.is_multiple_of(50) { 502 } else { 200 },
        input_tokens: 120 + i % 300,
        output_tokens: 40 + i % 200,
        cost_usd: 0.000_123,
        latency_ms: 350.0 + (i % 700) as f64,
        trace_id: Some(format!("{:032x}", i)),
        span_id: Some(format!("{:016x}", i)),
        ..RequestRecord::default()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Pushes `records` in chunks the queue holds, waiting for the writer between chunks.
async fn fill(log: &RequestLog, records: impl Iterator<Item = RequestRecord>) {
    let mut pending = 0;
    for record in records {
        log.push(&Arc::new(record));
        pending += 1;
        if pending == 50_000 {
            log.drain(Duration::from_secs(120)).await;
            pending = 0;
        }
    }
    log.drain(Duration::from_secs(120)).await;
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

fn time_query(log: &RequestLog, query: &RequestQuery, runs: usize) -> (f64, f64, usize) {
    let mut samples = Vec::new();
    let mut found = 0;
    for _ in 0..runs {
        let started = Instant::now();
        found = log.query(query).unwrap().len();
        samples.push(started.elapsed());
    }
    let max = samples.iter().max().unwrap().as_secs_f64() * 1000.0;
    (median_ms(samples), max, found)
}

fn query(pairs: &[(&str, &str)]) -> RequestQuery {
    let map: serde_json::Map<String, serde_json::Value> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned())))
        .collect();
    serde_json::from_value(serde_json::Value::Object(map)).unwrap()
}

#[tokio::main]
async fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());

    // 1. Queries over a full log.
    let log = RequestLog::open(
        &config(&dir.path().join("big"), 64 << 30),
        Arc::clone(&metrics),
    )
    .unwrap();
    let now = now_ms();
    let spacing = 86_400_000 / records;
    let started = Instant::now();
    fill(
        &log,
        (0..records).map(|i| record(i, now - (records - i) * spacing)),
    )
    .await;
    let filled = started.elapsed();
    println!(
        "filled {} records in {:.1} s ({:.0} records/s); {:.0} MiB on disk",
        log.len(),
        filled.as_secs_f64(),
        records as f64 / filled.as_secs_f64(),
        log.size_on_disk() as f64 / (1 << 20) as f64
    );
    let one_id = record(0, 0).id; // a fresh id: absent, the worst case of a lookup by id
    println!();
    println!("| query over {records} records | median | slowest of 20 | records returned |");
    println!("|---|---|---|---|");
    for (label, q) in [
        (
            "one tenant, last hour (100 newest)",
            query(&[("tenant", "tenant-7"), ("since", "1h")]),
        ),
        (
            "one tenant, last hour (up to 1,000)",
            query(&[("tenant", "tenant-7"), ("since", "1h"), ("limit", "1000")]),
        ),
        (
            "every tenant, last hour (100 newest)",
            query(&[("since", "1h")]),
        ),
        (
            "one tenant, last hour, status 502 (scans its hour)",
            query(&[("tenant", "tenant-7"), ("since", "1h"), ("status", "502")]),
        ),
        (
            "every tenant, last hour, a filter nothing matches (scans the hour)",
            query(&[("since", "1h"), ("route", "nope")]),
        ),
    ] {
        let (median, max, found) = time_query(&log, &q, 20);
        println!("| {label} | {median:.2} ms | {max:.2} ms | {found} |");
    }
    let mut samples = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let _ = log.get(&one_id).unwrap();
        samples.push(started.elapsed());
    }
    println!(
        "| one request by id | {:.3} ms | – | – |",
        median_ms(samples)
    );
    drop(log);

    // 2. Retention under a write rate no gateway reaches.
    let bound: u64 = 64 << 20;
    let log = RequestLog::open(&config(&dir.path().join("bounded"), bound), metrics).unwrap();
    let written: u64 = records.min(600_000);
    let largest = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (log, largest) = (Arc::clone(&log), Arc::clone(&largest));
        tokio::spawn(async move {
            loop {
                largest.fetch_max(log.size_on_disk(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let now = now_ms();
    fill(&log, (0..written).map(|i| record(i, now - written + i))).await;
    let took = started.elapsed();
    // Let the last pass run.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let final_size = log.size_on_disk();
    sampler.abort();
    println!();
    println!(
        "bounded log: {written} records written in {:.1} s into max_bytes = {} MiB; {} kept; \
         on disk: largest seen {:.1} MiB, at the end {:.1} MiB",
        took.as_secs_f64(),
        bound >> 20,
        log.len(),
        largest.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1 << 20) as f64,
        final_size as f64 / (1 << 20) as f64,
    );
}
