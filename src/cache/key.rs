//! The exact-cache key: blake3 over a canonical form of exactly what changes an answer.
//!
//! Canonical form, hashed field by field as `name length, name, value length, value` so that no
//! field can run into the next:
//! - `scope`: tenant, namespace, route alias, and the route's targets (`provider/model`, in
//!   order): a changed chain is a different cache;
//! - every answer-changing request field, as canonical JSON (object keys sorted, no whitespace),
//!   absent fields hashed as absent: messages (roles, content and its parts, names, tool calls,
//!   tool call ids, extra per-message fields), tools, tool_choice, parallel_tool_calls,
//!   response_format, temperature, top_p, seed, max_tokens, max_completion_tokens, stop, n,
//!   logit_bias, and every field the gateway does not know (`reasoning_effort`,
//!   `frequency_penalty`, ...), because an unknown field may change the answer;
//! - left out, because they do not change the answer: `model` (the route stands for it),
//!   `stream`, `stream_options`, `user`, and the bookkeeping fields in [`IGNORED_EXTRA_FIELDS`].
//!
//! [`chat_key`] destructures the request, so adding a field to `ChatRequest` does not compile
//! until this function decides whether the field belongs in the key.

use serde::Serialize;
use serde_json::Value;

use crate::canonical::write_canonical;
use crate::protocol::openai::ChatRequest;

/// Unknown-to-us request fields that never change an answer.
pub const IGNORED_EXTRA_FIELDS: &[&str] = &[
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn to_hex(self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheKey({})", &self.to_hex()[..16])
    }
}

/// What must match, besides the request, for an entry to be served.
pub struct KeyScope<'a> {
    pub tenant: &'a str,
    pub namespace: &'a str,
    pub route: &'a str,
    pub targets: &'a [String],
    /// The prompt version the request was rendered from (`id@version#hash`, plus, for a semantic
    /// scope, the variables that must match exactly): two versions never share an answer, even
    /// where they render alike.
    pub prompt: Option<&'a str>,
}

struct KeyHasher {
    hasher: blake3::Hasher,
    scratch: Vec<u8>,
}

