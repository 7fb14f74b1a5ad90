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
use crate::protocol::answer::AnswerFacts;
use crate::protocol::openai::{ChatRequest, Content, EmbeddingInput, EmbeddingsRequest};
use crate::providers::{Answer, ChunkStream};
use crate::router::Route;
use crate::store::{Settle, Step, Store};
use crate::telemetry::Metrics;
use usage::{UsageBook, UsageCounts, UsageKey};

/// The minute a rate limit counts over, from the first request it counts.
const RATE_WINDOW: Duration = Duration::from_secs(60);
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
    /// The counter's name, shared: an admission names three or more, the same ones request
    /// after request, so it is written into a reused buffer and made once per thread.
    fn counter(&self, what: &str) -> Arc<str> {
        thread_local! {
            static NAME: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        NAME.with_borrow_mut(|name| {
            name.clear();
            write_counter(name, self.kind, self.id, what);
            usage::shared_name(name)
        })
    }
}

/// The holder of an admission that took nothing: shared, so that it costs no allocation.
static NO_HOLDER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

fn counter(kind: &str, id: &str, what: &str) -> String {
    let mut name = String::new();
    write_counter(&mut name, kind, id, what);
    name
}

/// Where a key's or tenant's count or budget lives in the store.
fn write_counter(out: &mut String, kind: &str, id: &str, what: &str) {
    use std::fmt::Write;
    let _ = write!(out, "limits/v1/{kind}/{id}/{what}");
}

pub struct Limits {
    store: Option<Arc<dyn Store>>,
    tenants: HashMap<String, KeyLimits>,
    prices: Arc<PriceTable>,
    metrics: Arc<Metrics>,
    usage: Arc<UsageBook>,
    deferred: Arc<Deferred>,
    /// `[limits] hold_lease`.
    hold_lease: Duration,
}

/// Settlements not yet told to the store: the next admission carries them along (no round
/// trip of their own), or a flush within `DEFER_AT_MOST` if none comes.
#[derive(Default)]
struct Deferred {
    items: parking_lot::Mutex<Vec<Settle>>,
}

/// How long a settlement waits for an admission to carry it.
const DEFER_AT_MOST: Duration = Duration::from_millis(10);

impl Deferred {
    fn push(&self, items: Vec<Settle>) {
        self.items.lock().extend(items);
    }

    fn take(&self) -> Vec<Settle> {
        std::mem::take(&mut *self.items.lock())
    }

    /// Puts back what could not be written, to try again.
    fn restore(&self, items: Vec<Settle>) {
        let mut pending = self.items.lock();
        let newer = std::mem::replace(&mut *pending, items);
        pending.extend(newer);
    }

    async fn flush(&self, store: &dyn Store) {
        let items = self.take();
        if items.is_empty() {
            return;
        }
        if let Err(error) = store.settle(&items).await {
            tracing::warn!(%error, "cannot settle limits; will retry");
            self.restore(items);
        }
    }
}

/// Writes what is still only in memory (deferred settlements, the usage book) when the gateway
/// stops.
pub struct Closer {
    store: Option<Arc<dyn Store>>,
    deferred: Arc<Deferred>,
    usage: Arc<UsageBook>,
}

impl Closer {
    pub async fn close(self) {
        if let Some(store) = &self.store {
            self.deferred.flush(store.as_ref()).await;
        }
        self.usage.flush().await;
    }
}

/// What a request was admitted with.
pub struct Admission {
    /// The tighter requests-per-minute standing, for `x-ratelimit-*-requests`.
    pub rate: Option<RateState>,
    /// What going upstream holds, or why it may not: raised only if the cache cannot answer.
    pub upstream: Result<Charge, Refusal>,
}

/// Why a request may not go upstream (a cache hit is still served).
pub struct Refusal {
    error: ApiError,
    scope: &'static str,
    limit: &'static str,
    metrics: Arc<Metrics>,
}

impl Refusal {
    /// The error the client gets, counted in `reprise_limit_refusals_total`.
    pub fn raise(self) -> ApiError {
        self.metrics.limit_refused(self.scope, self.limit);
        self.error
    }
}

/// What one admission step stands for.
enum Purpose<'a> {
    Requests(&'a Scope<'a>),
    Tokens(&'a Scope<'a>, u64),
    Concurrent(&'a Scope<'a>),
    /// The budget, what is held against it, and the counter of the period it is held in.
    Budget(&'a Scope<'a>, &'a Budget, u64, Arc<str>),
}

