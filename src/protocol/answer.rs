//! A whole chat answer as it passes through the gateway: the upstream's bytes, served to the client
//! as they came, and the few facts the stages read from it (usage, model, id, whether it may be
//! cached), parsed once without building a JSON tree. The tree is built only for a stage that
//! needs the whole answer (the semantic cache, Anthropic's shape, a captured payload).

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// A `chat.completion` (or anything else an upstream answered with, as long as it is JSON).
/// Cloning shares it.
#[derive(Clone)]
pub struct Answer(Arc<Inner>);

struct Inner {
    facts: AnswerFacts,
    form: Form,
}

/// The form an answer came in, and the other one once something asked for it.
enum Form {
    Text { bytes: Bytes, tree: OnceLock<Value> },
    Tree { tree: Value, bytes: OnceLock<Bytes> },
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("facts", &self.0.facts)
            .finish_non_exhaustive()
    }
}

impl Answer {
    /// An upstream's answer, kept as its bytes: `Err` if they are not JSON.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, serde_json::Error> {
        let (facts, tree) = match AnswerFacts::read(&bytes) {
            Some(facts) => (facts, OnceLock::new()),
            // An answer outside the usual shape (a field of another type, a duplicate key) is
            // read through the tree, so that every JSON answer means what it meant before.
            None => {
                let tree: Value = serde_json::from_slice(&bytes)?;
                (AnswerFacts::of_value(&tree), OnceLock::from(tree))
            }
        };
        Ok(Self(Arc::new(Inner {
            facts,
            form: Form::Text { bytes, tree },
        })))
    }

    /// An answer the gateway built (translated from another shape, assembled from a stream, read
    /// from the cache).
    pub fn from_value(tree: Value) -> Self {
        Self(Arc::new(Inner {
            facts: AnswerFacts::of_value(&tree),
            form: Form::Tree {
                tree,
                bytes: OnceLock::new(),
            },
        }))
    }

    pub fn facts(&self) -> &AnswerFacts {
        &self.0.facts
    }

    /// The answer as JSON text, to send or to store.
    pub fn bytes(&self) -> &Bytes {
        match &self.0.form {
            Form::Text { bytes, .. } => bytes,
            // A tree of JSON values always serialises.
            Form::Tree { tree, bytes } => bytes.get_or_init(|| {
                serde_json::to_vec(tree).map_or_else(|_| Bytes::new(), Bytes::from)
            }),
        }
    }

    /// The answer as a JSON tree, for a stage that reads more than its facts.
    pub fn value(&self) -> &Value {
        match &self.0.form {
            // The text was read as JSON when the answer was made.
            Form::Text { bytes, tree } => {
                tree.get_or_init(|| serde_json::from_slice(bytes).unwrap_or(Value::Null))
            }
            Form::Tree { tree, .. } => tree,
        }
    }
}

/// What the gateway reads from a whole answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerFacts {
    pub id: Option<String>,
    /// The model the upstream says answered.
    pub model: Option<String>,
    /// `None` when the upstream sent no `usage` (or `null`).
    pub usage: Option<UsageFacts>,
    pub cacheable: Cacheable,
}

/// Token counts as reported; a count that is missing or not a whole number is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageFacts {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`: input the provider served from its own cache.
    pub cached_tokens: u64,
}

/// Whether an answer may be stored: every choice finished normally (`stop` or `tool_calls`, or
/// `length` where a route allows truncated answers), none was refused, and every tool call's
/// arguments are valid JSON. A refusal, a content-filter stop or a malformed tool call is never
/// replayed to anyone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cacheable {
    #[default]
    No,
    /// Only where truncated answers may be cached: a choice stopped at its length.
    IfTruncatedAllowed,
    Yes,
}

impl Cacheable {
    pub fn allows(self, truncated_allowed: bool) -> bool {
        match self {
            Cacheable::Yes => true,
            Cacheable::IfTruncatedAllowed => truncated_allowed,
            Cacheable::No => false,
        }
    }

