//! A mock upstream provider on loopback that speaks OpenAI's and Anthropic's APIs. Its behaviour is
//! chosen by the *upstream model name* the gateway sends, so one mock serves many targets and every
//! test states its scenario in its route config:
//!
//! | model                | behaviour                                                                 |
//! |----------------------|---------------------------------------------------------------------------|
//! | `ok`, anything else  | answers; the text is `echo: <last user text>`                             |
//! | `constant`           | answers every question with the same text, `the one answer`               |
//! | `status-N`           | always answers status N with an error body in the API's shape             |
//! | `flaky-K-N`          | the first K calls answer status N, later calls answer normally            |
//! | `chance-P-N`         | each call answers status N with probability P%, else normally             |
//! | `retry-after-S`      | the first call answers 429 with `Retry-After: S` (seconds), then normally |
//! | `hang`               | never answers                                                             |
//! | `slow-MS`            | waits MS ms before the answer (streams: before the first token)           |
//! | `slowfail-MS`        | waits MS ms, then answers 500                                             |
//! | `drop`               | streams two tokens, then breaks the connection; whole answers break too   |
//! | `drop-early`         | breaks the connection before the first token                              |
//! | `tool`               | answers with a tool call `get_weather({"city":"Paris"})`                  |
//! | `long-stream`        | streams 200 tokens, one every 20 ms                                       |
//! | `pretty`             | answers like `ok`, a whole answer as indented JSON text as OpenAI sends it |
//!
//! It counts calls per model, records request bodies and headers, and counts streams whose client
//! went away before the end (to prove cancellation reaches the upstream).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use parking_lot::Mutex;
use serde_json::{Value, json};

#[derive(Default)]
pub struct MockState {
    calls: Mutex<HashMap<String, usize>>,
    pub requests: Mutex<Vec<(String, HeaderMap, Value)>>,
    pub streams_cancelled: AtomicUsize,
    /// Whole-answer calls whose caller went away while the mock was still working on them.
    pub calls_cancelled: AtomicUsize,
    pub streams_completed: AtomicUsize,
    /// OTLP export calls received on `/v1/traces`.
    pub trace_exports: AtomicUsize,
}

#[derive(Clone)]
pub struct Mock {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
}

