//! Any server speaking OpenAI's chat-completions API. The request is forwarded as the client wrote
//! it (unknown fields included), with only `model` replaced by the target's upstream model.

use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use serde_json::Value;

use super::{
    ChatReply, Provider, ProviderError, event_stream_chain, events, post_json, read_answer,
    read_json, sensitive,
};
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest};

pub struct OpenAiCompatible {
    client: super::Clients,
    chat_url: http::Uri,
    embeddings_url: http::Uri,
    headers: HeaderMap,
}

impl OpenAiCompatible {
    pub fn new(
        client: super::Clients,
        base_url: &url::Url,
        api_key: Option<&str>,
        mut headers: HeaderMap,
    ) -> anyhow::Result<Self> {
        if let Some(key) = api_key {
            headers.insert(AUTHORIZATION, sensitive(&format!("Bearer {key}"))?);
        }
        // `join` would drop the last path segment (`/v1`) without a trailing slash.
        let base = base_url.as_str().trim_end_matches('/');
        Ok(Self {
            client,
            chat_url: format!("{base}/chat/completions").parse()?,
            embeddings_url: format!("{base}/embeddings").parse()?,
            headers,
        })
    }
}

#[async_trait::async_trait]
impl Provider for OpenAiCompatible {
    async fn chat(
        &self,
        request: &ChatRequest,
        upstream_model: &str,
        stream: bool,
    ) -> Result<ChatReply, ProviderError> {
        let outgoing = Outgoing {
            request,
            model: upstream_model,
            stream,
        };
        let response = post_json(&self.client, &self.chat_url, &self.headers, &outgoing).await?;
        if !stream {
            return read_answer(response).await.map(ChatReply::Complete);
        }
        let mut events = events(response);
        let chunks = async_stream::stream! {
            loop {
                match events.next().await {
                    Some(Ok(event)) => {
                        if event.data.trim() == "[DONE]" {
                            return;
                        }
                        match serde_json::from_str::<Value>(&event.data) {
                            Ok(chunk) => {
                                if let Some(error) = chunk.get("error") {
                                    let message = error.get("message").and_then(Value::as_str).unwrap_or("upstream error");
                                    yield Err(ProviderError::StreamBroken(message.to_owned()));
                                    return;
                                }
                                yield Ok(chunk);
                            }
                            Err(e) => {
                                yield Err(ProviderError::InvalidResponse(format!("stream chunk is not JSON: {e}")));
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        yield Err(ProviderError::StreamBroken(event_stream_chain(e)));
                        return;
                    }
                    None => {
                        yield Err(ProviderError::StreamBroken("upstream closed the stream before [DONE]".into()));
                        return;
                    }
                }
            }
        };
        Ok(ChatReply::Stream(Box::pin(chunks)))
    }

    async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
        upstream_model: &str,
    ) -> Result<Value, ProviderError> {
        let mut outgoing = request.clone();
        outgoing.model = upstream_model.to_owned();
        let response =
            post_json(&self.client, &self.embeddings_url, &self.headers, &outgoing).await?;
        read_json(response).await
    }
}

/// The request as the upstream gets it: the client's, with the target's model and, unless
/// streaming, without the stream fields; serialised from the client's request without copying it.
struct Outgoing<'a> {
    request: &'a ChatRequest,
    model: &'a str,
    stream: bool,
}

impl serde::Serialize for Outgoing<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        // Destructured so that a new field of `ChatRequest` does not compile until it is sent.
        let ChatRequest {
            model: _,
            messages,
            stream,
            stream_options,
            temperature,
            top_p,
            n,
            max_tokens,
            max_completion_tokens,
            stop,
            seed,
            tools,
            tool_choice,
            parallel_tool_calls,
            response_format,
            logit_bias,
            user,
            extra,
        } = self.request;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("model", self.model)?;
        map.serialize_entry("messages", messages)?;
        fn optional<M: SerializeMap, T: serde::Serialize>(
            map: &mut M,
            name: &str,
            value: &Option<T>,
        ) -> Result<(), M::Error> {
            match value {
                Some(value) => map.serialize_entry(name, value),
                None => Ok(()),
            }
        }
        if self.stream {
            optional(&mut map, "stream", stream)?;
            optional(&mut map, "stream_options", stream_options)?;
        }
        optional(&mut map, "temperature", temperature)?;
        optional(&mut map, "top_p", top_p)?;
        optional(&mut map, "n", n)?;
        optional(&mut map, "max_tokens", max_tokens)?;
        optional(&mut map, "max_completion_tokens", max_completion_tokens)?;
        optional(&mut map, "stop", stop)?;
        optional(&mut map, "seed", seed)?;
        optional(&mut map, "tools", tools)?;
        optional(&mut map, "tool_choice", tool_choice)?;
        optional(&mut map, "parallel_tool_calls", parallel_tool_calls)?;
        optional(&mut map, "response_format", response_format)?;
        optional(&mut map, "logit_bias", logit_bias)?;
        optional(&mut map, "user", user)?;
        for (name, value) in extra {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_outgoing_request_is_the_clients_with_the_targets_model() {
        let body = json!({
            "model": "alias", "messages": [{"role": "user", "content": "hi", "x": 1}],
            "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.5,
            "top_p": 0.9, "n": 1, "max_tokens": 5, "max_completion_tokens": 6, "stop": ["a"],
            "seed": 7, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto", "parallel_tool_calls": false,
            "response_format": {"type": "json_object"}, "logit_bias": {"1": 2},
            "user": "u", "reasoning_effort": "low"
        });
        let request: ChatRequest = serde_json::from_value(body.clone()).unwrap();
        let sent = |stream| {
            serde_json::to_value(Outgoing {
                request: &request,
                model: "gpt-x",
                stream,
            })
            .unwrap()
        };
        // What a copy of the request with its model replaced serialises to.
        let mut copied = request.clone();
        copied.model = "gpt-x".to_owned();
        let expected = serde_json::to_value(&copied).unwrap();
        assert_eq!(expected["model"], "gpt-x");
        assert_eq!(expected["reasoning_effort"], "low");
        assert_eq!(sent(true), expected);
        copied.stream = None;
        copied.stream_options = None;
        assert_eq!(sent(false), serde_json::to_value(&copied).unwrap());
    }
}
