//! The OpenAI-compatible surface, driven over HTTP against a real gateway and a mock upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{ADMIN, Gateway, KEY_A, header, sse_data, streamed_text, user};
use serde_json::{Value, json};

const ROUTES: &str = r#"
    [routes.chat]
    targets = [{ provider = "mock", model = "ok" }]
    [routes.tools]
    targets = [{ provider = "mock", model = "tool" }]
    [routes.embed]
    targets = [{ provider = "mock", model = "embed-ok" }]
"#;

#[tokio::test]
async fn chat_completion_is_passed_through_and_reports_how_it_was_served() {
    let gw = Gateway::start(ROUTES).await;
    let request = json!({
        "model": "chat",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
        "temperature": 0.3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "metadata": {"trace": "abc"},
        "reasoning_effort": "low",
        "user": "end-user-1"
    });
    let response = gw.chat(request.clone()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-reprise-route"), Some("chat"));
    assert_eq!(header(&response, "x-reprise-target"), Some("mock/ok"));
    assert_eq!(header(&response, "x-reprise-attempts"), Some("1"));
    assert!(header(&response, "x-request-id").is_some_and(|id| id.len() >= 32));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "echo: hello there"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 18);
    assert_eq!(
        body["system_fingerprint"], "fp_mock",
        "unknown response fields survive"
    );

    let (headers, upstream) = gw.mock.last_request("ok").unwrap();
    assert_eq!(headers["authorization"], "Bearer sk-upstream-secret-openai");
    let mut expected = request;
    expected["model"] = json!("ok");
    assert_eq!(
        upstream, expected,
        "everything but the model is forwarded untouched"
    );
}

