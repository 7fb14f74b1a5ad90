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
//! `[semantic]` ones (e.g. `verifier = "off"`, or `model = "fold.json"`); without them the
//! gateway runs its defaults. `EVAL_DOMAINS` (comma-separated) scores only those domains: the
//! streams that hold them are replayed whole (the cache holds what it would), and the other
//! domains' requests are sent but not counted, which is how `scripts/heldout-replay.sh` reports
//! a model on the domains it was not fitted on.
//!
//! `EVAL_UPSTREAM=echo` swaps the by-group upstream for one that answers every prompt
//! differently (it echoes it), as a free-writing model does; a served answer is then correct iff
//! the prompt it echoes is of the request's group. Each table also splits every stream into its
//! first and second half, which shows what verification (`verify_share`) learns as traffic
//! flows. `EVAL_STREAMS=one` replays every stream, one after the other, into one cache, and
//! splits the first 1,000 requests from the rest instead (`EVAL_WRONG=file.jsonl` lists every
//! answer served wrong); a request whose group an earlier
//! stream already asked is then a true repeat, whatever its own stream's label says.
//! `EVAL_STREAMS=source` does the same with one cache per source (the streams named
//! `snips-*` in one, `sgd-*` in another): one bot's traffic, not two bots' mixed.

mod common;

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use common::{EvalGateway, answer_for, percent};

#[derive(serde::Deserialize)]
struct Row {
    stream: String,
    prompt: String,
    group: String,
    domain: String,
    expect: String,
    slice: String,
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

async fn replay_stream(
    rows: &[&Row],
    upstream: &str,
    model_dir: &str,
    groups: &HashMap<String, String>,
    echo: bool,
) -> anyhow::Result<Vec<Verdict>> {
    let gateway = EvalGateway::start(
        upstream,
        model_dir,
        &std::env::var("EVAL_CACHE").unwrap_or_default(),
        &std::env::var("EVAL_SEMANTIC").unwrap_or_default(),
    )
    .await?;
    let mut verdicts = Vec::with_capacity(rows.len());
    for row in rows {
        let before = gateway.indexed().await?;
        let answer = gateway.ask(&row.prompt, &[]).await?;
        let verdict = match answer.cache.as_str() {
            "hit" => Verdict::Exact,
            "semantic-hit" => Verdict::Served {
                correct: if echo {
                    groups.get(&answer.text) == Some(&row.group)
                } else {
                    answer.text == answer_for(&row.group)
                },
            },
            _ => Verdict::Missed,
        };
        if let (Verdict::Served { correct: false }, Ok(path)) =
            (verdict, std::env::var("EVAL_WRONG"))
        {
            use std::io::Write;
            let line = serde_json::json!({
                "prompt": row.prompt, "group": row.group, "kind": row.kind,
                "served": answer.text, "similarity": answer.similarity,
            });
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?
                .write_all(format!("{line}\n").as_bytes())?;
        }
        verdicts.push(verdict);
        if verdict == Verdict::Exact {
            continue;
        }
        if matches!(verdict, Verdict::Served { .. }) {
            // Store this request with its correct answer too, as the scoring asks.
            gateway
                .ask(&row.prompt, &[("x-reprise-cache-mode", "refresh")])
                .await?;
        }
        gateway.wait_indexed_above(before).await?;
    }
    let learnt = gateway
        .metrics("reprise_semantic_verif")
        .await?
        .into_iter()
        .chain(gateway.metrics("reprise_semantic_cutoff_offset").await?)
        .collect::<Vec<_>>();
    if learnt
        .iter()
        .any(|line| line.contains("verifications_total{"))
    {
        eprintln!("{}: {}", rows[0].stream, learnt.join("; "));
    }
    gateway.stop().await?;
    Ok(verdicts)
}

/// The column of every hard negative (slot changes and sibling intents together).
const HARD: &str = "hard negatives";

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
    let echo = std::env::var("EVAL_UPSTREAM").as_deref() == Ok("echo");
    let upstream = common::upstream((!echo).then(|| groups.clone())).await?;
    let scored: Option<Vec<String>> = std::env::var("EVAL_DOMAINS")
        .ok()
        .map(|d| d.split(',').map(|s| s.trim().to_owned()).collect());
    let is_scored = |row: &Row| scored.as_ref().is_none_or(|d| d.contains(&row.domain));
    let mut streams: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in &rows {
        streams.entry(row.stream.as_str()).or_default().push(row);
    }
    streams.retain(|_, rows| rows.iter().any(|row| is_scored(row)));
    let grouping = std::env::var("EVAL_STREAMS").unwrap_or_default();
    let one_cache = matches!(grouping.as_str(), "one" | "source");
    if grouping == "one" {
        let all = streams.into_values().flatten().collect();
        streams = BTreeMap::from([("all streams in one cache", all)]);
    } else if grouping == "source" {
        let mut by_source: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
        for (stream, rows) in streams {
            let source = stream.split('-').next().unwrap_or(stream);
            by_source.entry(source).or_default().extend(rows);
        }
        streams = by_source;
    }
    println!(
        "Settings: [cache] {:?}, [semantic] {:?}, upstream {}\n",
        std::env::var("EVAL_CACHE").unwrap_or_default(),
        std::env::var("EVAL_SEMANTIC").unwrap_or_default(),
        if echo { "echo" } else { "by group" }
    );
    // Tallies by (table, key, column): expected hits, and expected misses by kind and in all.
    let mut tallies: BTreeMap<(&str, String), BTreeMap<String, Tally>> = BTreeMap::new();
    let mut exact: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for (stream, stream_rows) in &streams {
        let verdicts = replay_stream(stream_rows, &upstream, &model_dir, &groups, echo).await?;
        let (split, parts) = if one_cache {
            (1_000, ["first 1,000 requests", "after the first 1,000"])
        } else {
            (
                stream_rows.len() / 2,
                ["first half of each stream", "second half of each stream"],
            )
        };
        let mut seen_groups = std::collections::HashSet::new();
        for (position, (row, verdict)) in stream_rows.iter().zip(verdicts).enumerate() {
            let repeat = !seen_groups.insert(row.group.as_str()) || row.expect == "hit";
            if !is_scored(row) {
                continue;
            }
            let part = parts[usize::from(position >= split)];
            let keys = [
                ("stream", (*stream).to_owned()),
                ("domain", row.domain.clone()),
                ("half", part.to_owned()),
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
            let columns = if repeat {
                vec!["hit".to_owned()]
            } else if row.slice == "hard_negative" {
                vec!["miss".to_owned(), row.kind.clone(), HARD.to_owned()]
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
    kinds.insert(0, HARD.to_owned());
    for table in ["stream", "domain", "half", "all"] {
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
