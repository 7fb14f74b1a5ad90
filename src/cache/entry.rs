//! What a cache entry holds, and the conversions that let one entry serve both a whole answer
//! and a stream: a streamed answer is assembled into a complete `chat.completion` before it is
//! stored, and an entry is replayed as a well-formed chunk stream when a stream is asked for.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// An exact-cache entry, borrowing its parts from the text it is written to or read from: the
/// answer is kept as its JSON text both ways, so it is never parsed into a tree to be stored or
/// served.
#[derive(Debug, Serialize, Deserialize)]
pub struct Entry<'a> {
    /// Unix milliseconds when the answer was stored.
    pub created_at_ms: u64,
    pub ttl_secs: Option<u64>,
    #[serde(borrow)]
    pub tenant: Cow<'a, str>,
    #[serde(borrow)]
    pub route: Cow<'a, str>,
    /// The target that produced the answer.
    #[serde(borrow)]
    pub target: Cow<'a, str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The complete `chat.completion` object.
    #[serde(borrow)]
    pub response: &'a RawValue,
}

impl Entry<'_> {
    /// The entry's stored text with `answer` (an answer's JSON text, already read as JSON when it
    /// arrived) as its `response`: the text is copied in, not scanned again to be written out.
    /// `response` is the last field, so the entry is written with a `null` there that the answer
    /// then replaces.
    pub fn into_bytes_answering(mut self, answer: &[u8]) -> Option<Vec<u8>> {
        const PLACEHOLDER: &[u8] = b"null}";
        if answer.trim_ascii().is_empty() {
            return None;
        }
        self.response = RawValue::NULL;
        let mut bytes = serde_json::to_vec(&self).ok()?;
        if !bytes.ends_with(PLACEHOLDER) {
            return None;
        }
        bytes.truncate(bytes.len() - PLACEHOLDER.len());
        bytes.reserve_exact(answer.len() + 1);
        bytes.extend_from_slice(answer);
        bytes.push(b'}');
        Some(bytes)
    }
}

#[derive(Debug, Default)]
struct ChoiceBuilder {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<Map<String, Value>>,
    finish_reason: Option<Value>,
}

/// Folds a chunk stream into the `chat.completion` it stands for.
#[derive(Debug, Default)]
pub struct StreamAssembler {
    head: Map<String, Value>,
    choices: Vec<ChoiceBuilder>,
    usage: Option<Value>,
}

impl StreamAssembler {
    pub fn push(&mut self, chunk: &Value) {
        if self.head.is_empty() {
            for field in [
                "id",
                "created",
                "model",
                "system_fingerprint",
                "service_tier",
            ] {
                if let Some(value) = chunk.get(field) {
                    self.head.insert(field.to_owned(), value.clone());
                }
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage.clone());
        }
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if index >= 128 {
                continue;
            }
            if self.choices.len() <= index {
                self.choices.resize_with(index + 1, ChoiceBuilder::default);
            }
            let builder = &mut self.choices[index];
            if let Some(reason) = choice.get("finish_reason").filter(|f| !f.is_null()) {
                builder.finish_reason = Some(reason.clone());
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            if let Some(role) = delta.get("role").and_then(Value::as_str) {
                builder.role = Some(role.to_owned());
            }
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                builder
                    .content
                    .get_or_insert_with(String::new)
                    .push_str(text);
            }
            if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
                builder
                    .refusal
                    .get_or_insert_with(String::new)
                    .push_str(text);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let at = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                if at >= 128 {
                    continue;
                }
                if builder.tool_calls.len() <= at {
                    builder.tool_calls.resize_with(at + 1, Map::new);
                }
                let slot = &mut builder.tool_calls[at];
                for field in ["id", "type"] {
                    if let Some(value) = call.get(field).filter(|v| !v.is_null()) {
                        slot.insert(field.to_owned(), value.clone());
                    }
                }
                let function = slot
                    .entry("function")
                    .or_insert_with(|| json!({"name": "", "arguments": ""}));
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    function["name"] = name.into();
                }
                if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    let joined = format!("{}{args}", function["arguments"].as_str().unwrap_or(""));
                    function["arguments"] = joined.into();
                }
            }
        }
    }

    pub fn finish(self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let mut message = json!({
                    "role": c.role.unwrap_or_else(|| "assistant".to_owned()),
                    "content": c.content,
                    "refusal": c.refusal,
                });
                if !c.tool_calls.is_empty() {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .into_iter()
                        .map(|mut call| {
                            call.entry("type").or_insert_with(|| "function".into());
                            Value::Object(call)
                        })
                        .collect();
                    message["tool_calls"] = calls.into();
                }
                json!({"index": index, "message": message, "logprobs": null,
                       "finish_reason": c.finish_reason.unwrap_or(Value::Null)})
            })
            .collect();
        let mut response = self.head;
        response.insert("object".into(), "chat.completion".into());
        response.insert("choices".into(), choices.into());
        if let Some(usage) = self.usage {
            response.insert("usage".into(), usage);
        }
        Value::Object(response)
    }
}

