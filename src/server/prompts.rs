//! The prompt store's admin API (admin key). Changes are acknowledged only once durable; each
//! takes an optional `if_revision` (the prompt's `revision` as last read) to refuse a change made
//! against a stale view, and `x-reprise-actor` names who makes it in the audit trail.
//!
//! - `GET /admin/prompts`: every prompt with its labels;
//! - `GET /admin/prompts/audit?limit=N`: the newest audit events of all prompts;
//! - `GET /admin/prompts/stats`: requests, hit ratio, latency, tokens, cost and error rate per
//!   version (this replica's traffic);
//! - `GET /admin/prompts/{id}`, `.../history`, `.../export`, `.../diff?from=A&to=B`;
//! - `POST /admin/prompts/{id}/versions`: a version (`version` optional: the next number);
//! - `GET /admin/prompts/{id}/versions/{n}`;
//! - `PUT /admin/prompts/{id}/labels/{label}`: `{"version": n}` or `{"rollout": [{"version": n,
//!   "weight": w}, ...], "salt": "..."}`; `DELETE` removes it; `POST .../rollback` points it
//!   back to its previous target;
//! - `GET /admin/prompts/{id}/experiments`, `.../experiments/{label}`: an experiment's arms,
//!   tests, pending decision, power and past decisions; `POST .../experiments/{label}/promote`
//!   promotes the arm that beats the control (409 while none does).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use crate::error::ApiError;
use crate::prompts::labels::LabelTarget;
use crate::prompts::spec::VersionSpec;
use crate::prompts::{Actor, PromptStore};

const MAX_BODY: usize = 1024 * 1024;

fn actor(headers: &HeaderMap) -> Actor {
    let name = headers
        .get("x-reprise-actor")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or("admin");
    Actor {
        name: name.chars().take(128).collect(),
        source: "admin api".into(),
    }
}

fn store<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a PromptStore, ApiError> {
    state.auth.admin(headers)?;
    state.pipeline.prompts()
}

fn reply<T: serde::Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(value) => axum::Json(value).into_response(),
        Err(error) => error.into_response(),
    }
}

/// A JSON object body, with the change's `if_revision` taken out.
async fn object_body(
    state: &AppState,
    body: axum::body::Body,
) -> Result<(serde_json::Map<String, Value>, Option<u64>), ApiError> {
    let bytes = super::read_body(state, body, MAX_BODY).await?;
    let Value::Object(mut object) = crate::protocol::parse_json::<Value>(&bytes)? else {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    };
    let if_revision = match object.remove("if_revision") {
        None | Some(Value::Null) => None,
        Some(value) => Some(value.as_u64().ok_or_else(|| {
            ApiError::invalid("if_revision must be a whole number", Some("if_revision"))
        })?),
    };
    Ok((object, if_revision))
}

fn typed<T: serde::de::DeserializeOwned>(
    object: serde_json::Map<String, Value>,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(object)).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(
            e.inner().to_string(),
            (path != ".").then_some(path.as_str()),
        )
    })
}

fn number(text: &str, param: &'static str) -> Result<u32, ApiError> {
    text.trim_start_matches('v').parse().map_err(|_| {
        ApiError::invalid(
            format!("{param} must be a version number, not {text:?}"),
            Some(param),
        )
    })
}

pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    reply(store(&state, &headers).map(|s| json!({"object": "list", "data": s.list()})))
}

pub async fn audit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    reply(store(&state, &headers).and_then(|s| {
        let limit = match query.get("limit") {
            Some(limit) => limit
                .parse::<usize>()
                .map_err(|_| ApiError::invalid("limit must be a whole number", Some("limit")))?,
            None => 100,
        };
        let data: Vec<Value> = s
            .audit(limit)
            .into_iter()
            .map(|(prompt, event)| {
                let mut event = serde_json::to_value(event).unwrap_or(Value::Null);
                if let Some(object) = event.as_object_mut() {
                    object.insert("prompt".into(), Value::from(prompt));
                }
                event
            })
            .collect();
        Ok(json!({"object": "list", "data": data}))
    }))
}

pub async fn stats(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    reply(store(&state, &headers).map(|s| json!({"object": "list", "data": s.stats()})))
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    reply(store(&state, &headers).and_then(|s| s.show(&id)))
}

