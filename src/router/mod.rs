//! The failover router: a model alias names a route, a route is a chain of targets
//! (provider + upstream model), and one request walks the chain until a target answers.
//!
//! Per attempt: the target's breaker must admit it, the attempt has its own timeout (for streams:
//! time to the first token), and its failure is classified once (`policy::classify`) into
//! "return to client", "retry this target" or "fail over". Retries back off with jitter, honour
//! `Retry-After` and draw on the route's retry budget; the whole request has one deadline.
//! With `hedge_after`, a slow attempt is raced against the next target.

mod breaker;
mod policy;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use serde::Serialize;
use serde_json::Value;

pub use breaker::BreakerSnapshot;
use breaker::{Breaker, Permit};
use policy::{Disposition, HealthSignal, RetryBudget, backoff, classify};

use crate::config::{Config, RetryConfig, Strategy, TimeoutConfig};
use crate::error::ApiError;
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest, chunk_carries_output};
use crate::providers::{Answer, ChatReply, ChunkStream, Provider, ProviderError, TimeoutKind};
use crate::telemetry::{ExtraAttempt, Metrics};

pub struct Target {
    /// `provider/model`, as shown in headers, metrics and the health endpoint.
    pub id: String,
    provider: Arc<dyn Provider>,
    model: String,
    weight: u32,
    breaker: Arc<Breaker>,
}

pub struct Route {
    pub name: String,
    strategy: Strategy,
    pub targets: Vec<Target>,
    /// The targets' ids in config order: part of the cache scope, so a changed chain is a new cache.
    pub target_ids: Vec<String>,
    retry: RetryConfig,
    timeouts: TimeoutConfig,
    hedge_after: Option<Duration>,
    budget: RetryBudget,
    panic: bool,
    /// Output tokens a budget holds for a request that sets no `max_tokens`.
    pub reserve_output_tokens: u64,
}

impl Route {
    /// The deadline of a whole request on this route.
    pub fn total_timeout(&self) -> Duration {
        self.timeouts.total
    }

    /// The order in which this request tries the targets.
    fn attempt_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.targets.len()).collect();
        if self.strategy == Strategy::Weighted {
            // Weighted random order without replacement (Efraimidis-Spirakis): sort by u^(1/w).
            let mut rng = rand::rng();
            let mut keyed: Vec<(f64, usize)> = order
                .iter()
                .map(|&i| {
                    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                    (u.powf(1.0 / f64::from(self.targets[i].weight)), i)
                })
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            order = keyed.into_iter().map(|(_, i)| i).collect();
        }
        order
    }
}

/// A successful answer and how it was obtained.
pub struct Served<T> {
    pub value: T,
    pub target: String,
    pub attempts: u32,
    /// Every attempt made, in the order they ended.
    pub tried: Vec<Attempt>,
}

/// A failed request, with the number of attempts it took (reported in a header).
#[derive(Debug)]
pub struct RouteFailure {
    pub error: ApiError,
    pub attempts: u32,
    pub tried: Vec<Attempt>,
}

/// One upstream attempt, for the request log and the trace's child spans.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// `provider/model`.
    pub target: String,
    /// `first`, `retry`, `failover` or `hedge`.
    pub kind: &'static str,
    /// When the request went out (after any backoff).
    pub started: std::time::SystemTime,
    pub duration: Duration,
    /// For a stream: until its first token.
    pub first_token: Option<Duration>,
    /// `ok`, an error kind (`status_5xx`, `timeout`, ...), or `cancelled` for a hedge that lost.
    pub outcome: &'static str,
    pub status: Option<u16>,
    /// The attempt's span, as sent upstream in `traceparent`.
    pub span_id: [u8; 8],
}

/// An attempt that has been sent and not yet ended.
struct OpenAttempt {
    slot: usize,
    index: usize,
    kind: &'static str,
    started: std::time::SystemTime,
    began: tokio::time::Instant,
    span_id: [u8; 8],
}