impl Mock {
    pub async fn start() -> Mock {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> Mock {
        let state = Arc::new(MockState::default());
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(openai_chat))
            .route("/v1/embeddings", post(openai_embeddings))
            .route("/v1/messages", post(anthropic_messages))
            // An OTLP collector's endpoint that takes and drops spans, for the load benchmark.
            .route("/v1/traces", post(otlp_traces))
            // Tests send multi-megabyte prompts; a real provider takes them too.
            .layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener =
            axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                let _ = tcp.set_nodelay(true);
            });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Mock { addr, state }
    }

    pub fn openai_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn anthropic_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self, model: &str) -> usize {
        self.state.calls.lock().get(model).copied().unwrap_or(0)
    }

    pub fn total_calls(&self) -> usize {
        self.state.calls.lock().values().sum()
    }

    /// The last request body the mock received for `model`.
    pub fn last_request(&self, model: &str) -> Option<(HeaderMap, Value)> {
        self.state
            .requests
            .lock()
            .iter()
            .rev()
            .find(|(m, _, _)| m == model)
            .map(|(_, h, b)| (h.clone(), b.clone()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Api {
    OpenAi,
    Anthropic,
}

enum Plan {
    Answer {
        delay: Duration,
    },
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    Hang,
    Drop {
        after_tokens: usize,
    },
    Tool,
    LongStream,
}

async fn otlp_traces(State(state): State<Arc<MockState>>) -> StatusCode {
    state.trace_exports.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

fn plan(model: &str, call: usize) -> Plan {
    let parts: Vec<&str> = model.split('-').collect();
    match parts.as_slice() {
        ["status", code] => Plan::Status {
            status: code.parse().unwrap(),
            retry_after: None,
        },
        ["flaky", k, code] if call < k.parse::<usize>().unwrap() => Plan::Status {
            status: code.parse().unwrap(),
            retry_after: None,
        },
        ["chance", percent, code]
            if rand::random_range(0..100) < percent.parse::<u32>().unwrap() =>
        {
            Plan::Status {
                status: code.parse().unwrap(),
                retry_after: None,
            }
        }
        ["retry", "after", secs] if call == 0 => Plan::Status {
            status: 429,
            retry_after: Some(secs.parse().unwrap()),
        },
        ["hang"] => Plan::Hang,
        ["slow", ms] => Plan::Answer {
            delay: Duration::from_millis(ms.parse().unwrap()),
        },
        ["drop"] => Plan::Drop { after_tokens: 2 },
        ["drop", "early"] => Plan::Drop { after_tokens: 0 },
        ["tool"] => Plan::Tool,
        ["long", "stream"] => Plan::LongStream,
        _ => Plan::Answer {
            delay: Duration::ZERO,
        },
    }
}

/// `slowfail-MS`: waits MS ms, then fails with 500.
async fn slow_failure(model: &str) -> Option<Plan> {
    let ms: u64 = model.strip_prefix("slowfail-")?.parse().ok()?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Some(Plan::Status {
        status: 500,
        retry_after: None,
    })
}

fn record(state: &MockState, model: &str, headers: &HeaderMap, body: &Value) -> usize {
    let mut calls = state.calls.lock();
    let count = calls.entry(model.to_owned()).or_insert(0);
    let call = *count;
    *count += 1;
    state
        .requests
        .lock()
        .push((model.to_owned(), headers.clone(), body.clone()));
    call
}

fn last_user_text(body: &Value) -> String {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let last = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .cloned()
        .unwrap_or_default();
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn error_response(api: Api, status: u16, retry_after: Option<u64>) -> Response {
    let body = match api {
        Api::OpenAi => {
            json!({"error": {"message": format!("mock error {status}"), "type": "mock_error", "param": null, "code": format!("mock_{status}")}})
        }
        Api::Anthropic => {
            json!({"type": "error", "error": {"type": "mock_error", "message": format!("mock error {status}")}})
        }
    };
    let mut response = (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    response
}

/// Counts a stream as cancelled if it is dropped before it ran to the end.
struct StreamGuard {
    state: Arc<MockState>,
    completed: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.completed {
            self.state.streams_completed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.state.streams_cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Counts a whole-answer call as cancelled when its handler is dropped before it finished.
struct CallGuard(Arc<MockState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.calls_cancelled.fetch_add(1, Ordering::SeqCst);
    }
}

enum Piece {
    Data(String),
    Sleep(Duration),
    Break,
}

fn sse_body(state: Arc<MockState>, pieces: Vec<Piece>) -> Response {
    let stream = async_stream::stream! {
        let mut guard = StreamGuard { state, completed: false };
        for piece in pieces {
            match piece {
                Piece::Data(text) => yield Ok::<Bytes, std::io::Error>(Bytes::from(text)),
                Piece::Sleep(d) if d.is_zero() => {}
                Piece::Sleep(d) => tokio::time::sleep(d).await,
                Piece::Break => {
                    guard.completed = true;
                    yield Err(std::io::Error::other("mock breaks the connection"));
                    return;
                }
            }
        }
        guard.completed = true;
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn answer_text(model: &str, body: &Value) -> String {
    if model == "constant" {
        "the one answer".into()
    } else {
        format!("echo: {}", last_user_text(body))
    }
}

async fn openai_chat(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    let model = body["model"].as_str().unwrap_or("").to_owned();
    let call = record(&state, &model, &headers, &body);
    let stream = body["stream"] == true;
    let include_usage = body["stream_options"]["include_usage"] == true;
    let text = answer_text(&model, &body);
    let plan = match slow_failure(&model).await {
        Some(failure) => failure,
        None => plan(&model, call),
    };
    if !stream {
        return match plan {
            Plan::Status { status, retry_after } => error_response(Api::OpenAi, status, retry_after),
            Plan::Hang => {
                let _guard = CallGuard(Arc::clone(&state));
                tokio::time::sleep(Duration::from_secs(3600)).await;
                StatusCode::OK.into_response()
            }
            Plan::Drop { .. } => sse_body(state, vec![Piece::Data("{\"id\": \"chatcmpl-".into()), Piece::Break]),
            Plan::Answer { delay } => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let answer = openai_completion(&model, json!({"role": "assistant", "content": text, "refusal": null}), "stop");
                if model == "pretty" {
                    return pretty_json(&answer);
                }
                axum::Json(answer).into_response()
            }
            Plan::LongStream => axum::Json(openai_completion(&model, json!({"role": "assistant", "content": text}), "stop"))
                .into_response(),
            Plan::Tool => axum::Json(openai_completion(
                &model,
                json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}),
                "tool_calls",
            ))
            .into_response(),
        };
    }
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        Piece::Data(format!("data: {c}\n\n"))
    };
    let mut pieces = Vec::new();
    let tokens: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
    match plan {
        Plan::Status {
            status,
            retry_after,
        } => return error_response(Api::OpenAi, status, retry_after),
        Plan::Hang => {
            pieces.push(Piece::Sleep(Duration::from_secs(3600)));
        }
        Plan::Drop { after_tokens } => {
            if after_tokens > 0 {
                pieces.push(chunk(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                ));
            }
            for token in tokens.iter().take(after_tokens) {
                pieces.push(chunk(json!({"content": token}), Value::Null));
            }
            // Let hyper flush what was sent: an abort discards data still in its buffer.
            pieces.push(Piece::Sleep(Duration::from_millis(50)));
            pieces.push(Piece::Break);
        }
        Plan::Answer { delay } => {
            // The role chunk comes at once, as real providers send it; the first token is late.
            pieces.push(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ));
            pieces.push(Piece::Sleep(delay));
            for token in &tokens {
                pieces.push(chunk(json!({"content": token}), Value::Null));
            }
            pieces.push(chunk(json!({}), json!("stop")));
        }
        Plan::LongStream => {
            pieces.push(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ));
            for i in 0..200 {
                pieces.push(chunk(json!({"content": format!("t{i} ")}), Value::Null));
                pieces.push(Piece::Sleep(Duration::from_millis(20)));
            }
            pieces.push(chunk(json!({}), json!("stop")));
        }
        Plan::Tool => {
            pieces.push(chunk(json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}), Value::Null));
            pieces.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                Value::Null,
            ));
            pieces.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                Value::Null,
            ));
            pieces.push(chunk(json!({}), json!("tool_calls")));
        }
    }
    if include_usage {
        let u = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}});
        pieces.push(Piece::Data(format!("data: {u}\n\n")));
    }
    pieces.push(Piece::Data("data: [DONE]\n\n".into()));
    sse_body(state, pieces)
}

