//! Prompt experiments: a rollout whose label declares an `experiment` is tested arm against
//! control, continuously, and acted on.
//!
//! - Evidence: each request served through the rollout (fresh or from the cache, failed or not,
//!   how slow, its tokens and cost) and each feedback report on one is counted per arm in this
//!   process ([`evidence`]), and the totals are written to the shared store every
//!   `flush_interval` as this process's shard of the experiment's record. Each process writes
//!   only its own totals, so a lost race is retried without double counting; a crash loses at
//!   most one interval of counts (the feedback reports themselves are durable).
//! - Tests: sequential tests that stay valid however often they are looked at ([`stats`]),
//!   run by every replica every `check_interval` on the sum of the shards ([`decide`]).
//! - Decisions: a guardrail breach or a conclusive loss takes the arm out; a conclusive win on
//!   the primary metric promotes the arm (at once with `promote = "auto"`, on command
//!   otherwise). The change is one compare-and-swap of the prompt record with the evidence in
//!   its audit event, so two replicas cannot both act, and the existing rollback undoes it; an
//!   arm decided once is not decided again.

pub mod decide;
pub mod evidence;
pub mod stats;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::config::ExperimentsConfig;
use crate::error::ApiError;
use crate::prompts::experiment::{Decided, ExperimentTag, Outcome, Promote};
use crate::prompts::labels::LabelTarget;
use crate::prompts::{Actor, PromptStore, RunningExperiment};
use crate::store::{Store, StoreError};
use decide::{Action, Evaluation};
use evidence::{ArmCounts, Shard};

const EVIDENCE_PREFIX: &str = "experiments/v1/evidence/";

/// Identifies an experiment within the store's keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    prompt: String,
    label: String,
    id: String,
}

impl Key {
    fn store_key(&self) -> String {
        format!(
            "{EVIDENCE_PREFIX}{}/{}/{}",
            part(&self.prompt),
            part(&self.label),
            part(&self.id)
        )
    }
}

/// An experiment's record in the store: each process's shard, by process. One record (not one
/// per process) keeps a read to one `get`, whatever else the store holds.
type ShardsByProcess = std::collections::BTreeMap<String, Shard>;

fn part(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Keyed by the tag a resolved request carries, so counting one allocates nothing.
#[derive(Default)]
struct Totals {
    shards: HashMap<Arc<ExperimentTag>, Shard>,
    /// Experiments counted since the last flush.
    changed: HashSet<Arc<ExperimentTag>>,
}

pub struct Experiments {
    store: Arc<dyn Store>,
    prompts: Arc<PromptStore>,
    /// This process's shard name: totals since it started.
    instance: String,
    totals: Mutex<Totals>,
    config: ExperimentsConfig,
    telemetry: Arc<crate::telemetry::Metrics>,
}

/// A feedback report on an answer served through an experiment's rollout.
pub struct Scored<'a> {
    pub version: u32,
    pub cached: bool,
    pub metric: &'a str,
    pub value: f64,
    pub replaced: Option<f64>,
}

/// One fresh or cached answer served through an experiment's rollout.
pub struct Served {
    pub version: u32,
    pub cached: bool,
    pub error: bool,
    pub latency: Duration,
}