impl OpenAttempt {
    fn close(self, route: &Route, outcome: &'static str, status: Option<u16>) -> Attempt {
        Attempt {
            target: route.targets[self.index].id.clone(),
            kind: self.kind,
            started: self.started,
            duration: self.began.elapsed(),
            first_token: None,
            outcome,
            status,
            span_id: self.span_id,
        }
    }
}

fn attempt_kind(kind: Option<ExtraAttempt>) -> &'static str {
    kind.map_or("first", ExtraAttempt::label)
}

pub struct Router {
    routes: HashMap<String, Arc<Route>>,
    /// Every distinct target once, in config order, for the health endpoint.
    targets: Vec<(String, Arc<Breaker>)>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Serialize)]
pub struct TargetHealth {
    pub target: String,
    #[serde(flatten)]
    pub breaker: BreakerSnapshot,
}

impl Router {
    pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let mut providers = HashMap::new();
        let serving_threads = crate::runtime::serving_threads(config.server.worker_threads);
        for (name, provider) in &config.providers {
            providers.insert(
                name.clone(),
                crate::providers::build(name, provider, serving_threads)?,
            );
        }
        let mut breakers: HashMap<String, Arc<Breaker>> = HashMap::new();
        let mut targets = Vec::new();
        let mut routes = HashMap::new();
        for (name, route) in &config.routes {
            let mut route_targets = Vec::new();
            for target in &route.targets {
                let id = format!("{}/{}", target.provider, target.model);
                let breaker = breakers
                    .entry(id.clone())
                    .or_insert_with(|| {
                        let breaker = Breaker::new(config.breaker.clone());
                        targets.push((id.clone(), Arc::clone(&breaker)));
                        metrics.breaker_state(&id, 0);
                        breaker
                    })
                    .clone();
                let provider = providers.get(&target.provider).ok_or_else(|| {
                    anyhow::anyhow!("routes.{name}: unknown provider {}", target.provider)
                })?;
                route_targets.push(Target {
                    id,
                    provider: Arc::clone(provider),
                    model: target.model.clone(),
                    weight: target.weight,
                    breaker,
                });
            }
            routes.insert(
                name.clone(),
                Arc::new(Route {
                    name: name.clone(),
                    strategy: route.strategy,
                    target_ids: route_targets.iter().map(|t| t.id.clone()).collect(),
                    targets: route_targets,
                    retry: route.retry.clone(),
                    timeouts: route.timeouts.clone(),
                    hedge_after: route.hedge_after,
                    budget: RetryBudget::new(
                        route.retry.budget_ratio,
                        route.retry.budget_min_per_sec,
                    ),
                    panic: config.breaker.panic,
                    reserve_output_tokens: route.reserve_output_tokens,
                }),
            );
        }
        Ok(Self {
            routes,
            targets,
            metrics,
        })
    }

    pub fn route(&self, model: &str) -> Option<Arc<Route>> {
        self.routes.get(model).cloned()
    }

    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    pub fn health(&self) -> Vec<TargetHealth> {
        self.targets
            .iter()
            .map(|(target, breaker)| TargetHealth {
                target: target.clone(),
                breaker: breaker.snapshot(),
            })
            .collect()
    }

    /// A whole (non-streaming) chat completion.
    pub async fn chat(
        &self,
        route: &Route,
        request: &ChatRequest,
    ) -> Result<Served<Answer>, RouteFailure> {
        let timeout = route.timeouts.attempt;
        self.execute(route, |target| async move {
            match tokio::time::timeout(timeout, target.provider.chat(request, &target.model, false))
                .await
            {
                Ok(Ok(ChatReply::Complete(body))) => Ok(body),
                Ok(Ok(ChatReply::Stream(_))) => Err(ProviderError::InvalidResponse(
                    "a stream where none was asked for".into(),
                )),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ProviderError::Timeout(TimeoutKind::Attempt)),
            }
        })
        .await
    }

    /// A streamed chat completion. Failover happens only until the first token: the returned stream
    /// starts with it, and a later upstream failure ends the stream with an error item.
    pub async fn chat_stream(
        &self,
        route: &Route,
        request: &ChatRequest,
    ) -> Result<Served<ChunkStream>, RouteFailure> {
        let first_token = route.timeouts.first_token;
        let served = self
            .execute(route, |target| async move {
                let head = async {
                    let mut stream =
                        match target.provider.chat(request, &target.model, true).await? {
                            ChatReply::Stream(stream) => stream,
                            ChatReply::Complete(_) => {
                                return Err(ProviderError::InvalidResponse(
                                    "a whole answer where a stream was asked for".into(),
                                ));
                            }
                        };
                    let mut head = Vec::new();
                    loop {
                        match stream.next().await {
                            Some(Ok(chunk)) => {
                                let output = chunk_carries_output(&chunk);
                                head.push(chunk);
                                if output {
                                    return Ok((head, stream));
                                }
                            }
                            Some(Err(e)) => return Err(e),
                            None => {
                                return Err(ProviderError::StreamBroken(
                                    "the stream ended before any output".into(),
                                ));
                            }
                        }
                    }
                };
                match tokio::time::timeout(first_token, head).await {
                    Ok(result) => {
                        result.map(|(head, rest)| (head, rest, Arc::clone(&target.breaker)))
                    }
                    Err(_) => Err(ProviderError::Timeout(TimeoutKind::FirstToken)),
                }
            })
            .await?;
        let (head, rest, breaker) = served.value;
        let mut tried = served.tried;
        if let Some(winner) = tried.iter_mut().rev().find(|a| a.outcome == "ok") {
            winner.first_token = Some(winner.duration);
            self.metrics
                .time_to_first_token(&winner.target, winner.duration);
        }
        let stream = committed_stream(
            head,
            rest,
            route.timeouts.stream_idle,
            breaker,
            Arc::clone(&self.metrics),
            served.target.clone(),
        );
        Ok(Served {
            value: stream,
            target: served.target,
            attempts: served.attempts,
            tried,
        })
    }

    pub async fn embeddings(
        &self,
        route: &Route,
        request: &EmbeddingsRequest,
    ) -> Result<Served<Value>, RouteFailure> {
        let timeout = route.timeouts.attempt;
        self.execute(route, |target| async move {
            tokio::time::timeout(timeout, target.provider.embeddings(request, &target.model))
                .await
                .unwrap_or(Err(ProviderError::Timeout(TimeoutKind::Attempt)))
        })
        .await
    }

    fn settle(&self, target: &Target, permit: Permit, signal: HealthSignal, error: Option<String>) {
        permit.settle(signal, error);
        self.metrics
            .breaker_state(&target.id, target.breaker.state_code());
    }

    /// Walks the route's targets with `attempt` until one succeeds, the chain is exhausted, or the
    /// deadline passes. Attempts still running when it returns (losing hedges) are cancelled.
    async fn execute<'r, T, F, Fut>(
        &self,
        route: &'r Route,
        attempt: F,
    ) -> Result<Served<T>, RouteFailure>
    where
        F: Fn(&'r Target) -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let deadline = tokio::time::Instant::now() + route.timeouts.total;
        route.budget.record_request();
        let mut plan = Plan::new(route, &self.metrics);
        let mut attempts = 0u32;
        let mut last_error: Option<(usize, ProviderError)> = None;
        let mut in_flight = FuturesUnordered::new();
        let mut open: Vec<OpenAttempt> = Vec::new();
        let mut tried: Vec<Attempt> = Vec::new();
        let mut hedge_at: Option<tokio::time::Instant> = None;
        let mut next = plan.next_target(None);
        // Attempts still open when the request ends were cancelled (losing hedges, a deadline).
        let finish = |open: Vec<OpenAttempt>, mut tried: Vec<Attempt>| {
            tried.extend(open.into_iter().map(|o| o.close(route, "cancelled", None)));
            tried
        };

        loop {
            if let Some(start) = next.take().and_then(|n| self.admit(route, &mut plan, n)) {
                attempts += 1;
                plan.tries[start.index] += 1;
                let span_id = crate::otel::new_span_id();
                let run = crate::otel::upstream(span_id, attempt(&route.targets[start.index]));
                let NextAttempt {
                    index,
                    permit,
                    delay,
                    kind,
                } = start;
                let slot = attempts as usize;
                open.push(OpenAttempt {
                    slot,
                    index,
                    kind: attempt_kind(kind),
                    started: std::time::SystemTime::now() + delay,
                    began: tokio::time::Instant::now() + delay,
                    span_id,
                });
                in_flight.push(async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    (slot, index, permit, run.await)
                });
                if let Some(after) = route.hedge_after {
                    hedge_at = Some(tokio::time::Instant::now() + delay + after);
                }
            }
            if in_flight.is_empty() {
                return Err(RouteFailure {
                    error: exhausted(route, last_error, &plan),
                    attempts,
                    tried: finish(open, tried),
                });
            }
            tokio::select! {
                biased;
                Some((slot, index, permit, result)) = in_flight.next() => {
                    let target = &route.targets[index];
                    let ended = open
                        .iter()
                        .position(|o| o.slot == slot)
                        .map(|at| open.swap_remove(at));
                    let error = match result {
                        Ok(value) => {
                            self.metrics.upstream_attempt(&target.id, "ok");
                            self.settle(target, permit, HealthSignal::Healthy, None);
                            tried.extend(ended.map(|o| o.close(route, "ok", Some(200))));
                            return Ok(Served {
                                value,
                                target: target.id.clone(),
                                attempts,
                                tried: finish(open, tried),
                            });
                        }
                        Err(error) => error,
                    };
                    let status = match &error {
                        ProviderError::Status { status, .. } => Some(*status),
                        _ => None,
                    };
                    tried.extend(ended.map(|o| o.close(route, error.kind(), status)));
                    let disposition = self.record_failure(route, index, permit, &error, attempts);
                    if disposition == Disposition::ReturnToClient {
                        return Err(RouteFailure {
                            error: rejected(error),
                            attempts,
                            tried: finish(open, tried),
                        });
                    }
                    if let ProviderError::MissingKey(provider) = &error {
                        plan.missing_keys.push(Arc::clone(provider));
                    }
                    last_error = Some((index, error));
                    if !in_flight.is_empty() {
                        // A hedged attempt is still running; let it finish before deciding more.
                        continue;
                    }
                    hedge_at = None;
                    next = after_failure(route, &mut plan, index, disposition);
                }
                _ = sleep_until_or_never(hedge_at) => {
                    hedge_at = None;
                    next = plan.next_target(Some(ExtraAttempt::Hedge));
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let last = describe(route, last_error.as_ref());
                    return Err(RouteFailure {
                        error: ApiError::DeadlineExceeded { seconds: route.timeouts.total.as_secs_f64(), attempts, last },
                        attempts,
                        tried: finish(open, tried),
                    });
                }
            }
        }
    }

    /// Whether `next` may start: retries and hedges draw on the route's retry budget. A retry the
    /// budget refuses becomes a failover to the next target (the budget guards the struggling
    /// target, not the route); a refused hedge is not made.
    fn admit(&self, route: &Route, plan: &mut Plan<'_>, next: NextAttempt) -> Option<NextAttempt> {
        match next.kind {
            Some(kind @ (ExtraAttempt::RetrySameTarget | ExtraAttempt::Hedge)) => {
                let last_chance = !plan.has_untried_target();
                if route.budget.try_spend(last_chance) {
                    self.metrics.extra_attempt(&route.name, kind);
                    return Some(next);
                }
                self.metrics.budget_exhausted(&route.name);
                tracing::warn!(route = %route.name, "retry budget exhausted; not retrying");
                if kind == ExtraAttempt::Hedge {
                    return None;
                }
                drop(next);
                let failover = plan.next_target(Some(ExtraAttempt::Failover))?;
                self.metrics
                    .extra_attempt(&route.name, ExtraAttempt::Failover);
                Some(failover)
            }
            Some(ExtraAttempt::Failover) => {
                self.metrics
                    .extra_attempt(&route.name, ExtraAttempt::Failover);
                Some(next)
            }
            None => Some(next),
        }
    }

    /// Counts and logs a failed attempt, tells the target's breaker, and says what to do next.
    fn record_failure(
        &self,
        route: &Route,
        index: usize,
        permit: Permit,
        error: &ProviderError,
        attempts: u32,
    ) -> Disposition {
        let target = &route.targets[index];
        self.metrics.upstream_attempt(&target.id, error.kind());
        let (disposition, signal) = classify(error);
        tracing::warn!(route = %route.name, target = %target.id, attempt = attempts, error = %error, ?disposition, "upstream attempt failed");
        self.settle(target, permit, signal, Some(error.to_string()));
        disposition
    }
}