/// The exact text of the `pretty` model's whole answer to `text`.
pub fn pretty_answer_text(text: &str) -> String {
    let answer = openai_completion(
        "pretty",
        json!({"role": "assistant", "content": format!("echo: {text}"), "refusal": null}),
        "stop",
    );
    format!("{}\n", serde_json::to_string_pretty(&answer).unwrap())
}

fn pretty_json(answer: &Value) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        format!("{}\n", serde_json::to_string_pretty(answer).unwrap()),
    )
        .into_response()
}

fn openai_completion(model: &str, message: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        "system_fingerprint": "fp_mock",
    })
}

async fn openai_embeddings(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    let model = body["model"].as_str().unwrap_or("").to_owned();
    let call = record(&state, &model, &headers, &body);
    if let Plan::Status {
        status,
        retry_after,
    } = plan(&model, call)
    {
        return error_response(Api::OpenAi, status, retry_after);
    }
    axum::Json(json!({
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }))
    .into_response()
}

async fn anthropic_messages(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    let model = body["model"].as_str().unwrap_or("").to_owned();
    let call = record(&state, &model, &headers, &body);
    if body.get("max_tokens").is_none() {
        return error_response(Api::Anthropic, 400, None);
    }
    let text = answer_text(&model, &body);
    let plan = match slow_failure(&model).await {
        Some(failure) => failure,
        None => plan(&model, call),
    };
    let stream = body["stream"] == true;
    let usage = json!({"input_tokens": 11, "output_tokens": 7});
    if !stream {
        return match plan {
            Plan::Status { status, retry_after } => error_response(Api::Anthropic, status, retry_after),
            Plan::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                StatusCode::OK.into_response()
            }
            Plan::Tool => axum::Json(json!({
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "Checking."},
                            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
                "stop_reason": "tool_use", "stop_sequence": null, "usage": usage,
            }))
            .into_response(),
            Plan::Answer { delay } => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                axum::Json(json!({
                    "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn", "stop_sequence": null, "usage": usage,
                }))
                .into_response()
            }
            Plan::Drop { .. } | Plan::LongStream => sse_body(state, vec![Piece::Break]),
        };
    }
    let event = |name: &str, data: Value| Piece::Data(format!("event: {name}\ndata: {data}\n\n"));
    let mut pieces = vec![event(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
               "model": model, "content": [], "stop_reason": null, "usage": {"input_tokens": 11, "output_tokens": 1}}}),
    )];
    match plan {
        Plan::Status {
            status,
            retry_after,
        } => return error_response(Api::Anthropic, status, retry_after),
        Plan::Hang => pieces.push(Piece::Sleep(Duration::from_secs(3600))),
        Plan::Drop { .. } | Plan::LongStream => {
            pieces.push(event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
            pieces.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "echo"}})));
            pieces.push(Piece::Sleep(Duration::from_millis(50)));
            pieces.push(Piece::Break);
        }
        Plan::Answer { delay } => {
            pieces.push(event("ping", json!({"type": "ping"})));
            pieces.push(Piece::Sleep(delay));
            pieces.push(event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
            for token in text.split_inclusive(' ') {
                pieces.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}})));
            }
            pieces.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            pieces.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 7}})));
            pieces.push(event("message_stop", json!({"type": "message_stop"})));
        }
        Plan::Tool => {
            pieces.push(event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}})));
            pieces.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Paris\"}"}})));
            pieces.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            pieces.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 7}})));
            pieces.push(event("message_stop", json!({"type": "message_stop"})));
        }
    }
    sse_body(state, pieces)
}