impl Limits {
    pub fn new(
        store: Option<Arc<dyn Store>>,
        tenants: HashMap<String, KeyLimits>,
        prices: Arc<PriceTable>,
        metrics: Arc<Metrics>,
        usage: Arc<UsageBook>,
        hold_lease: Duration,
    ) -> Self {
        let deferred = Arc::<Deferred>::default();
        if let Some(store) = &store {
            // Weak, so a stopped gateway's store closes (an embedded store can then be reopened).
            let (store, pending) = (Arc::downgrade(store), Arc::downgrade(&deferred));
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(DEFER_AT_MOST);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let (Some(store), Some(pending)) = (store.upgrade(), pending.upgrade()) else {
                        return;
                    };
                    pending.flush(store.as_ref()).await;
                }
            });
        }
        Self {
            store,
            tenants,
            prices,
            metrics,
            usage,
            deferred,
            hold_lease,
        }
    }

    /// What to call when the gateway stops.
    pub fn closer(&self) -> Closer {
        Closer {
            store: self.store.clone(),
            deferred: Arc::clone(&self.deferred),
            usage: Arc::clone(&self.usage),
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

    /// Admits a request against its tenant's and key's limits, in one step of the store (one
    /// round trip with Redis): its requests per minute (429 at once if over), and, for a request
    /// that may go `upstream`, its tokens per minute, a concurrency slot and what it may cost
    /// against each budget, all held together or not at all.
    pub async fn admit(
        &self,
        tenant: &str,
        key: Option<&KeyRecord>,
        upstream: Option<Upstream<'_>>,
    ) -> Result<Admission, ApiError> {
        let scopes = self.scopes(tenant, key);
        let row = UsageKey::today(
            tenant,
            key.map(|k| k.id.as_str()),
            upstream.as_ref().map_or("-", |u| u.route.name.as_str()),
        );
        let input = upstream.as_ref().map(|u| u.input);
        let mut settlement = Settlement {
            taken: Taken {
                store: self.store.clone(),
                deferred: Arc::clone(&self.deferred),
                holder: Arc::clone(&NO_HOLDER),
                tokens: Vec::new(),
                slots: Vec::new(),
                holds: Vec::new(),
            },
            usage: Arc::clone(&self.usage),
            prices: Arc::clone(&self.prices),
            input_estimate: input.map_or(0, |i| i.estimate()),
            booked: true,
            row,
        };
        let Some(store) = self.store.as_ref().filter(|_| !scopes.is_empty()) else {
            return Ok(Admission {
                rate: None,
                upstream: Ok(Charge::holding(settlement)),
            });
        };

        let mut purposes = Vec::new();
        let mut first = Vec::new();
        let mut second = Vec::new();
        for scope in &scopes {
            if let Some(limit) = scope.limits.rpm {
                first.push(Step::Count {
                    key: scope.counter("rpm"),
                    amount: 1,
                    cap: limit,
                    window: RATE_WINDOW,
                });
                purposes.push(Purpose::Requests(scope));
            }
        }
        let mut unpriced = None;
        if let Some(Upstream {
            route,
            input,
            output: asked_output,
            choices,
        }) = upstream
        {
            // Tokens per minute, as OpenAI counts them at admission: the input estimate plus
            // the output asked for.
            let asked = input.estimate() + asked_output.unwrap_or(0);
            let output = asked_output.unwrap_or(route.reserve_output_tokens);
            for scope in &scopes {
                if let Some(limit) = scope.limits.tpm {
                    second.push(Step::Count {
                        key: scope.counter("tpm"),
                        amount: asked,
                        cap: limit,
                        window: RATE_WINDOW,
                    });
                    purposes.push(Purpose::Tokens(scope, asked));
                }
                if let Some(limit) = scope.limits.max_concurrent {
                    second.push(Step::Hold {
                        key: scope.counter("concurrent"),
                        amount: 1,
                        cap: limit,
                        lease: self.hold_lease,
                        spend_on_lapse: None,
                    });
                    purposes.push(Purpose::Concurrent(scope));
                }
                if let Some(budget) = &scope.limits.budget {
                    let price = match self.route_price(route) {
                        Ok(price) => price,
                        Err(error) => {
                            unpriced.get_or_insert((error, scope.kind));
                            continue;
                        }
                    };
                    let most = to_nanos(
                        (input.bound() as f64 * price.input + output as f64 * price.output)
                            * f64::from(choices)
                            / 1e6,
                    );
                    // Named once: a request admitted just before midnight settles in the period
                    // it was held in.
                    let counter = scope.counter(&format!("budget/{}", budget.period.current()));
                    second.push(Step::Hold {
                        key: counter.clone(),
                        amount: most,
                        cap: to_nanos(budget.usd),
                        lease: self.hold_lease,
                        spend_on_lapse: Some(budget.period.keep()),
                    });
                    purposes.push(Purpose::Budget(scope, budget, most, counter));
                }
            }
        }
        if first.is_empty() && second.is_empty() && unpriced.is_none() {
            return Ok(Admission {
                rate: None,
                upstream: Ok(Charge::holding(settlement)),
            });
        }
        settlement.taken.holder = Arc::from(
            &*uuid::Uuid::new_v4()
                .simple()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        );
        let refusal = |error: ApiError, scope: &'static str, limit: &'static str| Refusal {
            error,
            scope,
            limit,
            metrics: Arc::clone(&self.metrics),
        };
        if let Some((error, scope)) = unpriced {
            // Nothing is taken for a request that can never go upstream.
            second.clear();
            purposes.retain(|p| matches!(p, Purpose::Requests(_)));
            let admitted = self
                .apply(store.as_ref(), &settlement.taken.holder, &first, &[])
                .await
                .unwrap_or_else(|_| crate::store::Admitted {
                    first: true,
                    second: true,
                    steps: Vec::new(),
                });
            return Ok(Admission {
                rate: self.rate(&admitted, &purposes)?,
                upstream: Err(refusal(error, scope, "budget")),
            });
        }
        let admitted = match self
            .apply(store.as_ref(), &settlement.taken.holder, &first, &second)
            .await
        {
            Ok(admitted) => admitted,
            Err(error) => {
                // A rate limit is not worth an outage: the request is counted nowhere. A
                // budget is money: without the store to hold it against, nothing goes upstream.
                tracing::warn!(%error, "cannot count against limits; admitted uncounted");
                let budgeted = purposes.iter().find_map(|p| match p {
                    Purpose::Budget(scope, ..) => Some(scope.kind),
                    _ => None,
                });
                let upstream = if let Some(scope) = budgeted {
                    Err(refusal(
                        ApiError::StoreUnavailable("the budget store cannot be reached".into()),
                        scope,
                        "budget",
                    ))
                } else {
                    Ok(Charge::holding(settlement))
                };
                return Ok(Admission {
                    rate: None,
                    upstream,
                });
            }
        };
        let rate = self.rate(&admitted, &purposes)?;
        let mut charge = Charge {
            settle: None,
            tokens: None,
            budget: None,
        };
        let mut refused = None;
        for (purpose, outcome) in purposes.iter().zip(&admitted.steps) {
            match purpose {
                Purpose::Requests(_) => {}
                Purpose::Tokens(scope, asked) => {
                    let limit = scope.limits.tpm.unwrap_or_default();
                    let state = RateState {
                        limit,
                        remaining: limit.saturating_sub(outcome.used),
                        resets_in: Duration::from_millis(outcome.other),
                    };
                    if admitted.second {
                        charge.tokens = tighter(charge.tokens, Some(state));
                        settlement.taken.tokens.push((scope.counter("tpm"), *asked));
                    } else if !outcome.fits && refused.is_none() {
                        let error = if *asked > limit {
                            ApiError::invalid(
                                format!(
                                    "this request asks for about {asked} tokens, more than this \
                                     {}'s limit of {limit} tokens per minute; lower max_tokens \
                                     or shorten it",
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
                        refused = Some(refusal(error, scope.kind, "tokens"));
                    }
                }
                Purpose::Concurrent(scope) => {
                    if admitted.second {
                        settlement.taken.slots.push(scope.counter("concurrent"));
                    } else if !outcome.fits && refused.is_none() {
                        let limit = scope.limits.max_concurrent.unwrap_or_default();
                        let error = ApiError::RateLimited {
                            state: RateState {
                                limit,
                                remaining: limit.saturating_sub(outcome.other),
                                resets_in: Duration::from_secs(1),
                            },
                            scope: scope.kind,
                            limit: Limit::Concurrent,
                        };
                        refused = Some(refusal(error, scope.kind, "concurrent"));
                    }
                }
                Purpose::Budget(scope, budget, most, counter) => {
                    if admitted.second {
                        settlement
                            .taken
                            .holds
                            .push((counter.clone(), budget.period.keep(), *most));
                        let cap = to_nanos(budget.usd);
                        let used = outcome.used + outcome.other;
                        let state = BudgetState {
                            scope: scope.kind,
                            remaining_usd: cap.saturating_sub(used) as f64 / NANOS_PER_USD,
                            warning: used as f64 >= budget.soft * cap as f64,
                            used: used as f64 / cap as f64,
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
                    } else if !outcome.fits && refused.is_none() {
                        let error = ApiError::InsufficientQuota {
                            scope: scope.kind,
                            usd: budget.usd,
                            period: budget.period.label(),
                        };
                        refused = Some(refusal(error, scope.kind, "budget"));
                    }
                }
            }
        }
        let upstream = match refused {
            Some(refusal) => Err(refusal),
            None => {
                charge.settle = Some(settlement);
                Ok(charge)
            }
        };
        Ok(Admission { rate, upstream })
    }

    /// One admission in the store, carrying the settlements deferred so far.
    async fn apply(
        &self,
        store: &dyn Store,
        holder: &str,
        first: &[Step],
        second: &[Step],
    ) -> Result<crate::store::Admitted, crate::store::StoreError> {
        let settled = self.deferred.take();
        let admitted = store.admit(&settled, holder, first, second).await;
        if admitted.is_err() {
            self.deferred.restore(settled);
        }
        admitted
    }

    /// The tighter requests-per-minute standing, or 429 if a limit is reached.
    fn rate(
        &self,
        admitted: &crate::store::Admitted,
        purposes: &[Purpose<'_>],
    ) -> Result<Option<RateState>, ApiError> {
        let mut rate = None;
        for (purpose, outcome) in purposes.iter().zip(&admitted.steps) {
            let Purpose::Requests(scope) = purpose else {
                continue;
            };
            let limit = scope.limits.rpm.unwrap_or_default();
            let state = RateState {
                limit,
                remaining: limit.saturating_sub(outcome.used),
                resets_in: Duration::from_millis(outcome.other),
            };
            if !admitted.first && !outcome.fits {
                self.metrics.limit_refused(scope.kind, "requests");
                return Err(ApiError::RateLimited {
                    state,
                    scope: scope.kind,
                    limit: Limit::Requests,
                });
            }
            rate = tighter(rate, Some(state));
        }
        Ok(rate)
    }

    /// The most a token can cost on `route`: its dearest target's prices.
    fn route_price(&self, route: &Route) -> Result<crate::prices::Price, ApiError> {
        let mut dearest = crate::prices::Price {
            input: 0.0,
            output: 0.0,
        };
        for target in &route.target_ids {
            let price =
                self.prices
                    .price(Some(target), None)
                    .ok_or_else(|| ApiError::Unpriced {
                        model: target.clone(),
                    })?;
            dearest.input = dearest.input.max(price.input);
            dearest.output = dearest.output.max(price.output);
        }
        Ok(dearest)
    }

    /// Books a cache hit in the usage book: it cost nothing, and saved what the upstream would
    /// have billed.
    pub fn book_hit(
        &self,
        tenant: &str,
        key: Option<&KeyRecord>,
        route: &str,
        report: &crate::cache::CacheReport,
    ) {
        let mut row = UsageKey::today(tenant, key.map(|k| k.id.as_str()), route);
        if let Some(model) = &report.model {
            row.model = usage::shared_name(model);
        }
        self.usage.add(
            row,
            UsageCounts {
                requests: 1,
                cache_hits: 1,
                tokens_saved: report.tokens_saved,
                saved_nanos: to_nanos(report.saved_usd),
                ..UsageCounts::default()
            },
        );
    }

    /// Where a key's or tenant's budget stands now, for the admin API.
    pub async fn budget_standing(&self, scope: &'static str, id: &str, budget: &Budget) -> Value {
        let Some(store) = &self.store else {
            return Value::Null;
        };
        let period = budget.period.current();
        match store
            .holding(&counter(scope, id, &format!("budget/{period}")))
            .await
        {
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

/// What a request that may go upstream asks for, for its admission.
pub struct Upstream<'a> {
    route: &'a Route,
    input: InputSize,
    /// Output tokens asked for at most (`None`: not said).
    output: Option<u64>,
    /// Answers asked for (`n`): each may be as long as the output asked for.
    choices: u32,
}

impl<'a> Upstream<'a> {
    pub fn chat(route: &'a Route, request: &ChatRequest) -> Self {
        Self {
            route,
            input: InputSize::of(request),
            output: requested_output(request),
            choices: request.n.unwrap_or(1).max(1),
        }
    }

    /// Embeddings have input only.
    pub fn embeddings(route: &'a Route, request: &EmbeddingsRequest) -> Self {
        let mut input = InputSize::default();
        match &request.input {
            EmbeddingInput::One(text) => input.bytes = text.len() as u64,
            EmbeddingInput::Many(texts) => input.bytes = texts.iter().map(|t| t.len() as u64).sum(),
            EmbeddingInput::Tokens(tokens) => input.tokens = tokens.len() as u64,
            EmbeddingInput::TokenBatches(batches) => {
                input.tokens = batches.iter().map(|b| b.len() as u64).sum();
            }
        }
        Self {
            route,
            input,
            output: Some(0),
            choices: 1,
        }
    }
}

/// The input of a request before any tokeniser has seen it: its text in bytes, how many
/// messages carry it, and how many non-text parts (images, audio).
#[derive(Debug, Clone, Copy, Default)]
pub struct InputSize {
    bytes: u64,
    messages: u64,
    media: u64,
    /// Input given as token ids: counted exactly.
    tokens: u64,
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
        self.tokens + self.bytes.div_ceil(4) + 4 * self.messages + 3 + 1000 * self.media
    }

    /// The most tokens the input can be, for a budget's hold: no tokeniser makes a token of
    /// less than one byte of text, and a chat template adds fewer than eight per message. A
    /// non-text part is held at 2,000 tokens (a high-detail image costs about 1,100 in
    /// OpenAI's pricing).
    pub fn bound(&self) -> u64 {
        self.tokens + self.bytes + 8 * self.messages + 3 + 2000 * self.media
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
    taken: Taken,
    usage: Arc<UsageBook>,
    prices: Arc<PriceTable>,
    input_estimate: u64,
    /// Whether the request counts in the usage book (a refused one does not).
    booked: bool,
    row: UsageKey,
}

impl Charge {
    /// A charge that only books usage (no limit applies).
    fn holding(settlement: Settlement) -> Self {
        Self {
            settle: Some(settlement),
            tokens: None,
            budget: None,
        }
    }

    /// Gives everything back without booking a request: the cache answered it.
    pub fn cancel(mut self) {
        if let Some(mut settlement) = self.settle.take() {
            settlement.booked = false;
            settlement.finish(None).defer();
        }
    }

    /// Whether settling needs the upstream's usage (a stream must then ask for it).
    pub fn needs_usage(&self) -> bool {
        self.settle
            .as_ref()
            .is_some_and(|s| !s.taken.tokens.is_empty() || !s.taken.holds.is_empty())
    }

    /// Settles a whole answer by its usage. Returns once the spend is durable, so an answer a
    /// client holds is never missing from its budget after a crash.
    pub async fn settle(self, target: &str, answer: &Answer) {
        self.settle_by(target, answer.facts(), || answer.value())
            .await
    }

    /// [`Charge::settle`] for an answer held as a tree (embeddings).
    pub async fn settle_value(self, target: &str, answer: &Value) {
        self.settle_by(target, &AnswerFacts::of_value(answer), || answer)
            .await
    }

    /// `tree` is asked for only when the upstream sent no usage, to estimate it from the text.
    async fn settle_by<'a>(
        mut self,
        target: &str,
        facts: &AnswerFacts,
        tree: impl FnOnce() -> &'a Value,
    ) {
        if let Some(settlement) = self.settle.take() {
            let usage = facts
                .usage
                .map(|u| (u.prompt_tokens, u.completion_tokens))
                .unwrap_or_else(|| (settlement.input_estimate, estimate_output_tokens(tree())));
            settlement
                .finish(Some((target, facts.model.as_deref(), usage)))
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
            settlement.finish(None).defer();
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
    model: Option<String>,
}

impl StreamMeter {
    fn saw(&mut self, chunk: &Value) {
        if let Some(usage) = reported_usage(chunk) {
            self.usage = Some(usage);
        }
        if self.model.is_none() {
            self.model = chunk
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        self.output_estimate += estimate_output_tokens(chunk);
    }

    fn finish(&mut self) -> Option<StoreWork> {
        let settlement = self.settlement.take()?;
        let usage = self
            .usage
            .unwrap_or((settlement.input_estimate, self.output_estimate));
        Some(settlement.finish(Some((&self.target, self.model.as_deref(), usage))))
    }
}

impl Drop for StreamMeter {
    fn drop(&mut self) {
        if let Some(pending) = self.finish() {
            pending.defer();
        }
    }
}

impl Settlement {
    /// Books the usage, and returns what is left to tell the store: holds become spend (or,
    /// without an answer, are given back), token counts are corrected.
    /// `answered`: the target, the model the upstream reported, and the tokens used.
    fn finish(self, answered: Option<(&str, Option<&str>, (u64, u64))>) -> StoreWork {
        let mut counts = UsageCounts {
            requests: 1,
            ..UsageCounts::default()
        };
        let mut row = self.row;
        let (used_tokens, cost) = match answered {
            Some((target, model, (input, output))) => {
                let cost = self.prices.cost(Some(target), model, input, output);
                counts.input_tokens = input;
                counts.output_tokens = output;
                counts.cost_nanos = to_nanos(cost);
                row.model =
                    usage::shared_name(target.split_once('/').map_or(target, |(_, model)| model));
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
            taken: self.taken,
            used_tokens,
            cost,
        }
    }
}

/// What an admission took from the store, to be given back or turned into spend.
struct Taken {
    store: Option<Arc<dyn Store>>,
    deferred: Arc<Deferred>,
    holder: Arc<str>,
    /// Token counters and what admission counted on each.
    tokens: Vec<(Arc<str>, u64)>,
    slots: Vec<Arc<str>>,
    /// Budget counters, how long their spend is kept, and what was held.
    holds: Vec<(Arc<str>, Duration, u64)>,
}

/// A settled charge's writes to the store.
struct StoreWork {
    taken: Taken,
    used_tokens: u64,
    cost: u64,
}

impl StoreWork {
    fn items(&self) -> Vec<Settle> {
        let mut items = Vec::with_capacity(
            self.taken.tokens.len() + self.taken.slots.len() + self.taken.holds.len(),
        );
        for (counter, counted) in &self.taken.tokens {
            items.push(Settle::Count {
                key: counter.clone(),
                delta: self.used_tokens as i64 - *counted as i64,
            });
        }
        for slots in &self.taken.slots {
            items.push(Settle::Hold {
                key: slots.clone(),
                holder: self.taken.holder.clone(),
                spend: 0,
                keep: Duration::ZERO,
            });
        }
        for (counter, keep, held) in &self.taken.holds {
            if self.cost > *held {
                tracing::warn!(
                    held_usd = *held as f64 / NANOS_PER_USD,
                    cost_usd = self.cost as f64 / NANOS_PER_USD,
                    "a request cost more than its budget hold"
                );
            }
            items.push(Settle::Hold {
                key: counter.clone(),
                holder: self.taken.holder.clone(),
                spend: self.cost,
                keep: *keep,
            });
        }
        items
    }

    /// Settles a request that was answered. Spend in the embedded store is written (durably)
    /// before this returns, so an answer a client holds is never missing from its budget after
    /// a crash. With a shared store the hold is already there and turns into spend if it lapses
    /// unsettled, so the settlement rides along with the next admission like the rest: a token
    /// count or a slot is not worth making an answer wait for.
    async fn commit(self) {
        let Some(store) = self.taken.store.clone() else {
            return;
        };
        if store.is_shared() || self.taken.holds.is_empty() || self.cost == 0 {
            self.defer();
            return;
        }
        let items = self.items();
        if let Err(error) = store.settle(&items).await {
            tracing::error!(%error, "cannot record spend; it stays held until it lapses");
        }
    }

    /// Hands the settlement to the next admission (or the flush that follows shortly).
    fn defer(self) {
        if self.taken.store.is_none() {
            return;
        }
        let items = self.items();
        if !items.is_empty() {
            self.taken.deferred.push(items);
        }
    }
}
