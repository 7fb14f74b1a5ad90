//! Outcomes of prompt requests: a client reports, for a request it was answered (its
//! `x-request-id`), a declared metric's value; the feedback is kept with the prompt version and
//! rollout arm that request was served, for the experiment's results.
//!
//! Two records in the shared store, both under the tenant, so one tenant can neither read nor
//! score another's requests:
//! - `feedback/v1/served/{tenant}/{request id}`: which prompt version and arm served the request,
//!   and whether from the cache; written off the response path when a prompt request is
//!   answered;
//! - `feedback/v1/value/{tenant}/{request id}/{metric}`: the latest value of a metric for that
//!   request (a repeated report replaces it).
//!
//! - `feedback/v1/stats/{prompt}/{version}/{metric}`: count, sum and sum of squares of the
//!   values per version, fresh answers and cache replays apart, kept as reports arrive (a
//!   replaced report moves its old value out).
//!
//! All are written by compare-and-swap, which the store never evicts to stay within the cache's
//! size bound (a plain `put` could be): an experiment's evidence must not vanish under cache
//! pressure. `[feedback] retention` is applied when a record is read, and a sweep every half
//! retention (at most hourly) deletes the attributions and reports past it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{FeedbackConfig, MetricKind};
use crate::error::ApiError;
use crate::experiments::Scored;
use crate::prompts::experiment::ExperimentTag;
use crate::store::Store;

/// The prompt version a request was served, as feedback finds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Served {
    pub prompt: String,
    pub version: u32,
    /// `arm/arms` in a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm: Option<String>,
    /// The label that resolved the request, when an experiment runs on its rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// That experiment's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// Answered from the cache: a replay of an earlier answer, not a new sample.
    pub cached: bool,
    pub at_ms: u64,
}

/// One report, as stored and answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub request_id: String,
    pub metric: String,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(flatten)]
    pub served: Served,
}

/// `POST /v1/feedback`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub request_id: String,
    pub metric: String,
    pub value: Value,
    #[serde(default)]
    pub comment: Option<String>,
}

const MAX_COMMENT_BYTES: usize = 4096;

pub struct Feedback {
    store: Arc<dyn Store>,
    telemetry: Arc<crate::telemetry::Metrics>,
    metrics: BTreeMap<String, MetricKind>,
    higher_is_better: BTreeMap<String, bool>,
    retention: Duration,
    experiments: Option<Arc<crate::experiments::Experiments>>,
}

