//! The console with a large request log, for `docs/console.md` (run by `make bench`):
//!
//! 1. fills a request log with 1,000,000 records over the last day (100 tenants, three routes,
//!    exact and semantic hits, refusals, failovers);
//! 2. starts the release gateway on it and times how long it takes to read the log back into
//!    the overview's figures, and its memory before and after;
//! 3. loads every console page in headless Chromium (`benches/console_pages.py`), five times
//!    each, and prints the median and slowest time until the page is drawn.
//!
//!   cargo build --release --bin reprise
//!   REPRISE_BROWSER=/usr/bin/chromium REPRISE_PYTHON=.venv/bin/python \
//!     cargo run --release --example console_scale [RECORDS]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reprise::config::RequestLogConfig;
use reprise::request_log::{AttemptRecord, RequestLog, RequestRecord};
use reprise::telemetry::Metrics;

const TENANTS: u64 = 100;
const ADMIN: &str = "console-scale-admin";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn record(i: u64, at_ms: u64) -> RequestRecord {
    let cache = match i % 10 {
        0..=2 => "hit",
        3 => "semantic-hit",
        _ => "miss",
    };
    let fresh = cache == "miss";
    let failed_over = i.is_multiple_of(97);
    let mut upstream = Vec::new();
    if fresh {
        if failed_over {
            upstream.push(AttemptRecord {
                target: "openai/gpt-4o-mini".into(),
                kind: "first".into(),
                outcome: "status_5xx".into(),
                status: Some(503),
                start_ms: 0.4,
                latency_ms: 80.0,
                first_token_ms: None,
                span_id: format!("{:016x}", i * 2),
            });
        }
        upstream.push(AttemptRecord {
            target: if failed_over {
                "anthropic/claude-haiku"
            } else {
                "openai/gpt-4o-mini"
            }
            .into(),
            kind: if failed_over { "failover" } else { "first" }.into(),
            outcome: "ok".into(),
            status: Some(200),
            start_ms: if failed_over { 81.0 } else { 0.4 },
            latency_ms: 300.0 + (i % 700) as f64,
            first_token_ms: None,
            span_id: format!("{:016x}", i * 2 + 1),
        });
    }
    RequestRecord {
        id: uuid::Uuid::new_v4().to_string(),
        at_ms,
        endpoint: "chat_completions".into(),
        tenant: format!("tenant-{}", i % TENANTS).into(),
        key: Some(format!("key_{:08x}", i % 1000)),
        route: Some(["chat", "support", "summarise"][(i % 3) as usize].into()),
        cache: Some(cache.into()),
        semantic: Some(
            match (cache, i % 20) {
                ("semantic-hit", _) => "hit",
                ("miss", 5) => "rejected-numbers",
                ("miss", 15) => "rejected-entities",
                _ => "miss",
            }
            .into(),
        ),
        similarity: (cache == "semantic-hit").then_some(0.93),
        target: Some(
            upstream
                .last()
                .map_or("openai/gpt-4o-mini", |a| a.target.as_str())
                .to_owned(),
        ),
        attempts: upstream.len() as u32,
        upstream,
        status: 200,
        input_tokens: if fresh { 120 + i % 300 } else { 0 },
        output_tokens: if fresh { 40 + i % 200 } else { 0 },
        cost_usd: if fresh { 0.000_123 } else { 0.0 },
        saved_usd: if fresh { 0.0 } else { 0.000_123 },
        latency_ms: if fresh {
            350.0 + (i % 700) as f64
        } else {
            0.3 + (i % 10) as f64 / 10.0
        },
        trace_id: Some(format!("{i:032x}")),
        span_id: Some(format!("{i:016x}")),
        ..RequestRecord::default()
    }
}

async fn fill(path: &std::path::Path, records: u64) {
    let text = format!(
        "path = \"{}\"\nmax_bytes = {}\nqueue = 100000\n",
        path.display(),
        64u64 << 30
    );
    let config: RequestLogConfig = toml::from_str(&text).unwrap();
    let log = RequestLog::open(&config, Arc::new(Metrics::new())).unwrap();
    let now = now_ms();
    let spacing = 86_400_000 / records;
    let started = Instant::now();
    for i in 0..records {
        log.push(&Arc::new(record(i, now - (records - i) * spacing)));
        if i % 50_000 == 49_999 {
            log.drain(Duration::from_secs(120)).await;
        }
    }
    log.drain(Duration::from_secs(120)).await;
    println!(
        "filled {} records in {:.1} s; {:.0} MiB on disk",
        log.len(),
        started.elapsed().as_secs_f64(),
        log.size_on_disk() as f64 / (1 << 20) as f64
    );
}

