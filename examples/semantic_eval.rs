//! Replays the evaluation set (`eval/prepare.py`) through a real gateway and reports, per slice,
//! how the semantic cache answered: hit rate on true repeats, wrong answers among hits, and false
//! hits on hard negatives, for each verifier setting: off (a plain threshold), `rules`, `rules+words`.
//!
//! `cargo run --release --example semantic_eval -- eval/data/kwik_e_mart.jsonl models/all-MiniLM-L6-v2`
//!
//! Each configuration gets a fresh gateway (embedded store in a temporary directory) in front of an
//! upstream that echoes the question, so the answer names the request that produced it (or, with
//! `EVAL_UPSTREAM=intent`, answers each group with one answer of its own). The
//! requests are sent one by one in the file's (shuffled) order, as live traffic would: a miss is
//! answered upstream and stored, a hit is judged by the labels. A request whose group (intent and
//! entity values) came earlier is a true repeat; one whose group is new is a hard negative of its
//! slice, or "first of its group" for an ordinary query: any hit on it is a wrong answer. The
//! unseeded intents' queries (sibling, unrelated) are sent `Cache-Control: no-store`: they probe
//! the cache but never become entries, so every one of them is a hard negative.

mod common;

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use common::{EvalGateway, percent};
use serde_json::json;

#[derive(serde::Deserialize)]
struct Row {
    text: String,
    group: String,
    slice: String,
}

impl Row {
    /// The unseeded intents' queries only probe: sent `no-store`, they never become entries, so
    /// each one tests the seeded traffic's entries.
    fn probe_only(&self) -> bool {
        matches!(self.slice.as_str(), "sibling" | "unrelated")
    }
}

#[derive(Default)]
struct Tally {
    probes: usize,
    hits: usize,
    wrong: usize,
}

const SLICES: &[&str] = &[
    "repeat",
    "parameters",
    "sibling",
    "negation",
    "unrelated",
    "first",
];
fn thresholds() -> Vec<f32> {
    std::env::var("EVAL_THRESHOLDS")
        .ok()
        .map(|t| t.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0.70, 0.75, 0.80, 0.85, 0.90])
}

/// `semantic.verifier` settings to compare: `off` is a plain threshold; `calibrated` (the
/// default) sets its own cut-off, so it runs once, at the shipped model's floor.
fn verifiers() -> Vec<String> {
    std::env::var("EVAL_VERIFIERS")
        .unwrap_or_else(|_| "calibrated,off,rules,rules+words".into())
        .split(',')
        .map(|v| v.trim().to_owned())
        .collect()
}

