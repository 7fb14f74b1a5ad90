//! Operational endpoints: provider health (admin key), metrics and liveness.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

pub async fn provider_health(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(error) = state.auth.admin(&headers) {
        return error.into_response();
    }
    axum::Json(json!({"object": "list", "data": state.pipeline.health()})).into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
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