/// The attempt the router makes next: the target, its breaker's permit, how long to wait before
/// sending (backoff or `Retry-After`), and why it is more than the first attempt.
struct NextAttempt {
    index: usize,
    permit: Permit,
    delay: Duration,
    /// `None` for the request's first attempt.
    kind: Option<ExtraAttempt>,
}

/// After target `index` failed: retry it after a backoff if the policy says so and it has tries
/// left (and its breaker lets one through), else fail over to the next target.
fn after_failure(
    route: &Route,
    plan: &mut Plan<'_>,
    index: usize,
    disposition: Disposition,
) -> Option<NextAttempt> {
    let retry = match disposition {
        Disposition::Retry { retry_after }
            if plan.tries[index] < route.retry.attempts_per_target =>
        {
            let wait = match retry_after {
                Some(wait) if wait > route.retry.max_retry_after => None,
                Some(wait) => Some(wait),
                None => Some(backoff(
                    route.retry.backoff_base,
                    route.retry.backoff_max,
                    plan.tries[index] - 1,
                )),
            };
            wait.and_then(|delay| {
                let permit = plan.acquire(index)?;
                Some(NextAttempt {
                    index,
                    permit,
                    delay,
                    kind: Some(ExtraAttempt::RetrySameTarget),
                })
            })
        }
        _ => None,
    };
    retry.or_else(|| plan.next_target(Some(ExtraAttempt::Failover)))
}

