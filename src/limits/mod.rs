//! The limits stage: what a key and its tenant may spend, enforced once across every replica
//! that shares the store.
//!
//! - At the door (before the body's route is known), a request counts against its requests per
//!   minute.
//! - After the cache, a request that has to go upstream must fit its tokens per minute (its
//!   input estimated, plus `max_tokens`), a concurrent-request slot and every budget: the most
//!   it can cost is held against the budget, so parallel requests cannot overspend it. This is a
//!   [`Charge`].
//! - When the answer is complete (a stream at its end), the charge settles what the upstream's
//!   usage says it cost: the hold becomes spend, the token count is corrected; a failure
//!   releases everything. A cache hit never reaches this stage: it costs nothing against a
//!   budget, and [`usage`] counts it as tokens served and money saved.
//!
//! Store layout: `limits/v1/{key|tenant}/{id}/{rpm|tpm|concurrent|budget/PERIOD}`.

pub mod usage;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::keys::{KeyLimits, KeyRecord};
use crate::prices::PriceTable;
use crate::protocol::openai::{ChatRequest, Content};
use crate::providers::ChunkStream;
use crate::router::Route;
use crate::store::Store;
use crate::telemetry::Metrics;
use usage::{UsageBook, UsageCounts, UsageKey};

/// The minute a rate limit counts over, from the first request it counts.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// How long a concurrency slot or a budget hold outlives a replica that died holding it. Longer
/// than any request may take, since a live request's hold must not lapse under it.
const HOLD_LEASE: Duration = Duration::from_secs(15 * 60);
/// USD are counted in billionths, so sums of small costs stay exact.
const NANOS_PER_USD: f64 = 1e9;

/// A budget in USD for a calendar period (UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub usd: f64,
    #[serde(default)]
    pub period: Period,
    /// The share of the budget past which answers carry `x-reprise-budget-warning` and
    /// `reprise_budget_soft_limit_total` counts (0.8 by default).
    #[serde(default = "default_soft", skip_serializing_if = "is_default_soft")]
    pub soft: f64,
}

fn default_soft() -> f64 {
    0.8
}

fn is_default_soft(soft: &f64) -> bool {
    *soft == default_soft()
}

impl Budget {
    /// Why this budget cannot be used, if it cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if !(self.usd.is_finite() && self.usd > 0.0) {
            Some("a budget must be a positive amount of USD")
        } else if !(self.soft > 0.0 && self.soft <= 1.0) {
            Some("soft must be a share of the budget, above 0 and at most 1")
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    #[default]
    Month,
}

impl Period {
    /// The period `now` falls in (`2026-12-02`, `2026-12`), UTC.
    fn current(self) -> String {
        let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        match self {
            Period::Day => date[..10].to_owned(),
            Period::Month => date[..7].to_owned(),
        }
    }

    /// How long a period's spend is kept after its last change: past the period's end.
    fn keep(self) -> Duration {
        match self {
            Period::Day => Duration::from_secs(8 * 86_400),
            Period::Month => Duration::from_secs(40 * 86_400),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
    Concurrent,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
            Limit::Concurrent => "concurrent",
        }
    }
}

/// Where a request stands against a rate limit, for OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateState {
    pub limit: u64,
    pub remaining: u64,
    pub resets_in: Duration,
}

/// Of two standings, the one closer to its limit: what the client must pace itself by.
pub fn tighter(a: Option<RateState>, b: Option<RateState>) -> Option<RateState> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Where a request left the tightest budget it was held against, for response headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetState {
    pub scope: &'static str,
    pub remaining_usd: f64,
    /// Past the budget's soft threshold.
    pub warning: bool,
    /// The share of the budget spent or held.
    pub used: f64,
}

/// One scope a request answers to: its key, or its tenant.
struct Scope<'a> {
    kind: &'static str,
    id: &'a str,
    limits: &'a KeyLimits,
}

impl Scope<'_> {
    fn counter(&self, what: &str) -> String {
        format!("limits/v1/{}/{}/{what}", self.kind, self.id)
    }
}