/// A client's text made safe as one segment of a store key.
fn part(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn served_key(tenant: &str, request_id: &str) -> String {
    format!("feedback/v1/served/{}/{}", part(tenant), part(request_id))
}

fn value_key(tenant: &str, request_id: &str, metric: &str) -> String {
    format!(
        "feedback/v1/value/{}/{}/{}",
        part(tenant),
        part(request_id),
        part(metric)
    )
}

fn unavailable(error: crate::store::StoreError) -> ApiError {
    ApiError::StoreUnavailable(format!("feedback: {error}"))
}

impl Feedback {
    pub fn new(
        config: &FeedbackConfig,
        store: Arc<dyn Store>,
        telemetry: Arc<crate::telemetry::Metrics>,
        experiments: Option<Arc<crate::experiments::Experiments>>,
    ) -> Self {
        Self {
            experiments,
            store,
            telemetry,
            metrics: config
                .metrics
                .iter()
                .map(|(name, metric)| (name.clone(), metric.kind))
                .collect(),
            higher_is_better: config
                .metrics
                .iter()
                .map(|(name, metric)| (name.clone(), metric.higher_is_better))
                .collect(),
            retention: config.retention,
        }
    }

    /// Deletes reports and attributions older than the retention, now and then, while the
    /// store is open. The per-version tallies and experiments' evidence are sums and stay.
    pub fn expire_periodically(&self) {
        // Weak: the sweep must not keep a stopped gateway's store (and an embedded store's file lock) open.
        let (store, retention) = (Arc::downgrade(&self.store), self.retention);
        let every = (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(store) = store.upgrade() else { return };
                match expire(&*store, retention).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(deleted, "expired feedback records deleted"),
                    Err(error) => tracing::warn!(%error, "expired feedback not deleted; retrying"),
                }
            }
        });
    }

    /// Notes which prompt version served `request_id`, off the response path.
    pub fn remember(&self, tenant: &str, request_id: &str, served: Served) {
        if request_id.is_empty() {
            return;
        }
        let (store, key) = (Arc::clone(&self.store), served_key(tenant, request_id));
        let Ok(bytes) = serde_json::to_vec(&served) else {
            return;
        };
        tokio::spawn(async move {
            if let Err(error) = replace(&*store, &key, bytes).await.map(drop) {
                tracing::warn!(%error, "cannot note which prompt version served a request");
            }
        });
    }

    /// Records `report` from `tenant`: 404 unless that tenant was served that request with a
    /// prompt version; a repeated report of the same metric replaces the earlier one.
    pub async fn record(&self, tenant: &str, report: Report) -> Result<Recorded, ApiError> {
        let kind = self.metrics.get(&report.metric).ok_or_else(|| {
            let known: Vec<&str> = self.metrics.keys().map(String::as_str).collect();
            ApiError::invalid(
                format!(
                    "unknown metric `{}` (declared: {})",
                    report.metric,
                    known.join(", ")
                ),
                Some("metric"),
            )
        })?;
        let value = match (kind, &report.value) {
            (MetricKind::Boolean, Value::Bool(b)) => f64::from(u8::from(*b)),
            (MetricKind::Number, Value::Number(n)) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| ApiError::invalid("value: a finite number", Some("value")))?,
            (MetricKind::Boolean, _) => {
                return Err(ApiError::invalid(
                    format!("value: `{}` takes true or false", report.metric),
                    Some("value"),
                ));
            }
            (MetricKind::Number, _) => {
                return Err(ApiError::invalid(
                    format!("value: `{}` takes a number", report.metric),
                    Some("value"),
                ));
            }
        };
        if report
            .comment
            .as_ref()
            .is_some_and(|c| c.len() > MAX_COMMENT_BYTES)
        {
            return Err(ApiError::invalid(
                format!("comment: at most {MAX_COMMENT_BYTES} bytes"),
                Some("comment"),
            ));
        }
        let oldest = crate::request_log::now_ms().saturating_sub(self.retention.as_millis() as u64);
        let served = self
            .store
            .get(&served_key(tenant, &report.request_id))
            .await
            .map_err(unavailable)?
            .and_then(|bytes| serde_json::from_slice::<Served>(&bytes).ok())
            .filter(|served| served.at_ms >= oldest)
            .ok_or_else(|| ApiError::NotFound {
                message: format!(
                    "no prompt request {} answered for this key's tenant (or it is older than the \
                     feedback retention)",
                    report.request_id
                ),
                param: Some("request_id"),
            })?;
        let recorded = Recorded {
            request_id: report.request_id,
            metric: report.metric,
            value,
            comment: report.comment,
            served,
        };
        let bytes = serde_json::to_vec(&recorded)
            .map_err(|e| ApiError::StoreUnavailable(format!("feedback: {e}")))?;
        let previous = replace(
            &*self.store,
            &value_key(tenant, &recorded.request_id, &recorded.metric),
            bytes,
        )
        .await
        .map_err(unavailable)?
        .and_then(|bytes| serde_json::from_slice::<Recorded>(&bytes).ok());
        let replaced = previous.map(|p| p.value);
        if let (Some(experiments), Some(label), Some(id)) = (
            &self.experiments,
            &recorded.served.label,
            &recorded.served.experiment,
        ) {
            let tag = Arc::new(ExperimentTag {
                prompt: recorded.served.prompt.clone(),
                label: label.clone(),
                id: id.clone(),
                slow_above: None,
            });
            experiments.feedback(
                &tag,
                &Scored {
                    version: recorded.served.version,
                    cached: recorded.served.cached,
                    metric: &recorded.metric,
                    value: recorded.value,
                    replaced,
                },
            );
        }
        self.count(&recorded, replaced).await.map_err(unavailable)?;
        Ok(recorded)
    }

    /// Adds `recorded` to its version's tallies, taking out the value it replaced.
    async fn count(
        &self,
        recorded: &Recorded,
        replaced: Option<f64>,
    ) -> Result<(), crate::store::StoreError> {
        let key = stats_key(
            &recorded.served.prompt,
            recorded.served.version,
            &recorded.metric,
        );
        loop {
            let current = self.store.get(&key).await?;
            let mut stats: VersionStats = current
                .as_deref()
                .and_then(|bytes| serde_json::from_slice(bytes).ok())
                .unwrap_or_default();
            let tally = if recorded.served.cached {
                &mut stats.cached
            } else {
                &mut stats.fresh
            };
            if let Some(old) = replaced {
                tally.remove(old);
            }
            tally.add(recorded.value);
            let bytes = serde_json::to_vec(&stats).unwrap_or_default();
            if self
                .store
                .compare_and_swap(&key, current.as_deref(), bytes)
                .await?
            {
                if stats.fresh.n > 0 {
                    self.telemetry.prompt_feedback(
                        &recorded.served.prompt,
                        recorded.served.version,
                        &recorded.metric,
                        stats.fresh.n,
                        stats.fresh.sum / stats.fresh.n as f64,
                    );
                }
                return Ok(());
            }
        }
    }

    /// Per version of `prompt`, per metric: the fresh answers' mean with a 95% interval, and
    /// the cache replays' apart.
    pub async fn results(&self, prompt: &str) -> Result<Value, ApiError> {
        let prefix = format!("feedback/v1/stats/{}/", part(prompt));
        let mut rows = Vec::new();
        self.store
            .scan_prefix(&prefix, &mut |key, bytes| {
                let rest = key.strip_prefix(&prefix).unwrap_or_default().to_owned();
                if let Ok(stats) = serde_json::from_slice::<VersionStats>(&bytes) {
                    rows.push((rest, stats));
                }
            })
            .await
            .map_err(unavailable)?;
        let mut data = Vec::new();
        for (rest, stats) in rows {
            let mut parts = rest.splitn(2, '/');
            let (Some(version), Some(metric)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(version) = version.parse::<u32>() else {
                continue;
            };
            let metric: String = url::form_urlencoded::parse(format!("m={metric}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            data.push(serde_json::json!({
                "version": version,
                "metric": metric,
                "higher_is_better": self.higher_is_better.get(&metric).copied().unwrap_or(true),
                "fresh": stats.fresh.summary(),
                "cached": stats.cached.summary(),
            }));
        }
        data.sort_by_key(|row| (row["metric"].to_string(), row["version"].as_u64()));
        Ok(serde_json::json!({"prompt": prompt, "object": "list", "data": data}))
    }
}