    fn of_choices<'c>(choices: impl IntoIterator<Item = ChoiceEnd<'c>>) -> Self {
        let mut verdict = Cacheable::Yes;
        let mut any = false;
        for choice in choices {
            any = true;
            if choice.refused || !choice.tool_calls_valid {
                return Cacheable::No;
            }
            match choice.finish_reason {
                Some("stop") | Some("tool_calls") => {}
                Some("length") => verdict = Cacheable::IfTruncatedAllowed,
                _ => return Cacheable::No,
            }
        }
        if any { verdict } else { Cacheable::No }
    }

    /// The same verdict read from a tree (a stream's assembled answer, an answer of an unusual
    /// shape).
    pub fn of_value(response: &Value) -> Self {
        let Some(choices) = response.get("choices").and_then(Value::as_array) else {
            return Cacheable::No;
        };
        Self::of_choices(choices.iter().map(|choice| {
            let message = choice.get("message");
            ChoiceEnd {
                finish_reason: choice.get("finish_reason").and_then(Value::as_str),
                refused: message
                    .and_then(|m| m.get("refusal"))
                    .is_some_and(|r| !r.is_null()),
                tool_calls_valid: message
                    .and_then(|m| m.get("tool_calls"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .all(|call| {
                        call.pointer("/function/arguments")
                            .and_then(Value::as_str)
                            .is_some_and(arguments_are_json)
                    }),
            }
        }))
    }
}

struct ChoiceEnd<'a> {
    finish_reason: Option<&'a str>,
    refused: bool,
    tool_calls_valid: bool,
}

fn arguments_are_json(arguments: &str) -> bool {
    serde_json::from_str::<IgnoredAny>(arguments).is_ok()
}

impl AnswerFacts {
    /// Prompt and completion tokens (0 and 0 without usage).
    pub fn tokens(&self) -> (u64, u64) {
        self.usage
            .map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens))
    }

    /// The facts of a tree.
    pub fn of_value(response: &Value) -> Self {
        let text = |field: &str| {
            response
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let usage = response.get("usage").filter(|u| !u.is_null()).map(|usage| {
            let count = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
            UsageFacts {
                prompt_tokens: count("/prompt_tokens"),
                completion_tokens: count("/completion_tokens"),
                cached_tokens: count("/prompt_tokens_details/cached_tokens"),
            }
        });
        Self {
            id: text("id"),
            model: text("model"),
            usage,
            cacheable: Cacheable::of_value(response),
        }
    }

    /// The facts read straight from JSON text, skipping everything else: `None` if the answer
    /// is not an object of the usual shape (then [`AnswerFacts::of_value`] reads it).
    fn read(bytes: &[u8]) -> Option<Self> {
        let Object(head): Object<Head<'_>> = serde_json::from_slice(bytes).ok()?;
        let mut choices = Vec::new();
        for Object(choice) in head.choices.iter().flatten() {
            let message = choice.message.as_ref().map(|Object(m)| m);
            let tool_calls_valid = match message.and_then(|m| m.tool_calls.as_ref()) {
                None => true,
                Some(calls) => calls.iter().all(|Object(call)| {
                    call.function
                        .as_ref()
                        .and_then(|Object(f)| f.arguments.as_deref())
                        .is_some_and(arguments_are_json)
                }),
            };
            choices.push(ChoiceEnd {
                finish_reason: choice.finish_reason.as_deref(),
                refused: message.is_some_and(|m| m.refusal.is_some()),
                tool_calls_valid,
            });
        }
        let cacheable = match head.choices {
            Some(_) => Cacheable::of_choices(choices),
            None => Cacheable::No,
        };
        Some(Self {
            id: head.id.map(Cow::into_owned),
            model: head.model.map(Cow::into_owned),
            usage: head.usage.map(|Object(usage)| UsageFacts {
                prompt_tokens: usage.prompt_tokens.unwrap_or(0),
                completion_tokens: usage.completion_tokens.unwrap_or(0),
                cached_tokens: usage
                    .prompt_tokens_details
                    .and_then(|Object(d)| d.cached_tokens)
                    .unwrap_or(0),
            }),
            cacheable,
        })
    }
}

// The shape `AnswerFacts::read` expects. Any other type in these fields (or a duplicate key)
// fails the read, and the answer is read through its tree instead.

/// A struct read only from a JSON object: serde would also read one from an array, by position,
/// where the tree sees no fields at all.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<Object<UsageHead>>,
    #[serde(borrow)]
    choices: Option<Vec<Object<ChoiceHead<'a>>>>,
}

#[derive(Deserialize)]
struct UsageHead {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<Object<DetailsHead>>,
}

#[derive(Deserialize)]
struct DetailsHead {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ChoiceHead<'a> {
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Object<MessageHead<'a>>>,
}

