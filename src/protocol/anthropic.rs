//! Translation between OpenAI's chat-completions shape and Anthropic's Messages shape, both ways,
//! for requests, whole responses and streams.
//!
//! Upstream direction (an OpenAI-shaped request served by an Anthropic target):
//! [`request_from_openai`], [`response_to_openai`], [`StreamToOpenAi`].
//! Client direction (an Anthropic SDK calling `/v1/messages`, served by any target):
//! [`MessagesRequest::into_openai`], [`response_from_openai`], [`StreamFromOpenAi`].

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::openai::{
    ChatMessage, ChatRequest, Content, FunctionCall, FunctionDef, Role, Stop, StreamOptions, Tool,
    ToolCall,
};
/// What can go wrong translating between the two APIs, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslationError {
    /// An OpenAI request Anthropic cannot express. Not the client's fault as such: the router
    /// fails over to a target that can serve it, and only reports it if none can.
    #[error("cannot express {0} for Anthropic")]
    Untranslatable(String),
    /// An Anthropic client's request that is invalid; `param` names the field.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// An Anthropic answer, whole or a stream event, that is not what the API promises.
    #[error("{0}")]
    InvalidResponse(String),
    /// Anthropic reported an error inside a stream it had started.
    #[error("{0}")]
    StreamError(String),
}

impl TranslationError {
    fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Upstream direction: OpenAI request -> Anthropic request, Anthropic answers -> OpenAI answers.
// ---------------------------------------------------------------------------------------------

pub fn request_from_openai(
    request: &ChatRequest,
    upstream_model: &str,
    default_max_tokens: u32,
    stream: bool,
) -> Result<Value, TranslationError> {
    if request.n.is_some_and(|n| n > 1) {
        return Err(TranslationError::Untranslatable("`n` above 1".into()));
    }
    if let Some(format) = &request.response_format
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(TranslationError::Untranslatable(
            "`response_format` other than text".into(),
        ));
    }
    let mut system = Vec::new();
    let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let mut push = |role: &'static str, blocks: Vec<Value>| {
        if blocks.is_empty() {
            return;
        }
        // Anthropic wants strictly alternating roles; consecutive turns of one role are merged.
        match messages.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => messages.push((role, blocks)),
        }
    };
    for message in &request.messages {
        match message.role {
            Role::System | Role::Developer => {
                if let Some(content) = &message.content {
                    system.push(content.joined_text());
                }
            }
            Role::User => push("user", user_blocks(message.content.as_ref())?),
            Role::Assistant => {
                let mut blocks = Vec::new();
                if let Some(content) = &message.content {
                    let text = content.joined_text();
                    if !text.is_empty() {
                        blocks.push(json!({"type": "text", "text": text}));
                    }
                }
                for call in message.tool_calls.iter().flatten() {
                    let input: Value = if call.function.arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&call.function.arguments).map_err(|_| {
                            TranslationError::Untranslatable(
                                "tool call arguments that are not JSON".into(),
                            )
                        })?
                    };
                    blocks.push(json!({"type": "tool_use", "id": call.id, "name": call.function.name, "input": input}));
                }
                push("assistant", blocks);
            }
            Role::Tool => {
                let text = message
                    .content
                    .as_ref()
                    .map(Content::joined_text)
                    .unwrap_or_default();
                push(
                    "user",
                    vec![
                        json!({"type": "tool_result", "tool_use_id": message.tool_call_id, "content": text}),
                    ],
                );
            }
            Role::Function => {
                return Err(TranslationError::Untranslatable(
                    "legacy `function` messages".into(),
                ));
            }
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), upstream_model.into());
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(default_max_tokens);
    body.insert("max_tokens".into(), max_tokens.into());
    if !system.is_empty() {
        body.insert("system".into(), system.join("\n\n").into());
    }
    body.insert(
        "messages".into(),
        messages
            .into_iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect(),
    );
    if let Some(t) = request.temperature {
        // OpenAI's range is 0..2, Anthropic's 0..1.
        body.insert("temperature".into(), t.min(1.0).into());
    }
    if let Some(p) = request.top_p {
        body.insert("top_p".into(), p.into());
    }
    if let Some(stop) = request.stop.clone() {
        body.insert("stop_sequences".into(), stop.into_vec().into());
    }
    if let Some(tools) = &request.tools {
        let tools: Vec<Value> = tools
            .iter()
            .map(|tool| {
                let mut t = Map::new();
                t.insert("name".into(), tool.function.name.clone().into());
                if let Some(d) = &tool.function.description {
                    t.insert("description".into(), d.clone().into());
                }
                let schema = tool
                    .function
                    .parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                t.insert("input_schema".into(), schema);
                Value::Object(t)
            })
            .collect();
        body.insert("tools".into(), tools.into());
    }
    let mut tool_choice = match &request.tool_choice {
        None => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            other => {
                return Err(TranslationError::Untranslatable(format!(
                    "tool_choice {other:?}"
                )));
            }
        },
        Some(choice) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Some(json!({"type": "tool", "name": name})),
            None => {
                return Err(TranslationError::Untranslatable(
                    "this `tool_choice`".into(),
                ));
            }
        },
    };
    if request.parallel_tool_calls == Some(false) && request.tools.is_some() {
        let choice = tool_choice.get_or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = true.into();
    }
    if let Some(choice) = tool_choice {
        body.insert("tool_choice".into(), choice);
    }
    if let Some(user) = &request.user {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
    if stream {
        body.insert("stream".into(), true.into());
    }
    Ok(Value::Object(body))
}

