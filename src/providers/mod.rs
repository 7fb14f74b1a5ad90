//! Upstream model providers behind one trait. The router only ever sees [`Provider`]; adding a
//! provider means one new implementation here and one arm in [`build`], nowhere else.

mod anthropic;
mod client;
mod echo;
mod openai;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http_body_util::BodyExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::config::{ProviderConfig, ProviderKind};
use crate::error::UpstreamError;
pub use crate::protocol::answer::Answer;
use crate::protocol::anthropic::TranslationError;
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest};
pub use client::Clients;
use client::{BoxError, UpstreamBody};

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Value, ProviderError>> + Send>>;

/// A chat answer in OpenAI's shape: whole, or as a stream of `chat.completion.chunk` objects.
pub enum ChatReply {
    Complete(Answer),
    Stream(ChunkStream),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    Attempt,
    FirstToken,
    StreamIdle,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection failed: {0}")]
    Transport(String),
    #[error("timed out ({0:?})")]
    Timeout(TimeoutKind),
    #[error("upstream returned {status}: {}", error.message)]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        error: UpstreamError,
    },
    #[error("invalid upstream response: {0}")]
    InvalidResponse(String),
    #[error("upstream stream broke: {0}")]
    StreamBroken(String),
    #[error("cannot express {0} for this provider")]
    Untranslatable(String),
    #[error("{0} is not supported by this provider")]
    Unsupported(&'static str),
    /// The config names a key for this provider (`api_key`) but it is empty: no request is sent.
    #[error("no API key configured for provider {0}")]
    MissingKey(Arc<str>),
}

impl From<TranslationError> for ProviderError {
    fn from(error: TranslationError) -> Self {
        match error {
            TranslationError::Untranslatable(what) => Self::Untranslatable(what),
            TranslationError::StreamError(message) => Self::StreamBroken(message),
            TranslationError::InvalidResponse(message) => Self::InvalidResponse(message),
            // Only the client side builds these; an upstream answer is never a request.
            TranslationError::InvalidRequest { message, .. } => Self::InvalidResponse(message),
        }
    }
}

impl ProviderError {
    /// A low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Transport(_) => "transport",
            Self::Timeout(TimeoutKind::Attempt) => "timeout",
            Self::Timeout(TimeoutKind::FirstToken) => "first_token_timeout",
            Self::Timeout(TimeoutKind::StreamIdle) => "stream_idle_timeout",
            Self::Status { status: 429, .. } => "status_429",
            Self::Status { status, .. } if *status >= 500 => "status_5xx",
            Self::Status { .. } => "status_4xx",
            Self::InvalidResponse(_) => "invalid_response",
            Self::StreamBroken(_) => "stream_broken",
            Self::Untranslatable(_) | Self::Unsupported(_) => "unsupported",
            Self::MissingKey(_) => "missing_key",
        }
    }

    /// What the client is told: the kind of failure, and the upstream's own message for an
    /// error status. The transport details (which may name hosts, ports or the proxy) are for
    /// the gateway's log only.
    pub fn for_client(&self) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow::{Borrowed, Owned};
        match self {
            Self::Connect(_) => Borrowed("could not connect"),
            Self::Transport(_) => Borrowed("the connection failed"),
            Self::InvalidResponse(_) => Borrowed("sent a response the gateway could not read"),
            Self::StreamBroken(_) => Borrowed("the stream broke"),
            other => Owned(other.to_string()),
        }
    }

    fn from_send(error: reqwest::Error) -> Self {
        if error.is_connect() {
            Self::Connect(reqwest_chain(error))
        } else if error.is_timeout() {
            Self::Timeout(TimeoutKind::Attempt)
        } else {
            Self::Transport(reqwest_chain(error))
        }
    }
}

/// The upstream's address is ours, not anyone else's business: it stays out of error bodies and
/// log lines.
pub(crate) fn reqwest_chain(error: reqwest::Error) -> String {
    error_chain(&error.without_url())
}

pub(crate) fn event_stream_chain(error: eventsource_stream::EventStreamError<BoxError>) -> String {
    match error {
        eventsource_stream::EventStreamError::Transport(error) => error_chain(&*error),
        other => error_chain(&other),
    }
}

/// A client's top-level message ("error sending request", "client error (Connect)") hides the
/// useful cause.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// Sends one chat request to `upstream_model`. With `stream`, returns once the response headers
    /// arrived; the router decides how long to wait for the first chunk.
    async fn chat(
        &self,
        request: &ChatRequest,
        upstream_model: &str,
        stream: bool,
    ) -> Result<ChatReply, ProviderError>;

    async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
        upstream_model: &str,
    ) -> Result<Value, ProviderError>;
}