async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Which fresh target comes next, skipping those whose breaker is open.
struct Plan<'r> {
    route: &'r Route,
    metrics: &'r Metrics,
    order: Vec<usize>,
    cursor: usize,
    tries: Vec<u32>,
    /// Providers skipped for want of a key: named in the error even when another target failed
    /// last, since the key is what the operator has to fix.
    missing_keys: Vec<Arc<str>>,
    /// No breaker admitted the request's first attempt, so it goes to targets that are open only
    /// for their error rate rather than nowhere.
    panic: bool,
}

impl<'r> Plan<'r> {
    fn new(route: &'r Route, metrics: &'r Metrics) -> Self {
        Self {
            route,
            metrics,
            order: route.attempt_order(),
            cursor: 0,
            tries: vec![0; route.targets.len()],
            missing_keys: Vec::new(),
            panic: false,
        }
    }

    fn acquire(&self, index: usize) -> Option<Permit> {
        let breaker = &self.route.targets[index].breaker;
        breaker.try_acquire().or_else(|| {
            if self.panic {
                breaker.panic_permit()
            } else {
                None
            }
        })
    }

    /// The next fresh target in the route's order whose breaker lets a request through. If none
    /// admits the request's first attempt, the route panics (when allowed) and the walk restarts.
    /// Whether targets remain in the order that the request has not reached yet.
    fn has_untried_target(&self) -> bool {
        self.cursor < self.order.len()
    }

