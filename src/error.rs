//! The one error type a client can see, rendered once into OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` (or Anthropic's shape on `/v1/messages`).
//! Internal causes are logged where they happen; only what the client may know goes into the body.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error body an upstream returned for a request it refused, normalised from either API shape.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamError {
    pub message: String,
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl UpstreamError {
    /// Reads OpenAI's `{"error": {...}}` or Anthropic's `{"type": "error", "error": {...}}`; any
    /// other body becomes a short, truncated message (upstream bodies can be large HTML pages).
    pub fn from_body(body: &[u8]) -> Self {
        if let Ok(value) = serde_json::from_slice::<Value>(body)
            && let Some(error) = value.get("error")
        {
            if let Some(message) = error.as_str() {
                return Self::plain(message.to_owned());
            }
            let text = |field: &str| match error.get(field) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            return Self {
                message: text("message").unwrap_or_else(|| error.to_string()),
                kind: text("type").unwrap_or_else(|| "upstream_error".to_owned()),
                param: text("param"),
                code: text("code"),
            };
        }
        let text = String::from_utf8_lossy(body);
        let mut message: String = text.chars().take(500).collect();
        if message.is_empty() {
            message = "upstream returned an empty error body".to_owned();
        }
        Self::plain(message)
    }

    fn plain(message: String) -> Self {
        Self {
            message,
            kind: "upstream_error".to_owned(),
            param: None,
            code: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("this endpoint needs the admin key")]
    AdminOnly,
    #[error("The model `{model}` does not exist or you do not have access to it.")]
    ModelNotFound { model: String },
    #[error("this key may not use model `{model}`")]
    ModelNotAllowed { model: String },
    /// The upstream refused the request itself (400, 413, 422, content policy): returned as is.
    #[error("{}", error.message)]
    UpstreamRejected {
        status: StatusCode,
        error: Box<UpstreamError>,
    },
    /// Every target was tried (or skipped by its breaker) and none answered.
    #[error("all upstream targets failed after {attempts} attempt(s); last error: {last}")]
    UpstreamFailed {
        status: StatusCode,
        attempts: u32,
        last: String,
    },
    #[error("the cache store is unavailable: {0}")]
    CacheUnavailable(String),
    /// Something the request names (an entry, a prompt) does not exist.
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<&'static str>,
    },
    /// A request that is well-formed but cannot be carried out as asked (a prompt template that
    /// fails to render with the given variables).
    #[error("{message}")]
    Unprocessable {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    /// An admin change that clashes with what is stored (a version number taken by other
    /// content, a revision that moved on).
    #[error("{message}")]
    Conflict {
        message: String,
        param: Option<&'static str>,
    },
    #[error("the store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("{}", rate_message(state, scope, *limit))]
    RateLimited {
        state: crate::limits::RateState,
        /// `key` or `tenant`.
        scope: &'static str,
        limit: crate::limits::Limit,
    },
    /// A budget is spent (OpenAI's `insufficient_quota`): retrying will not help before the
    /// period ends or the budget is raised.
    #[error("this {scope}'s budget of {usd} USD per {period} is spent")]
    InsufficientQuota {
        scope: &'static str,
        usd: f64,
        period: &'static str,
    },
    /// A budget applies but the route's model has no price to hold it against.
    #[error(
        "a budget applies to this request but `{model}` has no [prices] entry, so its cost cannot be held against it"
    )]
    Unpriced { model: String },
    #[error("the request body did not arrive within {seconds:.0}s")]
    BodyTimeout { seconds: f64 },
    #[error("no healthy upstream target for model `{route}`: every circuit breaker is open")]
    NoHealthyTarget {
        route: String,
        /// When the first of its breakers lets traffic through again (`Retry-After`).
        retry_after: Duration,
    },
    #[error(
        "the request did not complete within {seconds:.1}s (after {attempts} attempt(s); last error: {last})"
    )]
    DeadlineExceeded {
        seconds: f64,
        attempts: u32,
        last: String,
    },
}

