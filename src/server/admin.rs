//! Operational endpoints: provider health (admin key), metrics and liveness.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::cache::PurgeSelector;
use crate::error::ApiError;
use crate::protocol::parse_json;

pub async fn provider_health(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(error) = state.auth.admin(&headers) {
        return error.into_response();
    }
    axum::Json(json!({"object": "list", "data": state.pipeline.health()})).into_response()
}

pub async fn cache_stats(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(error) = state.auth.admin(&headers) {
        return error.into_response();
    }
    match state.pipeline.cache().stats().await {
        Ok(rows) => axum::Json(json!({
            "object": "list",
            "data": rows,
            "semantic": state.pipeline.cache().semantic_status(),
            "unpriced_models": state.pipeline.cache().unpriced_models(),
        }))
        .into_response(),
        Err(error) => error.into_response(),
    }
}

pub async fn cache_purge(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    if let Err(error) = state.auth.admin(&headers) {
        return error.into_response();
    }
    let selector: PurgeSelector =
        match super::read_body(&state, body, 64 * 1024)
            .await
            .and_then(|bytes| {
                if bytes.is_empty() {
                    Ok(PurgeSelector::default())
                } else {
                    parse_json(&bytes)
                }
            }) {
            Ok(selector) => selector,
            Err(error) => return error.into_response(),
        };
    match state.pipeline.cache().purge(selector).await {
        Ok(purged) => {
            tracing::info!(purged, "cache purged by the admin API");
            axum::Json(json!({"purged": purged})).into_response()
        }
        Err(error) => error.into_response(),
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(error) = state.auth.metrics_reader(&headers) {
        return error.into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.pipeline.metrics.encode(),
    )
        .into_response()
}

pub async fn liveness() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

fn request_log(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Arc<crate::request_log::RequestLog>, ApiError> {
    state.auth.admin(headers)?;
    state.request_log.clone().ok_or_else(|| {
        ApiError::invalid(
            "this gateway keeps no request log (add [request_log] to its config)",
            None,
        )
    })
}

/// `GET /admin/requests?tenant&key&route&target&status&cache&since&until&limit`: records,
/// newest first.
pub async fn requests(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let answer = async {
        let log = request_log(&state, &headers)?;
        let query: crate::request_log::RequestQuery = super::query_params(query, "request")?;
        if query.follows()? {
            crate::request_log::Filter::of(&query)?;
            return Ok(follow(log, query).into_response());
        }
        let found = tokio::task::spawn_blocking(move || log.query(&query))
            .await
            .map_err(|_| ApiError::StoreUnavailable("request log query failed".into()))??;
        Ok::<_, ApiError>(
            axum::Json(serde_json::json!({"object": "list", "data": found})).into_response(),
        )
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// New records matching `query`'s filters as server-sent events (`data:` one record), with a
/// `lagged` event counting the records a slow reader missed.
fn follow(
    log: Arc<crate::request_log::RequestLog>,
    query: crate::request_log::RequestQuery,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let (mut records, stopping) = log.follow();
    let events = async_stream::stream! {
        loop {
            let next = tokio::select! {
                next = records.recv() => next,
                () = stopping.cancelled() => return,
            };
            match next {
                Ok(record) => {
                    let Ok(filter) = crate::request_log::Filter::of(&query) else { return };
                    if filter.keeps(&record)
                        && let Ok(data) = serde_json::to_string(&*record)
                    {
                        yield Ok(Event::default().data(data));
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    yield Ok(Event::default().event("lagged").data(missed.to_string()));
                }
                Err(RecvError::Closed) => return,
            }
        }
    };
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// `GET /admin/requests/{id}`: one request's record, by its `x-request-id`.
pub async fn request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let answer = async {
        let log = request_log(&state, &headers)?;
        match log.get(&id)? {
            Some(record) => Ok::<_, ApiError>(axum::Json(record).into_response()),
            None => Err(ApiError::NotFound {
                message: format!("no request {id} in the log"),
                param: None,
            }),
        }
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /admin/overview?window&tenant&route`: the request log's figures over time.
pub async fn overview(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let answer = async {
        let log = request_log(&state, &headers)?;
        let query: crate::request_log::TimelineQuery = super::query_params(query, "overview")?;
        let summary = log
            .timeline()
            .summary(&query, crate::request_log::now_ms())?;
        Ok::<_, ApiError>(axum::Json(summary).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewQuery {
    tenant: Option<String>,
    /// At most this many (50 by default, at most 500).
    limit: Option<String>,
}

/// `GET /admin/cache/review?tenant&limit`: the semantic stage's recent hits (request text next
/// to the entry's) and refusals on this replica, newest first.
pub async fn cache_review(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let answer = async {
        state.auth.admin(&headers)?;
        let query: ReviewQuery = super::query_params(query, "review")?;
        let limit = match query.limit.as_deref() {
            Some(limit) => limit
                .parse::<usize>()
                .map_err(|_| ApiError::invalid("limit: a number", Some("limit")))?,
            None => 50,
        }
        .clamp(1, 500);
        let data = state
            .pipeline
            .cache()
            .semantic_reviews(query.tenant.as_deref(), limit);
        Ok::<_, ApiError>(axum::Json(json!({"object": "list", "data": data})).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminCacheFeedback {
    tenant: String,
    entry: String,
    similarity: Option<f32>,
    correct: bool,
}

/// `POST /admin/cache/feedback {"tenant", "entry", "similarity", "correct"}`: the feedback of
/// `POST /v1/cache/feedback`, given by an operator on a tenant's behalf (the cache review).
pub async fn cache_feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let answer = async {
        state.auth.admin(&headers)?;
        let bytes = super::read_body(&state, body, 64 * 1024).await?;
        let feedback: AdminCacheFeedback = parse_json(&bytes)?;
        let outcome = state
            .pipeline
            .cache()
            .feedback(
                &feedback.tenant,
                &feedback.entry,
                feedback.similarity,
                feedback.correct,
            )
            .await?;
        tracing::info!(entry = %outcome.entry, correct = feedback.correct, "semantic cache feedback from the admin API");
        Ok::<_, ApiError>(axum::Json(outcome).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}
