//! OpenAI's chat-completions and embeddings request shapes.
//!
//! The fields the gateway reasons about are typed (so a wrong type is a 400 naming the field, and
//! the cache key can destructure them later); everything else rides along in `extra` and is sent
//! upstream untouched, in the order the client wrote it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatRequest {
    // Both may be left out when a prompt version supplies them; `validate` runs after that.
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            extra: Map::new(),
        }
    }
}

/// A message's content: a string, or a list of typed parts (`text`, `image_url`, `input_audio`, ...).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Map<String, Value>>),
}

impl Content {
    /// The concatenated text of the content, ignoring non-text parts.
    pub fn joined_text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

impl ChatRequest {
    /// Checks what serde's types cannot express. Errors name the field, as OpenAI's `param` does.
    pub fn validate(&self) -> Result<(), crate::error::ApiError> {
        use crate::error::ApiError;
        if self.model.is_empty() {
            return Err(ApiError::invalid(
                "`model` is required (a missing or empty model names no route)",
                Some("model"),
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "`messages` is required and must contain at least one message (or name a `prompt`)",
                Some("messages"),
            ));
        }
        for (i, message) in self.messages.iter().enumerate() {
            if message.role == Role::Tool && message.tool_call_id.is_none() {
                return Err(ApiError::invalid(
                    "a message with role `tool` needs `tool_call_id`",
                    Some(&format!("messages[{i}].tool_call_id")),
                ));
            }
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::invalid(
                format!("`temperature` must be between 0 and 2, got {t}"),
                Some("temperature"),
            ));
        }
        if let Some(p) = self.top_p
            && !(0.0..=1.0).contains(&p)
        {
            return Err(ApiError::invalid(
                format!("`top_p` must be between 0 and 1, got {p}"),
                Some("top_p"),
            ));
        }
        if self.n == Some(0) {
            return Err(ApiError::invalid("`n` must be at least 1", Some("n")));
        }
        if self.stream_options.is_some() && self.stream != Some(true) {
            return Err(ApiError::invalid(
                "`stream_options` is only allowed when `stream` is true",
                Some("stream_options"),
            ));
        }
        Ok(())
    }

    pub fn wants_stream(&self) -> bool {
        self.stream == Some(true)
    }

    pub fn wants_usage_in_stream(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A string, a list of strings, a token list, or a list of token lists.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

impl EmbeddingsRequest {
    pub fn validate(&self) -> Result<(), crate::error::ApiError> {
        use crate::error::ApiError;
        let empty = match &self.input {
            EmbeddingInput::One(s) => s.is_empty(),
            EmbeddingInput::Many(v) => v.is_empty() || v.iter().any(String::is_empty),
            EmbeddingInput::Tokens(v) => v.is_empty(),
            EmbeddingInput::TokenBatches(v) => v.is_empty() || v.iter().any(Vec::is_empty),
        };
        if empty {
            return Err(ApiError::invalid(
                "`input` must not be empty",
                Some("input"),
            ));
        }
        Ok(())
    }
}

/// Whether a streamed chunk carries output (text, a tool call, a refusal or a finish reason) rather
/// than only the opening role announcement. Time-to-first-token is measured to the first such chunk,
/// because some upstreams send the role chunk at once and then stall.
/// A stream's closing usage chunk (`choices` empty, `usage` set), which only clients that asked
/// for `stream_options.include_usage` receive.
pub fn is_usage_only_chunk(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && chunk.get("usage").is_some_and(|u| !u.is_null())
}

pub fn chunk_carries_output(chunk: &Value) -> bool {
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
        return chunk.get("usage").is_some_and(|u| !u.is_null());
    };
    choices.iter().any(|choice| {
        if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
            return true;
        }
        let Some(delta) = choice.get("delta") else {
            return false;
        };
        let non_empty = |field: &str| match delta.get(field) {
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Null) | None => false,
            Some(_) => true,
        };
        non_empty("content")
            || non_empty("tool_calls")
            || non_empty("refusal")
            || non_empty("reasoning_content")
            || non_empty("function_call")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_survive_a_round_trip_in_order() {
        let body = json!({
            "model": "m", "messages": [{"role": "user", "content": "hi", "cache_control": {"x": 1}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"b": 1, "a": 2}}},
            "metadata": {"k": "v"}, "reasoning_effort": "low"
        });
        let request: ChatRequest = serde_json::from_value(body.clone()).unwrap();
        let back = serde_json::to_value(&request).unwrap();
        assert_eq!(back, body);
        assert_eq!(
            serde_json::to_string(&back["response_format"]).unwrap(),
            r#"{"type":"json_schema","json_schema":{"name":"s","schema":{"b":1,"a":2}}}"#
        );
    }

    #[test]
    fn role_only_chunk_is_not_output() {
        let role =
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
        let text = json!({"choices": [{"index": 0, "delta": {"content": "Hi"}}]});
        let finish = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        assert!(!chunk_carries_output(&role));
        assert!(chunk_carries_output(&text));
        assert!(chunk_carries_output(&finish));
    }
}