async fn run(
    rows: &[Row],
    upstream: &str,
    model_dir: &str,
    threshold: Option<f32>,
    verifier: &str,
) -> anyhow::Result<BTreeMap<String, Tally>> {
    let gateway = EvalGateway::start(
        upstream,
        model_dir,
        &threshold.map_or(String::new(), |t| format!("semantic_threshold = {t}")),
        // EVAL_SEMANTIC: more `[semantic]` settings, e.g. "word_similarity = 0.4".
        &format!(
            "verifier = \"{verifier}\"\n{}",
            std::env::var("EVAL_SEMANTIC").unwrap_or_default()
        ),
    )
    .await?;
    // EVAL_DUMP=file: one JSON line per request, to see what was served for what.
    let dump = std::env::var("EVAL_DUMP").ok().and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
            .map(std::sync::Mutex::new)
    });
    let mut group_of_answer: HashMap<String, String> = HashMap::new();
    let mut seen_groups: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for request in rows {
        let probe_only = request.probe_only();
        // A request whose group came before is a true repeat: an answer for it may be cached.
        // Otherwise it is new, and any hit is a wrong answer: a hard negative of its slice
        // (or, for an ordinary query, "first of its group").
        let slice = if probe_only {
            request.slice.as_str()
        } else if seen_groups.contains(request.group.as_str()) {
            "repeat"
        } else if request.slice == "seed" || request.slice == "repeat" {
            "first"
        } else {
            request.slice.as_str()
        };
        if !probe_only {
            seen_groups.insert(&request.group);
        }
        let before = gateway.indexed().await?;
        let headers: &[(&str, &str)] = if probe_only {
            &[("cache-control", "no-store")]
        } else {
            &[]
        };
        let reply = gateway.ask(&request.text, headers).await?;
        let hit = reply.cache == "semantic-hit";
        let exact = reply.cache == "hit";
        let (similarity, semantic, answer) = (reply.similarity, reply.semantic, reply.text);
        if !hit && !exact && !probe_only {
            group_of_answer.insert(answer.clone(), request.group.clone());
            gateway.wait_indexed_above(before).await?;
        }
        let wrong = hit && group_of_answer.get(&answer) != Some(&request.group);
        if let Some(dump) = &dump {
            use std::io::Write;
            let _ = writeln!(
                dump.lock().unwrap_or_else(|e| e.into_inner()),
                "{}",
                json!({"threshold": threshold, "verifier": verifier, "slice": slice,
                       "text": request.text, "group": request.group, "hit": hit,
                       "wrong": wrong, "answer": answer,
                       "answer_group": group_of_answer.get(&answer),
                       "similarity": similarity, "semantic": semantic})
            );
        }
        // An exact repeat never reaches the semantic stage: counted apart, not as a miss.
        let slice = if exact { "exact" } else { slice };
        let tally = tallies.entry(slice.to_owned()).or_default();
        tally.probes += 1;
        if hit {
            tally.hits += 1;
            if wrong {
                tally.wrong += 1;
            }
        }
    }
    gateway.stop().await?;
    Ok(tallies)
}

/// Requests a replay stores (all but the unseeded intents' probes), and whether each is a true
/// repeat (its group came earlier): the same rule as [`run`], without a cache.
fn replay_roles(rows: &[Row]) -> Vec<(bool, bool)> {
    let mut seen = std::collections::HashSet::new();
    let mut texts = std::collections::HashSet::new();
    rows.iter()
        .map(|row| {
            let stored = !row.probe_only();
            // Word for word again: the exact cache's, not a semantic repeat.
            let new_text = texts.insert(row.text.as_str());
            let repeat = stored && new_text && seen.contains(row.group.as_str());
            if stored {
                seen.insert(row.group.as_str());
            }
            (stored && new_text, repeat)
        })
        .collect()
}