#[derive(Deserialize)]
struct MessageHead<'a> {
    refusal: Option<IgnoredAny>,
    #[serde(borrow)]
    tool_calls: Option<Vec<Object<ToolCallHead<'a>>>>,
}

#[derive(Deserialize)]
struct ToolCallHead<'a> {
    #[serde(borrow)]
    function: Option<Object<FunctionHead<'a>>>,
}

#[derive(Deserialize)]
struct FunctionHead<'a> {
    #[serde(borrow)]
    arguments: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(answer: &Value) -> AnswerFacts {
        Answer::from_bytes(Bytes::from(answer.to_string()))
            .unwrap()
            .facts()
            .clone()
    }

    #[test]
    fn facts_read_from_the_text_are_the_facts_of_the_tree() {
        let answers = [
            json!({"id": "c1", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi \"there\""}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}}),
            json!({"choices": [{"message": {"content": "a"}, "finish_reason": "length"}], "usage": null}),
            json!({"choices": [{"message": {"content": "a"}, "finish_reason": "length"}, {"finish_reason": "content_filter"}]}),
            json!({"choices": [{"message": {"content": null, "refusal": "no"}, "finish_reason": "stop"}]}),
            json!({"choices": [{"message": {"refusal": null, "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\":1}"}}]}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": "{broken"}}]}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [{"message": {"tool_calls": [{"function": {"name": "f"}}]}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 1}}),
            json!({"choices": null}),
            json!({"usage": {}}),
            // Outside the usual shape: read through the tree.
            json!({"usage": {"prompt_tokens": 1.5, "completion_tokens": -1}, "choices": "x"}),
            json!({"model": 7, "choices": [{"message": "text", "finish_reason": "stop"}]}),
            json!({"choices": [{"message": {"tool_calls": {"not": "a list"}}, "finish_reason": "stop"}]}),
            json!({"choices": [["stop", null]]}),
            json!([1, 2]),
            json!("text"),
        ];
        for answer in answers {
            assert_eq!(read(&answer), AnswerFacts::of_value(&answer), "{answer}");
        }
        let first = read(
            &json!({"id": "c1", "model": "m", "choices": [{"message": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}}),
        );
        assert_eq!(first.id.as_deref(), Some("c1"));
        assert_eq!(first.model.as_deref(), Some("m"));
        assert_eq!(
            first.usage,
            Some(UsageFacts {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 1
            })
        );
        assert_eq!(first.cacheable, Cacheable::Yes);
    }

    #[test]
    fn only_complete_well_formed_answers_are_cacheable() {
        let completion = |message: Value, finish: &str| {
            read(
                &json!({"id": "c1", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}]}),
            )
            .cacheable
        };
        let text = json!({"role": "assistant", "content": "hi", "refusal": null});
        assert!(completion(text.clone(), "stop").allows(false));
        assert!(!completion(text.clone(), "length").allows(false));
        assert!(completion(text.clone(), "length").allows(true));
        assert!(!completion(text, "content_filter").allows(true));
        let refusal = json!({"role": "assistant", "content": null, "refusal": "no"});
        assert!(!completion(refusal, "stop").allows(false));
        let bad_tool = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{\"a\":"}}]});
        assert!(!completion(bad_tool, "tool_calls").allows(false));
        assert!(!read(&json!({"choices": []})).cacheable.allows(true));
    }

    #[test]
    fn a_duplicate_key_means_what_the_tree_makes_of_it() {
        let text = r#"{"model": "a", "model": "b", "choices": []}"#;
        let answer = Answer::from_bytes(Bytes::from(text)).unwrap();
        assert_eq!(answer.facts().model.as_deref(), Some("b"));
    }

    #[test]
    fn the_upstreams_bytes_are_served_as_they_came() {
        let text = "{\n  \"id\": \"x\",\n  \"choices\": []\n}\n";
        let answer = Answer::from_bytes(Bytes::from(text)).unwrap();
        assert_eq!(answer.bytes(), text.as_bytes());
        assert_eq!(answer.value(), &json!({"id": "x", "choices": []}));
        assert!(Answer::from_bytes(Bytes::from("{\"id\": ")).is_err());
        assert!(Answer::from_bytes(Bytes::from("{} trailing")).is_err());
        let built = Answer::from_value(json!({"id": "y"}));
        assert_eq!(built.bytes(), r#"{"id":"y"}"#.as_bytes());
    }
}
