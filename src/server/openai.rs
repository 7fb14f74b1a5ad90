//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::{
    Admitted, AppState, Endpoint, StreamRecorder, authenticated_request, respond_error,
    trace_headers,
};
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest};
use crate::providers::ChunkStream;
use crate::providers::{Answer, ChatReply};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = Endpoint::ChatCompletions;
    let started = std::time::Instant::now();
    let Admitted {
        context,
        request,
        body_bytes,
        _slot,
    }: Admitted<ChatRequest> = match authenticated_request(&state, &headers, body).await {
        Ok(parsed) => parsed,
        Err(error) => return respond_error(&state, endpoint, error.into(), started, None),
    };
    let (captured, answered) = state.chat_sized(context, request, body_bytes).await;
    match answered {
        Ok(answered) => {
            let trace = answered.trace;
            let body = match answered.value {
                ChatReply::Complete(body) => {
                    state.finish(endpoint, &trace, 200, started, Some(&body), captured);
                    json_response(&body)
                }
                ChatReply::Stream(stream) => {
                    state.record(endpoint, &trace, 200, started, None);
                    let recorder = StreamRecorder::new(&state, endpoint, &trace, started, captured);
                    openai_sse(stream, recorder).into_response()
                }
            };
            (trace_headers(&trace), body).into_response()
        }
        Err(failed) => respond_error(&state, endpoint, failed, started, captured),
    }
}

/// A whole answer, sent as the JSON text it arrived as.
fn json_response(answer: &Answer) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        Body::from(answer.bytes().clone()),
    )
        .into_response()
}

/// `POST /v1/cache/feedback`: `{"entry": x-reprise-cache-entry, "similarity":
/// x-reprise-cache-similarity, "correct": false}` from the tenant that was served the hit.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Feedback {
    entry: String,
    similarity: Option<f32>,
    correct: bool,
}

pub async fn cache_feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Admitted {
        context,
        request: feedback,
        _slot,
        ..
    }: Admitted<Feedback> = match authenticated_request(&state, &headers, body).await {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    match state
        .pipeline
        .cache()
        .feedback(
            &context.tenant,
            &feedback.entry,
            feedback.similarity,
            feedback.correct,
        )
        .await
    {
        Ok(outcome) => {
            tracing::info!(entry = %outcome.entry, correct = feedback.correct, "semantic cache feedback");
            axum::Json(outcome).into_response()
        }
        Err(error) => error.into_response(),
    }
}

/// `POST /v1/feedback`: `{"request_id": x-request-id, "metric": NAME, "value": true | 4.5,
/// "comment": "..."}` from the tenant that made the request; kept with the prompt version and
/// arm that served it.
pub async fn feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let answer = async {
        let Admitted {
            context,
            request: report,
            _slot,
            ..
        }: Admitted<crate::feedback::Report> =
            authenticated_request(&state, &headers, body).await?;
        let recorded = state
            .pipeline
            .feedback()?
            .record(&context.tenant, report)
            .await?;
        Ok::<_, crate::error::ApiError>(axum::Json(recorded).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// Chunks as `data:` events, then `data: [DONE]`. An upstream failure after the first chunk ends
/// the stream with an error event and no `[DONE]`, so SDKs raise instead of returning a truncated
/// answer as if it were complete.
fn openai_sse(
    stream: ChunkStream,
    mut recorder: Option<StreamRecorder>,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let events = async_stream::stream! {
        let mut stream = stream;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    if let Some(recorder) = &mut recorder {
                        recorder.on_chunk(&chunk);
                    }
                    yield Ok(Event::default().data(chunk.to_string()));
                }
                Err(error) => {
                    if let Some(recorder) = &mut recorder {
                        recorder.ended(Some("stream_interrupted"));
                    }
                    let body = json!({"error": {
                        "message": format!("upstream failed mid-stream: {}", error.for_client()),
                        "type": "upstream_error", "param": null, "code": "stream_interrupted",
                    }});
                    yield Ok(Event::default().data(body.to_string()));
                    return;
                }
            }
        }
        if let Some(recorder) = &mut recorder {
            recorder.ended(None);
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(events)
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = Endpoint::Embeddings;
    let started = std::time::Instant::now();
    let Admitted {
        context,
        request,
        _slot,
        ..
    }: Admitted<EmbeddingsRequest> = match authenticated_request(&state, &headers, body).await {
        Ok(parsed) => parsed,
        Err(error) => return respond_error(&state, endpoint, error.into(), started, None),
    };
    let answered = context
        .trace
        .clone()
        .scope(state.pipeline.embeddings(&context, request))
        .await;
    match answered {
        Ok(answered) => {
            // The vectors are not worth keeping; the usage is.
            let usage = answered
                .value
                .get("usage")
                .map(|usage| Answer::from_value(json!({"usage": usage})));
            state.finish(
                endpoint,
                &answered.trace,
                200,
                started,
                usage.as_ref(),
                None,
            );
            (trace_headers(&answered.trace), axum::Json(answered.value)).into_response()
        }
        Err(failed) => respond_error(&state, endpoint, failed, started, None),
    }
}

pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let key = match super::authenticate(&state, &headers).await {
        Ok((_, key)) => key,
        Err(error) => return error.into_response(),
    };
    let data: Vec<_> = state
        .pipeline
        .models()
        .into_iter()
        .filter(|model| key.as_ref().is_none_or(|key| key.allows(model)))
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "reprise"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
