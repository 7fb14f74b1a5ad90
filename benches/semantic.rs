//! Benches for the semantic cache: embedding (one text, and 32 concurrent texts batched), index
//! search at 10k, 100k and (with `REPRISE_BENCH_1M=1`) 1M entries, and the whole lookup
//! (embedding + search + judging the candidates) at 100k entries, with the default calibrated
//! decision and with the `rules+words` veto chain, and the verifiers on their own. Before
//! criterion runs, it prints each lookup's p50/p99 over 2,000 queries (and the same queries'
//! embedding alone, measured between the lookups) and the index's memory per
//! entry.
//!
//! `cargo bench --bench semantic` (the model from `REPRISE_EMBED_MODEL_DIR`, default
//! `models/all-MiniLM-L6-v2`).
//!
//! Index entries are synthetic but placed like real ones: 384-dimensional unit vectors at cosine
//! ~0.85 around the real embeddings of 400 chatbot-like texts (10 templates x 40 products), keyed
//! like real entries (a store path of ~110 bytes). Queries are real embeddings of the same
//! templates with products no entry was drawn around, so they land among the entries as live
//! traffic does (a query far from every entry would make any HNSW search unrealistically long).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::Criterion;
use reprise::cache::semantic::{
    CalibratedJudge, IndexEntry, IndexParams, Judge, PairVerdict, RuleVerifier, SemanticIndex,
    SemanticRecord, Verifier, judge_from_config, verifier_from_config,
};
use reprise::config::{SemanticConfig, VerifierKind};
use reprise::embed::{Embedded, Embedder, EmbedderConfig, MODEL_ID, PackedWords};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

const DIM: usize = 384;
const SCOPE: [u8; 32] = [7; 32];

fn embedder() -> Embedder {
    let dir = PathBuf::from(
        std::env::var("REPRISE_EMBED_MODEL_DIR")
            .unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into()),
    );
    Embedder::load(&EmbedderConfig {
        onnxruntime: dir.join("libonnxruntime.so.1.32.0"),
        model_dir: dir,
        queue: 256,
        max_batch: 32,
        intra_threads: 2,
        max_length: 128,
    })
    .expect("the embedding model (run scripts/fetch-embedding-model.sh)")
}

/// xorshift: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 20_000) as f32 / 10_000.0 - 1.0
    }
}

