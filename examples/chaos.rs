//! A bounded chaos run against the release gateway on loopback, for docs/reliability.md:
//! a flaky upstream under load, slow and idle clients, oversized prompts, Redis killed and
//! brought back under load, and `kill -9` while prompt versions are being written. Prints one
//! table row per scenario: requests, how many were served, errors by status, p99, RSS.
//!
//! `make chaos` (builds `reprise` and this example in release, fetches the model, needs
//! `redis-server`). Every request goes to 127.0.0.1 and every phase is bounded in count or time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mock_upstream.rs"]
mod mock_upstream;

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY_A: &str = "chaos-key-a";
const KEY_B: &str = "chaos-key-b";
const ADMIN: &str = "chaos-admin";

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Gateway {
    child: Child,
    base: String,
    config: PathBuf,
}

impl Gateway {
    async fn start(config: &Path) -> Gateway {
        let text = std::fs::read_to_string(config).unwrap();
        let listen = text
            .lines()
            .find_map(|l| l.strip_prefix("listen = "))
            .unwrap()
            .trim_matches('"')
            .to_owned();
        let child = Command::new("target/release/reprise")
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("target/release/reprise (make chaos builds it)");
        let gateway = Gateway {
            child,
            base: format!("http://{listen}"),
            config: config.to_owned(),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = client
                .get(format!("{}/healthz", gateway.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return gateway;
            }
            assert!(Instant::now() < deadline, "the gateway did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Redis {
    child: Child,
}

impl Redis {
    fn start(port: u16, dir: &Path) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Answers by status (0: no answer at all) and their latencies.
#[derive(Default)]
struct Tally {
    by_status: BTreeMap<u16, usize>,
    latencies: Vec<Duration>,
}

impl Tally {
    fn add(&mut self, status: u16, latency: Duration) {
        *self.by_status.entry(status).or_insert(0) += 1;
        self.latencies.push(latency);
    }

    fn total(&self) -> usize {
        self.by_status.values().sum()
    }

    fn served(&self) -> usize {
        self.by_status.get(&200).copied().unwrap_or(0)
    }

    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted
            .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    }

    fn errors(&self) -> String {
        let errors: Vec<String> = self
            .by_status
            .iter()
            .filter(|(status, _)| **status != 200)
            .map(|(status, n)| {
                if *status == 0 {
                    format!("{n} no answer")
                } else {
                    format!("{n}× {status}")
                }
            })
            .collect();
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        }
    }
}

/// Whether the gateway has closed `stream` (reading whatever it sent before closing).
async fn closed_now(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_millis(10), stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0})
}

async fn send(client: &reqwest::Client, url: &str, key: &str, body: &Value) -> (u16, Duration) {
    let started = Instant::now();
    let status = client
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    (status, started.elapsed())
}

/// `count` requests at `concurrency`, the i-th body from `body(i)`.
async fn drive(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    count: usize,
    concurrency: usize,
    body: impl Fn(usize) -> Value,
) -> Tally {
    let results: Vec<(u16, Duration)> = futures::stream::iter(0..count)
        .map(|i| {
            let body = body(i);
            async move { send(client, url, key, &body).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut tally = Tally::default();
    for (status, latency) in results {
        tally.add(status, latency);
    }
    tally
}

struct Row {
    scenario: String,
    requests: usize,
    served: String,
    errors: String,
    p99: String,
    rss: String,
}

fn row(scenario: &str, tally: &Tally, rss: String) -> Row {
    Row {
        scenario: scenario.to_owned(),
        requests: tally.total(),
        served: format!(
            "{} ({:.2}%)",
            tally.served(),
            100.0 * tally.served() as f64 / tally.total().max(1) as f64
        ),
        errors: tally.errors(),
        p99: ms(tally.quantile(0.99)),
        rss,
    }
}

fn config(listen: &str, mock: &str, store: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
max_body_bytes = 8388608
header_timeout = "5s"
body_timeout = "5s"
[log]
level = "error"
[auth]
admin_key = "{ADMIN}"
keys = [{{ key = "{KEY_A}", tenant = "a" }}, {{ key = "{KEY_B}", tenant = "b" }}]
[providers.mock]
kind = "openai"
base_url = "http://{mock}/v1"
api_key = "sk-chaos"
[providers.mock2]
kind = "openai"
base_url = "http://{mock}/v1"
api_key = "sk-chaos-2"
[cache]
{store}
[routes.flaky]
targets = [{{ provider = "mock", model = "chance-20-500" }}]
[routes.flaky-pair]
targets = [{{ provider = "mock", model = "chance-20-500" }}, {{ provider = "mock2", model = "chance-20-502" }}]
[routes.chat]
targets = [{{ provider = "mock", model = "ok" }}]
[routes.chat.cache]
enabled = true
{extra}
"#
    )
}

#[tokio::main]
async fn main() {
    let model_dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/all-MiniLM-L6-v2".to_owned());
    let model_dir = std::fs::canonicalize(&model_dir).expect("the embedding model's folder");
    let mock = mock_upstream::Mock::start().await;
    let work = tempfile::tempdir().unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut rows = Vec::new();

    let listen = format!("127.0.0.1:{}", free_port());
    let semantic = format!(
        "[semantic]\nmodel_dir = \"{}\"\n[routes.faq]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n[routes.faq.cache]\nenabled = true\nsemantic = true\n[prompts]\ndir = \"{}\"",
        model_dir.display(),
        work.path().join("prompts").display()
    );
    std::fs::create_dir_all(work.path().join("prompts")).unwrap();
    let store = format!("path = \"{}\"", work.path().join("store").display());
    let path = work.path().join("embedded.toml");
    std::fs::write(
        &path,
        config(&listen, &mock.addr.to_string(), &store, &semantic),
    )
    .unwrap();
    let mut gateway = Gateway::start(&path).await;
    let chat_url = gateway.url("/v1/chat/completions");

    // 1. A flaky upstream under load.
    let rss = gateway.rss_mb();
    let flaky = drive(&client, &chat_url, KEY_A, 20_000, 128, |i| {
        chat("flaky", &format!("question {i}"))
    })
    .await;
    rows.push(row(
        "flaky upstream (20% 500s), one target, c128",
        &flaky,
        format!("{rss:.0} → {:.0} MB", gateway.rss_mb()),
    ));
    let pair = drive(&client, &chat_url, KEY_A, 20_000, 128, |i| {
        chat("flaky-pair", &format!("question {i}"))
    })
    .await;
    rows.push(row(
        "flaky upstream, two such targets, c128",
        &pair,
        format!("{:.0} MB", gateway.rss_mb()),
    ));

    // 2. Slow and idle clients while another tenant is served.
    let ask_b = chat("chat", "what are your opening hours?");
    send(&client, &chat_url, KEY_B, &ask_b).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss = gateway.rss_mb();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let mut held = Vec::new();
    for i in 0..2_000 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            stream
                .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    for _ in 0..50 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        held.push(stream);
    }
    let mut health = Tally::default();
    let mut hits = Tally::default();
    for _ in 0..200 {
        let started = Instant::now();
        let status = client
            .get(gateway.url("/healthz"))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        health.add(status, started.elapsed());
        let (status, latency) = send(&client, &chat_url, KEY_B, &ask_b).await;
        hits.add(status, latency);
    }
    let rss_held = gateway.rss_mb();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut closed = 0;
    for stream in &mut held {
        if closed_now(stream).await {
            closed += 1;
        }
    }
    drop(held);
    rows.push(row(
        "/healthz with 2,000 idle/slow connections and 50 stalled bodies open",
        &health,
        format!("{rss:.0} → {rss_held:.0} MB"),
    ));
    let mut hits_row = row(
        "another tenant's cache hits, same time",
        &hits,
        format!("{:.0} MB", gateway.rss_mb()),
    );
    hits_row.errors = format!(
        "{}; {closed} of 2,050 held connections closed 7 s later (timeouts 5 s)",
        hits_row.errors
    );
    rows.push(hits_row);

    // 3. Oversized prompts on a semantic route while another tenant looks up.
    let question = chat("faq", "how do I reset my password?");
    send(&client, &chat_url, KEY_B, &question).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut alone = Tally::default();
    for _ in 0..50 {
        let (status, latency) = send(&client, &chat_url, KEY_B, &question).await;
        alone.add(status, latency);
    }
    let rss_before = gateway.rss_mb();
    let huge_text = "please summarise the following quarterly report in detail ".repeat(70_000);
    let flood = {
        let (client, url, text) = (client.clone(), chat_url.clone(), Arc::new(huge_text));
        tokio::spawn(async move {
            drive(&client, &url, KEY_A, 12, 3, |i| {
                chat("faq", &format!("{i} {text}"))
            })
            .await
        })
    };
    let mut during = Tally::default();
    while !flood.is_finished() {
        let (status, latency) = send(&client, &chat_url, KEY_B, &question).await;
        during.add(status, latency);
    }
    let flood = flood.await.unwrap();
    let rss_after = gateway.rss_mb();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_settled = gateway.rss_mb();
    rows.push(row(
        "12 prompts of 4.1 MB (3 at a time) on a semantic route",
        &flood,
        format!("{rss_before:.0} → {rss_after:.0} → {rss_settled:.0} MB (5 s later)"),
    ));
    let mut lookups = row(
        "another tenant's semantic hits, same time",
        &during,
        String::new(),
    );
    lookups.errors = format!(
        "{}; p50 {} / p99 {} alone, p50 {} / p99 {} during",
        lookups.errors,
        ms(alone.quantile(0.5)),
        ms(alone.quantile(0.99)),
        ms(during.quantile(0.5)),
        ms(during.quantile(0.99)),
    );
    rows.push(lookups);

    // 4. kill -9 while prompt versions are written: every acknowledged one must be there after.
    let writers = 4;
    let acknowledged = {
        let deadline = Instant::now() + Duration::from_secs(3);
        let versions = futures::future::join_all((0..writers).map(|w| {
            let (client, url) = (client.clone(), gateway.url("/admin/prompts/chaos/versions"));
            async move {
                let mut acknowledged = Vec::new();
                let mut n = 0;
                while Instant::now() < deadline + Duration::from_secs(2) {
                    n += 1;
                    let spec = json!({
                        "model": "chat",
                        "messages": [{"role": "system", "content": format!("writer {w} variant {n}")},
                                     {"role": "user", "content": "{{ question }}"}],
                        "variables": {"question": {"type": "string", "free_text": true}},
                    });
                    match client.post(&url).bearer_auth(ADMIN).json(&spec).send().await {
                        Ok(r) if r.status().is_success() => {
                            let body: Value = r.json().await.unwrap_or_default();
                            if let Some(version) = body["version"].as_u64() {
                                acknowledged.push((version, format!("writer {w} variant {n}")));
                            }
                        }
                        _ => break,
                    }
                }
                acknowledged
            }
        }));
        let killer = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            gateway.kill9();
        };
        let (versions, ()) = tokio::join!(versions, killer);
        versions.into_iter().flatten().collect::<Vec<_>>()
    };
    let restart = gateway.config.clone();
    drop(gateway);
    let gateway = Gateway::start(&restart).await;
    let mut found = 0;
    for (version, content) in &acknowledged {
        let body: Value = client
            .get(gateway.url(&format!("/admin/prompts/chaos/versions/{version}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default();
        if body.to_string().contains(content.as_str()) {
            found += 1;
        }
    }
    rows.push(Row {
        scenario: format!("kill -9 during prompt writes ({writers} writers)"),
        requests: acknowledged.len(),
        served: format!(
            "{found} of {} acknowledged found after restart",
            acknowledged.len()
        ),
        errors: format!("{} lost", acknowledged.len() - found),
        p99: "–".to_owned(),
        rss: format!("{:.0} MB after restart", gateway.rss_mb()),
    });
    drop(gateway);

    // 5. Redis killed and brought back under load.
    let redis_port = free_port();
    let mut redis = Redis::start(redis_port, work.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let path = work.path().join("redis.toml");
    std::fs::write(
        &path,
        config(
            &listen,
            &mock.addr.to_string(),
            &format!("store = \"redis\"\nredis_url = \"redis://127.0.0.1:{redis_port}\""),
            "",
        ),
    )
    .unwrap();
    let gateway = Gateway::start(&path).await;
    let url = gateway.url("/v1/chat/completions");
    let started = Instant::now();
    let load = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut i = 0usize;
            while started.elapsed() < Duration::from_secs(12) {
                let batch = drive(&client, &url, KEY_A, 256, 32, |j| {
                    chat("chat", &format!("repeat {}", (i + j) % 500))
                })
                .await;
                for (status, n) in batch.by_status {
                    *tally.by_status.entry(status).or_insert(0) += n;
                }
                tally.latencies.extend(batch.latencies);
                i += 256;
            }
            tally
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let redis = Redis::start(redis_port, work.path());
    let tally = load.await.unwrap();
    rows.push(row(
        "Redis killed at 3 s, back at 7 s, c32 for 12 s",
        &tally,
        format!("{:.0} MB", gateway.rss_mb()),
    ));
    drop(redis);

    println!("| scenario | requests | served | errors | p99 | gateway RSS |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.scenario, r.requests, r.served, r.errors, r.p99, r.rss
        );
    }
}