fn user_blocks(content: Option<&Content>) -> Result<Vec<Value>, TranslationError> {
    match content {
        None => Ok(Vec::new()),
        Some(Content::Text(text)) => Ok(vec![json!({"type": "text", "text": text})]),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => Ok(
                    json!({"type": "text", "text": part.get("text").cloned().unwrap_or_default()}),
                ),
                Some("image_url") => {
                    let url = part
                        .get("image_url")
                        .and_then(|i| i.get("url"))
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    Ok(image_block(url))
                }
                Some(other) => Err(TranslationError::Untranslatable(format!(
                    "content parts of type {other:?}"
                ))),
                None => Err(TranslationError::Untranslatable(
                    "content parts without a type".into(),
                )),
            })
            .collect(),
    }
}

fn image_block(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media_type, data)) = rest.split_once(";base64,")
    {
        return json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}});
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

fn finish_reason_from_stop_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") | Some("model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn stop_reason_from_finish_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

fn openai_usage(usage: Option<&Value>) -> Value {
    let count = |field: &str| {
        usage
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let cached = count("cache_read_input_tokens");
    let prompt = count("input_tokens") + cached + count("cache_creation_input_tokens");
    let completion = count("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// An Anthropic Messages response as an OpenAI chat completion.
pub fn response_to_openai(response: &Value) -> Result<Value, TranslationError> {
    let blocks = response
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            TranslationError::InvalidResponse("Anthropic response has no `content` array".into())
        })?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => tool_calls.push(json!({
                "id": block.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or_default(),
                    "arguments": block.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into()),
                },
            })),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { text.into() }, "refusal": null});
    if !tool_calls.is_empty() {
        message["tool_calls"] = tool_calls.into();
    }
    Ok(json!({
        "id": response.get("id").cloned().unwrap_or_default(),
        "object": "chat.completion",
        "created": unix_now(),
        "model": response.get("model").cloned().unwrap_or_default(),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason_from_stop_reason(response.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": openai_usage(response.get("usage")),
    }))
}

/// Turns Anthropic stream events into OpenAI chunks, one event at a time.
#[derive(Debug)]
pub struct StreamToOpenAi {
    include_usage: bool,
    id: String,
    model: String,
    created: u64,
    usage: Map<String, Value>,
    /// Anthropic numbers content blocks; OpenAI numbers tool calls. Maps block index -> tool index.
    tool_index_by_block: Vec<(u64, u64)>,
    next_tool_index: u64,
    finished: bool,
}

impl StreamToOpenAi {
    pub fn new(include_usage: bool) -> Self {
        Self {
            include_usage,
            id: String::new(),
            model: String::new(),
            created: unix_now(),
            usage: Map::new(),
            tool_index_by_block: Vec::new(),
            next_tool_index: 0,
            finished: false,
        }
    }

