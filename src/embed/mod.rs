//! Local text embeddings for the semantic cache: all-MiniLM-L6-v2 (int8 ONNX) through `fastembed`,
//! with ONNX Runtime loaded dynamically from a library file (no download at build or run time).
//!
//! Inference is CPU-bound, so it runs on a dedicated thread that owns the model, never on the async
//! runtime's workers. Requests queue per lane (the semantic cache uses one lane per tenant); the
//! thread takes up to `max_batch` of them, one from each waiting lane in turn, and embeds them as one
//! batch, so concurrent requests share the model's fixed cost and a tenant with many requests
//! queued does not make another's one request wait behind all of them. A lane's full queue answers
//! `Overloaded` at once (to that lane only): the caller skips the semantic stage rather than wait.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use fastembed::{
    InitOptionsUserDefined, OutputKey, Pooling, TextEmbedding, TokenizerFiles,
    UserDefinedEmbeddingModel,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Vectors of different models are unrelated: entries are keyed by this id.
pub const MODEL_ID: &str = "all-MiniLM-L6-v2-int8";

#[derive(Debug, Clone)]
pub struct EmbedderConfig {
    /// Holds `model.onnx`, `tokenizer.json`, `config.json`, `special_tokens_map.json`,
    /// `tokenizer_config.json`.
    pub model_dir: PathBuf,
    /// The ONNX Runtime shared library (`libonnxruntime.so.*`, version 1.24 or later).
    pub onnxruntime: PathBuf,
    /// Requests waiting at most per lane; beyond it `embed` answers `Overloaded`.
    pub queue: usize,
    pub max_batch: usize,
    /// Threads ONNX Runtime may use for one batch.
    pub intra_threads: usize,
    /// Tokens per text; longer texts are truncated.
    pub max_length: usize,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EmbedError {
    #[error("cannot load the embedding model: {0}")]
    Load(String),
    #[error("the embedding queue is full")]
    Overloaded,
    #[error("embedding failed: {0}")]
    Failed(String),
    #[error("the embedding worker has stopped")]
    Stopped,
}

/// Counters since start, for metrics and tests.
#[derive(Debug, Default)]
pub struct EmbedderStats {
    pub texts: AtomicU64,
    pub batches: AtomicU64,
    pub overloaded: AtomicU64,
}

/// A text's sentence vector and, when asked for, its words in context: each word's vector is
/// the mean of its word pieces' vectors in the model's last hidden state (unit length), from the
/// same forward pass as the sentence vector.
#[derive(Debug, Clone, Default)]
pub struct Embedded {
    /// The text had more tokens than the model reads (`max_length`): the vector stands for its
    /// beginning only.
    pub truncated: bool,
    pub vector: Vec<f32>,
    pub words: Vec<String>,
    /// `words.len()` vectors of the model's dimensions, one after the other.
    pub word_vectors: Vec<f32>,
}

impl Embedded {
    pub fn word_vector(&self, index: usize) -> &[f32] {
        let dimensions = self.vector.len();
        &self.word_vectors[index * dimensions..(index + 1) * dimensions]
    }
}

/// A text's words in context, packed to be stored with its cache entry: per word, a scale and
/// one signed byte per dimension, about a quarter of the floats' size. A restored unit vector's
/// dot products move by a few thousandths at most.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedWords {
    pub words: Vec<String>,
    /// Base64 of, for each word, its scale (`f32`, little-endian) and its components divided
    /// by the scale, rounded to `i8`.
    pub vectors: String,
}

impl PackedWords {
    /// `None` for a text embedded without its words.
    pub fn pack(embedded: &Embedded) -> Option<Self> {
        let dimensions = embedded.vector.len();
        if embedded.words.is_empty() || dimensions == 0 {
            return None;
        }
        let mut bytes = Vec::with_capacity(embedded.words.len() * (4 + dimensions));
        for vector in embedded.word_vectors.chunks_exact(dimensions) {
            let largest = vector.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let scale = if largest > 0.0 { largest / 127.0 } else { 1.0 };
            bytes.extend_from_slice(&scale.to_le_bytes());
            bytes.extend(vector.iter().map(|x| (x / scale).round() as i8 as u8));
        }
        Some(Self {
            words: embedded.words.clone(),
            vectors: BASE64.encode(bytes),
        })
    }

    /// The text's embedding with these words, given its sentence vector; `None` if the packed
    /// vectors do not fit it (another model, a damaged record).
    pub fn unpack(&self, vector: &[f32]) -> Option<Embedded> {
        let dimensions = vector.len();
        let bytes = BASE64.decode(&self.vectors).ok()?;
        if dimensions == 0 || bytes.len() != self.words.len() * (4 + dimensions) {
            return None;
        }
        let mut word_vectors = Vec::with_capacity(self.words.len() * dimensions);
        for packed in bytes.chunks_exact(4 + dimensions) {
            let (scale, components) = packed.split_at(4);
            let scale = f32::from_le_bytes(scale.try_into().ok()?);
            word_vectors.extend(components.iter().map(|&b| f32::from(b as i8) * scale));
        }
        Some(Embedded {
            truncated: false,
            vector: vector.to_vec(),
            words: self.words.clone(),
            word_vectors,
        })
    }
}