/// Splits text into pieces of about `size` characters on char boundaries, so a replayed stream
/// arrives in several chunks like a live one.
fn pieces(text: &str, size: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut count = 0;
    for (i, _) in text.char_indices() {
        if count == size {
            out.push(&text[start..i]);
            start = i;
            count = 0;
        }
        count += 1;
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// A stored `chat.completion` as the chunks a live stream would have sent (without `[DONE]`).
pub fn replay_chunks(response: &Value, include_usage: bool) -> Vec<Value> {
    let head = |choices: Value| {
        let mut chunk = json!({
            "id": response.get("id").cloned().unwrap_or_default(),
            "object": "chat.completion.chunk",
            "created": response.get("created").cloned().unwrap_or_default(),
            "model": response.get("model").cloned().unwrap_or_default(),
            "choices": choices,
        });
        if let Some(fingerprint) = response.get("system_fingerprint") {
            chunk["system_fingerprint"] = fingerprint.clone();
        }
        chunk
    };
    let mut chunks = Vec::new();
    for choice in response
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let index = choice.get("index").cloned().unwrap_or(json!(0));
        let delta = |delta: Value, finish: Value| json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]);
        let message = choice.get("message").cloned().unwrap_or_default();
        chunks.push(head(delta(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )));
        if let Some(text) = message.get("content").and_then(Value::as_str) {
            for piece in pieces(text, 32) {
                chunks.push(head(delta(json!({"content": piece}), Value::Null)));
            }
        }
        if let Some(text) = message.get("refusal").and_then(Value::as_str) {
            chunks.push(head(delta(json!({"refusal": text}), Value::Null)));
        }
        for (at, call) in message
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            chunks.push(head(delta(
                json!({"tool_calls": [{"index": at, "id": call.get("id").cloned().unwrap_or_default(), "type": "function",
                       "function": {"name": call.pointer("/function/name").cloned().unwrap_or_default(),
                                    "arguments": call.pointer("/function/arguments").cloned().unwrap_or_default()}}]}),
                Value::Null,
            )));
        }
        chunks.push(head(delta(
            json!({}),
            choice.get("finish_reason").cloned().unwrap_or_default(),
        )));
    }
    if include_usage && let Some(usage) = response.get("usage") {
        let mut chunk = head(json!([]));
        chunk["usage"] = usage.clone();
        chunks.push(chunk);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(message: Value, finish: &str) -> Value {
        json!({"id": "c1", "object": "chat.completion", "created": 5, "model": "m",
               "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    }

    #[test]
    fn a_new_entry_is_written_as_the_entry_it_is_read_back_as() {
        let response = completion(json!({"role": "assistant", "content": "hi"}), "stop");
        // An upstream's answer is stored as the text it came as, whitespace and all.
        for text in [
            response.to_string(),
            serde_json::to_string_pretty(&response).unwrap(),
            format!("\n {response}\r\n"),
        ] {
            let written = Entry {
                created_at_ms: 1,
                ttl_secs: Some(60),
                tenant: "a\"b".into(),
                route: "chat".into(),
                target: "mock/ok".into(),
                prompt_tokens: 3,
                completion_tokens: 4,
                response: RawValue::NULL,
            }
            .into_bytes_answering(text.as_bytes())
            .unwrap();
            let read: Entry<'_> = serde_json::from_slice(&written).unwrap();
            assert_eq!(
                (
                    read.created_at_ms,
                    read.ttl_secs,
                    &*read.tenant,
                    &*read.route
                ),
                (1, Some(60), "a\"b", "chat")
            );
            assert_eq!(
                (&*read.target, read.prompt_tokens, read.completion_tokens),
                ("mock/ok", 3, 4)
            );
            assert_eq!(read.response.get(), text.trim_ascii());
            // Entries written before answers were kept as text read the same way.
            let older = json!({"created_at_ms": 1, "ttl_secs": 60, "tenant": "a\"b", "route": "chat",
                "target": "mock/ok", "prompt_tokens": 3, "completion_tokens": 4, "response": response});
            let older = serde_json::to_vec(&older).unwrap();
            let read_older: Entry<'_> = serde_json::from_slice(&older).unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(read_older.response.get()).unwrap(),
                response
            );
        }
    }

    #[test]
    fn a_replayed_answer_assembles_back_into_the_same_answer() {
        let tool = json!({"role": "assistant", "content": "Let me check the weather in Paris for you right now, one moment.", "refusal": null,
                          "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Paris\"}"}}]});
        let original = completion(tool, "tool_calls");
        let chunks = replay_chunks(&original, true);
        assert!(chunks.len() >= 5, "several chunks: {}", chunks.len());
        let mut assembler = StreamAssembler::default();
        for chunk in &chunks {
            assembler.push(chunk);
        }
        assert_eq!(assembler.finish(), original);
        assert!(
            replay_chunks(&original, false)
                .iter()
                .all(|c| c.get("usage").is_none())
        );
    }

    #[test]
    fn pieces_respect_char_boundaries() {
        assert_eq!(pieces("héllo wörld", 4), ["héll", "o wö", "rld"]);
        assert!(pieces("", 4).is_empty());
    }
}
