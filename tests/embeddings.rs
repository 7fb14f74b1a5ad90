//! The local embedder with the real model (fetched from PyPI by `make test`, which sets
//! `REPRISE_EMBED_MODEL_DIR`): ignored by a plain `cargo test`, failing if run without the model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

mod common;

use reprise::embed::{EmbedError, Embedder, EmbedderConfig};

fn model_dir() -> PathBuf {
    PathBuf::from(common::prerequisites::embed_model_dir())
}

fn config(dir: PathBuf, queue: usize) -> EmbedderConfig {
    EmbedderConfig {
        onnxruntime: dir.join("libonnxruntime.so.1.32.0"),
        model_dir: dir,
        queue,
        max_batch: 16,
        intra_threads: 1,
        max_length: 256,
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn paraphrases_are_closer_than_sibling_intents_and_unrelated_text() {
    let dir = model_dir();
    let embedder = Embedder::load(&config(dir, 64)).unwrap();
    assert_eq!(embedder.dimensions(), 384);
    let mut vectors = Vec::new();
    for text in [
        "How do I cancel my order?",
        "I want to cancel my order",
        "How do I track my order?",
        "What is the capital of France?",
    ] {
        vectors.push(embedder.embed(text.to_owned()).await.unwrap());
    }
    let norm: f32 = vectors[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "unit vectors: {norm}");
    let paraphrase = cosine(&vectors[0], &vectors[1]);
    let sibling = cosine(&vectors[0], &vectors[2]);
    let unrelated = cosine(&vectors[0], &vectors[3]);
    assert!(paraphrase > 0.85, "{paraphrase}");
    assert!(
        paraphrase > sibling && sibling > unrelated,
        "{paraphrase} {sibling} {unrelated}"
    );
    assert!(unrelated < 0.3, "{unrelated}");
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched() {
    let dir = model_dir();
    let embedder = Arc::new(Embedder::load(&config(dir, 256)).unwrap());
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let embedder = Arc::clone(&embedder);
            tokio::spawn(async move {
                embedder
                    .embed(format!("question number {i} about my order"))
                    .await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().len(), 384);
    }
    let stats = embedder.stats();
    assert_eq!(stats.texts.load(Ordering::Relaxed), 64);
    let batches = stats.batches.load(Ordering::Relaxed);
    assert!(batches < 64, "64 concurrent texts ran in {batches} batches");
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_overloaded_at_once_and_recovers() {
    let dir = model_dir();
    let embedder = Arc::new(Embedder::load(&config(dir, 2)).unwrap());
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let embedder = Arc::clone(&embedder);
            tokio::spawn(async move { embedder.embed(format!("flood {i}")).await })
        })
        .collect();
    let mut overloaded = 0;
    let mut embedded = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => embedded += 1,
            Err(EmbedError::Overloaded) => overloaded += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert!(
        overloaded > 0 && embedded > 0,
        "{embedded} embedded, {overloaded} overloaded"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        embedder.stats().overloaded.load(Ordering::Relaxed),
        overloaded
    );
    assert!(embedder.embed("after the flood".to_owned()).await.is_ok());
}

#[ignore = "needs the embedding model (make test)"]
#[test]
fn a_missing_runtime_library_is_a_clear_load_error() {
    let error = Embedder::load(&config(PathBuf::from("/nonexistent/model"), 4))
        .err()
        .unwrap();
    assert!(
        matches!(&error, EmbedError::Load(message) if message.contains("/nonexistent/model/libonnxruntime.so.1.32.0")),
        "{error}"
    );
}
