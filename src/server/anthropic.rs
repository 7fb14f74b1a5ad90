//! Anthropic's `/v1/messages`, served through the same pipeline by translating at the edge.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::{Admitted, AppState, Endpoint, StreamRecorder, authenticated_request, trace_headers};
use crate::error::ApiError;
use crate::pipeline::{Failed, Trace};
use crate::protocol::anthropic::{MessagesRequest, StreamFromOpenAi, response_from_openai};
use crate::providers::ChatReply;
use crate::providers::ChunkStream;

pub async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = Endpoint::Messages;
    let started = std::time::Instant::now();
    let fail = |mut failed: Failed, captured| {
        failed.trace.error = Some(failed.error.kind());
        state.finish(
            endpoint,
            &failed.trace,
            failed.error.status().as_u16(),
            started,
            None,
            captured,
        );
        let headers = trace_headers(&failed.trace);
        (headers, failed.error.into_anthropic_response()).into_response()
    };
    let Admitted {
        context,
        request,
        body_bytes,
        _slot,
    }: Admitted<MessagesRequest> = match authenticated_request(&state, &headers, body).await {
        Ok(parsed) => parsed,
        Err(error) => return fail(error.into(), None),
    };
    let request = match request.into_openai() {
        Ok(request) => request,
        Err(error) => return fail(ApiError::from(error).into(), None),
    };
    let (captured, answered) = state.chat_sized(context, request, body_bytes).await;
    match answered {
        Ok(answered) => {
            let trace: Trace = answered.trace;
            let body = match answered.value {
                ChatReply::Complete(body) => {
                    state.finish(endpoint, &trace, 200, started, Some(&body), captured);
                    axum::Json(response_from_openai(body.value())).into_response()
                }
                ChatReply::Stream(stream) => {
                    state.record(endpoint, &trace, 200, started, None);
                    let recorder = StreamRecorder::new(&state, endpoint, &trace, started, captured);
                    anthropic_sse(stream, recorder).into_response()
                }
            };
            (trace_headers(&trace), body).into_response()
        }
        Err(failed) => fail(failed, captured),
    }
}

fn anthropic_sse(
    stream: ChunkStream,
    mut recorder: Option<StreamRecorder>,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let events = async_stream::stream! {
        let mut stream = stream;
        let mut translator = StreamFromOpenAi::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    if let Some(recorder) = &mut recorder {
                        recorder.on_chunk(&chunk);
                    }
                    for (name, data) in translator.on_chunk(&chunk) {
                        yield Ok(Event::default().event(name).data(data.to_string()));
                    }
                }
                Err(error) => {
                    if let Some(recorder) = &mut recorder {
                        recorder.ended(Some("stream_interrupted"));
                    }
                    let body = json!({"type": "error", "error": {
                        "type": "api_error", "message": format!("upstream failed mid-stream: {}", error.for_client()),
                    }});
                    yield Ok(Event::default().event("error").data(body.to_string()));
                    return;
                }
            }
        }
        if let Some(recorder) = &mut recorder {
            recorder.ended(None);
        }
        for (name, data) in translator.finish() {
            yield Ok(Event::default().event(name).data(data.to_string()));
        }
    };
    Sse::new(events)
}