/// `EVAL_ORACLE=1`: what a perfect verifier could reach at each threshold. Every request that a
/// replay sends upstream is stored; for each true repeat: is some earlier entry of its group at
/// least that similar, and is the nearest earlier entry of its group and at least that similar?
async fn oracle(rows: &[Row], model_dir: &str) -> anyhow::Result<()> {
    let semantic = reprise::config::SemanticConfig {
        model_dir: model_dir.into(),
        ..Default::default()
    };
    let embedder = reprise::embed::Embedder::load(&reprise::embed::EmbedderConfig {
        model_dir: semantic.model_dir.clone(),
        onnxruntime: semantic.onnxruntime_path(),
        queue: rows.len(),
        max_batch: semantic.max_batch,
        intra_threads: semantic.intra_threads,
        max_length: semantic.max_length,
    })?;
    let vectors =
        futures::future::try_join_all(rows.iter().map(|row| embedder.embed(row.text.clone())))
            .await?;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let roles = replay_roles(rows);
    let thresholds = thresholds();
    let (mut repeats, mut any, mut nearest) =
        (0, vec![0; thresholds.len()], vec![0; thresholds.len()]);
    for (i, row) in rows.iter().enumerate() {
        if !roles[i].1 {
            continue;
        }
        repeats += 1;
        let earlier = (0..i).filter(|&j| roles[j].0);
        let best_same = earlier
            .clone()
            .filter(|&j| rows[j].group == row.group)
            .map(|j| dot(&vectors[i], &vectors[j]))
            .fold(f32::MIN, f32::max);
        let top = earlier.max_by(|&a, &b| {
            dot(&vectors[i], &vectors[a]).total_cmp(&dot(&vectors[i], &vectors[b]))
        });
        let top_same = top.filter(|&j| rows[j].group == row.group);
        for (k, &t) in thresholds.iter().enumerate() {
            any[k] += usize::from(best_same >= t);
            nearest[k] += usize::from(top_same.is_some_and(|j| dot(&vectors[i], &vectors[j]) >= t));
        }
    }
    println!(
        "Ceiling over {repeats} true repeats (a perfect verifier, every earlier request stored):\n"
    );
    println!(
        "| threshold | an entry of its group is at least this similar | the nearest entry is of its group and at least this similar |"
    );
    println!("|---|---|---|");
    for (k, t) in thresholds.iter().enumerate() {
        println!(
            "| {t:.2} | {} | {} |",
            percent(any[k], repeats),
            percent(nearest[k], repeats)
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .unwrap_or_else(|| "eval/data/kwik_e_mart.jsonl".into());
    let model_dir = args
        .next()
        .unwrap_or_else(|| "models/all-MiniLM-L6-v2".into());
    let rows: Vec<Row> = std::fs::read_to_string(&data)
        .with_context(|| format!("{data} (run eval/prepare.py)"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    if std::env::var_os("EVAL_ORACLE").is_some() {
        return oracle(&rows, &model_dir).await;
    }
    let by_intent = (std::env::var("EVAL_UPSTREAM").as_deref() == Ok("intent")).then(|| {
        rows.iter()
            .map(|row| (row.text.clone(), row.group.clone()))
            .collect()
    });
    let upstream = common::upstream(by_intent).await?;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        *counts.entry(row.slice.as_str()).or_default() += 1;
    }
    println!("Requests: {counts:?}\n");
    println!(
        "| verifier | threshold | hits on repeats | wrong among hits | false hits: parameters | sibling | negation | unrelated | first of its group | all hard negatives | exact |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut probe_counts = String::new();
    for verifier in verifiers() {
        let grid: Vec<Option<f32>> = if verifier == "calibrated" {
            vec![None]
        } else {
            thresholds().into_iter().map(Some).collect()
        };
        for threshold in grid {
            let tallies = run(&rows, &upstream, &model_dir, threshold, &verifier).await?;
            if probe_counts.is_empty() {
                probe_counts = tallies
                    .iter()
                    .map(|(slice, tally)| format!("{slice} {}", tally.probes))
                    .collect::<Vec<_>>()
                    .join(", ");
            }
            let get = |slice: &str| {
                tallies
                    .get(slice)
                    .map_or((0, 0, 0), |t| (t.probes, t.hits, t.wrong))
            };
            let (repeats, repeat_hits, _) = get("repeat");
            let all_hits: usize = tallies.values().map(|t| t.hits).sum();
            let all_wrong: usize = tallies.values().map(|t| t.wrong).sum();
            let negatives: Vec<(usize, usize)> = SLICES[1..]
                .iter()
                .map(|s| {
                    let (p, h, _) = get(s);
                    (p, h)
                })
                .collect();
            let (neg_probes, neg_hits) = negatives[..4]
                .iter()
                .fold((0, 0), |(p, h), (pp, hh)| (p + pp, h + hh));
            let correct_repeat_hits = repeat_hits - get("repeat").2;
            let threshold = threshold.map_or("model".to_owned(), |t| format!("{t:.2}"));
            println!(
                "| {} | {threshold} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                verifier,
                percent(correct_repeat_hits, repeats),
                percent(all_wrong, all_hits),
                percent(negatives[0].1, negatives[0].0),
                percent(negatives[1].1, negatives[1].0),
                percent(negatives[2].1, negatives[2].0),
                percent(negatives[3].1, negatives[3].0),
                percent(negatives[4].1, negatives[4].0),
                percent(neg_hits, neg_probes),
                get("exact").0,
            );
        }
    }
    println!(
        "\n`exact`: requests that repeated an earlier one word for word, answered by the exact cache \
         and counted in no other column.\nRequests per column in the first row: {probe_counts}."
    );
    Ok(())
}
