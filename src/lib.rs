//! Reprise: a self-hosted, OpenAI-compatible LLM API gateway.
//!
//! A request passes these stages, in this order (see [`pipeline`], which composes them):
//!
//! 1. [`server`]: HTTP, cross-cutting layers (panic catching, secret redaction, request ids,
//!    tracing), authentication of the gateway key into a tenant, body limits and JSON parsing.
//!    `/v1/chat/completions`, `/v1/embeddings` and `/v1/models` speak OpenAI's API;
//!    `/v1/messages` speaks Anthropic's, translated at the edge by [`protocol::anthropic`].
//! 2. prompt resolution (the versioned prompt store; planned).
//! 3. exact cache, then semantic cache (planned), keyed by tenant.
//! 4. [`router`]: the model alias names a route; the request walks its chain of targets with
//!    retries, backoff, timeouts (time to first token included), circuit breakers and hedging.
//! 5. [`providers`]: one adapter per upstream API (OpenAI-compatible, Anthropic native).
//!
//! Answers flow back the same way. [`config`] holds the typed, validated configuration;
//! [`error`] the one error type clients see; [`telemetry`] logs and Prometheus metrics.

pub mod cache;
pub mod canonical;
pub mod config;
pub mod embed;
pub mod error;
pub mod pipeline;
pub mod prices;
pub mod prompts;
pub mod protocol;
pub mod providers;
pub mod router;
pub mod server;
pub mod store;
pub mod telemetry;
