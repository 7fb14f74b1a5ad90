//! Reading a request body: size limit first, then UTF-8 and JSON with field-level errors.

use axum::body::Body;
use bytes::Bytes;

use crate::error::ApiError;

pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::BodyTooLarge { limit }
        } else {
            ApiError::invalid(format!("could not read the request body: {error}"), None)
        }
    })
}