impl From<crate::protocol::anthropic::TranslationError> for ApiError {
    fn from(error: crate::protocol::anthropic::TranslationError) -> Self {
        use crate::protocol::anthropic::TranslationError;
        match error {
            TranslationError::InvalidRequest { message, param } => {
                Self::InvalidRequest { message, param }
            }
            other => Self::invalid(other.to_string(), None),
        }
    }
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited { .. } | Self::InsufficientQuota { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::AdminOnly | Self::ModelNotAllowed { .. } | Self::Unpriced { .. } => {
                StatusCode::FORBIDDEN
            }
            Self::ModelNotFound { .. } | Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::UpstreamRejected { status, .. } | Self::UpstreamFailed { status, .. } => *status,
            Self::NoHealthyTarget { .. }
            | Self::CacheUnavailable(_)
            | Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::RateLimited { .. } => "rate_limited",
            Self::InsufficientQuota { .. } => "insufficient_quota",
            Self::Unpriced { .. } => "model_not_priced",
            Self::Unauthorized => "unauthorized",
            Self::AdminOnly => "admin_only",
            Self::ModelNotFound { .. } => "model_not_found",
            Self::ModelNotAllowed { .. } => "model_not_allowed",
            Self::UpstreamRejected { .. } => "upstream_rejected",
            Self::UpstreamFailed { .. } => "upstream_failed",
            Self::NoHealthyTarget { .. } => "no_healthy_target",
            Self::CacheUnavailable(_) => "cache_unavailable",
            Self::NotFound { .. } => "not_found",
            Self::Unprocessable { .. } => "unprocessable",
            Self::Conflict { .. } => "conflict",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
        }
    }

    fn openai_type_param_code(&self) -> (String, Option<String>, Option<String>) {
        let owned = |s: &str| Some(s.to_owned());
        match self {
            Self::InvalidRequest { param, .. } => {
                ("invalid_request_error".into(), param.clone(), None)
            }
            Self::BodyTooLarge { .. } => (
                "invalid_request_error".into(),
                None,
                owned("request_too_large"),
            ),
            Self::Unauthorized => (
                "invalid_request_error".into(),
                None,
                owned("invalid_api_key"),
            ),
            Self::RateLimited { limit, .. } => {
                let kind = match limit {
                    crate::limits::Limit::Tokens => "tokens",
                    _ => "requests",
                };
                (kind.into(), None, owned("rate_limit_exceeded"))
            }
            Self::InsufficientQuota { .. } => (
                "insufficient_quota".into(),
                None,
                owned("insufficient_quota"),
            ),
            Self::Unpriced { .. } => (
                "permission_error".into(),
                owned("model"),
                owned("model_not_priced"),
            ),
            Self::BodyTimeout { .. } => (
                "invalid_request_error".into(),
                None,
                owned("request_timeout"),
            ),
            Self::AdminOnly => ("permission_error".into(), None, owned("admin_key_required")),
            Self::ModelNotAllowed { .. } => (
                "permission_error".into(),
                owned("model"),
                owned("model_not_allowed"),
            ),
            Self::ModelNotFound { .. } => (
                "invalid_request_error".into(),
                owned("model"),
                owned("model_not_found"),
            ),
            Self::UpstreamRejected { error, .. } => {
                (error.kind.clone(), error.param.clone(), error.code.clone())
            }
            Self::UpstreamFailed { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => (
                "rate_limit_error".into(),
                None,
                owned("rate_limit_exceeded"),
            ),
            Self::UpstreamFailed { .. } => {
                ("upstream_error".into(), None, owned("upstream_failed"))
            }
            Self::NoHealthyTarget { .. } => {
                ("upstream_error".into(), None, owned("no_healthy_target"))
            }
            Self::CacheUnavailable(_) => ("server_error".into(), None, owned("cache_unavailable")),
            Self::NotFound { param, .. } => (
                "invalid_request_error".into(),
                param.map(str::to_owned),
                owned("not_found"),
            ),
            Self::Unprocessable { param, code, .. } => {
                ("invalid_request_error".into(), param.clone(), owned(code))
            }
            Self::Conflict { param, .. } => (
                "invalid_request_error".into(),
                param.map(str::to_owned),
                owned("conflict"),
            ),
            Self::StoreUnavailable(_) => ("server_error".into(), None, owned("store_unavailable")),
            Self::DeadlineExceeded { .. } => {
                ("timeout_error".into(), None, owned("deadline_exceeded"))
            }
        }
    }

    pub fn openai_body(&self) -> Value {
        let (kind, param, code) = self.openai_type_param_code();
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }

    /// Anthropic's error shape, for clients of `/v1/messages`.
    pub fn anthropic_body(&self) -> Value {
        let kind = match self.status().as_u16() {
            400 | 413 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": self.to_string()}})
    }

    pub fn into_anthropic_response(self) -> Response {
        let body = self.anthropic_body();
        self.with_headers((self.status(), axum::Json(body)).into_response())
    }

    /// `Retry-After` in whole seconds (rounded up, at least 1) where the gateway knows when trying
    /// again can succeed, so the official SDKs wait that long by themselves.
    fn with_headers(&self, mut response: Response) -> Response {
        if let Self::BodyTimeout { .. } = self {
            // The rest of the body may still be on its way: the connection cannot be reused.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if let Self::RateLimited { state, limit, .. } = self {
            let headers = response.headers_mut();
            if *limit != crate::limits::Limit::Concurrent {
                put_rate_headers(headers, state, *limit);
            }
            headers.insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(whole_seconds(state.resets_in)),
            );
        }
        if let Self::InsufficientQuota { .. } = self {
            // The official SDKs read this before their own retry rules: waiting will not help.
            response.headers_mut().insert(
                axum::http::HeaderName::from_static("x-should-retry"),
                axum::http::HeaderValue::from_static("false"),
            );
        }
        if let Self::NoHealthyTarget { retry_after, .. } = self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(whole_seconds(*retry_after)),
            );
        }
        response
    }
}

