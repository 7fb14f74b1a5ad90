//! criterion benches for the exact cache's hot path: canonical key hashing, and lookups on both
//! stores (Redis only when a `redis-server` binary is on the PATH; it is started on a free
//! loopback port). Run: `cargo bench --bench cache`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use reprise::cache::{KeyScope, StreamAssembler, chat_key, replay_chunks};
use reprise::protocol::openai::ChatRequest;
use reprise::store::{FjallStore, RedisStore, Store};
use serde_json::{Value, json};

fn request(turns: usize) -> ChatRequest {
    let mut messages = vec![
        json!({"role": "system", "content": "You are a helpful support assistant for an online shop."}),
    ];
    for i in 0..turns {
        messages.push(json!({"role": "user", "content": format!("Question {i}: where is my order 12345? It was due yesterday.")}));
        messages.push(json!({"role": "assistant", "content": format!("Answer {i}: your order ships today and arrives within two days.")}));
    }
    messages.push(json!({"role": "user", "content": "Can I change the delivery address?"}));
    serde_json::from_value(
        json!({"model": "chat", "messages": messages, "temperature": 0.2, "max_tokens": 256}),
    )
    .unwrap()
}

fn completion() -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes. Open your orders page, pick the order and choose 'change address' before it ships.", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}})
}

fn key_hashing(c: &mut Criterion) {
    let targets = [
        "openai/gpt-4o-mini".to_owned(),
        "anthropic/claude-3-5-haiku-latest".to_owned(),
    ];
    let scope = KeyScope {
        tenant: "team-a",
        namespace: "",
        route: "chat",
        targets: &targets,
        prompt: None,
    };
    for turns in [0, 10] {
        let request = request(turns);
        let bytes = serde_json::to_vec(&request).unwrap().len();
        c.bench_function(
            &format!("cache key: {} messages ({bytes} B)", request.messages.len()),
            |b| b.iter(|| chat_key(black_box(&scope), black_box(&request))),
        );
    }
    let response = completion();
    c.bench_function("replay a stored answer as chunks", |b| {
        b.iter(|| replay_chunks(black_box(&response), true))
    });
    let chunks = replay_chunks(&response, true);
    c.bench_function("assemble a stream into an answer", |b| {
        b.iter(|| {
            let mut assembler = StreamAssembler::default();
            for chunk in &chunks {
                assembler.push(black_box(chunk));
            }
            assembler.finish()
        })
    });
}

fn lookups(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let entry = serde_json::to_vec(
        &json!({"created_at_ms": 1, "tenant": "team-a", "response": completion()}),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded = FjallStore::open(&dir.path().join("db"), 64 << 20, None).unwrap();
    runtime
        .block_on(embedded.put("cache/v1/team-a/chat/-/k", entry.clone(), None))
        .unwrap();
    c.bench_function("embedded lookup (hit)", |b| {
        b.to_async(&runtime).iter(|| async {
            embedded
                .get(black_box("cache/v1/team-a/chat/-/k"))
                .await
                .unwrap()
        })
    });
    c.bench_function("embedded lookup (miss)", |b| {
        b.to_async(&runtime).iter(|| async {
            embedded
                .get(black_box("cache/v1/team-a/chat/-/nope"))
                .await
                .unwrap()
        })
    });

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(mut server) = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
    else {
        eprintln!("redis-server not found: Redis lookups not benchmarked");
        return;
    };
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let redis = RedisStore::new(&format!("redis://127.0.0.1:{port}/0"), "bench:").unwrap();
    runtime
        .block_on(redis.put("cache/v1/team-a/chat/-/k", entry, None))
        .unwrap();
    c.bench_function("redis lookup (hit)", |b| {
        b.to_async(&runtime).iter(|| async {
            redis
                .get(black_box("cache/v1/team-a/chat/-/k"))
                .await
                .unwrap()
        })
    });
    let _ = server.kill();
    let _ = server.wait();
}

criterion_group!(benches, key_hashing, lookups);
criterion_main!(benches);