    fn next_target(&mut self, kind: Option<ExtraAttempt>) -> Option<NextAttempt> {
        if let Some(next) = self.next_admitted(kind) {
            return Some(next);
        }
        if kind.is_some() || self.panic || !self.route.panic {
            return None;
        }
        self.panic = true;
        self.cursor = 0;
        self.metrics.route_panic(&self.route.name);
        self.next_admitted(kind)
    }

    fn next_admitted(&mut self, kind: Option<ExtraAttempt>) -> Option<NextAttempt> {
        while let Some(&index) = self.order.get(self.cursor) {
            self.cursor += 1;
            let target = &self.route.targets[index];
            match self.acquire(index) {
                Some(permit) => {
                    return Some(NextAttempt {
                        index,
                        permit,
                        delay: Duration::ZERO,
                        kind,
                    });
                }
                None if !self.panic => {
                    self.metrics
                        .upstream_attempt(&target.id, "skipped_breaker_open");
                }
                None => {}
            }
        }
        None
    }
}

fn describe(route: &Route, last: Option<&(usize, ProviderError)>) -> String {
    match last {
        Some((index, error)) => format!("{}: {}", route.targets[*index].id, error.for_client()),
        None => "none".to_owned(),
    }
}

fn rejected(error: ProviderError) -> ApiError {
    match error {
        ProviderError::Status { status, error, .. } => ApiError::UpstreamRejected {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            error: Box::new(error),
        },
        other => ApiError::invalid(other.to_string(), None),
    }
}

