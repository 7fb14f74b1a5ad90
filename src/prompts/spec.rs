//! One prompt version: its message templates, declared variables, model alias and default
//! parameters; how it is hashed, checked and rendered.
//!
//! Templates are minijinja in strict mode, compiled when the version is loaded or created, so a
//! syntax error or a variable the template uses but does not declare is found then, not on a
//! request. Variable values are data to the engine: `{{ question }}` holding `{{ secret }}` renders
//! those characters literally.

use std::collections::BTreeMap;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::protocol::openai::{ChatMessage, ChatRequest, Role};

/// What a version file (or the admin API) defines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VersionSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The route alias to send the rendered prompt to; without one, the request's `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Request fields applied when the request does not set them (`temperature`, `max_tokens`, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, VariableSpec>,
    pub messages: Vec<MessageTemplate>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VariableSpec {
    #[serde(rename = "type")]
    pub kind: VariableType,
    /// Used when a request leaves the variable out; without one, the variable is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// Text a person wrote (a question, a message to translate). The semantic cache embeds only
    /// these; every other variable must match exactly for a cached answer to be served.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub free_text: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VariableType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

impl VariableType {
    fn admits(self, value: &Value) -> bool {
        match self {
            VariableType::String => value.is_string(),
            VariableType::Integer => value.is_i64() || value.is_u64(),
            VariableType::Number => value.is_number(),
            VariableType::Boolean => value.is_boolean(),
            VariableType::Array => value.is_array(),
            VariableType::Object => value.is_object(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            VariableType::String => "string",
            VariableType::Integer => "integer",
            VariableType::Number => "number",
            VariableType::Boolean => "boolean",
            VariableType::Array => "array",
            VariableType::Object => "object",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MessageTemplate {
    pub role: Role,
    pub content: String,
}

/// Request fields a version may not preset: they belong to the call, not to the prompt.
const CALL_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "user",
    "prompt",
];

/// Rendering steps allowed per message: a template from the admin API cannot loop forever on a
/// request.
const FUEL: u64 = 200_000;

/// The content address of a version: blake3 over its canonical JSON (keys sorted), so formatting,
/// comments and key order in the file do not change it and any change to what is sent does.
pub fn content_hash(spec: &VersionSpec) -> String {
    let value = serde_json::to_value(spec).unwrap_or(Value::Null);
    let mut canonical = b"prompt-version/1\n".to_vec();
    crate::canonical::write_canonical(&value, &mut canonical);
    blake3::hash(&canonical).to_hex().to_string()
}

/// Why a version cannot be accepted; `field` is a dotted path into the version.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    pub field: String,
    pub message: String,
    /// For template errors: the line inside the template.
    pub template_line: Option<usize>,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn spec_error(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
        template_line: None,
    }
}

pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A version checked and compiled, ready to render.
pub struct CompiledVersion {
    pub number: u32,
    pub hash: String,
    pub spec: VersionSpec,
    env: Environment<'static>,
}

impl std::fmt::Debug for CompiledVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CompiledVersion(v{} {})", self.number, &self.hash[..12])
    }
}

fn template_name(index: usize) -> String {
    format!("messages[{index}].content")
}

impl CompiledVersion {
    /// Checks everything that can be checked without a request: names, defaults against their
    /// types, preset parameters, template syntax, and that templates use only declared variables.
    pub fn compile(number: u32, spec: VersionSpec) -> Result<Self, SpecError> {
        if number == 0 {
            return Err(spec_error("version", "version numbers start at 1"));
        }
        if spec.messages.is_empty() {
            return Err(spec_error(
                "messages",
                "a prompt needs at least one message",
            ));
        }
        for (name, variable) in &spec.variables {
            let field = format!("variables.{name}");
            if !is_identifier(name) {
                return Err(spec_error(
                    field,
                    "a variable name is letters, digits and `_`, not starting with a digit",
                ));
            }
            if let Some(default) = &variable.default
                && !variable.kind.admits(default)
            {
                return Err(spec_error(
                    format!("{field}.default"),
                    format!("the default is not of type {}", variable.kind.name()),
                ));
            }
            if variable.free_text && variable.kind != VariableType::String {
                return Err(spec_error(
                    format!("{field}.free_text"),
                    "only a string variable can be free text",
                ));
            }
        }
        if let Some(model) = &spec.model
            && model.trim().is_empty()
        {
            return Err(spec_error("model", "must not be empty"));
        }
        check_parameters(&spec.parameters)?;
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env.set_keep_trailing_newline(true);
        for (index, message) in spec.messages.iter().enumerate() {
            let name = template_name(index);
            env.add_template_owned(name.clone(), message.content.clone())
                .map_err(|e| template_error(&name, &e))?;
            let template = env
                .get_template(&name)
                .map_err(|e| template_error(&name, &e))?;
            let mut undeclared: Vec<String> = template
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !spec.variables.contains_key(v) && !is_builtin(v))
                .collect();
            undeclared.sort();
            if let Some(first) = undeclared.first() {
                return Err(SpecError {
                    field: name,
                    message: format!(
                        "uses the variable `{first}`, which is not declared under `variables`"
                    ),
                    template_line: message
                        .content
                        .lines()
                        .position(|line| line.contains(first.as_str()))
                        .map(|i| i + 1),
                });
            }
        }
        let hash = content_hash(&spec);
        Ok(Self {
            number,
            hash,
            spec,
            env,
        })
    }

    /// Renders the messages with `values`. A missing, undeclared or mistyped variable is an error
    /// naming it; nothing half-rendered is ever returned.
    pub fn render(&self, values: &Map<String, Value>) -> Result<Rendered, RenderError> {
        for (name, value) in values {
            let Some(variable) = self.spec.variables.get(name) else {
                return Err(RenderError::Variable {
                    name: name.clone(),
                    message: format!(
                        "`{name}` is not a variable of this prompt version (it declares: {})",
                        self.declared()
                    ),
                });
            };
            if !variable.kind.admits(value) {
                return Err(RenderError::Variable {
                    name: name.clone(),
                    message: format!("`{name}` must be of type {}", variable.kind.name()),
                });
            }
        }
        let mut context = Map::new();
        let mut free_text = Vec::new();
        let mut exact = Vec::new();
        for (name, variable) in &self.spec.variables {
            let value = match values.get(name).or(variable.default.as_ref()) {
                Some(value) => value.clone(),
                None => {
                    return Err(RenderError::Variable {
                        name: name.clone(),
                        message: format!("`{name}` is required and has no default"),
                    });
                }
            };
            if variable.free_text {
                free_text.push(value.as_str().unwrap_or_default().to_owned());
            } else {
                exact.push((name.clone(), value.clone()));
            }
            context.insert(name.clone(), value);
        }
        let context = minijinja::Value::from_serialize(&context);
        let mut messages = Vec::with_capacity(self.spec.messages.len());
        for (index, message) in self.spec.messages.iter().enumerate() {
            let name = template_name(index);
            let rendered = self
                .env
                .get_template(&name)
                .and_then(|t| t.render(&context))
                .map_err(|e| RenderError::Template {
                    message: template_error(&name, &e).to_string(),
                })?;
            messages.push(ChatMessage::text(message.role, rendered));
        }
        Ok(Rendered {
            messages,
            free_text: (!free_text.is_empty()).then(|| free_text.join("\n")),
            exact_variables: exact,
        })
    }

    fn declared(&self) -> String {
        if self.spec.variables.is_empty() {
            return "none".into();
        }
        self.spec
            .variables
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// minijinja's globals (`range`, `loop`, ...) are not variables a request provides.
fn is_builtin(name: &str) -> bool {
    matches!(
        name,
        "range" | "dict" | "namespace" | "loop" | "debug" | "true" | "false" | "none"
    )
}

fn template_error(name: &str, error: &minijinja::Error) -> SpecError {
    let detail = error.detail().map(|d| format!(": {d}")).unwrap_or_default();
    let line = error.line();
    SpecError {
        field: name.to_owned(),
        message: format!(
            "template error{}: {}{detail}",
            line.map(|l| format!(" on line {l}")).unwrap_or_default(),
            error.kind()
        ),
        template_line: line,
    }
}

fn check_parameters(parameters: &Map<String, Value>) -> Result<(), SpecError> {
    for name in parameters.keys() {
        if CALL_FIELDS.contains(&name.as_str()) {
            return Err(spec_error(
                format!("parameters.{name}"),
                "belongs to the request, not to a prompt version",
            ));
        }
    }
    // The parameters must make a valid request: a wrong type is found now, not on a request.
    let mut probe = parameters.clone();
    probe.insert("model".into(), Value::from("probe"));
    probe.insert("messages".into(), Value::Array(Vec::new()));
    serde_path_to_error::deserialize::<_, ChatRequest>(Value::Object(probe))
        .map(|_| ())
        .map_err(|e| spec_error(format!("parameters.{}", e.path()), e.inner().to_string()))
}

/// A version rendered with a request's variables.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub messages: Vec<ChatMessage>,
    /// The free-text variables' values, one per line: what the semantic cache embeds.
    pub free_text: Option<String>,
    /// The other variables' values (defaults included), by name: part of the semantic scope.
    pub exact_variables: Vec<(String, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RenderError {
    Variable { name: String, message: String },
    Template { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: Value) -> VersionSpec {
        serde_json::from_value(value).unwrap()
    }

    fn reply() -> VersionSpec {
        spec(json!({
            "description": "support reply",
            "model": "chat",
            "parameters": {"temperature": 0.2},
            "variables": {
                "product": {"type": "string", "default": "Acme"},
                "question": {"type": "string", "free_text": true},
                "count": {"type": "integer", "default": 3},
            },
            "messages": [
                {"role": "system", "content": "You support {{ product }}. Give {{ count }} steps."},
                {"role": "user", "content": "{{ question }}"},
            ],
        }))
    }

    fn text(rendered: &Rendered, index: usize) -> String {
        rendered.messages[index]
            .content
            .as_ref()
            .unwrap()
            .joined_text()
    }

    #[test]
    fn renders_with_defaults_and_splits_free_text_from_exact_variables() {
        let version = CompiledVersion::compile(1, reply()).unwrap();
        let values = json!({"question": "How do I reset my password?"});
        let rendered = version.render(values.as_object().unwrap()).unwrap();
        assert_eq!(text(&rendered, 0), "You support Acme. Give 3 steps.");
        assert_eq!(text(&rendered, 1), "How do I reset my password?");
        assert_eq!(
            rendered.free_text.as_deref(),
            Some("How do I reset my password?")
        );
        assert_eq!(
            rendered.exact_variables,
            vec![
                ("count".to_owned(), json!(3)),
                ("product".to_owned(), json!("Acme"))
            ]
        );
    }

    #[test]
    fn variable_values_are_data_not_template_syntax() {
        let version = CompiledVersion::compile(1, reply()).unwrap();
        let values = json!({"question": "{{ product }} {% for x in range(9) %}x{% endfor %}"});
        let rendered = version.render(values.as_object().unwrap()).unwrap();
        assert_eq!(
            text(&rendered, 1),
            "{{ product }} {% for x in range(9) %}x{% endfor %}"
        );
    }

    #[test]
    fn missing_extra_and_mistyped_variables_are_named() {
        let version = CompiledVersion::compile(1, reply()).unwrap();
        let cases = [
            (json!({}), "question", "required"),
            (
                json!({"question": "q", "tone": "warm"}),
                "tone",
                "not a variable",
            ),
            (
                json!({"question": "q", "count": "three"}),
                "count",
                "integer",
            ),
            (json!({"question": 5}), "question", "string"),
        ];
        for (values, variable, says) in cases {
            match version.render(values.as_object().unwrap()) {
                Err(RenderError::Variable { name, message }) => {
                    assert_eq!(name, variable);
                    assert!(message.contains(says), "{message}");
                }
                other => panic!("{values}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_versions_are_rejected_with_the_field() {
        let mut undeclared = reply();
        undeclared.messages[0].content = "Hello {{ customer }}".into();
        let mut syntax = reply();
        syntax.messages[1].content = "line one\n{{ question ".into();
        let mut default_type = reply();
        default_type.variables.get_mut("count").unwrap().default = Some(json!("x"));
        let mut parameter = reply();
        parameter
            .parameters
            .insert("temperature".into(), json!("hot"));
        let mut call_field = reply();
        call_field.parameters.insert("stream".into(), json!(true));
        let mut empty = reply();
        empty.messages.clear();
        let cases = [
            (undeclared, "messages[0].content", "customer"),
            (syntax, "messages[1].content", "line 2"),
            (default_type, "variables.count.default", "integer"),
            (parameter, "parameters.temperature", ""),
            (call_field, "parameters.stream", "request"),
            (empty, "messages", "at least one"),
        ];
        for (spec, field, says) in cases {
            let error = CompiledVersion::compile(1, spec).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error.message.contains(says), "{error}");
        }
    }

    #[test]
    fn the_hash_ignores_key_order_and_changes_with_content() {
        let a = reply();
        let mut b: VersionSpec =
            serde_json::from_str(&serde_json::to_string(&reply()).unwrap()).unwrap();
        b.parameters = serde_json::from_value(json!({"temperature": 0.2})).unwrap();
        assert_eq!(content_hash(&a), content_hash(&b));
        b.messages[0].content.push('!');
        assert_ne!(content_hash(&a), content_hash(&b));
    }

    #[test]
    fn a_runaway_template_stops_instead_of_hanging() {
        let mut runaway = reply();
        runaway.messages[0].content =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                .into();
        let version = CompiledVersion::compile(1, runaway).unwrap();
        let values = json!({"question": "q"});
        assert!(matches!(
            version.render(values.as_object().unwrap()),
            Err(RenderError::Template { .. })
        ));
    }
}