#[tokio::test]
async fn tool_calls_come_back_untouched() {
    let gw = Gateway::start(ROUTES).await;
    let body: Value = gw
        .chat(json!({"model": "tools", "messages": user("weather?")}))
        .await
        .json()
        .await
        .unwrap();
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn streaming_sends_sse_chunks_usage_and_done() {
    let gw = Gateway::start(ROUTES).await;
    let response = gw
        .chat(json!({"model": "chat", "messages": user("one two three"), "stream": true, "stream_options": {"include_usage": true}}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&response, "x-reprise-target"), Some("mock/ok"));
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks = common::stream_chunks_of(&data);
    let text = streamed_text(&chunks);
    assert_eq!(text, "echo: one two three");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 18);
    let (_, upstream) = gw.mock.last_request("ok").unwrap();
    assert_eq!(upstream["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn embeddings_and_models() {
    let gw = Gateway::start(ROUTES).await;
    let response = gw
        .post(
            "/v1/embeddings",
            KEY_A,
            json!({"model": "embed", "input": ["a b"]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"][0]["embedding"], json!([0.1, -0.2, 0.3]));
    let (_, upstream) = gw.mock.last_request("embed-ok").unwrap();
    assert_eq!(upstream["input"], json!(["a b"]));

    let models: Value = gw.get_json("/v1/models", KEY_A).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "embed", "tools"]);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["object"], "model");
}

#[tokio::test]
async fn client_request_id_is_echoed() {
    let gw = Gateway::start(ROUTES).await;
    let response = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-request-id", "my-trace-123")
        .json(&json!({"model": "chat", "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "x-request-id"), Some("my-trace-123"));
}

async fn assert_openai_error(
    response: reqwest::Response,
    status: u16,
    param: Option<&str>,
    message_part: &str,
) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "missing {field} in {body}");
    }
    assert_eq!(error["param"].as_str(), param, "{body}");
    assert!(
        error["message"].as_str().unwrap().contains(message_part),
        "{message_part:?} not in {body}"
    );
    body
}

#[tokio::test]
async fn authentication_is_required_and_checked() {
    let gw = Gateway::start(ROUTES).await;
    let body = json!({"model": "chat", "messages": user("hi")});
    let none = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        header(&none, "x-request-id").is_some(),
        "rejections carry a request id"
    );
    let error = assert_openai_error(none, 401, None, "API key").await;
    assert_eq!(error["error"]["code"], "invalid_api_key");
    let wrong = gw
        .post("/v1/chat/completions", "not-a-key", body.clone())
        .await;
    assert_openai_error(wrong, 401, None, "API key").await;
    let anthropic_style = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .header("x-api-key", KEY_A)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic_style.status(), 200);
    assert_eq!(
        gw.mock.calls("ok"),
        1,
        "rejected requests never reach the upstream"
    );

    // The admin endpoint wants the admin key, not a tenant key.
    let as_tenant = gw
        .client
        .get(gw.url("/v1/health/providers"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(as_tenant.status(), 403);
    let as_admin = gw
        .client
        .get(gw.url("/v1/health/providers"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(as_admin.status(), 200);
}

#[tokio::test]
async fn bad_inputs_get_openai_errors_that_name_the_field() {
    let gw = Gateway::start(ROUTES).await;
    let raw = |body: Vec<u8>| {
        gw.client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_openai_error(
        raw(b"{\"model\": ".to_vec()).await.unwrap(),
        400,
        None,
        "not valid JSON",
    )
    .await;
    assert_openai_error(
        raw(b"[1, 2]".to_vec()).await.unwrap(),
        400,
        None,
        "invalid request",
    )
    .await;
    assert_openai_error(raw(b"{\"model\": \"chat\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec()).await.unwrap(), 400, None, "UTF-8").await;
    assert_openai_error(
        gw.chat(json!({"messages": user("hi")})).await,
        400,
        Some("model"),
        "`model` is required",
    )
    .await;
    assert_openai_error(
        gw.chat(json!({"model": "chat"})).await,
        400,
        Some("messages"),
        "`messages` is required",
    )
    .await;
    assert_openai_error(
        gw.chat(json!({"model": "chat", "messages": []})).await,
        400,
        Some("messages"),
        "at least one",
    )
    .await;
    assert_openai_error(
        gw.chat(json!({"model": 5, "messages": user("hi")})).await,
        400,
        Some("model"),
        "invalid type",
    )
    .await;
    assert_openai_error(
        gw.chat(json!({"model": "chat", "messages": [{"role": "bot", "content": "x"}]}))
            .await,
        400,
        Some("messages[0].role"),
        "unknown variant",
    )
    .await;
    assert_openai_error(
        gw.chat(json!({"model": "chat", "messages": user("hi"), "temperature": "hot"}))
            .await,
        400,
        Some("temperature"),
        "invalid type",
    )
    .await;
    assert_openai_error(
        gw.chat(json!({"model": "chat", "messages": user("hi"), "temperature": 3.5}))
            .await,
        400,
        Some("temperature"),
        "between 0 and 2",
    )
    .await;
    assert_openai_error(
        gw.chat(json!({"model": "chat", "messages": user("hi"), "stream": "yes"}))
            .await,
        400,
        Some("stream"),
        "invalid type",
    )
    .await;
    let unknown = assert_openai_error(
        gw.chat(json!({"model": "gpt-9", "messages": user("hi")}))
            .await,
        404,
        Some("model"),
        "gpt-9",
    )
    .await;
    assert_eq!(unknown["error"]["code"], "model_not_found");
    let huge = "x".repeat(70_000);
    let too_large = assert_openai_error(
        gw.chat(json!({"model": "chat", "messages": user(&huge)}))
            .await,
        413,
        None,
        "larger than",
    )
    .await;
    assert_eq!(too_large["error"]["code"], "request_too_large");
    assert_openai_error(
        gw.post(
            "/v1/embeddings",
            KEY_A,
            json!({"model": "embed", "input": ""}),
        )
        .await,
        400,
        Some("input"),
        "empty",
    )
    .await;

    let wrong_method = gw
        .client
        .get(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_openai_error(wrong_method, 405, None, "method").await;
    let wrong_path = gw
        .client
        .get(gw.url("/v1/nope"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_openai_error(wrong_path, 404, None, "unknown endpoint").await;
    assert_eq!(
        gw.mock.total_calls(),
        0,
        "no bad request reached the upstream"
    );
}

#[tokio::test]
async fn provider_keys_never_appear_in_responses() {
    let gw = Gateway::start(
        r#"
        [routes.broken]
        targets = [{ provider = "mock", model = "status-401" }, { provider = "mock2", model = "status-503" }]
        "#,
    )
    .await;
    let response = gw
        .chat(json!({"model": "broken", "messages": user("hi")}))
        .await;
    let text = response.text().await.unwrap();
    let health = gw.health().await.to_string();
    for secret in ["sk-upstream-secret", "sk-ant-upstream-secret"] {
        assert!(!text.contains(secret), "{text}");
        assert!(!health.contains(secret), "{health}");
    }
}

#[tokio::test]
async fn metrics_count_requests_and_attempts() {
    let gw = Gateway::start(ROUTES).await;
    gw.chat(json!({"model": "chat", "messages": user("hi")}))
        .await;
    gw.chat(json!({"model": "nope", "messages": user("hi")}))
        .await;
    let text = gw.metrics().await;
    assert!(
        text.contains(
            r#"reprise_requests_total{endpoint="chat_completions",route="chat",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"reprise_requests_total{endpoint="chat_completions",route="-",status="404"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"reprise_upstream_attempts_total{target="mock/ok",outcome="ok"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("reprise_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains(r#"reprise_breaker_state{target="mock/ok"} 0"#),
        "{text}"
    );
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_too() {
    let gw = Gateway::start(ROUTES).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&json!({"model": "chat", "messages": user("over h2")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: over h2");
}
