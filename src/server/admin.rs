//! Operational endpoints: provider health (admin key), metrics and liveness.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::cache::PurgeSelector;
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
