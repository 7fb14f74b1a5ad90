//! Replays a labelled stream file (the schema of `../shared/semantic-dev/README.md`: `stream`,
//! `prompt`, `group`, `domain`, `expect`, `slice`, `kind`) through a real gateway with the
//! semantic cache on, and reports per stream, per domain and per kind of request how it answered.
//!
//! `cargo run --release --example semantic_replay -- ../shared/semantic-dev/semantic_dev.jsonl models/all-MiniLM-L6-v2`
//!
//! Scoring follows the file's README: every stream gets a fresh, empty cache (its own gateway and
//! store) and its requests in file order. The upstream answers each group with one answer of its
//! own, so a served answer is correct iff it is the request's group's answer; serving anything
//! on an `expect = miss` request is a false hit. After a request is scored it is stored with its
//! correct answer: a miss is stored by the gateway itself, and a hit is sent again with
//! `x-reprise-cache-mode: refresh`, which asks the upstream and stores its answer.
//!
//! `EVAL_CACHE` adds `[cache]` settings (e.g. `semantic_threshold = 0.85`), `EVAL_SEMANTIC`
//! `[semantic]` ones (e.g. `verifier = "off"`); without them the gateway runs its defaults.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::routing::post;
use serde_json::{Value, json};

#[derive(serde::Deserialize)]
struct Row {
    stream: String,
    prompt: String,
    group: String,
    domain: String,
    expect: String,
    kind: String,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    requests: usize,
    /// Answered from the semantic cache.
    served: usize,
    /// Served with another group's answer.
    wrong: usize,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.requests += other.requests;
        self.served += other.served;
        self.wrong += other.wrong;
    }
}

/// What the gateway did with one request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Answered by the exact cache: a word-for-word repeat, outside the semantic scoring.
    Exact,
    Missed,
    Served {
        correct: bool,
    },
}

fn answer_for(group: &str) -> String {
    format!("The answer for {group}")
}

