//! Reading a request body: size limit first, then UTF-8 and JSON with field-level errors.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;

use crate::error::ApiError;

/// Reads the whole body, refusing it past `limit` bytes or once `deadline` has passed (a client
/// that announces a body and trickles it must not hold a connection and its buffers forever).
pub async fn read_limited(body: Body, limit: usize, deadline: Duration) -> Result<Bytes, ApiError> {
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::BodyTimeout {
            seconds: deadline.as_secs_f64(),
        });
    };
    read.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::BodyTooLarge { limit }
        } else {
            ApiError::invalid(format!("could not read the request body: {error}"), None)
        }
    })
}
