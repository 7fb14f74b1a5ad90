//! Anthropic's native Messages API, spoken in OpenAI's shape towards the router.

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;

use super::{
    Answer, ChatReply, Provider, ProviderError, event_stream_chain, events, post_json, read_json,
    sensitive,
};
use crate::protocol::anthropic::{StreamToOpenAi, request_from_openai, response_to_openai};
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest};

pub struct Anthropic {
    client: super::Clients,
    messages_url: http::Uri,
    headers: HeaderMap,
    default_max_tokens: u32,
}

impl Anthropic {
    pub fn new(
        client: super::Clients,
        base_url: &url::Url,
        api_key: Option<&str>,
        version: &str,
        default_max_tokens: u32,
        mut headers: HeaderMap,
    ) -> anyhow::Result<Self> {
        if let Some(key) = api_key {
            headers.insert("x-api-key", sensitive(key)?);
        }
        headers.insert("anthropic-version", HeaderValue::from_str(version)?);
        let base = base_url.as_str().trim_end_matches('/');
        Ok(Self {
            client,
            messages_url: format!("{base}/v1/messages").parse()?,
            headers,
            default_max_tokens,
        })
    }
}

#[async_trait::async_trait]
impl Provider for Anthropic {
    async fn chat(
        &self,
        request: &ChatRequest,
        upstream_model: &str,
        stream: bool,
    ) -> Result<ChatReply, ProviderError> {
        let body = request_from_openai(request, upstream_model, self.default_max_tokens, stream)
            .map_err(ProviderError::from)?;
        let response = post_json(&self.client, &self.messages_url, &self.headers, &body).await?;
        if !stream {
            let message = read_json(response).await?;
            return response_to_openai(&message)
                .map(|answer| ChatReply::Complete(Answer::from_value(answer)))
                .map_err(ProviderError::from);
        }
        let mut translator = StreamToOpenAi::new(request.wants_usage_in_stream());
        let mut events = events(response);
        let chunks = async_stream::stream! {
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(e) => {
                        yield Err(ProviderError::StreamBroken(event_stream_chain(e)));
                        return;
                    }
                };
                let data: Value = match serde_json::from_str(&event.data) {
                    Ok(data) => data,
                    Err(e) => {
                        yield Err(ProviderError::InvalidResponse(format!("stream event is not JSON: {e}")));
                        return;
                    }
                };
                match translator.on_event(&event.event, &data) {
                    Ok(chunks) => {
                        for chunk in chunks {
                            yield Ok(chunk);
                        }
                        if translator.is_finished() {
                            return;
                        }
                    }
                    Err(error) => {
                        yield Err(ProviderError::from(error));
                        return;
                    }
                }
            }
            yield Err(ProviderError::StreamBroken("upstream closed the stream before message_stop".into()));
        };
        Ok(ChatReply::Stream(Box::pin(chunks)))
    }

    async fn embeddings(
        &self,
        _request: &EmbeddingsRequest,
        _upstream_model: &str,
    ) -> Result<Value, ProviderError> {
        Err(ProviderError::Unsupported("embeddings"))
    }
}
