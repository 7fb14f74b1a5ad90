//! Test harness: a mock upstream and a real gateway on ephemeral loopback ports, per test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod mock_upstream;
pub mod prerequisites;
pub mod redis_server;

use std::time::Duration;

pub use mock_upstream::Mock;
use reprise::config::Config;
use reprise::server::RunningServer;
use serde_json::{Value, json};

pub const KEY_A: &str = "test-key-tenant-a";
pub const KEY_B: &str = "test-key-tenant-b";
pub const ADMIN: &str = "test-admin-key";

pub struct Gateway {
    pub mock: Mock,
    pub server: RunningServer,
    pub base: String,
    pub client: reqwest::Client,
}

/// The provider and auth part of a config whose providers point at `mock`; tests append routes.
pub fn base_config(mock: &Mock) -> String {
    format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        max_body_bytes = 65536
        shutdown_grace = "5s"
        [auth]
        admin_key = "{ADMIN}"
        keys = [{{ key = "{KEY_A}", tenant = "a" }}, {{ key = "{KEY_B}", tenant = "b" }}]
        [providers.mock]
        kind = "openai"
        base_url = "{openai}"
        api_key = "sk-upstream-secret-openai"
        [providers.mock2]
        kind = "openai"
        base_url = "{openai}"
        api_key = "sk-upstream-secret-openai-2"
        [providers.claude]
        kind = "anthropic"
        base_url = "{anthropic}"
        api_key = "sk-ant-upstream-secret"
        [providers.dead]
        kind = "openai"
        base_url = "http://127.0.0.1:1/v1"
        connect_timeout = "1s"
        "#,
        openai = mock.openai_base(),
        anthropic = mock.anthropic_base(),
    )
}

impl Gateway {
    /// Starts a mock upstream and a gateway with `routes` (TOML) appended to the base config.
    pub async fn start(routes: &str) -> Gateway {
        let mock = Mock::start().await;
        Self::start_with(mock, routes).await
    }

    pub async fn start_with(mock: Mock, routes: &str) -> Gateway {
        Self::start_configured(mock, "", routes).await
    }

    /// A gateway with extra `[server]` settings (TOML lines) as well as `routes`.
    pub async fn start_with_server(server: &str, routes: &str) -> Gateway {
        Self::start_configured(Mock::start().await, server, routes).await
    }

    async fn start_configured(mock: Mock, server: &str, routes: &str) -> Gateway {
        let breaker = if routes.contains("[breaker]") {
            ""
        } else {
            "[breaker]\ncooldown = \"30s\"\n"
        };
        let mut base = base_config(&mock);
        if server.contains("max_body_bytes") {
            base = base.replacen("max_body_bytes = 65536", "", 1);
        }
        let base = base.replacen("[server]\n", &format!("[server]\n{server}\n"), 1);
        let text = format!("{base}\n{breaker}{routes}");
        let config =
            Config::from_toml_str(&text, "test.toml", &|_| None).expect("test config is valid");
        let server = reprise::server::start(&config).await.unwrap();
        let base = format!("http://{}", server.addr);
        Gateway {
            mock,
            server,
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn chat(&self, body: Value) -> reqwest::Response {
        self.post("/v1/chat/completions", KEY_A, body).await
    }

    /// A chat completion with extra request headers (cache controls, namespaces, ...).
    pub async fn chat_with(
        &self,
        key: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET path` with `key`, its body as JSON.
    pub async fn get_json(&self, path: &str, key: &str) -> Value {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// An admin API call: its status and its body as JSON (`null` if there is none).
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(ADMIN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Makes a run-time key through the admin API: its id and secret.
    pub async fn create_key(&self, body: Value) -> (String, String) {
        let (status, created) = self
            .admin(reqwest::Method::POST, "/admin/keys", Some(body))
            .await;
        assert_eq!(status, 201, "{created}");
        (
            created["id"].as_str().unwrap().to_owned(),
            created["secret"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn health(&self) -> Value {
        self.get_json("/v1/health/providers", ADMIN).await
    }

    pub async fn breaker_state(&self, target: &str) -> String {
        let health = self.health().await;
        health["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == target)
            .map(|t| t["state"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no target {target} in {health}"))
    }
}

/// Polls `condition` every 20 ms for up to 3 s; panics with `what` if it never holds.
pub async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

pub fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Parses an SSE body into `(event name, data)` pairs.
pub fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    event = Some(name.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.trim_start().to_owned());
                }
            }
            (event, data.join("\n"))
        })
        .collect()
}

/// The chunks of an OpenAI stream body, parsed, without the final `[DONE]`.
pub fn stream_chunks(body: &str) -> Vec<Value> {
    stream_chunks_of(&sse_data(body))
}

/// The chunks among `sse_data` payloads, parsed, without the final `[DONE]`.
pub fn stream_chunks_of(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The text a stream of chunks spells out (choice 0).
pub fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The `data:` payloads of an OpenAI stream, `[DONE]` included.
pub fn sse_data(body: &str) -> Vec<String> {
    sse_events(body).into_iter().map(|(_, d)| d).collect()
}
