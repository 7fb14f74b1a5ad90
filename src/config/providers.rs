//! `[providers.NAME]`: the upstream APIs and their credentials.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::FieldError;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any server speaking OpenAI's `/chat/completions`: OpenAI, DeepSeek, Mistral, Qwen/DashScope,
    /// Gemini's and OpenRouter's OpenAI endpoints, vLLM, Ollama.
    OpenAi,
    /// Anthropic's native Messages API.
    Anthropic,
    /// The built-in demo: answers inside the gateway by echoing the last user turn (no
    /// `base_url`, no key), so a fresh install serves requests without any provider account.
    Echo,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// For `openai`, the base up to and including `/v1` (requests go to `{base_url}/chat/completions`);
    /// for `anthropic`, the host (requests go to `{base_url}/v1/messages`).
    /// Not used by `echo`.
    #[serde(default)]
    pub base_url: Option<url::Url>,
    /// Left out: the provider needs no key (a local server such as Ollama). Present but empty
    /// (an unset `${OPENAI_API_KEY:-}`): a key is missing; startup warns and the provider's
    /// targets fail over at once with "no API key configured".
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Extra headers sent upstream on every request (e.g. OpenRouter's `HTTP-Referer`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Anthropic requires `max_tokens`; used when the client sent none.
    #[serde(default = "default_anthropic_max_tokens")]
    pub default_max_tokens: u32,
    #[serde(default = "default_anthropic_version")]
    pub anthropic_version: String,
    /// TCP connect timeout; a connect failure fails over without waiting for the attempt timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

fn default_anthropic_max_tokens() -> u32 {
    4096
}
fn default_anthropic_version() -> String {
    "2023-06-01".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl ProviderConfig {
    pub(super) fn validate(&self, name: &str) -> Result<(), FieldError> {
        let field = |f: &str| format!("providers.{name}.{f}");
        match (&self.base_url, self.kind) {
            (Some(_), ProviderKind::Echo) => {
                return Err(FieldError::new(
                    field("base_url"),
                    "the echo provider answers inside the gateway; leave base_url out",
                ));
            }
            (None, ProviderKind::OpenAi | ProviderKind::Anthropic) => {
                return Err(FieldError::new(field("base_url"), "required"));
            }
            (Some(url), _) if url.scheme() != "http" && url.scheme() != "https" => {
                return Err(FieldError::new(
                    field("base_url"),
                    format!("scheme must be http or https, not {}", url.scheme()),
                ));
            }
            _ => {}
        }
        for header in self.headers.keys() {
            if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                return Err(FieldError::new(
                    field("headers"),
                    format!("{header:?} is not a valid header name"),
                ));
            }
        }
        Ok(())
    }
}