struct Job {
    text: String,
    /// The text was cut to `max_text_bytes` before it was queued.
    cut: bool,
    words: bool,
    reply: oneshot::Sender<Result<Embedded, EmbedError>>,
}

/// The jobs waiting, per lane, and the lanes with jobs in the order they are served.
#[derive(Default)]
struct Lanes {
    waiting: HashMap<Arc<str>, VecDeque<Job>>,
    turn: VecDeque<Arc<str>>,
    /// Every handle is gone: the worker ends.
    closed: bool,
}

struct Queue {
    lanes: Mutex<Lanes>,
    ready: Condvar,
    per_lane: usize,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lanes> {
        self.lanes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Up to `max` jobs, one per lane in turn; `None` once closed and drained.
    fn take(&self, max: usize) -> Option<Vec<Job>> {
        let mut lanes = self.lock();
        while lanes.turn.is_empty() {
            if lanes.closed {
                return None;
            }
            lanes = self
                .ready
                .wait(lanes)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(lane) = lanes.turn.pop_front() else {
                break;
            };
            let Some(queue) = lanes.waiting.get_mut(&lane) else {
                continue;
            };
            if let Some(job) = queue.pop_front() {
                batch.push(job);
            }
            if queue.is_empty() {
                lanes.waiting.remove(&lane);
            } else {
                lanes.turn.push_back(lane);
            }
        }
        Some(batch)
    }
}

/// Closes the queue when the last handle goes.
struct Closer(Arc<Queue>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
    }
}

/// A handle: clones share the one model and its queue.
#[derive(Clone)]
pub struct Embedder {
    queue: Arc<Queue>,
    _closer: Arc<Closer>,
    stats: Arc<EmbedderStats>,
    dimensions: usize,
    max_length: usize,
}

/// How many bytes a text may have and still fit `max_length` tokens: a word piece is rarely longer
/// than this, so a longer text is surely truncated and is refused without tokenising it.
const MAX_BYTES_PER_TOKEN: usize = 16;

/// ONNX Runtime allows one environment per process: the first load creates it from its library,
/// later loads (tests, a reloaded config) share it, and a different library is refused.
fn environment(library: &Path) -> Result<ort::environment::Environment, EmbedError> {
    static ENVIRONMENT: Mutex<Option<(PathBuf, ort::environment::Environment)>> = Mutex::new(None);
    let mut slot = ENVIRONMENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((loaded_from, environment)) = slot.as_ref() {
        if loaded_from != library {
            return Err(EmbedError::Load(format!(
                "ONNX Runtime is already loaded from {} in this process; cannot also load {}",
                loaded_from.display(),
                library.display()
            )));
        }
        return Ok(environment.clone());
    }
    let environment = ort::init_from(library)
        .map_err(|e| EmbedError::Load(format!("{}: {e}", library.display())))?
        .build()
        .map_err(|e| EmbedError::Load(e.to_string()))?;
    *slot = Some((library.to_owned(), environment.clone()));
    Ok(environment)
}

fn read(dir: &Path, file: &str) -> Result<Vec<u8>, EmbedError> {
    let path = dir.join(file);
    std::fs::read(&path).map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))
}

impl Embedder {
    /// Loads the model (on the calling thread, at startup) and starts the worker thread.
    pub fn load(config: &EmbedderConfig) -> Result<Self, EmbedError> {
        if !config.onnxruntime.is_file() {
            return Err(EmbedError::Load(format!(
                "{}: no such file (run scripts/fetch-embedding-model.sh)",
                config.onnxruntime.display()
            )));
        }
        let environment = environment(&config.onnxruntime)?;
        let dir = &config.model_dir;
        let model = UserDefinedEmbeddingModel::new(
            read(dir, "model.onnx")?,
            TokenizerFiles {
                tokenizer_file: read(dir, "tokenizer.json")?,
                config_file: read(dir, "config.json")?,
                special_tokens_map_file: read(dir, "special_tokens_map.json")?,
                tokenizer_config_file: read(dir, "tokenizer_config.json")?,
            },
        )
        // all-MiniLM-L6-v2 is trained with mean pooling.
        .with_pooling(Pooling::Mean);
        let options = InitOptionsUserDefined::new()
            .with_environment(environment)
            .with_max_length(config.max_length)
            .with_intra_threads(config.intra_threads.max(1));
        let mut model = TextEmbedding::try_new_from_user_defined(model, options)
            .map_err(|e| EmbedError::Load(e.to_string()))?;
        let dimensions = model
            .embed(vec!["probe"], None)
            .map_err(|e| EmbedError::Load(e.to_string()))?
            .first()
            .map_or(0, Vec::len);
        let queue = Arc::new(Queue {
            lanes: Mutex::new(Lanes::default()),
            ready: Condvar::new(),
            per_lane: config.queue.max(1),
        });
        let stats = Arc::new(EmbedderStats::default());
        let worker_stats = Arc::clone(&stats);
        let worker_queue = Arc::clone(&queue);
        let max_batch = config.max_batch.max(1);
        let max_length = config.max_length;
        std::thread::Builder::new()
            .name("reprise-embed".into())
            .spawn(move || run_worker(model, &worker_queue, max_batch, max_length, &worker_stats))
            .map_err(|e| EmbedError::Load(format!("cannot start the embedding thread: {e}")))?;
        Ok(Self {
            _closer: Arc::new(Closer(Arc::clone(&queue))),
            queue,
            stats,
            dimensions,
            max_length,
        })
    }

