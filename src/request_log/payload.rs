//! Payload capture: the request and answer text of the routes that ask for it, redacted and cut
//! to size before the record leaves the request's task, so nothing unredacted is ever queued,
//! written or exported.

use std::collections::HashSet;

use regex::Regex;
use serde_json::{Map, Value};

use crate::config::PayloadConfig;

const REDACTED: &str = "[redacted]";

pub struct PayloadPolicy {
    routes: HashSet<String>,
    max_bytes: usize,
    fields: HashSet<String>,
    patterns: Vec<Regex>,
}

impl PayloadPolicy {
    /// `None` when no route captures payloads.
    pub fn from_config(config: &PayloadConfig) -> anyhow::Result<Option<Self>> {
        if config.routes.is_empty() {
            return Ok(None);
        }
        let patterns = config
            .redact_patterns
            .iter()
            .map(|p| Regex::new(p))
            .collect::<Result<_, _>>()?;
        Ok(Some(Self {
            routes: config.routes.iter().cloned().collect(),
            max_bytes: config.max_bytes,
            fields: config.redact_fields.iter().cloned().collect(),
            patterns,
        }))
    }

    pub fn captures(&self, route: &str) -> bool {
        self.routes.contains(route)
    }

    /// A JSON payload as it may be stored: named fields blanked, patterns replaced, and cut to
    /// `max_bytes` of JSON (then kept as the text of its beginning, marked truncated).
    pub fn capture(&self, payload: &Value) -> Value {
        let redacted = self.redact(payload);
        let text = redacted.to_string();
        if text.len() <= self.max_bytes {
            return redacted;
        }
        serde_json::json!({"truncated": true, "bytes": text.len(), "text": cut(&text, self.max_bytes)})
    }

    /// An answer's text gathered from a stream, treated as `capture` treats JSON.
    pub fn capture_text(&self, text: &str) -> Value {
        let redacted = self.redact_text(text);
        if redacted.len() <= self.max_bytes {
            return Value::String(redacted);
        }
        serde_json::json!({"truncated": true, "bytes": redacted.len(), "text": cut(&redacted, self.max_bytes)})
    }

    /// How much streamed text is worth gathering: a bound on memory for a long stream.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn redact(&self, value: &Value) -> Value {
        match value {
            Value::Object(object) => Value::Object(
                object
                    .iter()
                    .map(|(name, value)| {
                        let value = if self.fields.contains(name) {
                            Value::String(REDACTED.into())
                        } else {
                            self.redact(value)
                        };
                        (name.clone(), value)
                    })
                    .collect::<Map<_, _>>(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.redact(v)).collect()),
            Value::String(text) => Value::String(self.redact_text(text)),
            other => other.clone(),
        }
    }

    fn redact_text(&self, text: &str) -> String {
        let mut text = std::borrow::Cow::Borrowed(text);
        for pattern in &self.patterns {
            if let std::borrow::Cow::Owned(replaced) = pattern.replace_all(&text, REDACTED) {
                text = std::borrow::Cow::Owned(replaced);
            }
        }
        text.into_owned()
    }
}

/// The longest beginning of `text` within `max` bytes that ends on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_bytes: usize) -> PayloadPolicy {
        PayloadPolicy::from_config(&PayloadConfig {
            routes: vec!["chat".into()],
            max_bytes,
            redact_fields: vec!["user".into(), "api_key".into()],
            redact_patterns: vec![r"[\w.+-]+@[\w-]+\.[\w.]+".into()],
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn fields_and_patterns_are_redacted_at_any_depth() {
        let captured = policy(4096).capture(&serde_json::json!({
            "user": "u-1",
            "messages": [{"role": "user", "content": "mail me at ann@example.com"}],
            "metadata": {"api_key": "sk-123"},
        }));
        assert_eq!(captured["user"], "[redacted]");
        assert_eq!(captured["metadata"]["api_key"], "[redacted]");
        assert_eq!(captured["messages"][0]["content"], "mail me at [redacted]");
        assert!(!captured.to_string().contains("example.com"));
    }

    #[test]
    fn large_payloads_are_cut_on_a_character_boundary() {
        let captured = policy(300).capture(&serde_json::json!({"content": "é".repeat(400)}));
        assert_eq!(captured["truncated"], true);
        assert!(captured["text"].as_str().unwrap().len() <= 300);
        let text = policy(300).capture_text(&"ü".repeat(400));
        assert!(text["text"].as_str().unwrap().len() <= 300);
    }
}
