//! The demo provider (`kind = "echo"`): answers from inside the gateway, calling no model, so a
//! fresh install shows routing, the exact cache and the semantic cache without any provider key.
//! Every answer says it came from the demo, so nobody mistakes it for a model's.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{Answer, ChatReply, Provider, ProviderError};
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest, Role};

pub struct Echo;

const LABEL: &str = "[reprise demo: echo provider, no model was called]";

fn answer_text(request: &ChatRequest) -> String {
    let last_user = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .and_then(|m| m.content.as_ref())
        .map(|c| c.joined_text())
        .unwrap_or_default();
    format!("{LABEL} You said: {last_user}")
}

/// Whitespace-separated words: a stand-in for tokens, so usage (and so the cache's
/// tokens-saved figures) is not zero in the demo.
fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn prompt_words(request: &ChatRequest) -> u64 {
    request
        .messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(|c| word_count(&c.joined_text()))
        .sum()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl Provider for Echo {
    async fn chat(
        &self,
        request: &ChatRequest,
        upstream_model: &str,
        stream: bool,
    ) -> Result<ChatReply, ProviderError> {
        let text = answer_text(request);
        let prompt_tokens = prompt_words(request);
        let completion_tokens = word_count(&text);
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        let id = format!("chatcmpl-echo-{}", uuid::Uuid::new_v4().simple());
        let created = now_secs();
        if !stream {
            return Ok(ChatReply::Complete(Answer::from_value(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": upstream_model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }],
                "usage": usage,
            }))));
        }
        let chunk = |delta: Value, finish: Value| {
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": upstream_model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
        };
        let mut chunks = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        // Word by word, as a model streams, so clients see more than one content chunk.
        let mut words = text.split_inclusive(' ').peekable();
        while let Some(word) = words.next() {
            chunks.push(chunk(json!({"content": word}), Value::Null));
            if words.peek().is_none() {
                chunks.push(chunk(json!({}), json!("stop")));
            }
        }
        if request.wants_usage_in_stream() {
            chunks.push(json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": upstream_model,
                "choices": [],
                "usage": usage,
            }));
        }
        Ok(ChatReply::Stream(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn embeddings(
        &self,
        _request: &EmbeddingsRequest,
        _upstream_model: &str,
    ) -> Result<Value, ProviderError> {
        Err(ProviderError::Unsupported("embeddings"))
    }
}