pub struct Limits {
    store: Option<Arc<dyn Store>>,
    tenants: HashMap<String, KeyLimits>,
    prices: Arc<PriceTable>,
    metrics: Arc<Metrics>,
    usage: Arc<UsageBook>,
}

impl Limits {
    pub fn new(
        store: Option<Arc<dyn Store>>,
        tenants: HashMap<String, KeyLimits>,
        prices: Arc<PriceTable>,
        metrics: Arc<Metrics>,
        usage: Arc<UsageBook>,
    ) -> Self {
        Self {
            store,
            tenants,
            prices,
            metrics,
            usage,
        }
    }

    pub fn usage(&self) -> &Arc<UsageBook> {
        &self.usage
    }

    /// The tenants with limits in the config, by name.
    pub fn tenants(&self) -> impl Iterator<Item = (&String, &KeyLimits)> {
        let mut tenants: Vec<_> = self.tenants.iter().collect();
        tenants.sort_by_key(|(name, _)| *name);
        tenants.into_iter()
    }

    /// The tenant's limits, then the key's.
    fn scopes<'a>(&'a self, tenant: &'a str, key: Option<&'a KeyRecord>) -> Vec<Scope<'a>> {
        let mut scopes = Vec::with_capacity(2);
        if let Some(limits) = self.tenants.get(tenant) {
            scopes.push(Scope {
                kind: "tenant",
                id: tenant,
                limits,
            });
        }
        if let Some(key) = key {
            scopes.push(Scope {
                kind: "key",
                id: &key.id,
                limits: &key.limits,
            });
        }
        scopes
    }

    /// Counts a request against its tenant's and key's requests per minute: the tighter
    /// standing, or 429 once either is reached.
    pub async fn admit_request(
        &self,
        tenant: &str,
        key: Option<&KeyRecord>,
    ) -> Result<Option<RateState>, ApiError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let mut rate = None;
        let mut counted_on = Vec::new();
        for scope in self.scopes(tenant, key) {
            let Some(limit) = scope.limits.rpm else {
                continue;
            };
            let counter = scope.counter("rpm");
            match count(store.as_ref(), &counter, 1, limit).await {
                Counted::Within(state) => {
                    rate = tighter(rate, Some(state));
                    counted_on.push(counter);
                }
                Counted::Over(state) => {
                    self.metrics.limit_refused(scope.kind, "requests");
                    // A refused request does not use up the tenant's minute either.
                    for counter in counted_on {
                        let _ = store.adjust_count(&counter, -1).await;
                    }
                    return Err(ApiError::RateLimited {
                        state,
                        scope: scope.kind,
                        limit: Limit::Requests,
                    });
                }
                Counted::Unknown => {}
            }
        }
        Ok(rate)
    }

    /// Admits a request the cache could not answer against its tokens per minute, concurrency
    /// and budgets, holding what it may cost until it settles.
    pub async fn admit_upstream(
        &self,
        tenant: &str,
        key: Option<&KeyRecord>,
        route: &Route,
        request: &ChatRequest,
    ) -> Result<Charge, ApiError> {
        let input = InputSize::of(request);
        let mut settlement = Settlement {
            store: self.store.clone(),
            usage: Arc::clone(&self.usage),
            prices: Arc::clone(&self.prices),
            holder: uuid::Uuid::new_v4().simple().to_string(),
            tokens: Vec::new(),
            slots: Vec::new(),
            holds: Vec::new(),
            input_estimate: input.estimate(),
            booked: true,
            row: UsageKey::today(tenant, key.map(|k| k.id.as_str()), &route.name),
        };
        let mut charge = Charge {
            settle: None,
            tokens: None,
            budget: None,
        };
        // A refused request gives back what it took so far, and is not booked as used.
        let refused = |mut settlement: Settlement, error: ApiError| {
            settlement.booked = false;
            settlement.finish(None).spawn();
            Err(error)
        };
        let scopes = self.scopes(tenant, key);
        let Some(store) = self.store.as_ref().filter(|_| !scopes.is_empty()) else {
            charge.settle = Some(settlement);
            return Ok(charge);
        };
        let output = requested_output(request).unwrap_or(route.reserve_output_tokens);
        let holder = settlement.holder.clone();

        // Tokens per minute, as OpenAI counts them at admission: the input estimate plus the
        // output asked for.
        let asked = input.estimate() + requested_output(request).unwrap_or(0);
        for scope in &scopes {
            let Some(limit) = scope.limits.tpm else {
                continue;
            };
            let counter = scope.counter("tpm");
            match count(store.as_ref(), &counter, asked, limit).await {
                Counted::Within(state) => {
                    charge.tokens = tighter(charge.tokens, Some(state));
                    settlement.tokens.push((counter, asked));
                }
                Counted::Over(state) => {
                    self.metrics.limit_refused(scope.kind, "tokens");
                    let error = if asked > limit {
                        ApiError::invalid(
                            format!(
                                "this request asks for about {asked} tokens, more than this {}'s \
                                 limit of {limit} tokens per minute; lower max_tokens or shorten it",
                                scope.kind
                            ),
                            Some("max_tokens"),
                        )
                    } else {
                        ApiError::RateLimited {
                            state,
                            scope: scope.kind,
                            limit: Limit::Tokens,
                        }
                    };
                    return refused(settlement, error);
                }
                Counted::Unknown => {}
            }
        }

        for scope in &scopes {
            let Some(limit) = scope.limits.max_concurrent else {
                continue;
            };
            let slots = scope.counter("concurrent");
            match store.hold(&slots, &holder, 1, limit, HOLD_LEASE).await {
                Ok(held) if held.granted => settlement.slots.push(slots),
                Ok(held) => {
                    self.metrics.limit_refused(scope.kind, "concurrent");
                    let error = ApiError::RateLimited {
                        state: RateState {
                            limit,
                            remaining: limit.saturating_sub(held.held),
                            resets_in: Duration::from_secs(1),
                        },
                        scope: scope.kind,
                        limit: Limit::Concurrent,
                    };
                    return refused(settlement, error);
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot count concurrent requests; admitted");
                }
            }
        }

        for scope in &scopes {
            let Some(budget) = &scope.limits.budget else {
                continue;
            };
            let price = match self.route_price(route) {
                Ok(price) => price,
                Err(error) => return refused(settlement, error),
            };
            let most = to_nanos(
                (input.bound() as f64 * price.input + output as f64 * price.output)
                    * f64::from(request.n.unwrap_or(1).max(1))
                    / 1e6,
            );
            let cap = to_nanos(budget.usd);
            let counter = scope.counter(&format!("budget/{}", budget.period.current()));
            match store.hold(&counter, &holder, most, cap, HOLD_LEASE).await {
                Ok(held) if held.granted => {
                    settlement.holds.push((counter, budget.period.keep(), most));
                    let used = (held.spent + held.held) as f64 / cap as f64;
                    let state = BudgetState {
                        scope: scope.kind,
                        remaining_usd: cap.saturating_sub(held.spent + held.held) as f64
                            / NANOS_PER_USD,
                        warning: used >= budget.soft,
                        used,
                    };
                    if state.warning {
                        self.metrics.budget_warned(scope.kind);
                    }
                    if charge
                        .budget
                        .is_none_or(|b| state.remaining_usd < b.remaining_usd)
                    {
                        charge.budget = Some(state);
                    }
                }
                Ok(_) => {
                    self.metrics.limit_refused(scope.kind, "budget");
                    let error = ApiError::InsufficientQuota {
                        scope: scope.kind,
                        usd: budget.usd,
                        period: budget.period.label(),
                    };
                    return refused(settlement, error);
                }
                Err(error) => {
                    // Unlike a rate limit, a budget is money: without the store to hold it
                    // against, the request is refused rather than let through uncounted.
                    tracing::warn!(%error, "cannot hold against a budget; refused");
                    let error =
                        ApiError::StoreUnavailable("the budget store cannot be reached".into());
                    return refused(settlement, error);
                }
            }
        }
        charge.settle = Some(settlement);
        Ok(charge)
    }

    /// The most a token can cost on `route`: its dearest target's prices.
    fn route_price(&self, route: &Route) -> Result<crate::prices::Price, ApiError> {
        let mut dearest = crate::prices::Price {
            input: 0.0,
            output: 0.0,
        };
        for target in &route.target_ids {
            let price = self
                .prices
                .price(Some(target), &Value::Null)
                .ok_or_else(|| ApiError::Unpriced {
                    model: target.clone(),
                })?;
            dearest.input = dearest.input.max(price.input);
            dearest.output = dearest.output.max(price.output);
        }
        Ok(dearest)
    }

    /// Where `tenant`'s and `key`'s budgets stand now, for the admin API.
    pub async fn budget_standing(&self, scope: &'static str, id: &str, budget: &Budget) -> Value {
        let Some(store) = &self.store else {
            return Value::Null;
        };
        let period = budget.period.current();
        let counter = format!("limits/v1/{scope}/{id}/budget/{period}");
        match store.holding(&counter).await {
            Ok(held) => serde_json::json!({
                "usd": budget.usd,
                "period": budget.period.label(),
                "current": period,
                "spent_usd": held.spent as f64 / NANOS_PER_USD,
                "held_usd": held.held as f64 / NANOS_PER_USD,
                "remaining_usd": (budget.usd - (held.spent + held.held) as f64 / NANOS_PER_USD).max(0.0),
            }),
            Err(_) => Value::Null,
        }
    }
}

