//! Any server speaking OpenAI's chat-completions API. The request is forwarded as the client wrote
//! it (unknown fields included), with only `model` replaced by the target's upstream model.

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use serde_json::Value;

use super::{
    ChatReply, Provider, ProviderError, event_stream_chain, post_json, read_json, sensitive,
};
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest};

pub struct OpenAiCompatible {
    client: super::Clients,
    chat_url: url::Url,
    embeddings_url: url::Url,
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
            chat_url: url::Url::parse(&format!("{base}/chat/completions"))?,
            embeddings_url: url::Url::parse(&format!("{base}/embeddings"))?,
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
        let mut outgoing = request.clone();
        outgoing.model = upstream_model.to_owned();
        if !stream {
            outgoing.stream = None;
            outgoing.stream_options = None;
        }
        let response = post_json(&self.client, &self.chat_url, &self.headers, &outgoing).await?;
        if !stream {
            return read_json(response).await.map(ChatReply::Complete);
        }
        let mut events = response.bytes_stream().eventsource();
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
