//! Anthropic's shape in both directions: an OpenAI client served by an Anthropic upstream, and an
//! Anthropic client (`/v1/messages`) served by an OpenAI-compatible upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Gateway, KEY_A, header, sse_data, sse_events, streamed_text, user};
use serde_json::{Value, json};

const ROUTES: &str = r#"
    [routes.claude]
    targets = [{ provider = "claude", model = "claude-ok" }]
    [routes.claude-tool]
    targets = [{ provider = "claude", model = "tool" }]
    [routes.claude-drop]
    targets = [{ provider = "claude", model = "drop" }]
    [routes.claude-bad]
    targets = [{ provider = "claude", model = "status-400" }]
    [routes.gpt]
    targets = [{ provider = "mock", model = "ok" }]
    [routes.gpt-tool]
    targets = [{ provider = "mock", model = "tool" }]
"#;

#[tokio::test]
async fn openai_client_is_served_by_an_anthropic_upstream() {
    let gw = Gateway::start(ROUTES).await;
    let response = gw
        .chat(json!({
            "model": "claude",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "bonjour"}],
            "max_tokens": 64, "stop": ["\n\n"], "user": "u-42"
        }))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-reprise-target"),
        Some("claude/claude-ok")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: bonjour");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, "prompt_tokens_details": {"cached_tokens": 0}})
    );

    let (headers, upstream) = gw.mock.last_request("claude-ok").unwrap();
    assert_eq!(headers["x-api-key"], "sk-ant-upstream-secret");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert!(headers.get("authorization").is_none());
    assert_eq!(upstream["system"], "Be brief.");
    assert_eq!(upstream["max_tokens"], 64);
    assert_eq!(upstream["stop_sequences"], json!(["\n\n"]));
    assert_eq!(upstream["metadata"]["user_id"], "u-42");
    assert_eq!(
        upstream["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "bonjour"}]}])
    );
}

#[tokio::test]
async fn anthropic_tool_use_becomes_openai_tool_calls_whole_and_streamed() {
    let gw = Gateway::start(ROUTES).await;
    let body: Value = gw
        .chat(json!({"model": "claude-tool", "messages": user("weather?")}))
        .await
        .json()
        .await
        .unwrap();
    let message = &body["choices"][0]["message"];
    assert_eq!(message["content"], "Checking.");
    assert_eq!(message["tool_calls"][0]["id"], "toolu_1");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Paris\"}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");

    let response = gw
        .chat(json!({"model": "claude-tool", "messages": user("weather?"), "stream": true}))
        .await;
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks = common::stream_chunks_of(&data);
    let arguments: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, "{\"city\": \"Paris\"}");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
}

#[tokio::test]
async fn anthropic_stream_becomes_an_openai_stream_with_usage() {
    let gw = Gateway::start(ROUTES).await;
    let response = gw
        .chat(json!({"model": "claude", "messages": user("a b c"), "stream": true, "stream_options": {"include_usage": true}}))
        .await;
    assert_eq!(response.status(), 200);
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks = common::stream_chunks_of(&data);
    let text = streamed_text(&chunks);
    assert_eq!(text, "echo: a b c");
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 18);
}

#[tokio::test]
async fn a_broken_anthropic_stream_ends_with_an_error_event() {
    let gw = Gateway::start(ROUTES).await;
    let response = gw
        .chat(json!({"model": "claude-drop", "messages": user("x"), "stream": true}))
        .await;
    let data = sse_data(&response.text().await.unwrap());
    assert!(!data.iter().any(|d| d == "[DONE]"), "{data:?}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted");
}

#[tokio::test]
async fn an_anthropic_rejection_reaches_the_openai_client_as_is() {
    let gw = Gateway::start(ROUTES).await;
    let response = gw
        .chat(json!({"model": "claude-bad", "messages": user("x")}))
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "mock error 400");
    assert_eq!(body["error"]["type"], "mock_error");
}

async fn messages(gw: &Gateway, body: Value) -> reqwest::Response {
    gw.client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", KEY_A)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn anthropic_client_is_served_by_an_openai_upstream() {
    let gw = Gateway::start(ROUTES).await;
    let response = messages(
        &gw,
        json!({"model": "gpt", "max_tokens": 100, "system": "Be brief.",
               "messages": [{"role": "user", "content": [{"type": "text", "text": "hola"}]}],
               "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-reprise-target"), Some("mock/ok"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(
        body["content"],
        json!([{"type": "text", "text": "echo: hola"}])
    );
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(
        body["usage"],
        json!({"input_tokens": 11, "output_tokens": 7})
    );
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));

    let (_, upstream) = gw.mock.last_request("ok").unwrap();
    assert_eq!(
        upstream["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hola"}])
    );
    assert_eq!(upstream["max_tokens"], 100);
    assert_eq!(upstream["stop"], json!(["END"]));
    assert_eq!(upstream["user"], "u-1");
}

#[tokio::test]
async fn anthropic_client_streams_and_gets_tool_use() {
    let gw = Gateway::start(ROUTES).await;
    let response = messages(&gw, json!({"model": "gpt", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "x y"}]})).await;
    assert_eq!(response.status(), 200);
    let events = sse_events(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    let text: String = events
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("content_block_delta"))
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["delta"]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(text, "echo: x y");
    let delta: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(
        delta["usage"]["output_tokens"], 7,
        "usage reaches Anthropic clients"
    );

    let body: Value = messages(&gw, json!({"model": "gpt-tool", "max_tokens": 50, "messages": [{"role": "user", "content": "weather"}],
                                           "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["stop_reason"], "tool_use");
    assert_eq!(
        body["content"][0],
        json!({"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}})
    );
    let (_, upstream) = gw.mock.last_request("tool").unwrap();
    assert_eq!(
        upstream["tools"][0]["function"]["parameters"],
        json!({"type": "object"})
    );
}

#[tokio::test]
async fn anthropic_clients_get_anthropic_shaped_errors() {
    let gw = Gateway::start(ROUTES).await;
    let unauthenticated = gw
        .client
        .post(gw.url("/v1/messages"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let body: Value = unauthenticated.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");

    let missing = messages(
        &gw,
        json!({"model": "gpt", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(missing.status(), 400);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{body}"
    );

    let unknown = messages(
        &gw,
        json!({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"]["type"],
        "not_found_error"
    );
}
