//! Writes the labelled pairs the semantic cache's decision is fitted on
//! (`scripts/fit_semantic_model.py`): for every request of every stream, in arrival order, the
//! nearest earlier entries of its stream (as the cache would hold them) with the features the
//! gateway computes for the pair (`cache::semantic::pair_features`), and whether the two share
//! an answer (the same `group`).
//!
//! `cargo run --release --example semantic_pairs -- OUT.jsonl MODEL_DIR FILE...`
//!
//! A FILE is either in the development set's schema (`../shared/semantic-dev/README.md`:
//! `stream`, `prompt`, `group`, `domain`, `expect`, `kind`) or in the Kwik-E-Mart one
//! (`eval/prepare.py`: `text`, `group`, `slice`), read as one stream of the domain
//! `kwik_e_mart` in which a request is a repeat if its group was stored earlier, and the
//! unseeded intents' queries (`sibling`, `unrelated`) probe without being stored.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use reprise::cache::semantic::pair_features;
use reprise::embed::{Embedded, Embedder, EmbedderConfig};
use serde_json::{Value, json};

/// Nearest earlier entries written per request, and the least similarity worth writing.
const CANDIDATES: usize = 4;
const MIN_SIMILARITY: f32 = 0.4;

struct Request {
    stream: String,
    domain: String,
    prompt: String,
    group: String,
    expect: String,
    kind: String,
    stored: bool,
}

fn read(path: &str) -> anyhow::Result<Vec<Request>> {
    let text = std::fs::read_to_string(path).with_context(|| path.to_owned())?;
    let mut requests = Vec::new();
    let mut kwik_groups: HashSet<String> = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let row: Value =
            serde_json::from_str(line).with_context(|| format!("{path}:{}", number + 1))?;
        let field = |name: &str| row[name].as_str().unwrap_or_default().to_owned();
        if row.get("prompt").is_some() {
            requests.push(Request {
                stream: field("stream"),
                domain: field("domain"),
                prompt: field("prompt"),
                group: field("group"),
                expect: field("expect"),
                kind: field("kind"),
                stored: true,
            });
        } else {
            let (group, slice) = (field("group"), field("slice"));
            let stored = !matches!(slice.as_str(), "sibling" | "unrelated");
            let repeat = kwik_groups.contains(&group);
            if stored {
                kwik_groups.insert(group.clone());
            }
            requests.push(Request {
                stream: "kwik_e_mart".into(),
                domain: "kwik_e_mart".into(),
                prompt: field("text"),
                group,
                expect: if repeat { "hit" } else { "miss" }.into(),
                kind: slice,
                stored,
            });
        }
    }
    Ok(requests)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, model_dir, files @ ..] = &args[..] else {
        anyhow::bail!("usage: semantic_pairs OUT.jsonl MODEL_DIR FILE...");
    };
    let model_dir = PathBuf::from(model_dir);
    let embedder = Embedder::load(&EmbedderConfig {
        onnxruntime: model_dir.join("libonnxruntime.so.1.32.0"),
        model_dir,
        queue: 1024,
        max_batch: 32,
        intra_threads: 2,
        max_length: 128,
    })?;
    let mut requests = Vec::new();
    for file in files {
        requests.extend(read(file)?);
    }
    let mut embedded: Vec<Embedded> = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(256) {
        let batch = chunk
            .iter()
            .map(|r| embedder.embed_with_words(r.prompt.clone()));
        for result in futures::future::join_all(batch).await {
            embedded.push(result?);
        }
    }
    let mut streams: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, request) in requests.iter().enumerate() {
        streams.entry(&request.stream).or_default().push(i);
    }
    let mut output = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut pairs = 0usize;
    for members in streams.values() {
        for (position, &i) in members.iter().enumerate() {
            let request = &requests[i];
            let mut nearest: Vec<(f32, usize)> = members[..position]
                .iter()
                .filter(|&&j| requests[j].stored && requests[j].prompt != request.prompt)
                .map(|&j| (dot(&embedded[i].vector, &embedded[j].vector), j))
                .filter(|(similarity, _)| *similarity >= MIN_SIMILARITY)
                .collect();
            nearest.sort_by(|a, b| b.0.total_cmp(&a.0));
            nearest.truncate(CANDIDATES);
            let candidates: Vec<Value> = nearest
                .iter()
                .map(|&(similarity, j)| {
                    let features = pair_features(
                        &request.prompt,
                        &embedded[i],
                        &requests[j].prompt,
                        &embedded[j],
                        similarity,
                    );
                    json!({
                        "text": requests[j].prompt,
                        "group": requests[j].group,
                        "same_group": requests[j].group == request.group,
                        "features": features.values(),
                    })
                })
                .collect();
            // Each two candidates compared as a pair too: whether two entries that both match
            // ask the same thing (the gateway refuses to choose between two that do not).
            let mut between = Vec::new();
            for (a, &(_, first)) in nearest.iter().enumerate() {
                for &(_, second) in &nearest[a + 1..] {
                    let similarity = dot(&embedded[first].vector, &embedded[second].vector);
                    let features = pair_features(
                        &requests[first].prompt,
                        &embedded[first],
                        &requests[second].prompt,
                        &embedded[second],
                        similarity,
                    );
                    between.push(features.values().to_vec());
                }
            }
            pairs += candidates.len();
            serde_json::to_writer(
                &mut output,
                &json!({
                    "stream": request.stream, "domain": request.domain,
                    "prompt": request.prompt, "expect": request.expect, "kind": request.kind,
                    "candidates": candidates, "between": between,
                }),
            )?;
            output.write_all(b"\n")?;
        }
    }
    output.flush()?;
    eprintln!(
        "{} requests, {pairs} pairs written to {out}",
        requests.len()
    );
    Ok(())
}