pub fn build(
    name: &str,
    config: &ProviderConfig,
    serving_threads: usize,
) -> anyhow::Result<Arc<dyn Provider>> {
    let client = Clients::new(config, serving_threads)?;
    let mut headers = HeaderMap::new();
    for (key, value) in &config.headers {
        headers.insert(
            HeaderName::from_bytes(key.as_bytes())?,
            HeaderValue::from_str(value).map_err(|_| {
                anyhow::anyhow!("providers.{name}.headers.{key}: invalid header value")
            })?,
        );
    }
    let api_key = match &config.api_key {
        Some(key) if key.expose_secret().is_empty() => {
            return Ok(Arc::new(MissingKey(Arc::from(name))));
        }
        Some(key) => Some(key.expose_secret().to_owned()),
        None => None,
    };
    let base_url = || {
        config
            .base_url
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("providers.{name}.base_url: required"))
    };
    let provider: Arc<dyn Provider> = match config.kind {
        ProviderKind::OpenAi => Arc::new(openai::OpenAiCompatible::new(
            client,
            base_url()?,
            api_key.as_deref(),
            headers,
        )?),
        ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(
            client,
            base_url()?,
            api_key.as_deref(),
            &config.anthropic_version,
            config.default_max_tokens,
            headers,
        )?),
        ProviderKind::Echo => Arc::new(echo::Echo),
    };
    Ok(provider)
}

/// A provider whose configured key is empty: its targets fail over at once, saying why, instead
/// of sending a request bound to be refused (or, for a local default such as Ollama's, refused
/// by a server that is not running).
struct MissingKey(Arc<str>);

#[async_trait::async_trait]
impl Provider for MissingKey {
    async fn chat(&self, _: &ChatRequest, _: &str, _: bool) -> Result<ChatReply, ProviderError> {
        Err(ProviderError::MissingKey(Arc::clone(&self.0)))
    }

    async fn embeddings(&self, _: &EmbeddingsRequest, _: &str) -> Result<Value, ProviderError> {
        Err(ProviderError::MissingKey(Arc::clone(&self.0)))
    }
}

/// A secret header value that `Debug` output of the header map will not print.
fn sensitive(value: &str) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| anyhow::anyhow!("the API key contains characters not allowed in a header"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// `retry-after-ms` (OpenAI), then `retry-after` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Sends `body` as JSON and returns the response if its status is a success; any other status
/// becomes a [`ProviderError::Status`] carrying the upstream's error and `Retry-After`.
async fn post_json<T: serde::Serialize + ?Sized>(
    client: &Clients,
    url: &http::Uri,
    headers: &HeaderMap,
    body: &T,
) -> Result<http::Response<UpstreamBody>, ProviderError> {
    let body = serde_json::to_vec(body).map_err(|e| ProviderError::Transport(e.to_string()))?;
    let mut request = http::Request::new(Bytes::from(body));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = url.clone();
    *request.headers_mut() = headers.clone();
    let request_headers = request.headers_mut();
    // A provider's configured headers win, as they did with reqwest.
    request_headers
        .entry(CONTENT_TYPE)
        .or_insert(HeaderValue::from_static("application/json"));
    request_headers
        .entry(ACCEPT)
        .or_insert(HeaderValue::from_static("*/*"));
    if let Some(trace) = crate::otel::upstream_headers() {
        if let Ok(value) = HeaderValue::from_str(&trace.traceparent) {
            request_headers.insert("traceparent", value);
        }
        if let Some(value) = trace
            .tracestate
            .and_then(|state| HeaderValue::from_str(&state).ok())
        {
            request_headers.insert("tracestate", value);
        }
    }
    let response = client.send(request).await?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(status_error(response).await)
    }
}

/// Turns a non-2xx upstream response into a [`ProviderError::Status`].
async fn status_error(response: http::Response<UpstreamBody>) -> ProviderError {
    let (parts, body) = response.into_parts();
    let body = read_body(body).await.unwrap_or_default();
    ProviderError::Status {
        status: parts.status.as_u16(),
        retry_after: retry_after(&parts.headers),
        error: UpstreamError::from_body(&body),
    }
}

/// The whole body of a response.
async fn read_body(body: UpstreamBody) -> Result<Bytes, ProviderError> {
    body.collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| ProviderError::Transport(error_chain(&*e)))
}

async fn read_json(response: http::Response<UpstreamBody>) -> Result<Value, ProviderError> {
    let bytes = read_body(response.into_body()).await?;
    serde_json::from_slice(&bytes).map_err(|e| ProviderError::InvalidResponse(e.to_string()))
}

/// A whole answer in OpenAI's shape, kept as the upstream's bytes.
async fn read_answer(response: http::Response<UpstreamBody>) -> Result<Answer, ProviderError> {
    let bytes = read_body(response.into_body()).await?;
    Answer::from_bytes(bytes).map_err(|e| ProviderError::InvalidResponse(e.to_string()))
}

/// A streamed response's body as server-sent events.
fn events(
    response: http::Response<UpstreamBody>,
) -> eventsource_stream::EventStream<http_body_util::BodyDataStream<UpstreamBody>> {
    use eventsource_stream::Eventsource;
    http_body_util::BodyDataStream::new(response.into_body()).eventsource()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
