//! Wire formats. The gateway's internal lingua franca is OpenAI's chat-completions shape; Anthropic's
//! Messages shape is translated to and from it at the edges (client side in `server::messages`,
//! upstream side in `providers::anthropic`), both through the functions of [`anthropic`].

pub mod answer;
pub mod anthropic;
pub mod openai;

use crate::error::ApiError;

/// Parses a JSON body into `T`, turning serde's complaint into a 400 that names the offending field
/// (`messages[0].role`), as OpenAI's `param` does.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::invalid("request body is not valid UTF-8", None));
    }
    // Tracking the path copies every object key read, so a body is read without it first; only
    // a body that fails is read again, to name the field.
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid(format!("request body is not valid JSON: {inner}"), None);
        }
        let message = inner.to_string();
        // serde reports a missing field at its parent's path; OpenAI names the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let param = match (missing, path.as_str()) {
            (Some(field), ".") => field.to_owned(),
            (Some(field), parent) => format!("{parent}.{field}"),
            (None, path) => path.to_owned(),
        };
        let param = (param != ".").then_some(param);
        let message = match &param {
            Some(p) => format!("invalid request: {p}: {message}"),
            None => format!("invalid request: {message}"),
        };
        ApiError::InvalidRequest { message, param }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}"), None))?;
    Ok(value)
}
