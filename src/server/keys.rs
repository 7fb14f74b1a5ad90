//! The run-time keys' admin API (admin key). A secret is in the answer to `create` and `rotate`
//! only; every other answer shows the key's prefix.
//!
//! - `POST /admin/keys`: `{"name", "tenant", "models"?, "expires_at"? | "expires_in"?,
//!   "metadata"?}` → 201 with `secret`;
//! - `GET /admin/keys?tenant=T`, `GET /admin/keys/{id}`;
//! - `PATCH /admin/keys/{id}`: the same fields but `tenant` (`null` clears `models` or
//!   `expires_at`);
//! - `POST /admin/keys/{id}/rotate`: `{"grace": "1h"}` (default 0: the old secret stops at once)
//!   → the new `secret`;
//! - `POST /admin/keys/{id}/revoke`: refused on every replica within `[keys] cache_ttl`.
//!
//! Every key is shown with its spend today and this month (from the usage book) and, if it has
//! a budget, where the budget stands. `GET /admin/usage?from&to&tenant&key&route&model&group_by`
//! answers the usage book itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use crate::error::ApiError;
use crate::keys::{Issued, KeyChange, KeyStore};
use crate::limits::usage::UsageQuery;

const MAX_BODY: usize = 64 * 1024;

fn keys<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a KeyStore, ApiError> {
    state.auth.admin(headers)?;
    state.pipeline.keys()
}

async fn change(state: &AppState, body: axum::body::Body) -> Result<KeyChange, ApiError> {
    let bytes = super::read_body(state, body, MAX_BODY).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(KeyChange::default());
    }
    crate::protocol::parse_json(&bytes)
}

fn issued(status: StatusCode, issued: Issued) -> Response {
    let mut body = issued.record.view();
    body["secret"] = Value::String(issued.secret);
    (status, axum::Json(body)).into_response()
}

fn reply(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Spend by key or tenant (`column`) today and this month, from the usage book.
struct Spend {
    today: Value,
    month: Value,
    column: &'static str,
}

impl Spend {
    async fn by(state: &AppState, column: &'static str) -> Result<Self, ApiError> {
        let usage = state.pipeline.limits().usage();
        let today = usage
            .query(&UsageQuery {
                group_by: Some(column.into()),
                ..UsageQuery::default()
            })
            .await?;
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let month = usage
            .query(&UsageQuery {
                from: Some(format!("{}-01", &now[..7])),
                to: Some(now[..10].to_owned()),
                group_by: Some(column.into()),
                ..UsageQuery::default()
            })
            .await?;
        Ok(Self {
            today,
            month,
            column,
        })
    }

    fn of(&self, id: &str) -> Value {
        let cost = |book: &Value| {
            book["data"]
                .as_array()
                .and_then(|rows| rows.iter().find(|row| row[self.column] == id))
                .map_or(json!(0.0), |row| row["cost_usd"].clone())
        };
        json!({"today_usd": cost(&self.today), "month_usd": cost(&self.month)})
    }
}

/// `GET /admin/tenants`: the tenants with limits in the config, with their spend and budget.
pub async fn tenants(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    reply(
        async {
            state.auth.admin(&headers)?;
            let spend = Spend::by(&state, "tenant").await?;
            let limits = state.pipeline.limits();
            let mut data = Vec::new();
            for (name, tenant) in limits.tenants() {
                let mut view = json!({
                    "object": "tenant",
                    "tenant": name,
                    "limits": tenant,
                    "spend": spend.of(name),
                });
                if let Some(budget) = &tenant.budget {
                    view["budget"] = limits.budget_standing("tenant", name, budget).await;
                }
                data.push(view);
            }
            Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
        }
        .await,
    )
}

/// Keys as the admin API shows them: with their spend, and their budget's standing.
async fn views(
    state: &AppState,
    records: &[crate::keys::KeyRecord],
) -> Result<Vec<Value>, ApiError> {
    let spend = Spend::by(state, "key").await?;
    let mut views = Vec::with_capacity(records.len());
    for record in records {
        let mut view = record.view();
        view["spend"] = spend.of(&record.id);
        if let Some(budget) = &record.limits.budget {
            view["budget"] = state
                .pipeline
                .limits()
                .budget_standing("key", &record.id, budget)
                .await;
        }
        views.push(view);
    }
    Ok(views)
}

/// A key as the admin API shows it, or the error.
async fn viewed(state: &AppState, result: Result<crate::keys::KeyRecord, ApiError>) -> Response {
    let viewed = async {
        let record = result?;
        let mut views = views(state, std::slice::from_ref(&record)).await?;
        Ok(axum::Json(views.pop().unwrap_or_default()).into_response())
    };
    reply(viewed.await)
}

/// `GET /admin/usage`: requests, tokens, cost, cache hits and money saved, by day, tenant, key,
/// route and model.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    reply(
        async {
            state.auth.admin(&headers)?;
            let query: UsageQuery = super::query_params(query, "usage")?;
            let book = state.pipeline.limits().usage().query(&query).await?;
            Ok(axum::Json(book).into_response())
        }
        .await,
    )
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    reply(
        async {
            let keys = keys(&state, &headers)?;
            let created = keys.create(change(&state, body).await?).await?;
            tracing::info!(key = %created.record.id, tenant = %created.record.tenant, "key created");
            Ok(issued(StatusCode::CREATED, created))
        }
        .await,
    )
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    reply(
        async {
            let records = keys(&state, &headers)?
                .list(query.get("tenant").map(String::as_str))
                .await?;
            let data = views(&state, &records).await?;
            Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
        }
        .await,
    )
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let record = async { keys(&state, &headers)?.get(&id).await }.await;
    viewed(&state, record).await
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Response {
    let updated = async {
        let keys = keys(&state, &headers)?;
        keys.update(&id, change(&state, body).await?).await
    }
    .await;
    if let Ok(record) = &updated {
        tracing::info!(key = %record.id, "key updated");
    }
    viewed(&state, updated).await
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Rotation {
    #[serde(default, with = "humantime_serde")]
    grace: Option<Duration>,
}

pub async fn rotate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Response {
    reply(
        async {
            let keys = keys(&state, &headers)?;
            let bytes = super::read_body(&state, body, MAX_BODY).await?;
            let rotation: Rotation = if bytes.iter().all(u8::is_ascii_whitespace) {
                Rotation::default()
            } else {
                crate::protocol::parse_json(&bytes)?
            };
            let rotated = keys.rotate(&id, rotation.grace.unwrap_or_default()).await?;
            tracing::info!(key = %rotated.record.id, "key rotated");
            Ok(issued(StatusCode::OK, rotated))
        }
        .await,
    )
}

pub async fn revoke(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let revoked = async { keys(&state, &headers)?.revoke(&id).await }.await;
    if let Ok(record) = &revoked {
        tracing::info!(key = %record.id, "key revoked");
    }
    viewed(&state, revoked).await
}