impl KeyHasher {
    fn field_bytes(&mut self, name: &str, bytes: &[u8]) {
        self.hasher.update(&(name.len() as u64).to_le_bytes());
        self.hasher.update(name.as_bytes());
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    fn field<T: Serialize>(&mut self, name: &str, value: &Option<T>) {
        match value {
            None => self.field_bytes(name, b"\0absent"),
            Some(value) => {
                self.scratch.clear();
                let value = serde_json::to_value(value).unwrap_or(Value::Null);
                write_canonical(&value, &mut self.scratch);
                let scratch = std::mem::take(&mut self.scratch);
                self.field_bytes(name, &scratch);
                self.scratch = scratch;
            }
        }
    }
}

pub fn chat_key(scope: &KeyScope<'_>, request: &ChatRequest) -> CacheKey {
    let ChatRequest {
        model: _,
        messages,
        stream: _,
        stream_options: _,
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
        user: _,
        extra,
    } = request;
    let mut h = KeyHasher {
        hasher: blake3::Hasher::new(),
        scratch: Vec::with_capacity(1024),
    };
    h.field_bytes("key-version", b"chat/1");
    h.field_bytes("tenant", scope.tenant.as_bytes());
    h.field_bytes("namespace", scope.namespace.as_bytes());
    h.field_bytes("route", scope.route.as_bytes());
    for target in scope.targets {
        h.field_bytes("target", target.as_bytes());
    }
    // Absent for requests without a prompt, so their keys are what they were before prompts.
    if let Some(prompt) = scope.prompt {
        h.field_bytes("prompt", prompt.as_bytes());
    }
    h.field("messages", &Some(messages));
    h.field("temperature", temperature);
    h.field("top_p", top_p);
    h.field("n", n);
    h.field("max_tokens", max_tokens);
    h.field("max_completion_tokens", max_completion_tokens);
    h.field("stop", stop);
    h.field("seed", seed);
    h.field("tools", tools);
    h.field("tool_choice", tool_choice);
    h.field("parallel_tool_calls", parallel_tool_calls);
    h.field("response_format", response_format);
    h.field("logit_bias", logit_bias);
    let mut extra: Vec<(&String, &Value)> = extra
        .iter()
        .filter(|(name, _)| !IGNORED_EXTRA_FIELDS.contains(&name.as_str()))
        .collect();
    extra.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (name, value) in extra {
        h.field(&format!("extra.{name}"), &Some(value));
    }
    CacheKey(*h.hasher.finalize().as_bytes())
}

/// The semantic scope: everything that must match exactly for a semantic hit. It is the exact key
/// of the request with the last message's content left out (that text is what gets embedded),
/// so tenant, namespace, route, targets, parameters, system prompt, earlier turns and tools all
/// take part; and the embedding model, whose vectors mean nothing to another model.
pub fn semantic_scope(scope: &KeyScope<'_>, request: &ChatRequest, model_id: &str) -> CacheKey {
    let mut rest = request.clone();
    if let Some(last) = rest.messages.last_mut() {
        last.content = None;
    }
    let without_last_text = chat_key(scope, &rest);
    let mut h = KeyHasher {
        hasher: blake3::Hasher::new(),
        scratch: Vec::new(),
    };
    h.field_bytes("key-version", b"semantic/1");
    h.field_bytes("embedding-model", model_id.as_bytes());
    h.field_bytes("request", &without_last_text.0);
    CacheKey(*h.hasher.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TARGETS: &[String] = &[];

    fn key_of(body: Value) -> CacheKey {
        key_in("tenant-a", "", body)
    }

    fn key_in(tenant: &str, namespace: &str, body: Value) -> CacheKey {
        let request: ChatRequest = serde_json::from_value(body).unwrap();
        let scope = KeyScope {
            tenant,
            namespace,
            route: "chat",
            targets: TARGETS,
            prompt: None,
        };
        chat_key(&scope, &request)
    }

    fn base() -> Value {
        json!({
            "model": "chat",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            "temperature": 0.2
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut body = base();
        body[field] = value;
        body
    }

    #[test]
    fn fields_that_do_not_change_the_answer_do_not_change_the_key() {
        let k = key_of(base());
        assert_eq!(k, key_of(with("stream", json!(true))));
        assert_eq!(
            k,
            key_of(with("stream_options", json!({"include_usage": true})))
        );
        assert_eq!(k, key_of(with("user", json!("someone"))));
        assert_eq!(k, key_of(with("metadata", json!({"trace": 1}))));
        assert_eq!(k, key_of(with("store", json!(true))));
        assert_eq!(
            k,
            key_of(with("model", json!("other-alias"))),
            "the route scope stands for the model"
        );
        let reordered: Value = serde_json::from_str(
            r#"{"temperature": 0.2, "messages": [{"content": "Be brief.", "role": "system"}, {"content": "hi", "role": "user"}], "model": "chat"}"#,
        )
        .unwrap();
        assert_eq!(
            k,
            key_of(reordered),
            "key order and whitespace do not matter"
        );
        assert_eq!(k, key_of(with("temperature", json!(0.20))));
    }

    #[test]
    fn every_answer_changing_field_changes_the_key() {
        let k = key_of(base());
        let variants = [
            with(
                "messages",
                json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi!"}]),
            ),
            with(
                "messages",
                json!([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]),
            ),
            with("messages", json!([{"role": "user", "content": "hi"}])),
            with(
                "messages",
                json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi", "name": "bob"}]),
            ),
            with(
                "messages",
                json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
            ),
            with(
                "messages",
                json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "42"}]),
            ),
            with("temperature", json!(0.3)),
            with("top_p", json!(0.5)),
            with("seed", json!(7)),
            with("max_tokens", json!(10)),
            with("max_completion_tokens", json!(10)),
            with("stop", json!(["\n"])),
            with("n", json!(2)),
            with("logit_bias", json!({"50256": -100})),
            with(
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            with("tool_choice", json!("required")),
            with("parallel_tool_calls", json!(false)),
            with("response_format", json!({"type": "json_object"})),
            with("reasoning_effort", json!("high")),
            with("frequency_penalty", json!(0.5)),
        ];
        for (i, body) in variants.into_iter().enumerate() {
            assert_ne!(k, key_of(body), "variant {i} must change the key");
        }
    }

    #[test]
    fn tenants_namespaces_and_routes_are_separate_caches() {
        let k = key_of(base());
        assert_ne!(k, key_in("tenant-b", "", base()));
        assert_ne!(k, key_in("tenant-a", "ns1", base()));
        let request: ChatRequest = serde_json::from_value(base()).unwrap();
        let other_route = chat_key(
            &KeyScope {
                tenant: "tenant-a",
                namespace: "",
                route: "chat2",
                targets: TARGETS,
                prompt: None,
            },
            &request,
        );
        assert_ne!(k, other_route);
        let targets = ["openai/gpt-4o".to_owned()];
        let other_chain = chat_key(
            &KeyScope {
                tenant: "tenant-a",
                namespace: "",
                route: "chat",
                targets: &targets,
                prompt: None,
            },
            &request,
        );
        assert_ne!(k, other_chain);
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        // "ab" + "c" and "a" + "bc" must not collide.
        assert_ne!(key_in("ab", "c", base()), key_in("a", "bc", base()));
    }
}