enum Counted {
    Within(RateState),
    Over(RateState),
    /// The store could not count: the request goes through, since a rate limit is not worth an
    /// outage.
    Unknown,
}

async fn count(store: &dyn Store, counter: &str, amount: u64, limit: u64) -> Counted {
    match store
        .count_capped(counter, amount, limit, RATE_WINDOW)
        .await
    {
        Ok(counted) => {
            let state = RateState {
                limit,
                remaining: limit.saturating_sub(counted.count),
                resets_in: counted.resets_in,
            };
            if counted.counted {
                Counted::Within(state)
            } else {
                Counted::Over(state)
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot count against a rate limit; admitted");
            Counted::Unknown
        }
    }
}

fn to_nanos(usd: f64) -> u64 {
    (usd * NANOS_PER_USD).round().max(0.0) as u64
}

/// The output tokens a request asks for at most, if it says.
fn requested_output(request: &ChatRequest) -> Option<u64> {
    request
        .max_completion_tokens
        .or(request.max_tokens)
        .map(u64::from)
}

/// The input of a request before any tokeniser has seen it: its text in bytes, how many
/// messages carry it, and how many non-text parts (images, audio).
#[derive(Debug, Clone, Copy, Default)]
pub struct InputSize {
    bytes: u64,
    messages: u64,
    media: u64,
}

impl InputSize {
    pub fn of(request: &ChatRequest) -> Self {
        let mut size = InputSize::default();
        for message in &request.messages {
            size.messages += 1;
            match &message.content {
                Some(Content::Text(text)) => size.bytes += text.len() as u64,
                Some(Content::Parts(parts)) => {
                    for part in parts {
                        match part.get("text").and_then(Value::as_str) {
                            Some(text) => size.bytes += text.len() as u64,
                            None => size.media += 1,
                        }
                    }
                }
                None => {}
            }
            if let Some(calls) = &message.tool_calls {
                size.bytes += serde_json::to_vec(calls).map_or(0, |v| v.len() as u64);
            }
        }
        if let Some(tools) = &request.tools {
            size.bytes += serde_json::to_vec(tools).map_or(0, |v| v.len() as u64);
        }
        size
    }

    /// Tokens as OpenAI estimates them for a rate limit: about four bytes of text per token,
    /// four per message for the chat template and three to prime the reply. Corrected by the
    /// upstream's usage once the answer is in.
    pub fn estimate(&self) -> u64 {
        self.bytes.div_ceil(4) + 4 * self.messages + 3 + 1000 * self.media
    }

    /// The most tokens the input can be, for a budget's hold: no tokeniser makes a token of
    /// less than one byte of text, and a chat template adds fewer than eight per message. A
    /// non-text part is held at 2,000 tokens (a high-detail image costs about 1,100 in
    /// OpenAI's pricing).
    pub fn bound(&self) -> u64 {
        self.bytes + 8 * self.messages + 3 + 2000 * self.media
    }
}

/// Output tokens an answer (or a stream chunk) carries, estimated from its text when the
/// upstream sent no usage.
fn estimate_output_tokens(answer: &Value) -> u64 {
    let mut bytes = 0usize;
    if let Some(choices) = answer.get("choices").and_then(Value::as_array) {
        for choice in choices {
            let body = choice.get("message").or_else(|| choice.get("delta"));
            if let Some(body) = body {
                if let Some(text) = body.get("content").and_then(Value::as_str) {
                    bytes += text.len();
                }
                if let Some(calls) = body.get("tool_calls") {
                    bytes += calls.to_string().len();
                }
            }
        }
    }
    (bytes as u64).div_ceil(3)
}

/// What an admitted request holds until it settles: dropped unsettled (a failure, a cancelled
/// request), it gives everything back.
pub struct Charge {
    settle: Option<Settlement>,
    /// The tighter tokens-per-minute standing, for `x-ratelimit-*-tokens`.
    pub tokens: Option<RateState>,
    /// The tightest budget's standing, for `x-reprise-budget-*`.
    pub budget: Option<BudgetState>,
}

struct Settlement {
    store: Option<Arc<dyn Store>>,
    usage: Arc<UsageBook>,
    prices: Arc<PriceTable>,
    holder: String,
    /// Token counters and what admission counted on each.
    tokens: Vec<(String, u64)>,
    slots: Vec<String>,
    /// Budget counters, how long their spend is kept, and what was held.
    holds: Vec<(String, Duration, u64)>,
    input_estimate: u64,
    /// Whether the request counts in the usage book (a refused one does not).
    booked: bool,
    row: UsageKey,
}

impl Charge {
    /// Whether settling needs the upstream's usage (a stream must then ask for it).
    pub fn needs_usage(&self) -> bool {
        self.settle
            .as_ref()
            .is_some_and(|s| !s.tokens.is_empty() || !s.holds.is_empty())
    }

    /// Settles a whole answer by its usage. Returns once the spend is durable, so an answer a
    /// client holds is never missing from its budget after a crash.
    pub async fn settle(mut self, target: &str, answer: &Value) {
        if let Some(settlement) = self.settle.take() {
            let usage = reported_usage(answer)
                .unwrap_or_else(|| (settlement.input_estimate, estimate_output_tokens(answer)));
            settlement
                .finish(Some((target, answer, usage)))
                .commit()
                .await;
        }
    }

    /// Settles a stream when it ends: by the usage chunk if one passed, else by the text that
    /// did. The stream's end (and so `[DONE]`) waits until the spend is durable; a stream
    /// dropped before its end (its client left) settles what it saw in the background.
    pub fn meter(mut self, target: String, stream: ChunkStream) -> ChunkStream {
        let Some(settlement) = self.settle.take() else {
            return stream;
        };
        let mut meter = StreamMeter {
            settlement: Some(settlement),
            target,
            usage: None,
            output_estimate: 0,
            model: None,
        };
        Box::pin(async_stream::stream! {
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                if let Ok(chunk) = &item {
                    meter.saw(chunk);
                }
                yield item;
            }
            if let Some(pending) = meter.finish() {
                pending.commit().await;
            }
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(settlement) = self.settle.take() {
            settlement.finish(None).spawn();
        }
    }
}

/// Prompt and completion tokens, as the upstream reported them.
fn reported_usage(answer: &Value) -> Option<(u64, u64)> {
    let usage = answer.get("usage").filter(|u| !u.is_null())?;
    let count = |field: &str| usage.get(field).and_then(Value::as_u64).unwrap_or(0);
    Some((count("prompt_tokens"), count("completion_tokens")))
}

struct StreamMeter {
    settlement: Option<Settlement>,
    target: String,
    usage: Option<(u64, u64)>,
    output_estimate: u64,
    model: Option<Value>,
}

impl StreamMeter {
    fn saw(&mut self, chunk: &Value) {
        if let Some(usage) = reported_usage(chunk) {
            self.usage = Some(usage);
        }
        if self.model.is_none() {
            self.model = chunk.get("model").cloned();
        }
        self.output_estimate += estimate_output_tokens(chunk);
    }

    fn finish(&mut self) -> Option<StoreWork> {
        let settlement = self.settlement.take()?;
        let usage = self
            .usage
            .unwrap_or((settlement.input_estimate, self.output_estimate));
        let answer = serde_json::json!({ "model": self.model });
        Some(settlement.finish(Some((&self.target, &answer, usage))))
    }
}

impl Drop for StreamMeter {
    fn drop(&mut self) {
        if let Some(pending) = self.finish() {
            pending.spawn();
        }
    }
}

impl Settlement {
    /// Books the usage, and returns what is left to tell the store: holds become spend (or,
    /// without an answer, are given back), token counts are corrected.
    fn finish(self, answered: Option<(&str, &Value, (u64, u64))>) -> StoreWork {
        let mut counts = UsageCounts {
            requests: 1,
            ..UsageCounts::default()
        };
        let mut row = self.row.clone();
        let (used_tokens, cost) = match answered {
            Some((target, answer, (input, output))) => {
                let cost = self.prices.cost(Some(target), answer, input, output);
                counts.input_tokens = input;
                counts.output_tokens = output;
                counts.cost_nanos = to_nanos(cost);
                row.model = target
                    .split_once('/')
                    .map_or(target, |(_, model)| model)
                    .to_owned();
                (input + output, counts.cost_nanos)
            }
            None => {
                counts.errors = 1;
                (0, 0)
            }
        };
        if self.booked {
            self.usage.add(row, counts);
        }
        StoreWork {
            store: self.store,
            holder: self.holder,
            tokens: self.tokens,
            slots: self.slots,
            holds: self.holds,
            used_tokens,
            cost,
        }
    }
}

/// A settled charge's writes to the store.
struct StoreWork {
    store: Option<Arc<dyn Store>>,
    holder: String,
    tokens: Vec<(String, u64)>,
    slots: Vec<String>,
    holds: Vec<(String, Duration, u64)>,
    used_tokens: u64,
    cost: u64,
}

impl StoreWork {
    /// Records the spend now (durably), and corrects counts and frees slots in the background:
    /// those are not money, and waiting for them would only slow the answer.
    async fn commit(mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        for (counter, keep, held) in std::mem::take(&mut self.holds) {
            record_spend(
                store.as_ref(),
                &counter,
                &self.holder,
                keep,
                held,
                self.cost,
            )
            .await;
        }
        self.spawn();
    }

    /// Everything in the background (a failure: nothing is spent, so nothing must be awaited).
    fn spawn(self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        if self.tokens.is_empty() && self.slots.is_empty() && self.holds.is_empty() {
            return;
        }
        let work = async move {
            for (counter, counted) in &self.tokens {
                let delta = self.used_tokens as i64 - *counted as i64;
                if delta != 0
                    && let Err(error) = store.adjust_count(counter, delta).await
                {
                    tracing::warn!(%error, "cannot correct a token count");
                }
            }
            for slots in &self.slots {
                if let Err(error) = store.release(slots, &self.holder, 0, Duration::ZERO).await {
                    tracing::warn!(%error, "cannot free a concurrency slot; it lapses by itself");
                }
            }
            for (counter, keep, held) in &self.holds {
                record_spend(
                    store.as_ref(),
                    counter,
                    &self.holder,
                    *keep,
                    *held,
                    self.cost,
                )
                .await;
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(work);
            }
            Err(_) => tracing::error!("no runtime to settle a request's charge on"),
        }
    }
}

async fn record_spend(
    store: &dyn Store,
    counter: &str,
    holder: &str,
    keep: Duration,
    held: u64,
    cost: u64,
) {
    if cost > held {
        tracing::warn!(
            held_usd = held as f64 / NANOS_PER_USD,
            cost_usd = cost as f64 / NANOS_PER_USD,
            "a request cost more than its budget hold"
        );
    }
    if let Err(error) = store.release(counter, holder, cost, keep).await {
        tracing::error!(%error, "cannot record spend against a budget");
    }
}