/// A wait in whole seconds for `Retry-After`: rounded up, at least 1.
fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

fn rate_message(
    state: &crate::limits::RateState,
    scope: &str,
    limit: crate::limits::Limit,
) -> String {
    let wait = state.resets_in.as_secs_f64();
    match limit {
        crate::limits::Limit::Requests => format!(
            "rate limit reached: {} requests per minute for this {scope}; try again in {wait:.1}s",
            state.limit
        ),
        crate::limits::Limit::Tokens => format!(
            "rate limit reached: {} tokens per minute for this {scope}; try again in {wait:.1}s",
            state.limit
        ),
        crate::limits::Limit::Concurrent => format!(
            "too many concurrent requests: at most {} at a time for this {scope}",
            state.limit
        ),
    }
}

/// OpenAI's `x-ratelimit-*-requests` (or `-tokens`) headers, so clients and the official SDKs
/// can pace themselves.
pub fn put_rate_headers(
    headers: &mut axum::http::HeaderMap,
    state: &crate::limits::RateState,
    limit: crate::limits::Limit,
) {
    use axum::http::{HeaderName, HeaderValue};
    let [limit_name, remaining_name, reset_name] = match limit {
        crate::limits::Limit::Tokens => [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
        _ => [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
    };
    headers.insert(
        HeaderName::from_static(limit_name),
        HeaderValue::from(state.limit),
    );
    headers.insert(
        HeaderName::from_static(remaining_name),
        HeaderValue::from(state.remaining),
    );
    let reset = format!("{}s", state.resets_in.as_millis() as f64 / 1000.0);
    if let Ok(reset) = HeaderValue::from_str(&reset) {
        headers.insert(HeaderName::from_static(reset_name), reset);
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.openai_body();
        self.with_headers((self.status(), axum::Json(body)).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_error_reads_both_shapes_and_truncates_html() {
        let openai = br#"{"error":{"message":"bad","type":"invalid_request_error","param":"messages","code":null}}"#;
        let e = UpstreamError::from_body(openai);
        assert_eq!(
            (e.message.as_str(), e.param.as_deref()),
            ("bad", Some("messages"))
        );
        let anthropic =
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"too long"}}"#;
        assert_eq!(UpstreamError::from_body(anthropic).message, "too long");
        let html = "<html>".repeat(1000);
        assert_eq!(UpstreamError::from_body(html.as_bytes()).message.len(), 500);
    }

    #[test]
    fn openai_shape_has_all_four_fields() {
        let body = ApiError::ModelNotFound { model: "x".into() }.openai_body();
        let error = &body["error"];
        for field in ["message", "type", "param", "code"] {
            assert!(error.get(field).is_some(), "{field}");
        }
        assert_eq!(error["code"], "model_not_found");
    }
}
