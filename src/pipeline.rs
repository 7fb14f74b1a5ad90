//! The business pipeline, composed in plain code: every stage a request passes is called from
//! here, in order, so the path of a request can be read top to bottom.
//!
//! Today: route resolution → router (failover chain) → providers. Later stages slot in between:
//! prompt resolution (before anything else), then the exact cache, then the semantic cache, with
//! cache writers on the way back.

use std::sync::Arc;

use serde_json::Value;

use crate::error::ApiError;
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest};
use crate::providers::ChunkStream;
use crate::router::{Route, RouteFailure, Router, Served, TargetHealth};
use crate::telemetry::Metrics;

/// What later stages need to know about the caller, resolved once by the server.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub tenant: Arc<str>,
    pub request_id: String,
}

/// How an answer (or a failure) was produced, for response headers and the request's log line.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub route: Option<String>,
    pub target: Option<String>,
    pub attempts: u32,
}

pub enum ChatAnswer {
    Complete(Value),
    Stream(ChunkStream),
}

pub struct Answered<T> {
    pub value: T,
    pub trace: Trace,
}

pub struct Failed {
    pub error: ApiError,
    pub trace: Trace,
}

impl From<ApiError> for Failed {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            trace: Trace::default(),
        }
    }
}

pub struct Pipeline {
    router: Router,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    pub fn new(router: Router, metrics: Arc<Metrics>) -> Self {
        Self { router, metrics }
    }

    fn resolve(&self, model: &str) -> Result<Arc<Route>, Failed> {
        self.router.route(model).ok_or_else(|| {
            ApiError::ModelNotFound {
                model: model.to_owned(),
            }
            .into()
        })
    }

    pub async fn chat(
        &self,
        _context: &RequestContext,
        request: ChatRequest,
    ) -> Result<Answered<ChatAnswer>, Failed> {
        request.validate()?;
        let route = self.resolve(&request.model)?;
        if request.wants_stream() {
            let served = self.router.chat_stream(&route, &request).await;
            finish(&route, served, ChatAnswer::Stream)
        } else {
            let served = self.router.chat(&route, &request).await;
            finish(&route, served, ChatAnswer::Complete)
        }
    }

    pub async fn embeddings(
        &self,
        _context: &RequestContext,
        request: EmbeddingsRequest,
    ) -> Result<Answered<Value>, Failed> {
        request.validate()?;
        let route = self.resolve(&request.model)?;
        let served = self.router.embeddings(&route, &request).await;
        finish(&route, served, |v| v)
    }

    pub fn models(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.router.route_names().collect();
        names.sort_unstable();
        names
    }

    pub fn health(&self) -> Vec<TargetHealth> {
        self.router.health()
    }
}

fn finish<T, U>(
    route: &Route,
    served: Result<Served<T>, RouteFailure>,
    wrap: impl FnOnce(T) -> U,
) -> Result<Answered<U>, Failed> {
    match served {
        Ok(served) => Ok(Answered {
            value: wrap(served.value),
            trace: Trace {
                route: Some(route.name.clone()),
                target: Some(served.target),
                attempts: served.attempts,
            },
        }),
        Err(failure) => Err(Failed {
            error: failure.error,
            trace: Trace {
                route: Some(route.name.clone()),
                target: None,
                attempts: failure.attempts,
            },
        }),
    }
}