    /// Texts longer than this many bytes exceed the tokens the model reads, whatever they say.
    pub fn max_text_bytes(&self) -> usize {
        self.max_length * MAX_BYTES_PER_TOKEN
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    pub fn stats(&self) -> &EmbedderStats {
        &self.stats
    }

    /// The text's embedding, a unit vector of `dimensions()` floats.
    pub async fn embed(&self, text: String) -> Result<Vec<f32>, EmbedError> {
        Ok(self.embed_in("", text, false).await?.vector)
    }

    /// The text's embedding and its words' vectors in context.
    pub async fn embed_with_words(&self, text: String) -> Result<Embedded, EmbedError> {
        self.embed_in("", text, true).await
    }

    /// The text's embedding (and its words in context if `words`), queued in `lane`.
    pub async fn embed_in(
        &self,
        lane: &str,
        text: String,
        words: bool,
    ) -> Result<Embedded, EmbedError> {
        let mut text = text;
        let cut = text.len() > self.max_text_bytes();
        if cut {
            // Tokenising megabytes only to keep the first few hundred tokens would stall every
            // lane behind this one.
            let mut end = self.max_text_bytes();
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        let (reply, answer) = oneshot::channel();
        {
            let mut lanes = self.queue.lock();
            if lanes.closed {
                return Err(EmbedError::Stopped);
            }
            let queued = lanes.waiting.get(lane).map_or(0, VecDeque::len);
            if queued >= self.queue.per_lane {
                drop(lanes);
                self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(EmbedError::Overloaded);
            }
            let job = Job {
                text,
                cut,
                words,
                reply,
            };
            match lanes.waiting.get_mut(lane) {
                Some(queue) => queue.push_back(job),
                None => {
                    let lane: Arc<str> = Arc::from(lane);
                    lanes
                        .waiting
                        .insert(Arc::clone(&lane), VecDeque::from([job]));
                    lanes.turn.push_back(lane);
                }
            }
        }
        self.queue.ready.notify_one();
        answer.await.unwrap_or(Err(EmbedError::Stopped))
    }
}

fn run_worker(
    mut model: TextEmbedding,
    queue: &Queue,
    max_batch: usize,
    max_length: usize,
    stats: &EmbedderStats,
) {
    // Ends when every `Embedder` handle is dropped.
    while let Some(mut batch) = queue.take(max_batch) {
        // A caller that gave up (cancelled request) needs no embedding.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let texts: Vec<&str> = batch.iter().map(|job| job.text.as_str()).collect();
        let result = embed_batch(&mut model, &texts, &batch, max_length);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.texts.fetch_add(batch.len() as u64, Ordering::Relaxed);
        match result {
            Ok(embedded) => {
                for (job, embedded) in batch.into_iter().zip(embedded) {
                    let _ = job.reply.send(Ok(embedded));
                }
            }
            Err(message) => {
                for job in batch {
                    let _ = job.reply.send(Err(EmbedError::Failed(message.clone())));
                }
            }
        }
    }
}

/// One forward pass over the batch: mean pooling over the attention mask (how all-MiniLM-L6-v2
/// was trained, and what `TextEmbedding::embed` computes), and for the jobs that ask, the words.
fn embed_batch(
    model: &mut TextEmbedding,
    texts: &[&str],
    jobs: &[Job],
    max_length: usize,
) -> Result<Vec<Embedded>, String> {
    let output = model
        .transform(texts, Some(texts.len()))
        .map_err(|e| e.to_string())?;
    let mut embedded = Vec::with_capacity(texts.len());
    for batch in output.into_raw() {
        let hidden = batch
            .select_output(&&OutputKey::ByName("last_hidden_state"))
            .map_err(|e| e.to_string())?;
        let shape = hidden.shape().to_vec();
        let [rows, tokens, dimensions] = shape[..] else {
            return Err(format!("unexpected output shape {shape:?}"));
        };
        let hidden = hidden.as_standard_layout();
        let values = hidden.as_slice().ok_or("non-contiguous output")?;
        let mask = &batch.attention_mask_array;
        for row in 0..rows {
            let token = |t: usize| {
                let start = (row * tokens + t) * dimensions;
                &values[start..start + dimensions]
            };
            let mut vector = vec![0.0f32; dimensions];
            let mut counted = 0usize;
            for t in (0..tokens).filter(|&t| mask[[row, t]] != 0) {
                add(&mut vector, token(t));
                counted += 1;
            }
            vector.iter_mut().for_each(|x| *x /= counted.max(1) as f32);
            normalise(&mut vector);
            let index = embedded.len();
            let mut result = Embedded {
                // Holding `max_length` tokens, special ones included, it may have had more.
                truncated: counted >= max_length
                    || jobs.get(embedded.len()).is_some_and(|job| job.cut),
                vector,
                ..Embedded::default()
            };
            if jobs.get(index).is_some_and(|job| job.words) {
                let encoding = model
                    .tokenizer
                    .encode(texts[index], true)
                    .map_err(|e| e.to_string())?;
                let words = word_spans(encoding.get_word_ids(), encoding.get_offsets());
                for (first, last, (from, to)) in words {
                    let mut word = vec![0.0f32; dimensions];
                    (first..=last.min(tokens - 1)).for_each(|t| add(&mut word, token(t)));
                    normalise(&mut word);
                    result.words.push(
                        texts[index]
                            .get(from..to)
                            .unwrap_or_default()
                            .to_lowercase(),
                    );
                    result.word_vectors.extend_from_slice(&word);
                }
            }
            embedded.push(result);
        }
    }
    if embedded.len() != texts.len() {
        return Err(format!(
            "{} vectors for {} texts",
            embedded.len(),
            texts.len()
        ));
    }
    Ok(embedded)
}

/// Each word's first and last token and its byte range in the text; special tokens (no word)
/// are left out.
fn word_spans(
    word_ids: &[Option<u32>],
    offsets: &[(usize, usize)],
) -> Vec<(usize, usize, (usize, usize))> {
    let mut spans: Vec<(usize, usize, (usize, usize))> = Vec::new();
    let mut current: Option<u32> = None;
    for (t, (word, &(from, to))) in word_ids.iter().zip(offsets).enumerate() {
        match (word, spans.last_mut()) {
            (Some(w), Some(last)) if current == Some(*w) => {
                last.1 = t;
                last.2.1 = to;
            }
            (Some(w), _) => {
                current = Some(*w);
                spans.push((t, t, (from, to)));
            }
            (None, _) => current = None,
        }
    }
    spans
}

fn add(sum: &mut [f32], vector: &[f32]) {
    sum.iter_mut().zip(vector).for_each(|(s, v)| *s += v);
}

fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u32, dimensions: usize) -> Vec<f32> {
        let mut vector: Vec<f32> = (0..dimensions)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000)
            .map(|x| x as f32 / 500.0 - 1.0)
            .collect();
        normalise(&mut vector);
        vector
    }

    #[test]
    fn packed_words_come_back_with_their_dot_products_nearly_unchanged() {
        let dimensions = 384;
        let words: Vec<Vec<f32>> = (0..5).map(|seed| unit(seed, dimensions)).collect();
        let embedded = Embedded {
            truncated: false,
            vector: unit(99, dimensions),
            words: ["where", "is", "the", "nearest", "store"]
                .map(String::from)
                .to_vec(),
            word_vectors: words.concat(),
        };
        let packed = PackedWords::pack(&embedded).expect("words to pack");
        let restored = packed.unpack(&embedded.vector).expect("fits its vector");
        assert_eq!(restored.words, embedded.words);
        assert_eq!(restored.vector, embedded.vector);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        for i in 0..5 {
            for j in 0..5 {
                let before = dot(embedded.word_vector(i), embedded.word_vector(j));
                let after = dot(restored.word_vector(i), restored.word_vector(j));
                assert!(
                    (before - after).abs() < 0.005,
                    "{i},{j}: {before} vs {after}"
                );
            }
        }
        // A quarter of the floats' size, and nothing for a text embedded without its words.
        assert!(packed.vectors.len() < embedded.word_vectors.len() * 4 * 2 / 5);
        assert_eq!(PackedWords::pack(&Embedded::default()), None);
        // Vectors of another size (another model, a damaged record) are not used.
        assert!(packed.unpack(&embedded.vector[..100]).is_none());
    }
}
