//! What the semantic-cache evaluations share: an upstream that answers by group, a gateway with
//! the semantic cache on in front of it, and the way they wait for a write to be indexed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post;
use serde_json::{Value, json};

/// What the upstream answers a prompt of `group` with.
pub fn answer_for(group: &str) -> String {
    format!("The answer for {group}")
}

/// An upstream that echoes the prompt, or, for a prompt `groups` knows, answers with its group's
/// one answer, as an intent-driven bot with templated replies does.
pub async fn upstream(groups: Option<HashMap<String, String>>) -> anyhow::Result<String> {
    let groups = Arc::new(groups);
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |Json(body): Json<Value>| {
            let groups = Arc::clone(&groups);
            async move {
                let prompt = body["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or_default();
                let text = match groups.as_ref().as_ref().and_then(|g| g.get(prompt)) {
                    Some(group) => answer_for(group),
                    None => prompt.to_owned(),
                };
                Json(json!({
                    "id": "chatcmpl-eval", "object": "chat.completion", "created": 0,
                    "model": "eval",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/v1"))
}

/// A real gateway with an empty store of its own, the semantic cache on for route `chat`.
pub struct EvalGateway {
    server: reprise::server::RunningServer,
    base: String,
    client: reqwest::Client,
    _store: tempfile::TempDir,
}

/// One answer and what the cache said about it.
pub struct Answer {
    /// `x-reprise-cache`: `hit`, `semantic-hit`, `miss`, ...
    pub cache: String,
    pub semantic: Option<String>,
    pub similarity: Option<String>,
    pub text: String,
}

impl EvalGateway {
    /// `cache_extra` and `semantic_extra` are more `[cache]` and `[semantic]` settings.
    pub async fn start(
        upstream: &str,
        model_dir: &str,
        cache_extra: &str,
        semantic_extra: &str,
    ) -> anyhow::Result<Self> {
        let store = tempfile::tempdir()?;
        let config = format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            [log]
            level = "warn"
            [auth]
            admin_key = "eval-admin"
            keys = [{{ key = "eval", tenant = "eval" }}]
            [cache]
            enabled = true
            semantic = true
            path = "{path}"
            {cache_extra}
            [semantic]
            model_dir = "{model_dir}"
            {semantic_extra}
            [providers.upstream]
            kind = "openai"
            base_url = "{upstream}"
            [routes.chat]
            targets = [{{ provider = "upstream", model = "eval" }}]
            "#,
            path = store.path().join("store").display(),
        );
        let config = reprise::config::Config::from_toml_str(&config, "eval.toml", &|_| None)?;
        let server = reprise::server::start(&config).await?;
        Ok(Self {
            base: format!("http://{}", server.addr),
            server,
            client: reqwest::Client::new(),
            _store: store,
        })
    }

    /// Asks `prompt` with extra request headers (cache controls).
    pub async fn ask(&self, prompt: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
        let mut request = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth("eval");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .json(&json!({"model": "chat", "messages": [{"role": "user", "content": prompt}]}))
            .send()
            .await?
            .error_for_status()?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (cache, semantic, similarity) = (
            header("x-reprise-cache").unwrap_or_default(),
            header("x-reprise-cache-semantic"),
            header("x-reprise-cache-similarity"),
        );
        let body: Value = response.json().await?;
        Ok(Answer {
            cache,
            semantic,
            similarity,
            text: body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// Entries in the semantic index now.
    pub async fn indexed(&self) -> anyhow::Result<u64> {
        let stats: Value = self
            .client
            .get(format!("{}/admin/cache/stats", self.base))
            .bearer_auth("eval-admin")
            .send()
            .await?
            .json()
            .await?;
        Ok(stats["semantic"]["indexed_entries"].as_u64().unwrap_or(0))
    }

    /// Writes land after the answer: waits (up to 5 s) until the index holds more than `before`,
    /// so the next request sees this one's entry.
    pub async fn wait_indexed_above(&self, before: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.indexed().await? <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// The gateway's Prometheus lines whose name starts with `prefix`.
    pub async fn metrics(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|line| line.starts_with(prefix))
            .map(str::to_owned)
            .collect())
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await?;
        Ok(())
    }
}

pub fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}
