//! Reprise: a self-hosted, OpenAI-compatible LLM API gateway.
//!
//! A request passes these stages, in this order ([`pipeline`] composes them, one call each):
//!
//! 1. [`server`]: HTTP, cross-cutting layers (panic catching, secret redaction, request ids,
//!    tracing), authentication of the gateway key into a tenant, body limits and JSON parsing.
//!    `/v1/chat/completions`, `/v1/embeddings` and `/v1/models` speak OpenAI's API;
//!    `/v1/messages` speaks Anthropic's, translated at the edge by [`protocol::anthropic`].
//! 2. [`prompts`]: a request naming a prompt becomes what one immutable prompt version renders.
//! 3. [`cache`]: one front door ([`cache::CacheStage`]): the exact cache, then the semantic
//!    cache, keyed by tenant, route, targets and namespace; a miss leaves a pending write.
//! 4. [`router`]: the model alias names a route; the request walks its chain of targets with
//!    retries, backoff, timeouts (time to first token included), circuit breakers and hedging.
//! 5. [`providers`]: one adapter per upstream API (OpenAI-compatible, Anthropic native, and the
//!    built-in echo demo).
//!
//! Answers flow back the same way and through the cache's pending write. [`config`] holds the
//! typed, validated configuration; [`store`] the storage trait (embedded, Redis) that the cache and
//! the prompt store share; [`error`] the one error type clients see; [`telemetry`] logs and
//! Prometheus metrics.

pub mod cache;
pub mod canonical;
pub mod config;
pub mod embed;
pub mod error;
pub mod experiments;
pub mod feedback;
pub mod keys;
pub mod limits;
pub mod otel;
pub mod pipeline;
pub mod prices;
pub mod prompts;
pub mod protocol;
pub mod providers;
pub mod request_log;
pub mod router;
pub mod runtime;
pub mod server;
pub mod store;
pub mod telemetry;