/// The client's error once every target failed or was skipped.
fn exhausted(route: &Route, last: Option<(usize, ProviderError)>, plan: &Plan<'_>) -> ApiError {
    let Some((index, error)) = last else {
        let retry_after = route
            .targets
            .iter()
            .map(|target| target.breaker.retry_in())
            .min()
            .unwrap_or_default();
        return ApiError::NoHealthyTarget {
            route: route.name.clone(),
            retry_after,
        };
    };
    let attempts: u32 = plan.tries.iter().sum();
    let mut last = format!("{}: {}", route.targets[index].id, error.for_client());
    if !matches!(error, ProviderError::MissingKey(_)) && !plan.missing_keys.is_empty() {
        let names: Vec<&str> = plan.missing_keys.iter().map(|p| &**p).collect();
        last.push_str(&format!(
            "; no API key configured for provider {}",
            names.join(", ")
        ));
    }
    let status = match &error {
        ProviderError::Untranslatable(_) | ProviderError::Unsupported(_) => {
            return ApiError::invalid(
                format!(
                    "no target of model `{}` can serve this request ({last})",
                    route.name
                ),
                None,
            );
        }
        ProviderError::Status { status: 429, .. } => StatusCode::TOO_MANY_REQUESTS,
        ProviderError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    ApiError::UpstreamFailed {
        status,
        attempts,
        last,
    }
}

/// The part of a stream after the first token: forwards chunks, ends with an error item if the
/// upstream breaks or goes silent for longer than `idle`, and reports such failures to the breaker.
fn committed_stream(
    head: Vec<Value>,
    mut rest: ChunkStream,
    idle: Duration,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
    target: String,
) -> ChunkStream {
    Box::pin(async_stream::stream! {
        for chunk in head {
            yield Ok(chunk);
        }
        loop {
            let error = match tokio::time::timeout(idle, rest.next()).await {
                Ok(Some(Ok(chunk))) => {
                    yield Ok(chunk);
                    continue;
                }
                Ok(None) => return,
                Ok(Some(Err(error))) => error,
                Err(_) => ProviderError::Timeout(TimeoutKind::StreamIdle),
            };
            tracing::warn!(target = %target, error = %error, "upstream stream failed after the first token");
            metrics.upstream_attempt(&target, error.kind());
            breaker.record(HealthSignal::Failure, Some(error.to_string()));
            metrics.breaker_state(&target, breaker.state_code());
            yield Err(error);
            return;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_order_follows_weights() {
        let config = Config::from_toml_str(
            r#"
            [auth]
            [providers.p]
            kind = "openai"
            base_url = "http://127.0.0.1:9/v1"
            [routes.r]
            strategy = "weighted"
            targets = [{ provider = "p", model = "a", weight = 9 }, { provider = "p", model = "b", weight = 1 }]
            "#,
            "t.toml",
            &|_| None,
        )
        .unwrap();
        let router = Router::from_config(&config, Arc::new(Metrics::new())).unwrap();
        let route = router.route("r").unwrap();
        let firsts = (0..10_000)
            .filter(|_| route.attempt_order()[0] == 0)
            .count();
        assert!((8_700..=9_300).contains(&firsts), "{firsts}");
        assert_eq!(route.attempt_order().len(), 2);
    }
}