fn memory_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the release gateway on the log at `log_dir`; its base URL.
fn start(dir: &std::path::Path, log_dir: &std::path::Path) -> (std::process::Child, String) {
    let port = free_port();
    let config = dir.join(format!("reprise-{port}.toml"));
    let prompts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
    std::fs::write(
        &config,
        format!(
            r#"
            [server]
            listen = "127.0.0.1:{port}"
            [log]
            level = "warn"
            [auth]
            admin_key = "{ADMIN}"
            keys = [{{ key = "console-scale-key", tenant = "tenant-0" }}]
            [providers.openai]
            kind = "openai"
            base_url = "http://127.0.0.1:9/v1"
            api_key = "unused"
            [cache]
            path = "{store}"
            [keys]
            [prompts]
            dir = "{prompts}"
            [request_log]
            path = "{log}"
            max_bytes = 68719476736
            [routes.chat]
            targets = [{{ provider = "openai", model = "gpt-4o-mini" }}]
            "#,
            store = dir.join(format!("store-{port}")).display(),
            prompts = prompts.display(),
            log = log_dir.display(),
        ),
    )
    .unwrap();
    let child = Command::new("target/release/reprise")
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()
        .expect("target/release/reprise (cargo build --release --bin reprise)");
    (child, format!("http://127.0.0.1:{port}"))
}

#[tokio::main]
async fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let browser = std::env::var("REPRISE_BROWSER").expect("REPRISE_BROWSER: the Chromium binary");
    let python = std::env::var("REPRISE_PYTHON").expect("REPRISE_PYTHON: Python with Playwright");
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("requests");
    fill(&log_dir, records).await;

    // The same gateway on an empty log first: the memory the figures are measured against.
    let (mut empty, empty_base) = start(dir.path(), &dir.path().join("empty"));
    while reqwest::get(format!("{empty_base}/healthz")).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let empty_rss = memory_mb(empty.id(), "VmRSS:");
    let _ = empty.kill();
    let _ = empty.wait();

    let started = Instant::now();
    let (mut gateway, base) = start(dir.path(), &log_dir);
    let client = reqwest::Client::new();
    let overview = |window: &'static str| {
        client
            .get(format!("{base}/admin/overview?window={window}"))
            .bearer_auth(ADMIN)
            .send()
    };
    let mut up = None;
    let mut rebuilt = None;
    while rebuilt.is_none() && started.elapsed() < Duration::from_secs(300) {
        if let Ok(response) = overview("7d").await {
            up.get_or_insert(started.elapsed());
            let body: serde_json::Value = response.json().await.unwrap();
            if body["total"]["requests"].as_u64() == Some(records) {
                rebuilt = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rebuilt = rebuilt.expect("the overview never counted every record");
    let pid = gateway.id();
    println!(
        "gateway answering after {:.2} s; the overview had read the whole log after {:.2} s; \
         RSS then {:.1} MB (peak {:.1} MB; {empty_rss:.1} MB on an empty log)",
        up.unwrap().as_secs_f64(),
        rebuilt.as_secs_f64(),
        memory_mb(pid, "VmRSS:"),
        memory_mb(pid, "VmHWM:"),
    );
    let mut samples = Vec::new();
    for window in ["1h", "7d"] {
        for _ in 0..20 {
            let asked = Instant::now();
            overview(window).await.unwrap().bytes().await.unwrap();
            samples.push((window, asked.elapsed()));
        }
    }
    for window in ["1h", "7d"] {
        let mut times: Vec<Duration> = samples
            .iter()
            .filter(|(w, _)| *w == window)
            .map(|(_, t)| *t)
            .collect();
        times.sort();
        println!(
            "GET /admin/overview?window={window}: median {:.2} ms",
            times[times.len() / 2].as_secs_f64() * 1000.0
        );
    }

    let output = Command::new(python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/console_pages.py"))
        .args([base.as_str(), ADMIN, "5"])
        .env("REPRISE_BROWSER", browser)
        .output()
        .unwrap();
    let _ = gateway.kill();
    let _ = gateway.wait();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let timings: std::collections::BTreeMap<String, Vec<f64>> =
        serde_json::from_slice(&output.stdout).unwrap();
    println!();
    println!("| console page, {records} records in the log | median | slowest of 5 |");
    println!("|---|---|---|");
    for (page, mut times) in timings {
        times.sort_by(f64::total_cmp);
        println!(
            "| {page} | {:.0} ms | {:.0} ms |",
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}