pub async fn history(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    reply(
        store(&state, &headers)
            .and_then(|s| s.history(&id))
            .map(|events| json!({"object": "list", "data": events})),
    )
}

/// `GET /admin/prompts/{id}/feedback`: per version and metric, the reported outcomes' mean
/// with a 95% interval, cache replays counted apart.
pub async fn feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let answer = async {
        state.auth.admin(&headers)?;
        state.pipeline.feedback()?.results(&id).await
    };
    reply(answer.await)
}

/// `GET /admin/prompts/{id}/experiments`.
pub async fn experiments(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let answer = async {
        state.auth.admin(&headers)?;
        state.pipeline.experiments()?.list(&id).await
    };
    reply(answer.await)
}

/// `GET /admin/prompts/{id}/experiments/{label}`.
pub async fn experiment(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, label)): Path<(String, String)>,
) -> Response {
    let answer = async {
        state.auth.admin(&headers)?;
        state.pipeline.experiments()?.status(&id, &label).await
    };
    reply(answer.await)
}

/// `POST /admin/prompts/{id}/experiments/{label}/promote`.
pub async fn promote(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, label)): Path<(String, String)>,
) -> Response {
    let answer = async {
        state.auth.admin(&headers)?;
        state
            .pipeline
            .experiments()?
            .promote(&id, &label, &actor(&headers))
            .await
    };
    reply(answer.await)
}

pub async fn export(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    reply(
        store(&state, &headers)
            .and_then(|s| s.export(&id))
            .map(|files| json!({"prompt": id, "files": files})),
    )
}

pub async fn diff(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    reply(store(&state, &headers).and_then(|s| {
        let side = |name: &'static str| {
            query
                .get(name)
                .ok_or_else(|| {
                    ApiError::invalid(format!("`{name}` (a version) is required"), Some(name))
                })
                .and_then(|v| number(v, name))
        };
        let (from, to) = (side("from")?, side("to")?);
        Ok(json!({"prompt": id, "from": from, "to": to, "diff": s.diff(&id, from, to)?}))
    }))
}

pub async fn version(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, version)): Path<(String, String)>,
) -> Response {
    reply(store(&state, &headers).and_then(|s| s.version(&id, number(&version, "version")?)))
}

pub async fn create_version(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Response {
    let result = async {
        let store = store(&state, &headers)?;
        let (mut object, if_revision) = object_body(&state, body).await?;
        let number = match object.remove("version") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        ApiError::invalid("version must be a whole number", Some("version"))
                    })?,
            ),
        };
        let spec: VersionSpec = typed(object)?;
        store
            .create_version(&id, number, spec, if_revision, &actor(&headers))
            .await
    }
    .await;
    match result {
        Ok(outcome) => {
            let status = if outcome.changed {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(outcome)).into_response()
        }
        Err(error) => error.into_response(),
    }
}

pub async fn set_label(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, label)): Path<(String, String)>,
    body: axum::body::Body,
) -> Response {
    let result = async {
        let store = store(&state, &headers)?;
        let (object, if_revision) = object_body(&state, body).await?;
        let target: LabelTarget = typed(object)?;
        store
            .set_label(&id, &label, target, if_revision, &actor(&headers))
            .await
    }
    .await;
    reply(result)
}

/// The label changes that take no body: `DELETE .../labels/{label}` and `POST .../rollback`.
enum LabelCommand {
    Delete,
    Rollback,
}

async fn label_command(
    state: &AppState,
    headers: &HeaderMap,
    (id, label): (String, String),
    query: &HashMap<String, String>,
    command: LabelCommand,
) -> Response {
    let result = async {
        let store = store(state, headers)?;
        let if_revision = revision_query(query)?;
        let actor = actor(headers);
        match command {
            LabelCommand::Delete => store.delete_label(&id, &label, if_revision, &actor).await,
            LabelCommand::Rollback => store.rollback(&id, &label, if_revision, &actor).await,
        }
    }
    .await;
    reply(result)
}

pub async fn delete_label(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(path): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    label_command(&state, &headers, path, &query, LabelCommand::Delete).await
}

pub async fn rollback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(path): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    label_command(&state, &headers, path, &query, LabelCommand::Rollback).await
}

fn revision_query(query: &HashMap<String, String>) -> Result<Option<u64>, ApiError> {
    query
        .get("if_revision")
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::invalid("if_revision must be a whole number", Some("if_revision"))
            })
        })
        .transpose()
}
