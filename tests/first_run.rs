//! A newcomer's first run: the shipped `config/reprise.toml`, no provider key at all. The README's
//! first request, sent twice and then reworded, must show a miss, an exact hit and a semantic hit
//! from the built-in demo route; a route whose providers have no key must say so in its 502,
//! without an upstream address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::header;
use reprise::config::Config;
use serde_json::{Value, json};

const KEY: &str = "first-run-key";
const ADMIN: &str = "first-run-admin";

fn shipped_config(data: &std::path::Path, model_dir: &str) -> Config {
    let text = std::fs::read_to_string("config/reprise.toml").unwrap();
    let data = data.display().to_string();
    let model_dir = model_dir.to_owned();
    // Exactly what a fresh shell has: the gateway's own keys (the Makefile's defaults), and no
    // provider key.
    let env = move |name: &str| match name {
        "REPRISE_LISTEN" => Some("127.0.0.1:0".to_owned()),
        "REPRISE_API_KEY" => Some(KEY.to_owned()),
        "REPRISE_ADMIN_KEY" => Some(ADMIN.to_owned()),
        "REPRISE_DATA_DIR" => Some(data.clone()),
        "REPRISE_EMBED_MODEL_DIR" => Some(model_dir.clone()),
        _ => None,
    };
    Config::from_toml_str(&text, "config/reprise.toml", &env).unwrap()
}

async fn ask(client: &reqwest::Client, base: &str, model: &str, text: &str) -> reqwest::Response {
    client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap()
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn the_shipped_config_shows_a_miss_an_exact_hit_and_a_semantic_hit_without_provider_keys() {
    let model_dir = common::prerequisites::embed_model_dir();
    let data = tempfile::tempdir().unwrap();
    let config = shipped_config(data.path(), &model_dir);
    let warnings = config.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("provider openai has no API key")),
        "{warnings:?}"
    );
    let server = reprise::server::start(&config).await.unwrap();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();

    let first = ask(&client, &base, "demo", "How do I reset my password?").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-reprise-cache"), Some("miss"));
    assert_eq!(header(&first, "x-reprise-target"), Some("echo/echo"));
    let body: Value = first.json().await.unwrap();
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("demo") && answer.contains("How do I reset my password?"));

    // The answer is stored off the response path: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = ask(&client, &base, "demo", "How do I reset my password?").await;
        if header(&again, "x-reprise-cache") == Some("hit") {
            let cached: Value = again.json().await.unwrap();
            assert_eq!(cached, body, "an exact hit is the stored answer");
            break;
        }
        assert!(Instant::now() < deadline, "no exact hit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The semantic entry lands off the response path, possibly after the exact one: wait for it,
    // or the reworded question would miss and then be an exact hit of its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats: Value = client
            .get(format!("{base}/admin/cache/stats"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if stats["semantic"]["indexed_entries"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the semantic entry never landed: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reworded = ask(&client, &base, "demo", "How can I reset my password?").await;
        assert_eq!(reworded.status(), 200);
        if header(&reworded, "x-reprise-cache") == Some("semantic-hit") {
            assert!(header(&reworded, "x-reprise-cache-similarity").is_some());
            let cached: Value = reworded.json().await.unwrap();
            assert_eq!(cached["choices"], body["choices"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no semantic hit: {:?}",
            header(&reworded, "x-reprise-cache-semantic")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let keyless = ask(&client, &base, "chat-default", "Hello").await;
    assert_eq!(keyless.status(), 502);
    let error: Value = keyless.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no API key configured for provider openai")
            && message.contains("anthropic"),
        "{message}"
    );
    assert!(
        !message.contains("127.0.0.1"),
        "no upstream address: {message}"
    );
    server.shutdown_handle().trigger();
}
