//! Benches for the semantic cache: embedding (one text, and 32 concurrent texts batched), index
//! search at 10k, 100k and (with `REPRISE_BENCH_1M=1`) 1M entries, and the whole lookup
//! (embedding + search + guards) at 100k entries. Before criterion runs, it prints the lookup's
//! p50/p99 over 2,000 queries and the index's memory per entry.
//!
//! `cargo bench --bench semantic` (the model from `REPRISE_EMBED_MODEL_DIR`, default
//! `models/all-MiniLM-L6-v2`).
//!
//! Index entries are synthetic: 384-dimensional unit vectors drawn around 2,000 cluster centres at
//! cosine ~0.7 (embeddings of real traffic cluster by intent; uniform random vectors would be the
//! worst case for any HNSW), keyed like real entries (a store path of ~110 bytes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::Criterion;
use reprise::cache::index::{IndexParams, SemanticIndex};
use reprise::cache::verify::{RuleVerifier, Verifier};
use reprise::embed::{Embedder, EmbedderConfig};

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
        intra_threads: 1,
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

/// `count` vectors around 2,000 centres, generated one at a time (so building an index does not
/// hold a second copy of every vector, which would blur the memory figure).
fn clustered(count: usize, seed: u64) -> impl Iterator<Item = Vec<f32>> {
    let mut rng = Rng(seed | 1);
    let centres: Vec<Vec<f32>> = (0..2_000)
        .map(|_| normalised((0..DIM).map(|_| rng.next()).collect()))
        .collect();
    (0..count).map(move |i| {
        let centre = &centres[i % centres.len()];
        // Per coordinate a unit centre is ~±0.05; noise of ±0.09 leaves each vector at cosine
        // ~0.7 to its centre, as paraphrases of one intent are in MiniLM's space. (Noise much
        // larger than the centre makes the vectors uniform in 384 dimensions, which no real
        // traffic looks like and which is HNSW's worst case.)
        normalised(centre.iter().map(|c| c + 0.09 * rng.next()).collect())
    })
}

fn path(i: usize) -> String {
    format!(
        "semantic/v1/tenant-a/chat/-/all-MiniLM-L6-v2-int8/{}",
        blake3::hash(&i.to_le_bytes()).to_hex()
    )
}

fn build(count: usize) -> SemanticIndex {
    let index = SemanticIndex::new(IndexParams {
        expected_entries: count,
        ..IndexParams::default()
    });
    let started = Instant::now();
    for (i, v) in clustered(count, 11).enumerate() {
        index.insert(&SCOPE, &v, &path(i), 0);
    }
    eprintln!(
        "built an index of {count} entries in {:.1?}",
        started.elapsed()
    );
    index
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

const QUERIES: &[&str] = &[
    "How do I cancel my order?",
    "Where is my parcel? It was due yesterday.",
    "Can I change the delivery address of order 12345?",
    "Is the Elm Street store open on Sunday?",
    "Send 50 USD to Alice",
    "How do I reset my password?",
    "Turn off notifications for two hours",
    "What is your refund policy for damaged items?",
];

fn percentiles(runtime: &tokio::runtime::Runtime, embedder: &Embedder, index: &SemanticIndex) {
    let mut samples = Vec::with_capacity(2_000);
    for i in 0..2_000 {
        let text = format!("{} ({})", QUERIES[i % QUERIES.len()], i / QUERIES.len());
        let started = Instant::now();
        let vector = runtime.block_on(embedder.embed(text.clone())).unwrap();
        let matches = index.search(&SCOPE, &vector, 4, 0);
        for m in &matches {
            black_box(RuleVerifier.verify(&text, QUERIES[0]).is_ok() && m.similarity > 0.0);
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    eprintln!(
        "semantic lookup at 100k entries (embedding + search + guards), 2,000 queries: p50 {:.2?}, p99 {:.2?}",
        at(0.5),
        at(0.99)
    );
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    // The indexes are built before the model loads, so the resident-memory growth is theirs.
    let mut sizes = vec![10_000, 100_000];
    if std::env::var_os("REPRISE_BENCH_1M").is_some() {
        sizes.push(1_000_000);
    }
    let mut indexes = Vec::new();
    for &size in &sizes {
        let before = resident_bytes();
        let index = build(size);
        let grown = resident_bytes().saturating_sub(before);
        let vectors = (size * DIM * 4) as u64;
        eprintln!(
            "index of {size}: {:.0} MiB resident, {} bytes per entry beyond its {}-byte vector",
            grown as f64 / (1 << 20) as f64,
            grown.saturating_sub(vectors) / size as u64,
            DIM * 4
        );
        indexes.push((size, index));
    }
    let embedder = embedder();
    let hundred_k = &indexes[1].1;
    percentiles(&runtime, &embedder, hundred_k);

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
            futures::future::join_all(
                (0..32).map(|i| embedder.embed(format!("{} {i}", QUERIES[i % QUERIES.len()]))),
            )
        })
    });
    group.finish();
    let mut group = c.benchmark_group("index search (k=4)");
    let queries: Vec<Vec<f32>> = clustered(256, 99).collect();
    for (size, index) in &indexes {
        let mut i = 0;
        group.bench_function(format!("{size} entries"), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                black_box(index.search(&SCOPE, &queries[i], 4, 0))
            })
        });
    }
    group.finish();
    let mut group = c.benchmark_group("semantic lookup");
    let embedder = &embedder;
    let mut i = 0;
    group.bench_function("embed + search + guards, 100k entries", |b| {
        b.to_async(&runtime).iter(|| {
            i += 1;
            let text = format!("{} ({i})", QUERIES[i % QUERIES.len()]);
            async move {
                let vector = embedder.embed(text.clone()).await.unwrap();
                let matches = hundred_k.search(&SCOPE, &vector, 4, 0);
                black_box(RuleVerifier.verify(&text, QUERIES[0]).is_ok() && !matches.is_empty())
            }
        })
    });
    group.finish();
    c.final_summary();
}
