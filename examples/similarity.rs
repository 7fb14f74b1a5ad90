//! Prints the cosine similarity of pairs of texts (tab-separated on stdin) with the gateway's
//! embedding model: `cargo run --example similarity -- models/all-MiniLM-L6-v2 < pairs.tsv`.
use std::io::BufRead;

use reprise::embed::{Embedder, EmbedderConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "models/all-MiniLM-L6-v2".into()),
    );
    let embedder = Embedder::load(&EmbedderConfig {
        onnxruntime: dir.join("libonnxruntime.so.1.32.0"),
        model_dir: dir,
        queue: 64,
        max_batch: 16,
        intra_threads: 1,
        max_length: 128,
    })?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let Some((a, b)) = line.split_once('\t') else {
            continue;
        };
        let (va, vb) = (
            embedder.embed(a.to_owned()).await?,
            embedder.embed(b.to_owned()).await?,
        );
        let cosine: f32 = va.iter().zip(&vb).map(|(x, y)| x * y).sum();
        println!("{cosine:.3}\t{a}\t{b}");
    }
    Ok(())
}