impl Experiments {
    pub fn new(
        store: Arc<dyn Store>,
        prompts: Arc<PromptStore>,
        config: ExperimentsConfig,
        telemetry: Arc<crate::telemetry::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            prompts,
            instance: format!("{:016x}", rand::random::<u64>()),
            totals: Mutex::default(),
            config,
            telemetry,
        })
    }

    fn update(&self, tag: &Arc<ExperimentTag>, version: u32, change: impl FnOnce(&mut ArmCounts)) {
        let mut totals = self.totals.lock();
        if !totals.changed.contains(tag) {
            totals.changed.insert(Arc::clone(tag));
        }
        let shard = match totals.shards.get_mut(tag) {
            Some(shard) => shard,
            None => totals.shards.entry(Arc::clone(tag)).or_default(),
        };
        change(shard.arms.entry(version).or_default());
    }

    /// Counts an answered request.
    pub fn request(&self, tag: &Arc<ExperimentTag>, served: &Served) {
        self.update(tag, served.version, |arm| {
            if served.cached {
                arm.cached += 1;
                return;
            }
            arm.requests += 1;
            arm.errors += u64::from(served.error);
            if !served.error {
                arm.slow += u64::from(tag.slow_above.is_some_and(|s| served.latency > s));
                *arm.latency
                    .entry(evidence::bucket_of(served.latency))
                    .or_default() += 1;
            }
        });
    }

    /// Adds the tokens and cost an upstream billed for an arm's answer.
    pub fn tokens(
        &self,
        tag: &Arc<ExperimentTag>,
        version: u32,
        input: u64,
        output: u64,
        cost: f64,
    ) {
        self.update(tag, version, |arm| {
            arm.prompt_tokens += input;
            arm.completion_tokens += output;
            arm.cost_usd += cost;
        });
    }

    /// Counts a feedback report on an answer served through experiment `tag` (taking out the
    /// report it replaced).
    pub fn feedback(&self, tag: &Arc<ExperimentTag>, report: &Scored<'_>) {
        self.update(tag, report.version, |arm| {
            let sums = if report.cached {
                arm.cached_metrics
                    .entry(report.metric.to_owned())
                    .or_default()
            } else {
                arm.metrics.entry(report.metric.to_owned()).or_default()
            };
            if let Some(old) = report.replaced {
                sums.add(old, -1.0);
            }
            sums.add(report.value, 1.0);
        });
    }

    /// Starts writing this process's counts and running the tests, until `self` is dropped.
    pub fn start(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let flush_every = self.config.flush_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(flush_every).await;
                let Some(this) = weak.upgrade() else { return };
                if let Err(error) = this.flush().await {
                    tracing::warn!(%error, "experiment counts not written; retrying");
                }
            }
        });
        let weak: Weak<Self> = Arc::downgrade(self);
        let check_every = self.config.check_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(check_every).await;
                let Some(this) = weak.upgrade() else { return };
                this.check_all().await;
            }
        });
    }

    /// Writes what was counted since the last flush, logging a failure.
    pub async fn flush_now(&self) {
        if let Err(error) = self.flush().await {
            tracing::warn!(%error, "experiment counts not written at shutdown");
        }
    }

    /// Writes this process's totals of every experiment that changed since the last flush.
    async fn flush(&self) -> Result<(), StoreError> {
        let snapshot: Vec<(Arc<ExperimentTag>, Shard)> = {
            let mut totals = self.totals.lock();
            let changed = std::mem::take(&mut totals.changed);
            changed
                .into_iter()
                .filter_map(|tag| {
                    let shard = totals.shards.get(&tag)?.clone();
                    Some((tag, shard))
                })
                .collect()
        };
        let mut failed = None;
        for (tag, shard) in snapshot {
            let key = Key {
                prompt: tag.prompt.clone(),
                label: tag.label.clone(),
                id: tag.id.clone(),
            };
            if let Err(error) = self.write_shard(&key, shard).await {
                // Written again at the next flush.
                self.totals.lock().changed.insert(tag);
                failed = Some(error);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Puts this process's shard into the experiment's record, by compare-and-swap (replicas
    /// flush the same record).
    async fn write_shard(&self, key: &Key, shard: Shard) -> Result<(), StoreError> {
        let name = key.store_key();
        loop {
            let current = self.store.get(&name).await?;
            let mut shards: ShardsByProcess = current
                .as_deref()
                .and_then(|bytes| serde_json::from_slice(bytes).ok())
                .unwrap_or_default();
            shards.insert(self.instance.clone(), shard.clone());
            let bytes = serde_json::to_vec(&shards).unwrap_or_default();
            if self
                .store
                .compare_and_swap(&name, current.as_deref(), bytes)
                .await?
            {
                return Ok(());
            }
        }
    }

    /// The sum of every process's shard of an experiment.
    async fn evidence(&self, key: &Key) -> Result<Shard, StoreError> {
        let mut merged = Shard::default();
        let shards: ShardsByProcess = self
            .store
            .get(&key.store_key())
            .await?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        for shard in shards.values() {
            merged.merge(shard);
        }
        Ok(merged)
    }

    async fn evaluate(&self, running: &RunningExperiment) -> Result<(Key, Evaluation), StoreError> {
        let key = Key {
            prompt: running.prompt.clone(),
            label: running.label.clone(),
            id: running.spec.id.clone(),
        };
        let shard = self.evidence(&key).await?;
        let evaluation = decide::evaluate(
            &running.spec,
            &running.rollout.arms,
            &shard,
            &running.decided,
            self.prompts.metric_info(),
        );
        Ok((key, evaluation))
    }

    /// The experiment running on `label` of `prompt`, if one is.
    fn running(&self, prompt: &str, label: &str) -> Option<RunningExperiment> {
        self.prompts
            .experiments()
            .into_iter()
            .find(|r| r.prompt == prompt && r.label == label)
    }

    /// `evaluate`, for the admin API.
    async fn evaluated(&self, running: &RunningExperiment) -> Result<(Key, Evaluation), ApiError> {
        self.evaluate(running)
            .await
            .map_err(|e| ApiError::StoreUnavailable(format!("experiment evidence: {e}")))
    }

    /// Runs every experiment's tests and acts on the conclusive ones.
    pub async fn check_all(&self) {
        if let Err(error) = self.flush().await {
            tracing::warn!(%error, "experiment counts not written before a check");
        }
        for running in self.prompts.experiments() {
            let automatic = running.spec.promote == Promote::Auto;
            match self.evaluate(&running).await {
                Ok((key, evaluation)) => {
                    let Some(decision) = &evaluation.decision else {
                        continue;
                    };
                    if decision.action == Action::Promote && !automatic {
                        continue;
                    }
                    let actor = Actor {
                        name: "experiment".into(),
                        source: format!("experiment {}", key.id),
                    };
                    self.act(&key, &evaluation, &actor).await.ok();
                }
                Err(error) => {
                    tracing::warn!(prompt = %running.prompt, label = %running.label, %error, "experiment evidence unreadable");
                }
            }
        }
    }

    async fn act(
        &self,
        key: &Key,
        evaluation: &Evaluation,
        actor: &Actor,
    ) -> Result<Value, ApiError> {
        let Some(decision) = &evaluation.decision else {
            return Err(ApiError::Conflict {
                message: "no decision".into(),
                param: None,
            });
        };
        let evidence = json!({
            "reason": decision.reason,
            "test": decision.test,
            "arms": evaluation.arms,
        });
        let outcome = self
            .prompts
            .decide(
                &key.prompt,
                &key.label,
                &Decided {
                    experiment: key.id.clone(),
                    version: decision.version,
                    outcome: match decision.action {
                        Action::Promote => Outcome::Promote,
                        Action::Rollback => Outcome::Rollback,
                    },
                    evidence: evidence.clone(),
                },
                actor,
            )
            .await;
        match &outcome {
            Ok(_) => {
                tracing::warn!(
                    prompt = %key.prompt,
                    label = %key.label,
                    experiment = %key.id,
                    action = ?decision.action,
                    version = decision.version,
                    reason = %decision.reason,
                    "experiment decided"
                );
                self.telemetry.experiment_decision(
                    &key.prompt,
                    match decision.action {
                        Action::Promote => "promote",
                        Action::Rollback => "rollback",
                    },
                );
            }
            Err(error) => {
                tracing::debug!(%error, "experiment decision not applied (another replica, or a change)")
            }
        }
        outcome.map(|change| json!({"decision": decision, "change": change, "evidence": evidence}))
    }

    /// The experiment on `label` now: its arms' figures, every test, what it would decide, and
    /// what it decided before. Without a running experiment, the label's latest decision.
    pub async fn status(&self, prompt: &str, label: &str) -> Result<Value, ApiError> {
        let running = self.running(prompt, label);
        let history = self.prompts.history(prompt)?;
        let Some(running) = running else {
            let decision = history
                .iter()
                .rev()
                .find(|e| e.label.as_deref() == Some(label) && e.experiment.is_some());
            return match decision {
                Some(event) => Ok(json!({
                    "prompt": prompt,
                    "label": label,
                    "state": "ended",
                    "last_decision": event,
                })),
                None => Err(ApiError::NotFound {
                    message: format!(
                        "label {label:?} of {prompt:?} runs no experiment and has run none"
                    ),
                    param: Some("label"),
                }),
            };
        };
        let (_, evaluation) = self.evaluated(&running).await?;
        let spec = &running.spec;
        let decisions: Vec<_> = history
            .iter()
            .filter(|e| e.experiment.as_deref() == Some(spec.id.as_str()))
            .collect();
        let state = match &evaluation.decision {
            Some(d) if d.action == Action::Promote => "ready_to_promote",
            Some(_) => "deciding",
            None if !running.decided.is_empty() => "held",
            None => "running",
        };
        Ok(json!({
            "prompt": prompt,
            "label": label,
            "state": state,
            "experiment": spec,
            "target": LabelTarget::Rollout(running.rollout.clone()),
            "arms": evaluation.arms,
            "tests": evaluation.tests,
            "pending_decision": evaluation.decision,
            "power": evaluation.power,
            "decisions": decisions,
        }))
    }

    /// Every experiment on `prompt`'s labels, running or ended.
    pub async fn list(&self, prompt: &str) -> Result<Value, ApiError> {
        let mut labels: Vec<String> = self
            .prompts
            .history(prompt)?
            .iter()
            .filter(|e| e.experiment.is_some())
            .filter_map(|e| e.label.clone())
            .collect();
        labels.extend(
            self.prompts
                .experiments()
                .into_iter()
                .filter(|r| r.prompt == prompt)
                .map(|r| r.label),
        );
        labels.sort();
        labels.dedup();
        let mut data = Vec::new();
        for label in labels {
            data.push(self.status(prompt, &label).await?);
        }
        Ok(json!({"object": "list", "data": data}))
    }

    /// Promotes the arm the test found better than the control, on an admin's command.
    pub async fn promote(
        &self,
        prompt: &str,
        label: &str,
        actor: &Actor,
    ) -> Result<Value, ApiError> {
        self.flush()
            .await
            .map_err(|e| ApiError::StoreUnavailable(format!("experiment counts: {e}")))?;
        let running = self
            .running(prompt, label)
            .ok_or_else(|| ApiError::NotFound {
                message: format!("label {label:?} of {prompt:?} runs no experiment"),
                param: Some("label"),
            })?;
        let (key, evaluation) = self.evaluated(&running).await?;
        match &evaluation.decision {
            Some(decision) if decision.action == Action::Promote => {
                self.act(&key, &evaluation, actor).await
            }
            Some(decision) => Err(ApiError::Conflict {
                message: format!("not promoted: {}", decision.reason),
                param: Some("label"),
            }),
            None => Err(ApiError::Conflict {
                message: "no arm beats the control with the experiment's confidence yet (GET the \
                          experiment for its tests); to move the label anyway, set it"
                    .into(),
                param: Some("label"),
            }),
        }
    }
}