/// Deletes the attributions and reports of requests answered longer than `retention` ago.
async fn expire(store: &dyn Store, retention: Duration) -> Result<u64, crate::store::StoreError> {
    let oldest = crate::request_log::now_ms().saturating_sub(retention.as_millis() as u64);
    let mut expired = Vec::new();
    for prefix in ["feedback/v1/served/", "feedback/v1/value/"] {
        store
            .scan_prefix(prefix, &mut |key, bytes| {
                // A report holds its attribution's fields, `at_ms` among them.
                let at_ms = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| v["at_ms"].as_u64());
                if at_ms.is_none_or(|at| at < oldest) {
                    expired.push(key);
                }
            })
            .await?;
    }
    let mut deleted = 0;
    for key in expired {
        deleted += u64::from(store.delete(&key).await?);
    }
    Ok(deleted)
}

fn stats_key(prompt: &str, version: u32, metric: &str) -> String {
    format!(
        "feedback/v1/stats/{}/{version}/{}",
        part(prompt),
        part(metric)
    )
}

/// One version's tallies of one metric.
#[derive(Debug, Default, Serialize, Deserialize)]
struct VersionStats {
    fresh: Tally,
    cached: Tally,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Tally {
    n: u64,
    sum: f64,
    sum_squares: f64,
}

impl Tally {
    fn add(&mut self, value: f64) {
        self.n += 1;
        self.sum += value;
        self.sum_squares += value * value;
    }

    fn remove(&mut self, value: f64) {
        if self.n > 0 {
            self.n -= 1;
            self.sum -= value;
            self.sum_squares -= value * value;
        }
    }

    /// `n`, the mean, and its 95% interval (normal approximation; none under two samples).
    fn summary(&self) -> Value {
        if self.n == 0 {
            return serde_json::json!({"n": 0});
        }
        let n = self.n as f64;
        let mean = self.sum / n;
        let mut summary = serde_json::json!({"n": self.n, "mean": mean});
        if self.n >= 2 {
            let variance = ((self.sum_squares - n * mean * mean) / (n - 1.0)).max(0.0);
            let half = 1.96 * (variance / n).sqrt();
            summary["ci95"] = serde_json::json!([mean - half, mean + half]);
        }
        summary
    }
}

/// Writes `value` under `key` whatever was there, by compare-and-swap (see the module's note);
/// what it replaced.
pub(crate) async fn replace(
    store: &dyn Store,
    key: &str,
    value: Vec<u8>,
) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
    loop {
        let current = store.get(key).await?;
        if store
            .compare_and_swap(key, current.as_deref(), value.clone())
            .await?
        {
            return Ok(current);
        }
    }
}