    /// True once `message_stop` arrived: a stream that ends before that was cut off.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
    }

    fn merge_usage(&mut self, usage: Option<&Value>) {
        if let Some(Value::Object(u)) = usage {
            for (k, v) in u {
                if !v.is_null() {
                    self.usage.insert(k.clone(), v.clone());
                }
            }
        }
    }

    /// Returns the OpenAI chunks this event becomes, or the upstream's error message.
    pub fn on_event(&mut self, event: &str, data: &Value) -> Result<Vec<Value>, TranslationError> {
        let kind = data.get("type").and_then(Value::as_str).unwrap_or(event);
        let block_index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
        match kind {
            "message_start" => {
                let message = data.get("message").cloned().unwrap_or_default();
                self.id = message
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                self.model = message
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                self.merge_usage(message.get("usage"));
                Ok(vec![
                    self.chunk(json!({"role": "assistant", "content": ""}), None),
                ])
            }
            "content_block_start" => {
                let block = data.get("content_block").cloned().unwrap_or_default();
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let tool_index = self.next_tool_index;
                        self.next_tool_index += 1;
                        self.tool_index_by_block.push((block_index, tool_index));
                        Ok(vec![self.chunk(
                            json!({"tool_calls": [{
                                "index": tool_index, "id": block.get("id").cloned().unwrap_or_default(), "type": "function",
                                "function": {"name": block.get("name").cloned().unwrap_or_default(), "arguments": ""},
                            }]}),
                            None,
                        )])
                    }
                    Some("text") => match block.get("text").and_then(Value::as_str) {
                        Some(text) if !text.is_empty() => {
                            Ok(vec![self.chunk(json!({"content": text}), None)])
                        }
                        _ => Ok(Vec::new()),
                    },
                    _ => Ok(Vec::new()),
                }
            }
            "content_block_delta" => {
                let delta = data.get("delta").cloned().unwrap_or_default();
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        let text = delta.get("text").cloned().unwrap_or_default();
                        Ok(vec![self.chunk(json!({"content": text}), None)])
                    }
                    Some("input_json_delta") => {
                        let tool_index = self
                            .tool_index_by_block
                            .iter()
                            .find(|(block, _)| *block == block_index)
                            .map(|(_, tool)| *tool)
                            .ok_or_else(|| {
                                TranslationError::InvalidResponse(
                                    "input_json_delta for a block that is not a tool_use".into(),
                                )
                            })?;
                        let partial = delta.get("partial_json").cloned().unwrap_or_default();
                        Ok(vec![self.chunk(
                            json!({"tool_calls": [{"index": tool_index, "function": {"arguments": partial}}]}),
                            None,
                        )])
                    }
                    _ => Ok(Vec::new()),
                }
            }
            "message_delta" => {
                self.merge_usage(data.get("usage"));
                let stop_reason = data.pointer("/delta/stop_reason").and_then(Value::as_str);
                Ok(vec![self.chunk(
                    json!({}),
                    Some(finish_reason_from_stop_reason(stop_reason)),
                )])
            }
            "message_stop" => {
                self.finished = true;
                if !self.include_usage {
                    return Ok(Vec::new());
                }
                let usage = openai_usage(Some(&Value::Object(self.usage.clone())));
                Ok(vec![json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [], "usage": usage,
                })])
            }
            "error" => Err(TranslationError::StreamError(
                data.pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream stream error")
                    .to_owned(),
            )),
            // ping, content_block_stop and event types added later carry nothing OpenAI can show.
            _ => Ok(Vec::new()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client direction: an Anthropic SDK talks to the gateway.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    pub max_tokens: u32,
    pub messages: Vec<AnthropicMessage>,
    #[serde(default)]
    pub system: Option<AnthropicContent>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub tools: Option<Vec<AnthropicTool>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AnthropicRole {
    User,
    Assistant,
}

#[derive(Debug, Deserialize)]
pub struct AnthropicMessage {
    pub role: AnthropicRole,
    pub content: AnthropicContent,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum AnthropicContent {
    Text(String),
    Blocks(Vec<Map<String, Value>>),
}

#[derive(Debug, Deserialize)]
pub struct AnthropicTool {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub input_schema: Value,
}

fn block_text(block: &Map<String, Value>) -> String {
    block
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

impl MessagesRequest {
    pub fn wants_stream(&self) -> bool {
        self.stream == Some(true)
    }

    pub fn into_openai(self) -> Result<ChatRequest, TranslationError> {
        if self.messages.is_empty() {
            return Err(TranslationError::invalid(
                "`messages` must not be empty",
                Some("messages"),
            ));
        }
        let stream = self.wants_stream();
        let mut messages = Vec::new();
        match self.system {
            Some(AnthropicContent::Text(text)) => {
                messages.push(ChatMessage::text(Role::System, text))
            }
            Some(AnthropicContent::Blocks(blocks)) => {
                let text: Vec<String> = blocks.iter().map(block_text).collect();
                messages.push(ChatMessage::text(Role::System, text.join("\n")));
            }
            None => {}
        }
        for (i, message) in self.messages.into_iter().enumerate() {
            let blocks = match message.content {
                AnthropicContent::Text(text) => {
                    let role = match message.role {
                        AnthropicRole::User => Role::User,
                        AnthropicRole::Assistant => Role::Assistant,
                    };
                    messages.push(ChatMessage::text(role, text));
                    continue;
                }
                AnthropicContent::Blocks(blocks) => blocks,
            };
            let mut parts = Vec::new();
            let mut tool_calls = Vec::new();
            for (j, block) in blocks.iter().enumerate() {
                let param = format!("messages[{i}].content[{j}]");
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let mut part = Map::new();
                        part.insert("type".into(), "text".into());
                        part.insert("text".into(), block_text(block).into());
                        parts.push(part);
                    }
                    Some("image") => {
                        let source = block.get("source").cloned().unwrap_or_default();
                        let url = match source.get("type").and_then(Value::as_str) {
                            Some("base64") => format!(
                                "data:{};base64,{}",
                                source
                                    .get("media_type")
                                    .and_then(Value::as_str)
                                    .unwrap_or("image/png"),
                                source.get("data").and_then(Value::as_str).unwrap_or("")
                            ),
                            Some("url") => source
                                .get("url")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            _ => {
                                return Err(TranslationError::invalid(
                                    "unsupported image source",
                                    Some(&param),
                                ));
                            }
                        };
                        let mut part = Map::new();
                        part.insert("type".into(), "image_url".into());
                        part.insert("image_url".into(), json!({"url": url}));
                        parts.push(part);
                    }
                    Some("tool_use") if message.role == AnthropicRole::Assistant => {
                        tool_calls.push(ToolCall {
                            id: block
                                .get("id")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            kind: "function".into(),
                            function: FunctionCall {
                                name: block
                                    .get("name")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_owned(),
                                arguments: block
                                    .get("input")
                                    .map(Value::to_string)
                                    .unwrap_or_else(|| "{}".into()),
                            },
                        });
                    }
                    Some("tool_result") if message.role == AnthropicRole::User => {
                        let text = match block.get("content") {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Array(items)) => items
                                .iter()
                                .filter_map(|b| b.get("text").and_then(Value::as_str))
                                .collect::<Vec<_>>()
                                .join("\n"),
                            _ => String::new(),
                        };
                        let mut tool_message = ChatMessage::text(Role::Tool, text);
                        tool_message.tool_call_id = block
                            .get("tool_use_id")
                            .and_then(Value::as_str)
                            .map(str::to_owned);
                        // Tool results answer the previous assistant turn, so they come first.
                        messages.push(tool_message);
                    }
                    Some("thinking") | Some("redacted_thinking") => {}
                    Some(other) => {
                        return Err(TranslationError::invalid(
                            format!("content blocks of type {other:?} are not supported here"),
                            Some(&param),
                        ));
                    }
                    None => {
                        return Err(TranslationError::invalid(
                            "content block without `type`",
                            Some(&param),
                        ));
                    }
                }
            }
            let role = match message.role {
                AnthropicRole::User => Role::User,
                AnthropicRole::Assistant => Role::Assistant,
            };
            if parts.is_empty() && tool_calls.is_empty() {
                continue;
            }
            let content = if parts.is_empty() {
                None
            } else if parts
                .iter()
                .all(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            {
                Some(Content::Text(
                    parts.iter().map(block_text).collect::<Vec<_>>().join("\n"),
                ))
            } else {
                Some(Content::Parts(parts))
            };
            messages.push(ChatMessage {
                role,
                content,
                name: None,
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                tool_call_id: None,
                extra: Map::new(),
            });
        }
        let tool_choice = match &self.tool_choice {
            None => None,
            Some(choice) => match choice.get("type").and_then(Value::as_str) {
                Some("auto") => Some(json!("auto")),
                Some("any") => Some(json!("required")),
                Some("none") => Some(json!("none")),
                Some("tool") => Some(
                    json!({"type": "function", "function": {"name": choice.get("name").cloned().unwrap_or_default()}}),
                ),
                _ => {
                    return Err(TranslationError::invalid(
                        "unsupported `tool_choice`",
                        Some("tool_choice"),
                    ));
                }
            },
        };
        let parallel_tool_calls = self
            .tool_choice
            .as_ref()
            .and_then(|c| c.get("disable_parallel_tool_use"))
            .and_then(Value::as_bool)
            .map(|disable| !disable);
        Ok(ChatRequest {
            model: self.model,
            messages,
            stream: stream.then_some(true),
            // Usage arrives in the last chunk only when asked for; Anthropic clients always get it.
            stream_options: stream.then(|| StreamOptions {
                include_usage: Some(true),
                extra: Map::new(),
            }),
            temperature: self.temperature,
            top_p: self.top_p,
            n: None,
            max_tokens: Some(self.max_tokens),
            max_completion_tokens: None,
            stop: self.stop_sequences.map(Stop::Many),
            seed: None,
            tools: self.tools.map(|tools| {
                tools
                    .into_iter()
                    .map(|t| Tool {
                        kind: "function".into(),
                        function: FunctionDef {
                            name: t.name,
                            description: t.description,
                            parameters: Some(t.input_schema),
                            extra: Map::new(),
                        },
                        extra: Map::new(),
                    })
                    .collect()
            }),
            tool_choice,
            parallel_tool_calls,
            response_format: None,
            logit_bias: None,
            user: self
                .metadata
                .as_ref()
                .and_then(|m| m.get("user_id"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            extra: Map::new(),
        })
    }
}

fn anthropic_message_id(openai_id: &str) -> String {
    if openai_id.starts_with("msg_") {
        openai_id.to_owned()
    } else {
        format!("msg_{}", openai_id.trim_start_matches("chatcmpl-"))
    }
}

/// An OpenAI chat completion as an Anthropic Messages response.
pub fn response_from_openai(response: &Value) -> Value {
    let choice = response.pointer("/choices/0").cloned().unwrap_or_default();
    let message = choice.get("message").cloned().unwrap_or_default();
    let mut content = Vec::new();
    if let Some(text) = message.get("content").and_then(Value::as_str)
        && !text.is_empty()
    {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
        content.push(json!({
            "type": "tool_use", "id": call.get("id").cloned().unwrap_or_default(),
            "name": call.pointer("/function/name").cloned().unwrap_or_default(), "input": input,
        }));
    }
    let usage = response.get("usage");
    let count = |field: &str| {
        usage
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    json!({
        "id": anthropic_message_id(response.get("id").and_then(Value::as_str).unwrap_or("")),
        "type": "message",
        "role": "assistant",
        "model": response.get("model").cloned().unwrap_or_default(),
        "content": content,
        "stop_reason": stop_reason_from_finish_reason(choice.get("finish_reason").and_then(Value::as_str)),
        "stop_sequence": null,
        "usage": {"input_tokens": count("prompt_tokens"), "output_tokens": count("completion_tokens")},
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    Text(u64),
    Tool { block: u64, tool_index: u64 },
}

/// Turns OpenAI chunks into Anthropic stream events (`(event name, data)` pairs).
#[derive(Debug, Default)]
pub struct StreamFromOpenAi {
    started: bool,
    next_block: u64,
    open: Option<OpenBlock>,
    stop_reason: Option<&'static str>,
    input_tokens: u64,
    output_tokens: u64,
}

pub type Event = (&'static str, Value);

impl StreamFromOpenAi {
    pub fn new() -> Self {
        Self::default()
    }

    fn close_block(&mut self, events: &mut Vec<Event>) {
        if let Some(open) = self.open.take() {
            let index = match open {
                OpenBlock::Text(i) => i,
                OpenBlock::Tool { block, .. } => block,
            };
            events.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn start_block(
        &mut self,
        block: Value,
        open: impl FnOnce(u64) -> OpenBlock,
        events: &mut Vec<Event>,
    ) -> u64 {
        self.close_block(events);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some(open(index));
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    pub fn on_chunk(&mut self, chunk: &Value) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.started {
            self.started = true;
            events.push(("message_start", json!({"type": "message_start", "message": {
                "id": anthropic_message_id(chunk.get("id").and_then(Value::as_str).unwrap_or("")),
                "type": "message", "role": "assistant",
                "model": chunk.get("model").cloned().unwrap_or_default(),
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }})));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.input_tokens = usage
                .get("prompt_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            self.output_tokens = usage
                .get("completion_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0);
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return events;
        };
        let delta = choice.get("delta").cloned().unwrap_or_default();
        if let Some(text) = delta.get("content").and_then(Value::as_str)
            && !text.is_empty()
        {
            let index = match self.open {
                Some(OpenBlock::Text(i)) => i,
                _ => self.start_block(
                    json!({"type": "text", "text": ""}),
                    OpenBlock::Text,
                    &mut events,
                ),
            };
            events.push(("content_block_delta", json!({
                "type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text},
            })));
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tool_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let index = match self.open {
                Some(OpenBlock::Tool { block, tool_index: open }) if open == tool_index => block,
                _ => self.start_block(
                    json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or_default(),
                           "name": call.pointer("/function/name").cloned().unwrap_or_default(), "input": {}}),
                    |block| OpenBlock::Tool { block, tool_index },
                    &mut events,
                ),
            };
            if let Some(arguments) = call.pointer("/function/arguments").and_then(Value::as_str)
                && !arguments.is_empty()
            {
                events.push((
                    "content_block_delta",
                    json!({
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": arguments},
                    }),
                ));
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop_reason = Some(stop_reason_from_finish_reason(Some(reason)));
        }
        events
    }

    /// The closing events, once the OpenAI stream ended normally.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        self.close_block(&mut events);
        events.push(("message_delta", json!({
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        })));
        events.push(("message_stop", json!({"type": "message_stop"})));
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> ChatRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn openai_request_becomes_anthropic_with_system_tools_and_merged_tool_results() {
        let request = chat(json!({
            "model": "alias", "max_tokens": 50, "temperature": 1.5, "stop": "END", "user": "u1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "rain"}
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "tool_choice": "required"
        }));
        let body = request_from_openai(&request, "claude-x", 1024, false).unwrap();
        assert_eq!(body["model"], "claude-x");
        assert_eq!(body["max_tokens"], 50);
        assert_eq!(body["system"], "Be brief.");
        assert_eq!(body["temperature"], 1.0);
        assert_eq!(body["stop_sequences"], json!(["END"]));
        assert_eq!(body["tool_choice"], json!({"type": "any"}));
        assert_eq!(body["metadata"]["user_id"], "u1");
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert_eq!(messages[1]["content"][1]["input"], json!({"city": "Rome"}));
        assert_eq!(messages[2]["role"], "user");
        assert_eq!(messages[2]["content"].as_array().unwrap().len(), 2);
        assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));
    }

    #[test]
    fn anthropic_response_becomes_openai() {
        let response = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2}
        });
        let out = response_to_openai(&response).unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(out["usage"]["prompt_tokens"], 12);
        assert_eq!(out["usage"]["total_tokens"], 17);
    }

    #[test]
    fn anthropic_stream_becomes_openai_chunks_with_usage() {
        let mut s = StreamToOpenAi::new(true);
        let events = [
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 7, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t1", "name": "f"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ];
        let chunks: Vec<Value> = events
            .iter()
            .flat_map(|e| s.on_event("", e).unwrap())
            .collect();
        assert!(s.is_finished());
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(
            chunks[2]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "t1"
        );
        assert_eq!(
            chunks[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\""
        );
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            chunks[5]["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16, "prompt_tokens_details": {"cached_tokens": 0}})
        );
        assert!(
            s.on_event(
                "error",
                &json!({"type": "error", "error": {"message": "overloaded"}})
            )
            .is_err()
        );
    }

    #[test]
    fn anthropic_client_request_becomes_openai_with_tool_results_first() {
        let request: MessagesRequest = serde_json::from_value(json!({
            "model": "chat", "max_tokens": 100, "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"c": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                             {"type": "text", "text": "Thanks"}]}
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stream": true
        }))
        .unwrap();
        let chat = request.into_openai().unwrap();
        let roles: Vec<Role> = chat.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::User
            ]
        );
        assert_eq!(
            chat.messages[2].tool_calls.as_ref().unwrap()[0]
                .function
                .arguments,
            "{\"c\":1}"
        );
        assert_eq!(chat.tool_choice, Some(json!("required")));
        assert_eq!(chat.parallel_tool_calls, Some(false));
        assert!(chat.wants_usage_in_stream());
    }

    #[test]
    fn openai_stream_becomes_anthropic_events() {
        let mut s = StreamFromOpenAi::new();
        let chunks = [
            json!({"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
            json!({"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}),
            json!({"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"id": "chatcmpl-1", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
        ];
        let mut events: Vec<Event> = chunks.iter().flat_map(|c| s.on_chunk(c)).collect();
        events.extend(s.finish());
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[0].1["message"]["id"], "msg_1");
        assert_eq!(events[7].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(events[7].1["usage"]["output_tokens"], 4);
    }
}