fn normalised(v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

/// Chatbot-like texts: every template with every filler.
fn texts(templates: &[&str], fillers: &[&str]) -> Vec<String> {
    templates
        .iter()
        .flat_map(|t| fillers.iter().map(move |f| t.replace("{}", f)))
        .collect()
}

const TEMPLATES: &[&str] = &[
    "How do I cancel my {} order?",
    "Where is my {} parcel?",
    "Can I change the delivery address for the {}?",
    "Is the {} store open on Sunday?",
    "What is the warranty on the {}?",
    "How do I reset the password of my {} account?",
    "Turn off notifications about the {}",
    "What is your refund policy for a damaged {}?",
    "Do you ship the {} abroad?",
    "Compare the {} with last year's model",
];
const FILLERS: &[&str] = &[
    "laptop",
    "phone",
    "headphones",
    "sofa",
    "bicycle",
    "camera",
    "printer",
    "kettle",
    "tent",
    "watch",
    "tablet",
    "monitor",
    "keyboard",
    "mattress",
    "vacuum cleaner",
    "blender",
    "jacket",
    "boots",
    "backpack",
    "drone",
    "router",
    "speaker",
    "microwave",
    "desk",
    "lamp",
    "stroller",
    "guitar",
    "treadmill",
    "coffee machine",
    "television",
    "fridge",
    "dishwasher",
    "scooter",
    "helmet",
    "sunglasses",
    "perfume",
    "wallet",
    "suitcase",
    "grill",
    "projector",
];

/// The real embeddings of 400 chatbot-like texts: the centres the synthetic entries are drawn
/// around, so that real queries land among entries as they would in a live cache.
fn centres(runtime: &tokio::runtime::Runtime, embedder: &Embedder) -> Vec<Vec<f32>> {
    embed_all(runtime, embedder, &texts(TEMPLATES, FILLERS))
}

/// Embeds `texts` 32 at a time (the queue is bounded).
fn embed_all(
    runtime: &tokio::runtime::Runtime,
    embedder: &Embedder,
    texts: &[String],
) -> Vec<Vec<f32>> {
    texts
        .chunks(32)
        .flat_map(|chunk| {
            runtime
                .block_on(futures::future::try_join_all(
                    chunk.iter().map(|t| embedder.embed(t.clone())),
                ))
                .unwrap()
        })
        .collect()
}

/// The records the entries stand for, one per centre text, written as the gateway writes them:
/// with the text's words in context from the forward pass that embedded it.
fn entry_records(runtime: &tokio::runtime::Runtime, embedder: &Embedder) -> Vec<SemanticRecord> {
    texts(TEMPLATES, FILLERS)
        .into_iter()
        .map(|text| {
            let embedded = runtime
                .block_on(embedder.embed_with_words(text.clone()))
                .unwrap();
            record(text, embedded)
        })
        .collect()
}

fn record(text: String, embedded: Embedded) -> SemanticRecord {
    SemanticRecord {
        created_at_ms: 0,
        ttl_secs: 3_600,
        tenant: "bench".into(),
        route: "bench".into(),
        namespace: String::new(),
        model: MODEL_ID.into(),
        scope: "07".repeat(32),
        text,
        words: PackedWords::pack(&embedded),
        vector: embedded.vector,
        threshold: None,
        wrong_reports: 0,
        cutoff: None,
        disagreed_at: None,
        target: "bench".into(),
        response: serde_json::json!({}),
    }
}

/// `count` vectors around the centres, generated one at a time (so building an index does not
/// hold a second copy of every vector, which would blur the memory figure).
fn clustered(centres: &[Vec<f32>], count: usize, seed: u64) -> impl Iterator<Item = Vec<f32>> {
    let mut rng = Rng(seed | 1);
    (0..count).map(move |i| {
        let centre = &centres[i % centres.len()];
        // Per coordinate a unit centre is ~±0.05; noise of ±0.05 leaves each vector at cosine
        // ~0.85 to its centre, as paraphrases of one request are in MiniLM's space.
        normalised(centre.iter().map(|c| c + 0.05 * rng.next()).collect())
    })
}

/// A store key as long as a real entry's (~110 bytes) that also names the entry's number.
fn path(i: usize) -> String {
    format!("semantic/v1/tenant-a/chat/-/all-MiniLM-L6-v2-int8/{i:064}")
}

fn number(path: &str) -> usize {
    path.rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap()
}

fn build(centres: &[Vec<f32>], count: usize) -> SemanticIndex {
    let index = SemanticIndex::new(IndexParams {
        expected_entries: count,
        ..IndexParams::default()
    });
    // As a gateway loads its index at startup: in bulk, over every core, 10,000 at a time.
    let started = Instant::now();
    let mut vectors = clustered(centres, count, 11).enumerate().peekable();
    while vectors.peek().is_some() {
        let chunk: Vec<IndexEntry> = vectors
            .by_ref()
            .take(10_000)
            .map(|(i, vector)| IndexEntry {
                scope: SCOPE,
                vector,
                entry: path(i),
                expires_at_ms: 0,
            })
            .collect();
        index.insert_many(chunk);
    }
    eprintln!(
        "loaded an index of {count} entries in bulk in {:.1?}",
        started.elapsed()
    );
    // One by one, as entries arrive while serving (off the response path).
    let started = Instant::now();
    for (i, vector) in clustered(centres, 1_000, 12).enumerate() {
        index.insert(&SCOPE, &vector, &path(count + i), 0);
    }
    eprintln!(
        "then inserted 1,000 more one at a time: {:.2?} each",
        started.elapsed() / 1_000
    );
    index
}

// Counts the heap the index takes: the resident-set size cannot tell it apart from memory the
// model's runs freed and the index then reused.
#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// glibc's malloc on x86-64 adds 8 bytes of header to each allocation and rounds to 16: ~16 bytes
/// per allocation on average beyond what was asked for.
const MALLOC_OVERHEAD: isize = 16;

/// Queries: the templates with fillers no entry was drawn around.
const QUERY_FILLERS: &[&str] = &[
    "skateboard",
    "toaster",
    "hair dryer",
    "bookshelf",
    "smart speaker",
    "rice cooker",
    "tripod",
    "e-reader",
    "air fryer",
    "power bank",
    "sleeping bag",
    "office chair",
];

/// The `rules+words` verifier; its word vectors are cached as in the gateway, so the first
/// lookups pay for embedding their words and later ones mostly do not.
fn verifier(embedder: &Embedder) -> Box<dyn Verifier> {
    let config = SemanticConfig {
        verifier: VerifierKind::RulesAndWords,
        ..SemanticConfig::default()
    };
    verifier_from_config(&config, embedder).expect("the rules+words verifier")
}

/// The default decision (`calibrated`); entries' words in context are cached as in the gateway.
fn calibrated(embedder: &Embedder) -> CalibratedJudge {
    match judge_from_config(&SemanticConfig::default(), embedder) {
        Ok(Judge::Calibrated(judge)) => *judge,
        _ => panic!("the default is the calibrated decision"),
    }
}

/// How a lookup judges its candidates.
#[derive(Clone, Copy)]
enum Decision<'a> {
    Words(&'a dyn Verifier),
    Calibrated(&'a CalibratedJudge),
}

/// How many of each query's 4 nearest entries (by exhaustive search) the index's search returns.
fn recall_at_4(
    index: &SemanticIndex,
    centres: &[Vec<f32>],
    size: usize,
    queries: &[Vec<f32>],
) -> f64 {
    // The entries as `build` made them: `size` in bulk (seed 11), then 1,000 one at a time (12).
    let entries = clustered(centres, size, 11).chain(clustered(centres, 1_000, 12));
    let mut nearest: Vec<Vec<(f32, usize)>> = vec![Vec::with_capacity(5); queries.len()];
    for (number, vector) in entries.enumerate() {
        for (query, best) in queries.iter().zip(&mut nearest) {
            let similarity: f32 = query.iter().zip(&vector).map(|(a, b)| a * b).sum();
            if best.len() < 4 || similarity > best[best.len() - 1].0 {
                best.push((similarity, number));
                best.sort_by(|a, b| b.0.total_cmp(&a.0));
                best.truncate(4);
            }
        }
    }
    let found: usize = queries
        .iter()
        .zip(&nearest)
        .map(|(query, best)| {
            let returned: Vec<usize> = index
                .search(&SCOPE, query, 4, 0)
                .iter()
                .map(|m| number(&m.entry))
                .collect();
            best.iter().filter(|(_, n)| returned.contains(n)).count()
        })
        .sum();
    found as f64 / (4 * queries.len()) as f64
}

/// One whole lookup: embed the query, search, and judge the candidates against the records
/// their entries stand for, as the gateway does (reading a record from the store is left out).
async fn lookup(
    embedder: &Embedder,
    decision: Decision<'_>,
    index: &SemanticIndex,
    records: &[SemanticRecord],
    query: &str,
) -> bool {
    let record_of = |entry: &str| &records[number(entry) % records.len()];
    match decision {
        Decision::Words(verifier) => {
            let vector = embedder.embed(query.to_owned()).await.unwrap();
            for candidate in index.search(&SCOPE, &vector, 4, 0) {
                if verifier
                    .verify(query, &record_of(&candidate.entry).text)
                    .await
                    .is_ok()
                {
                    return true;
                }
            }
            false
        }
        Decision::Calibrated(judge) => {
            let words = embedder.embed_with_words(query.to_owned()).await.unwrap();
            let candidates = index.search(&SCOPE, &words.vector, 4, 0);
            let verdicts = futures::future::join_all(candidates.iter().map(|candidate| {
                judge.judge(
                    query,
                    &words,
                    record_of(&candidate.entry),
                    candidate.similarity,
                )
            }))
            .await;
            verdicts
                .into_iter()
                .any(|v| matches!(v, Ok(PairVerdict::Scored(p)) if p >= judge.cutoff))
        }
    }
}

fn percentiles(
    runtime: &tokio::runtime::Runtime,
    embedder: &Embedder,
    decision: Decision<'_>,
    label: &str,
    index: &SemanticIndex,
    records: &[SemanticRecord],
) {
    let queries = texts(TEMPLATES, QUERY_FILLERS);
    let mut lookups = Vec::with_capacity(2_000);
    // The same query embedded alone right after each lookup: what the embedding costs in the
    // same conditions, so the rest of the lookup is the difference.
    let mut embeddings = Vec::with_capacity(2_000);
    for i in 0..2_000 {
        let query = &queries[i % queries.len()];
        let started = Instant::now();
        black_box(runtime.block_on(lookup(embedder, decision, index, records, query)));
        lookups.push(started.elapsed());
        let started = Instant::now();
        black_box(runtime.block_on(embedder.embed_with_words(query.clone()))).unwrap();
        embeddings.push(started.elapsed());
    }
    let at = |samples: &mut Vec<Duration>, q: f64| {
        samples.sort();
        samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)]
    };
    eprintln!(
        "semantic lookup at 100k entries ({label}), 2,000 queries: p50 {:.2?}, p99 {:.2?}; \
         the query embedded alone: p50 {:.2?}, p99 {:.2?}",
        at(&mut lookups, 0.5),
        at(&mut lookups, 0.99),
        at(&mut embeddings, 0.5),
        at(&mut embeddings, 0.99),
    );
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let embedder = embedder();
    let records = entry_records(&runtime, &embedder);
    let centres = centres(&runtime, &embedder);
    let mut sizes = vec![10_000, 100_000];
    if std::env::var_os("REPRISE_BENCH_1M").is_some() {
        sizes.push(1_000_000);
    }
    let queries = texts(TEMPLATES, QUERY_FILLERS);
    let query_vectors = embed_all(&runtime, &embedder, &queries);
    let mut indexes = Vec::new();
    for &size in &sizes {
        let region = Region::new(ALLOCATOR);
        let index = build(&centres, size);
        let change = region.change();
        // stats_alloc books a realloc's growth in `bytes_allocated` and its shrinkage in
        // `bytes_deallocated` already; `bytes_reallocated` is the same change again.
        let bytes = change.bytes_allocated as isize - change.bytes_deallocated as isize;
        let allocations = change.allocations as isize - change.deallocations as isize;
        let with_overhead = bytes + MALLOC_OVERHEAD * allocations;
        // `build` adds 1,000 entries one at a time after the bulk load.
        let entries = size + 1_000;
        let per_entry = |total: isize| total / entries as isize - (DIM * 4) as isize;
        eprintln!(
            "index of {size}: {:.0} MiB of heap; per entry beyond its {}-byte vector: {} bytes \
             ({} with malloc's overhead on {:.1} allocations)",
            with_overhead as f64 / (1 << 20) as f64,
            DIM * 4,
            per_entry(bytes),
            per_entry(with_overhead),
            allocations as f64 / entries as f64,
        );
        eprintln!(
            "index of {size}: recall@4 {:.3} (ef_search {})",
            recall_at_4(&index, &centres, size, &query_vectors),
            IndexParams::default().ef_search
        );
        indexes.push((size, index));
    }
    let hundred_k = &indexes[1].1;
    let verifier = verifier(&embedder);
    let judge = calibrated(&embedder);
    for (decision, label) in [
        (
            Decision::Calibrated(&judge),
            "embedding + search + calibrated decision",
        ),
        (
            Decision::Words(verifier.as_ref()),
            "embedding + search + rules+words",
        ),
    ] {
        percentiles(&runtime, &embedder, decision, label, hundred_k, &records);
    }

    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(5));
    let mut group = c.benchmark_group("embed");
    group.bench_function("one text", |b| {
        b.to_async(&runtime)
            .iter(|| embedder.embed(black_box("Can I change the delivery address?").to_owned()))
    });
    group.bench_function("32 concurrent texts", |b| {
        b.to_async(&runtime).iter(|| {
            futures::future::join_all(queries.iter().take(32).map(|q| embedder.embed(q.clone())))
        })
    });
    group.finish();
    let mut group = c.benchmark_group("index search (k=4)");
    for (size, index) in &indexes {
        let mut i = 0;
        group.bench_function(format!("{size} entries"), |b| {
            b.iter(|| {
                i = (i + 1) % query_vectors.len();
                black_box(index.search(&SCOPE, &query_vectors[i], 4, 0))
            })
        });
    }
    group.finish();
    // The pair passes the rules and fails the word check ("close" has no counterpart in
    // "number"): the check runs in full.
    let (query, candidate) = (
        "When does the Central Plaza store close?",
        "What is the number for the Central Plaza store?",
    );
    let mut group = c.benchmark_group("verify");
    let query_words = runtime
        .block_on(embedder.embed_with_words(query.to_owned()))
        .unwrap();
    let candidate_record = record(
        candidate.to_owned(),
        runtime
            .block_on(embedder.embed_with_words(candidate.to_owned()))
            .unwrap(),
    );
    group.bench_function("calibrated, entry words stored with it", |b| {
        b.to_async(&runtime).iter(|| {
            judge.judge(
                black_box(query),
                &query_words,
                black_box(&candidate_record),
                0.8,
            )
        })
    });
    group.bench_function("rules", |b| {
        b.iter(|| RuleVerifier.check(black_box(query), black_box(candidate)))
    });
    group.bench_function("rules+words, words cached", |b| {
        b.to_async(&runtime)
            .iter(|| verifier.verify(black_box(query), black_box(candidate)))
    });
    group.bench_function("rules+words, words not yet cached", |b| {
        b.to_async(&runtime).iter(|| async {
            let cold = self::verifier(&embedder);
            cold.verify(black_box(query), black_box(candidate)).await
        })
    });
    group.finish();
    let mut group = c.benchmark_group("semantic lookup");
    let (embedder, records, queries) = (&embedder, &records, &queries);
    for (decision, label) in [
        (
            Decision::Calibrated(&judge),
            "embed + search + calibrated, 100k entries",
        ),
        (
            Decision::Words(verifier.as_ref()),
            "embed + search + rules+words, 100k entries",
        ),
    ] {
        let mut i = 0;
        group.bench_function(label, |b| {
            b.to_async(&runtime).iter(|| {
                i = (i + 1) % queries.len();
                lookup(embedder, decision, hundred_k, records, &queries[i])
            })
        });
    }
    group.finish();
    c.final_summary();
}