/// An upstream that answers every prompt with its group's answer, as an intent-driven bot does.
async fn upstream(groups: Arc<HashMap<String, String>>) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |Json(body): Json<Value>| {
            let groups = Arc::clone(&groups);
            async move {
                let prompt = body["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or_default();
                let text = groups
                    .get(prompt)
                    .map_or_else(|| prompt.to_owned(), |group| answer_for(group));
                Json(json!({
                    "id": "chatcmpl-replay", "object": "chat.completion", "created": 0,
                    "model": "replay",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/v1"))
}

async fn replay_stream(
    rows: &[&Row],
    upstream: &str,
    model_dir: &str,
) -> anyhow::Result<Vec<Verdict>> {
    let dir = tempfile::tempdir()?;
    let config = format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        [log]
        level = "warn"
        [auth]
        admin_key = "replay-admin"
        keys = [{{ key = "replay", tenant = "replay" }}]
        [cache]
        enabled = true
        semantic = true
        path = "{store}"
        {cache_extra}
        [semantic]
        model_dir = "{model_dir}"
        {semantic_extra}
        [providers.upstream]
        kind = "openai"
        base_url = "{upstream}"
        [routes.chat]
        targets = [{{ provider = "upstream", model = "replay" }}]
        "#,
        store = dir.path().join("store").display(),
        cache_extra = std::env::var("EVAL_CACHE").unwrap_or_default(),
        semantic_extra = std::env::var("EVAL_SEMANTIC").unwrap_or_default(),
    );
    let config = reprise::config::Config::from_toml_str(&config, "replay.toml", &|_| None)?;
    let server = reprise::server::start(&config).await?;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let indexed = || async {
        let stats: Value = client
            .get(format!("{base}/admin/cache/stats"))
            .bearer_auth("replay-admin")
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(stats["semantic"]["indexed_entries"].as_u64().unwrap_or(0))
    };
    let send = |prompt: &str, mode: Option<&'static str>| {
        let mut request = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth("replay");
        if let Some(mode) = mode {
            request = request.header("x-reprise-cache-mode", mode);
        }
        request
            .json(&json!({"model": "chat", "messages": [{"role": "user", "content": prompt}]}))
            .send()
    };
    let mut verdicts = Vec::with_capacity(rows.len());
    for row in rows {
        let before = indexed().await?;
        let response = send(&row.prompt, None).await?.error_for_status()?;
        let status = response
            .headers()
            .get("x-reprise-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body: Value = response.json().await?;
        let answer = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default();
        let verdict = match status.as_str() {
            "hit" => Verdict::Exact,
            "semantic-hit" => Verdict::Served {
                correct: answer == answer_for(&row.group),
            },
            _ => Verdict::Missed,
        };
        verdicts.push(verdict);
        if verdict == Verdict::Exact {
            continue;
        }
        if matches!(verdict, Verdict::Served { .. }) {
            // Store this request with its correct answer too, as the scoring asks.
            send(&row.prompt, Some("refresh"))
                .await?
                .error_for_status()?;
        }
        // Writes land after the answer: the next request must see this one's entry.
        let deadline = Instant::now() + Duration::from_secs(5);
        while indexed().await? <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    server.stop().await?;
    Ok(verdicts)
}

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .unwrap_or_else(|| "../shared/semantic-dev/semantic_dev.jsonl".into());
    let model_dir = args
        .next()
        .unwrap_or_else(|| "models/all-MiniLM-L6-v2".into());
    let rows: Vec<Row> = std::fs::read_to_string(&data)
        .with_context(|| data.clone())?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let groups: HashMap<String, String> = rows
        .iter()
        .map(|row| (row.prompt.clone(), row.group.clone()))
        .collect();
    let upstream = upstream(Arc::new(groups)).await?;
    let mut streams: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in &rows {
        streams.entry(row.stream.as_str()).or_default().push(row);
    }
    println!(
        "Settings: [cache] {:?}, [semantic] {:?}\n",
        std::env::var("EVAL_CACHE").unwrap_or_default(),
        std::env::var("EVAL_SEMANTIC").unwrap_or_default()
    );
    // Tallies by (table, key, column): expected hits, and expected misses by kind and in all.
    let mut tallies: BTreeMap<(&str, String), BTreeMap<String, Tally>> = BTreeMap::new();
    let mut exact: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for (stream, stream_rows) in &streams {
        let verdicts = replay_stream(stream_rows, &upstream, &model_dir).await?;
        for (row, verdict) in stream_rows.iter().zip(verdicts) {
            let keys = [
                ("stream", (*stream).to_owned()),
                ("domain", row.domain.clone()),
                ("all", "all".to_owned()),
            ];
            let tally = match verdict {
                Verdict::Exact => {
                    for key in keys {
                        *exact.entry(key).or_default() += 1;
                    }
                    continue;
                }
                Verdict::Missed => Tally {
                    requests: 1,
                    ..Tally::default()
                },
                Verdict::Served { correct } => Tally {
                    requests: 1,
                    served: 1,
                    wrong: usize::from(!correct),
                },
            };
            let columns = if row.expect == "hit" {
                vec!["hit".to_owned()]
            } else {
                vec!["miss".to_owned(), row.kind.clone()]
            };
            for key in keys {
                let table = tallies.entry(key).or_default();
                for column in &columns {
                    table.entry(column.clone()).or_default().add(tally);
                }
            }
        }
    }
    let mut kinds: Vec<String> = rows
        .iter()
        .filter(|r| r.expect != "hit")
        .map(|r| r.kind.clone())
        .collect();
    kinds.sort();
    kinds.dedup();
    for table in ["stream", "domain", "all"] {
        println!(
            "\n| {table} | hits on true repeats | wrong among served repeats | false hits on expected misses | {} | exact repeats |",
            kinds.join(" | ")
        );
        println!("|---|---|---|---|{}---|", "---|".repeat(kinds.len()));
        for ((t, key), columns) in &tallies {
            if *t != table {
                continue;
            }
            let get = |c: &str| columns.get(c).copied().unwrap_or_default();
            let (hits, misses) = (get("hit"), get("miss"));
            let per_kind: Vec<String> = kinds
                .iter()
                .map(|kind| {
                    let t = get(kind);
                    percent(t.served, t.requests)
                })
                .collect();
            println!(
                "| {key} | {} of {} | {} | {} of {} | {} | {} |",
                percent(hits.served - hits.wrong, hits.requests),
                hits.requests,
                percent(hits.wrong, hits.served),
                percent(misses.served, misses.requests),
                misses.requests,
                per_kind.join(" | "),
                exact.get(&(table, key.clone())).copied().unwrap_or(0)
            );
        }
    }
    Ok(())
}
