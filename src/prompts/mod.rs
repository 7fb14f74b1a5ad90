//! The versioned prompt store: resolves a request's prompt reference (id plus label or version)
//! to an immutable template version and renders it, before the caches see the request.
//!
//! - Versions are content-addressed (blake3 of the canonical template) and immutable: a changed
//!   file or API call under a taken version number is refused.
//! - Labels point to a version or to a rollout of weighted versions; assignment is sticky per end
//!   user ([`labels`]).
//! - Every prompt is one record in the [`Store`] ([`record`]), changed by compare-and-swap, with
//!   its audit trail inside: durable before it is acknowledged, never half-written, no lost
//!   update between admins or replicas. With a shared store, replicas follow each other's
//!   changes through the store's change feed.
//! - At startup, `prompts/` ([`files`]) is imported: new versions are added, a label file that
//!   changed since it was last applied is applied.

pub mod experiment;
pub mod files;
pub mod labels;
pub mod record;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::protocol::openai::ChatRequest;
use crate::store::{Store, StoreError};
use experiment::{Decided, ExperimentTag, MetricInfo, Outcome};
use labels::LabelTarget;
use record::{Action, AuditEvent, PromptRecord, StoredVersion, now_rfc3339};
use spec::{CompiledVersion, RenderError, Rendered, VersionSpec, is_valid_name};

const RECORD_PREFIX: &str = "prompts/v1/";
const FEED: &str = "prompts";
/// The label a reference without label or version resolves.
pub const DEFAULT_LABEL: &str = "production";
/// Compare-and-swap attempts before a change gives up (only under a storm of concurrent admins).
const MAX_ATTEMPTS: usize = 64;

fn record_key(id: &str) -> String {
    format!("{RECORD_PREFIX}{id}")
}

fn unavailable(error: StoreError) -> ApiError {
    ApiError::StoreUnavailable(error.to_string())
}

/// How a request names a prompt: the `prompt` object of the body, or the `x-reprise-prompt`
/// header (`id`, `id@label` or `id@v3`) with `x-reprise-prompt-variables` (a JSON object).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRef {
    pub id: String,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default)]
    pub variables: Map<String, Value>,
}

impl PromptRef {
    pub fn from_body(value: Value) -> Result<Self, ApiError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ApiError::invalid(
                format!("prompt: {}", e.inner()),
                Some(&if path == "." {
                    "prompt".to_owned()
                } else {
                    format!("prompt.{path}")
                }),
            )
        })
    }

    pub fn from_header(reference: &str, variables: Option<&str>) -> Result<Self, ApiError> {
        let param = Some("x-reprise-prompt");
        let (id, selector) = match reference.trim().split_once('@') {
            Some((id, selector)) => (id, Some(selector)),
            None => (reference.trim(), None),
        };
        let (label, version) = match selector {
            None => (None, None),
            Some(selector) => match selector
                .strip_prefix('v')
                .and_then(|n| n.parse::<u32>().ok())
            {
                Some(version) => (None, Some(version)),
                None if !selector.is_empty() => (Some(selector.to_owned()), None),
                None => {
                    return Err(ApiError::invalid(
                        "x-reprise-prompt is `id`, `id@label` or `id@v<version>`",
                        param,
                    ));
                }
            },
        };
        let variables = match variables {
            None => Map::new(),
            Some(json) => match serde_json::from_str::<Value>(json) {
                Ok(Value::Object(map)) => map,
                _ => {
                    return Err(ApiError::invalid(
                        "x-reprise-prompt-variables must be a JSON object",
                        Some("x-reprise-prompt-variables"),
                    ));
                }
            },
        };
        Ok(Self {
            id: id.to_owned(),
            label,
            version,
            variables,
        })
    }
}

/// A prompt reference resolved to one version and rendered.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub id: String,
    pub version: u32,
    pub hash: String,
    pub label: Option<String>,
    /// For a rollout: which arm (1-based) of how many.
    pub arm: Option<(usize, usize)>,
    /// The experiment running on the label's rollout.
    pub experiment: Option<Arc<ExperimentTag>>,
    pub rendered: Rendered,
    model: Option<String>,
    parameters: Map<String, Value>,
}

impl Resolution {
    /// What the exact cache key adds for a prompt: the id, version and content hash. (The
    /// rendered messages are in the key already; this keeps two versions apart even where they
    /// render alike.)
    pub fn cache_identity(&self) -> String {
        format!("{}@{}#{}", self.id, self.version, self.hash)
    }

    /// What the semantic scope adds for a prompt: the version and the values of the variables
    /// that are not free text (those must match exactly; only free text is compared by meaning).
    pub fn semantic_identity(&self) -> String {
        let exact =
            serde_json::Value::Object(self.rendered.exact_variables.iter().cloned().collect());
        let mut canonical = Vec::new();
        crate::canonical::write_canonical(&exact, &mut canonical);
        format!(
            "{}\n{}",
            self.cache_identity(),
            String::from_utf8_lossy(&canonical)
        )
    }

    /// Turns `request` into the one the prompt makes: the rendered messages, then the client's
    /// own messages; the version's model alias; its parameters where the request set none.
    pub fn apply(&self, request: &mut ChatRequest) -> Result<(), ApiError> {
        let client_messages = std::mem::take(&mut request.messages);
        if !self.parameters.is_empty() {
            // Parameters are any request fields: merge them as JSON, where "set" is "present".
            let mut value = serde_json::to_value(&*request)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
            if let Some(fields) = value.as_object_mut() {
                for (name, parameter) in &self.parameters {
                    if !fields.contains_key(name) {
                        fields.insert(name.clone(), parameter.clone());
                    }
                }
            }
            *request = serde_json::from_value(value)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
        }
        if let Some(model) = &self.model {
            request.model.clone_from(model);
        }
        request.messages = self.rendered.messages.clone();
        request.messages.extend(client_messages);
        Ok(())
    }

    /// Whether the client sent messages of its own after the template's.
    pub fn has_client_turns(&self, request: &ChatRequest) -> bool {
        request.messages.len() > self.rendered.messages.len()
    }
}

struct Loaded {
    record: PromptRecord,
    compiled: BTreeMap<u32, Arc<CompiledVersion>>,
    /// Per label running an experiment, what its requests are counted under (made once here,
    /// not per request).
    experiments: HashMap<String, Arc<ExperimentTag>>,
}

impl Loaded {
    /// Compiles the record's versions, reusing those compiled before (versions never change).
    fn new(record: PromptRecord, previous: Option<&Loaded>) -> Self {
        let mut compiled = BTreeMap::new();
        for (&number, stored) in &record.versions {
            if let Some(done) = previous.and_then(|p| p.compiled.get(&number))
                && done.hash == stored.hash
            {
                compiled.insert(number, Arc::clone(done));
                continue;
            }
            match CompiledVersion::compile(number, stored.spec.clone()) {
                Ok(version) => {
                    compiled.insert(number, Arc::new(version));
                }
                Err(error) => {
                    tracing::error!(prompt = %record.id, version = number, %error, "stored prompt version does not compile; it cannot be served");
                }
            }
        }
        let experiments = record
            .labels
            .iter()
            .filter_map(|(label, target)| match target {
                LabelTarget::Rollout(rollout) => rollout.experiment.as_ref().map(|spec| {
                    (
                        label.clone(),
                        Arc::new(ExperimentTag {
                            prompt: record.id.clone(),
                            label: label.clone(),
                            id: spec.id.clone(),
                            slow_above: spec
                                .guardrails
                                .max_p95_latency_ms
                                .map(Duration::from_millis),
                        }),
                    )
                }),
                LabelTarget::Version(_) => None,
            })
            .collect();
        Self {
            record,
            compiled,
            experiments,
        }
    }
}

/// Counters per prompt version, for the admin API (this replica's traffic).
#[derive(Debug, Default, Clone, Serialize)]
pub struct VersionStats {
    pub requests: u64,
    pub errors: u64,
    pub cache_hits: u64,
    pub semantic_hits: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    #[serde(skip)]
    latency_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct VersionStatsRow {
    pub prompt: String,
    pub version: u32,
    /// Labels pointing to this version now (a rollout arm counts).
    pub labels: Vec<String>,
    pub hit_ratio: f64,
    pub error_rate: f64,
    pub mean_latency_ms: f64,
    #[serde(flatten)]
    pub counters: VersionStats,
}

/// One answered request, as the per-version statistics see it.
pub struct Usage {
    pub outcome: &'static str,
    pub error: bool,
    pub latency: Duration,
}

#[derive(Debug, Serialize)]
pub struct PromptSummary {
    pub id: String,
    pub revision: u64,
    pub versions: usize,
    pub latest_version: Option<u32>,
    pub labels: BTreeMap<String, LabelTarget>,
}

#[derive(Debug, Serialize)]
pub struct VersionView {
    pub prompt: String,
    pub version: u32,
    pub hash: String,
    pub created_at: String,
    pub created_by: String,
    #[serde(flatten)]
    pub spec: VersionSpec,
}

#[derive(Debug, Serialize)]
pub struct PromptView {
    pub id: String,
    pub revision: u64,
    pub labels: BTreeMap<String, LabelTarget>,
    pub versions: Vec<VersionView>,
}

/// The answer to a change: the record's revision after it, and whether anything changed (an
/// identical version or a label already pointing there changes nothing).
#[derive(Debug, Serialize)]
pub struct ChangeOutcome<T> {
    pub revision: u64,
    pub changed: bool,
    #[serde(flatten)]
    pub detail: T,
}

/// Who makes a change and through what, for the audit trail.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub source: String,
}

pub struct PromptStore {
    store: Arc<dyn Store>,
    prompts: RwLock<HashMap<String, Arc<Loaded>>>,
    stats: Mutex<BTreeMap<(String, u32), VersionStats>>,
    /// The declared feedback metrics, which experiments name.
    metrics: BTreeMap<String, MetricInfo>,
}

impl PromptStore {
    /// Loads the records from the store, then imports `dir`. A file that changes a stored version
    /// stops startup with an error naming the file.
    pub async fn open(
        store: Arc<dyn Store>,
        dir: Option<&Path>,
        metrics: BTreeMap<String, MetricInfo>,
    ) -> anyhow::Result<Arc<Self>> {
        let this = Arc::new(Self {
            store,
            prompts: RwLock::default(),
            stats: Mutex::default(),
            metrics,
        });
        let mut records = Vec::new();
        this.store
            .scan_prefix(
                RECORD_PREFIX,
                &mut |key, value| match serde_json::from_slice::<PromptRecord>(&value) {
                    Ok(record) => records.push(record),
                    Err(error) => tracing::error!(%key, %error, "unreadable prompt record skipped"),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("prompts: cannot read the store: {e}"))?;
        for record in records {
            this.install(record);
        }
        if let Some(dir) = dir {
            let prompts = files::read_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
            for prompt in prompts {
                this.import(prompt).await?;
            }
        }
        Ok(this)
    }

    async fn import(&self, prompt: files::PromptFiles) -> anyhow::Result<()> {
        for version in &prompt.versions {
            let actor = Actor {
                name: "startup".into(),
                source: version.path.display().to_string(),
            };
            self.create_version(
                &prompt.id,
                Some(version.number),
                version.spec.clone(),
                None,
                &actor,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", version.path.display()))?;
        }
        if let Some(labels) = prompt.labels {
            for (label, target) in &labels.labels {
                self.check_experiment(target).map_err(|(field, message)| {
                    anyhow::anyhow!("{}: {label}.{field}: {message}", labels.path.display())
                })?;
            }
            let source = labels.path.display().to_string();
            let hash = labels.hash.clone();
            self.update(&prompt.id, None, |record| {
                if record.labels_file.as_deref() == Some(hash.as_str()) {
                    return Ok(());
                }
                for (label, target) in &labels.labels {
                    record.set_label(label, target.clone(), "startup", &source, None);
                }
                record.labels_file = Some(hash.clone());
                Ok(())
            })
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", labels.path.display()))?;
        }
        Ok(())
    }

    fn install(&self, record: PromptRecord) -> Arc<Loaded> {
        let mut prompts = self.prompts.write();
        let previous = prompts.get(&record.id).cloned();
        if let Some(previous) = &previous
            && previous.record.revision >= record.revision
        {
            return Arc::clone(previous);
        }
        let loaded = Arc::new(Loaded::new(record, previous.as_deref()));
        prompts.insert(loaded.record.id.clone(), Arc::clone(&loaded));
        loaded
    }

    fn loaded(&self, id: &str) -> Result<Arc<Loaded>, ApiError> {
        self.prompts
            .read()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound {
                message: format!("prompt {id:?} does not exist"),
                param: Some("prompt.id"),
            })
    }

    /// Applies `change` to the stored record by compare-and-swap, starting over when another
    /// writer got there first, so no update is lost. `if_revision` makes the change conditional
    /// on the record not having moved since the caller read it.
    async fn update<T>(
        &self,
        id: &str,
        if_revision: Option<u64>,
        mut change: impl FnMut(&mut PromptRecord) -> Result<T, ApiError>,
    ) -> Result<(T, PromptRecord, bool), ApiError> {
        if !is_valid_name(id) {
            return Err(ApiError::invalid(
                format!(
                    "{id:?} is not a valid prompt id (letters, digits, `-`, `_`, `.`; up to 64)"
                ),
                Some("id"),
            ));
        }
        let key = record_key(id);
        for _ in 0..MAX_ATTEMPTS {
            let current = self.store.get(&key).await.map_err(unavailable)?;
            let mut record = match &current {
                Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
                    ApiError::StoreUnavailable(format!("prompt record {id:?} is unreadable: {e}"))
                })?,
                None => PromptRecord::new(id),
            };
            if let Some(expected) = if_revision
                && expected != record.revision
            {
                return Err(ApiError::Conflict {
                    message: format!(
                        "prompt {id:?} is at revision {}, not {expected}: read it again and retry",
                        record.revision
                    ),
                    param: Some("if_revision"),
                });
            }
            let before = record.clone();
            let detail = change(&mut record)?;
            if record == before {
                return Ok((detail, record, false));
            }
            record.revision += 1;
            let bytes = serde_json::to_vec(&record)
                .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?;
            if self
                .store
                .compare_and_swap(&key, current.as_deref(), bytes)
                .await
                .map_err(unavailable)?
            {
                if let Err(error) = self.store.publish(FEED, id.as_bytes().to_vec()).await {
                    tracing::warn!(%error, prompt = id, "prompt change not announced to other replicas; they pick it up on restart");
                }
                // One line per change, whatever made it (admin API, CLI, startup import).
                for event in record
                    .history
                    .iter()
                    .filter(|e| e.revision == record.revision)
                {
                    tracing::info!(
                        prompt = id,
                        revision = record.revision,
                        action = ?event.action,
                        version = ?event.version,
                        label = ?event.label,
                        actor = %event.actor,
                        "prompt changed"
                    );
                }
                self.install(record.clone());
                return Ok((detail, record, true));
            }
        }
        Err(ApiError::Conflict {
            message: format!("prompt {id:?} is being changed by many writers at once; retry"),
            param: None,
        })
    }

    /// Resolves and renders a request's prompt. `user` makes rollout assignment sticky; without
    /// one, each request draws its arm afresh.
    pub fn resolve(
        &self,
        reference: &PromptRef,
        user: Option<&str>,
    ) -> Result<Resolution, ApiError> {
        let loaded = self.loaded(&reference.id)?;
        let record = &loaded.record;
        let mut experiment = None;
        let (number, label, arm) = match (reference.version, &reference.label) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "give a prompt's label or its version, not both",
                    Some("prompt.version"),
                ));
            }
            (Some(version), None) => (version, None, None),
            (None, label) => {
                let label = label.as_deref().unwrap_or(DEFAULT_LABEL);
                let target = record.labels.get(label).ok_or_else(|| ApiError::NotFound {
                    message: format!(
                        "prompt {:?} has no label {label:?} (labels: {})",
                        record.id,
                        names(record.labels.keys())
                    ),
                    param: Some("prompt.label"),
                })?;
                match target {
                    LabelTarget::Version(version) => (*version, Some(label), None),
                    LabelTarget::Rollout(rollout) => {
                        let drawn;
                        let user = match user {
                            Some(user) => user,
                            None => {
                                drawn = rand::random::<u64>().to_string();
                                &drawn
                            }
                        };
                        let index = rollout.assign(user);
                        let version = rollout.arms.get(index).map_or(0, |a| a.version);
                        experiment = loaded.experiments.get(label).cloned();
                        (version, Some(label), Some((index + 1, rollout.arms.len())))
                    }
                }
            }
        };
        let compiled = loaded
            .compiled
            .get(&number)
            .ok_or_else(|| ApiError::NotFound {
                message: format!(
                    "prompt {:?} has no version {number} (versions: {})",
                    record.id,
                    names(loaded.compiled.keys())
                ),
                param: Some(if label.is_some() {
                    "prompt.label"
                } else {
                    "prompt.version"
                }),
            })?;
        let rendered = compiled.render(&reference.variables).map_err(|e| match e {
            RenderError::Variable { name, message } => ApiError::InvalidRequest {
                message: format!("prompt {:?} version {number}: {message}", record.id),
                param: Some(format!("prompt.variables.{name}")),
            },
            RenderError::Template { message } => ApiError::Unprocessable {
                message: format!("prompt {:?} version {number}: {message}", record.id),
                param: Some("prompt".into()),
                code: "prompt_render_failed",
            },
        })?;
        Ok(Resolution {
            id: record.id.clone(),
            version: number,
            hash: compiled.hash.clone(),
            label: label.map(str::to_owned),
            arm,
            experiment,
            rendered,
            model: compiled.spec.model.clone(),
            parameters: compiled.spec.parameters.clone(),
        })
    }

    pub fn list(&self) -> Vec<PromptSummary> {
        let mut list: Vec<PromptSummary> = self
            .prompts
            .read()
            .values()
            .map(|l| PromptSummary {
                id: l.record.id.clone(),
                revision: l.record.revision,
                versions: l.record.versions.len(),
                latest_version: l.record.latest_version(),
                labels: l.record.labels.clone(),
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    pub fn show(&self, id: &str) -> Result<PromptView, ApiError> {
        let loaded = self.loaded(id)?;
        let record = &loaded.record;
        Ok(PromptView {
            id: record.id.clone(),
            revision: record.revision,
            labels: record.labels.clone(),
            versions: record
                .versions
                .iter()
                .map(|(&n, v)| version_view(id, n, v))
                .collect(),
        })
    }

    pub fn version(&self, id: &str, number: u32) -> Result<VersionView, ApiError> {
        let loaded = self.loaded(id)?;
        loaded
            .record
            .versions
            .get(&number)
            .map(|v| version_view(id, number, v))
            .ok_or_else(|| ApiError::NotFound {
                message: format!("prompt {id:?} has no version {number}"),
                param: Some("version"),
            })
    }

    /// A unified diff of two versions as their files.
    pub fn diff(&self, id: &str, from: u32, to: u32) -> Result<String, ApiError> {
        let as_file = |number: u32| -> Result<String, ApiError> {
            let view = self.version(id, number)?;
            files::version_to_toml(&view.spec).map_err(|e| ApiError::invalid(e.to_string(), None))
        };
        let (old, new) = (as_file(from)?, as_file(to)?);
        Ok(similar::TextDiff::from_lines(&old, &new)
            .unified_diff()
            .header(&format!("{id}/v{from}.toml"), &format!("{id}/v{to}.toml"))
            .to_string())
    }

    pub fn history(&self, id: &str) -> Result<Vec<AuditEvent>, ApiError> {
        Ok(self.loaded(id)?.record.history.clone())
    }

    /// Every prompt's audit events, newest first, at most `limit`.
    pub fn audit(&self, limit: usize) -> Vec<(String, AuditEvent)> {
        let mut events: Vec<(String, AuditEvent)> = self
            .prompts
            .read()
            .values()
            .flat_map(|l| {
                l.record
                    .history
                    .iter()
                    .map(|e| (l.record.id.clone(), e.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        events.sort_by(|a, b| b.1.at.cmp(&a.1.at).then(b.1.revision.cmp(&a.1.revision)));
        events.truncate(limit);
        events
    }

    /// Adds a version (number: the next free one unless given). The same content as an existing
    /// version is that version, not a new one; other content under a taken number is a conflict.
    pub async fn create_version(
        &self,
        id: &str,
        number: Option<u32>,
        spec: VersionSpec,
        if_revision: Option<u64>,
        actor: &Actor,
    ) -> Result<ChangeOutcome<VersionView>, ApiError> {
        let compiled = CompiledVersion::compile(number.unwrap_or(1), spec)
            .map_err(|e| ApiError::invalid(e.to_string(), Some(&e.field)))?;
        let hash = compiled.hash.clone();
        let spec = compiled.spec;
        let (number, record, changed) = self
            .update(id, if_revision, |record| {
                if let Some(number) = number {
                    return match record.versions.get(&number) {
                        Some(existing) if existing.hash == hash => Ok(number),
                        Some(existing) => Err(ApiError::Conflict {
                            message: format!(
                                "version {number} of {id:?} exists with other content (hash {}, this is {}); versions are immutable: create version {}",
                                &existing.hash[..12],
                                &hash[..12],
                                record.latest_version().unwrap_or(0) + 1
                            ),
                            param: Some("version"),
                        }),
                        None => {
                            add_version(record, number, &hash, &spec, actor);
                            Ok(number)
                        }
                    };
                }
                if let Some((&existing, _)) = record.versions.iter().find(|(_, v)| v.hash == hash) {
                    return Ok(existing);
                }
                let next = record.latest_version().unwrap_or(0) + 1;
                add_version(record, next, &hash, &spec, actor);
                Ok(next)
            })
            .await?;
        let stored = record.versions.get(&number).ok_or_else(|| {
            ApiError::StoreUnavailable("the version vanished after it was written".into())
        })?;
        Ok(ChangeOutcome {
            revision: record.revision,
            changed,
            detail: version_view(id, number, stored),
        })
    }

    /// Points `label` at a version or a rollout (starting, adjusting or stopping it).
    pub async fn set_label(
        &self,
        id: &str,
        label: &str,
        target: LabelTarget,
        if_revision: Option<u64>,
        actor: &Actor,
    ) -> Result<ChangeOutcome<LabelChange>, ApiError> {
        check_label(label)?;
        self.loaded(id)?;
        self.check_experiment(&target).map_err(|(field, message)| {
            ApiError::invalid(
                format!("{field}: {message}"),
                Some(&format!("target.{field}")),
            )
        })?;
        let (action, record, changed) = self
            .update(id, if_revision, |record| {
                let target = target
                    .clone()
                    .validated(id, label, |v| record.versions.contains_key(&v))
                    .map_err(|e| ApiError::invalid(e, Some("target")))?;
                Ok(record.set_label(label, target, &actor.name, &actor.source, None))
            })
            .await?;
        Ok(label_change(&record, label, action, changed))
    }

    /// Points `label` back to what it pointed to before its last change.
    pub async fn rollback(
        &self,
        id: &str,
        label: &str,
        if_revision: Option<u64>,
        actor: &Actor,
    ) -> Result<ChangeOutcome<LabelChange>, ApiError> {
        self.loaded(id)?;
        let (action, record, changed) = self
            .update(id, if_revision, |record| {
                let previous = record
                    .previous_target(label)
                    .ok_or_else(|| ApiError::Conflict {
                        message: format!(
                            "label {label:?} of {id:?} has no earlier target to roll back to"
                        ),
                        param: Some("label"),
                    })?;
                Ok(record.set_label(
                    label,
                    previous,
                    &actor.name,
                    &actor.source,
                    Some(Action::Rollback),
                ))
            })
            .await?;
        Ok(label_change(&record, label, action, changed))
    }

    pub async fn delete_label(
        &self,
        id: &str,
        label: &str,
        if_revision: Option<u64>,
        actor: &Actor,
    ) -> Result<ChangeOutcome<LabelChange>, ApiError> {
        self.loaded(id)?;
        let (_, record, changed) = self
            .update(id, if_revision, |record| {
                let Some(before) = record.labels.remove(label) else {
                    return Err(ApiError::NotFound {
                        message: format!("prompt {id:?} has no label {label:?}"),
                        param: Some("label"),
                    });
                };
                let event = record.audit(&actor.name, &actor.source, Action::DeleteLabel);
                event.label = Some(label.to_owned());
                event.before = Some(before);
                Ok(())
            })
            .await?;
        Ok(label_change(
            &record,
            label,
            Some(Action::DeleteLabel),
            changed,
        ))
    }

    /// A prompt as files (`v1.toml`, ..., `labels.toml`), to commit back under `prompts/`.
    pub fn export(&self, id: &str) -> Result<BTreeMap<String, String>, ApiError> {
        let loaded = self.loaded(id)?;
        let failed = |e: toml::ser::Error| ApiError::invalid(e.to_string(), None);
        let mut out = BTreeMap::new();
        for (number, version) in &loaded.record.versions {
            out.insert(
                format!("v{number}.toml"),
                files::version_to_toml(&version.spec).map_err(failed)?,
            );
        }
        if !loaded.record.labels.is_empty() {
            out.insert(
                "labels.toml".into(),
                files::labels_to_toml(&loaded.record.labels).map_err(failed)?,
            );
        }
        Ok(out)
    }

    /// Counts one answered request against its prompt version.
    pub fn record_use(&self, id: &str, version: u32, usage: &Usage) {
        let mut stats = self.stats.lock();
        let row = stats.entry((id.to_owned(), version)).or_default();
        row.requests += 1;
        row.errors += u64::from(usage.error);
        row.cache_hits += u64::from(usage.outcome == "hit");
        row.semantic_hits += u64::from(usage.outcome == "semantic-hit");
        row.latency_seconds += usage.latency.as_secs_f64();
    }

    /// Adds tokens billed for a version: a whole answer's, or a stream's usage chunk as it passes.
    pub fn record_tokens(
        &self,
        id: &str,
        version: u32,
        prompt: u64,
        completion: u64,
        cost_usd: f64,
    ) {
        let mut stats = self.stats.lock();
        let row = stats.entry((id.to_owned(), version)).or_default();
        row.prompt_tokens += prompt;
        row.completion_tokens += completion;
        row.cost_usd += cost_usd;
    }

    /// Counters per prompt version with the labels pointing there, to compare rollout arms.
    pub fn stats(&self) -> Vec<VersionStatsRow> {
        let prompts = self.prompts.read();
        self.stats
            .lock()
            .iter()
            .map(|((id, version), counters)| {
                let labels = prompts
                    .get(id)
                    .map(|l| {
                        l.record
                            .labels
                            .iter()
                            .filter(|(_, t)| t.versions().contains(version))
                            .map(|(name, _)| name.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let requests = counters.requests.max(1) as f64;
                VersionStatsRow {
                    prompt: id.clone(),
                    version: *version,
                    labels,
                    hit_ratio: (counters.cache_hits + counters.semantic_hits) as f64 / requests,
                    error_rate: counters.errors as f64 / requests,
                    // Microsecond precision: more digits are float noise, not information.
                    mean_latency_ms: (counters.latency_seconds * 1e6 / requests).round() / 1e3,
                    counters: counters.clone(),
                }
            })
            .collect()
    }

    fn check_experiment(&self, target: &LabelTarget) -> Result<(), (String, String)> {
        match target {
            LabelTarget::Rollout(rollout) => rollout
                .experiment
                .as_ref()
                .map_or(Ok(()), |spec| spec.check(&self.metrics)),
            LabelTarget::Version(_) => Ok(()),
        }
    }

    /// The declared feedback metrics.
    pub fn metric_info(&self) -> &BTreeMap<String, MetricInfo> {
        &self.metrics
    }

    /// Every running experiment: prompt id, label, the rollout, and the arms decided already.
    pub fn experiments(&self) -> Vec<RunningExperiment> {
        let prompts = self.prompts.read();
        let mut running = Vec::new();
        for loaded in prompts.values() {
            for (label, target) in &loaded.record.labels {
                if let LabelTarget::Rollout(rollout) = target
                    && let Some(spec) = &rollout.experiment
                {
                    running.push(RunningExperiment {
                        prompt: loaded.record.id.clone(),
                        label: label.clone(),
                        decided: loaded.record.decided_arms(&spec.id),
                        spec: spec.clone(),
                        rollout: rollout.clone(),
                    });
                }
            }
        }
        running.sort_by(|a, b| (&a.prompt, &a.label).cmp(&(&b.prompt, &b.label)));
        running
    }

    /// Acts on an experiment's decision, if the label still runs that experiment and the arm
    /// was not decided before: a rollback takes the arm out (its users go to the control), a
    /// promotion points the label at the arm. The audit event carries the evidence.
    pub async fn decide(
        &self,
        id: &str,
        label: &str,
        decided: &Decided,
        actor: &Actor,
    ) -> Result<ChangeOutcome<LabelChange>, ApiError> {
        let Decided {
            experiment,
            version,
            outcome,
            evidence,
        } = decided;
        let (experiment, version) = (experiment.as_str(), *version);
        let stale = || ApiError::Conflict {
            message: format!(
                "label {label:?} of {id:?} no longer runs experiment {experiment}, or it decided on                  version {} already",
                version
            ),
            param: Some("label"),
        };
        let (action, record, changed) = self
            .update(id, None, |record| {
                let Some(LabelTarget::Rollout(rollout)) = record.labels.get(label).cloned() else {
                    return Err(stale());
                };
                if rollout
                    .experiment
                    .as_ref()
                    .is_none_or(|e| e.id != experiment)
                    || record.decided_arms(experiment).contains(&version)
                    || rollout.arms.first().is_none_or(|a| a.version == version)
                {
                    return Err(stale());
                }
                let (target, action) = match *outcome {
                    Outcome::Promote => (LabelTarget::Version(version), Action::ExperimentPromote),
                    Outcome::Rollback => (taken_out(rollout, version), Action::ExperimentRollback),
                };
                let action =
                    record.set_label(label, target, &actor.name, &actor.source, Some(action));
                if let Some(event) = record.history.last_mut() {
                    event.version = Some(version);
                    event.experiment = Some(experiment.to_owned());
                    event.evidence = Some(evidence.clone());
                }
                Ok(action)
            })
            .await?;
        Ok(label_change(&record, label, action, changed))
    }

    /// With a shared store, follows other replicas' changes until the store is dropped.
    pub fn follow(self: &Arc<Self>, interval: Duration) {
        if !self.store.is_shared() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut cursor = None;
            loop {
                let Some(this) = weak.upgrade() else { return };
                match this.store.read_feed(FEED, cursor.as_deref(), 256).await {
                    Ok(page) => {
                        let first_read = cursor.is_none();
                        cursor = Some(page.cursor);
                        if first_read {
                            // Changes made between startup's load and the first feed read.
                            this.reload_all().await;
                        }
                        for event in page.events {
                            if let Ok(id) = String::from_utf8(event) {
                                this.reload(&id).await;
                            }
                        }
                    }
                    Err(error) => tracing::debug!(%error, "prompt feed unavailable; retrying"),
                }
                drop(this);
                tokio::time::sleep(interval).await;
            }
        });
    }

    async fn reload(&self, id: &str) {
        match self.store.get(&record_key(id)).await {
            Ok(Some(bytes)) => match serde_json::from_slice::<PromptRecord>(&bytes) {
                Ok(record) => {
                    self.install(record);
                }
                Err(error) => tracing::error!(prompt = id, %error, "unreadable prompt record"),
            },
            Ok(None) => {}
            Err(error) => tracing::warn!(prompt = id, %error, "cannot reload a changed prompt"),
        }
    }

    async fn reload_all(&self) {
        let mut records = Vec::new();
        let scanned = self
            .store
            .scan_prefix(RECORD_PREFIX, &mut |_, value| {
                if let Ok(record) = serde_json::from_slice::<PromptRecord>(&value) {
                    records.push(record);
                }
            })
            .await;
        if scanned.is_ok() {
            for record in records {
                self.install(record);
            }
        }
    }
}

/// An experiment running on a label, as the monitor sees it.
#[derive(Debug, Clone)]
pub struct RunningExperiment {
    pub prompt: String,
    pub label: String,
    pub spec: Box<experiment::ExperimentSpec>,
    pub rollout: labels::Rollout,
    pub decided: Vec<u32>,
}

/// `rollout` without the arm of `version`: its users go to the control. The arm stays listed
/// with weight 0, so the experiment's status still shows it; with one live arm left, the label
/// points at the control. (Arms own consecutive bucket ranges and the control's grows: with
/// three or more arms, the treatment arms listed between the control and it shift their
/// ranges, so some of their users move too; the arms after it keep theirs.)
fn taken_out(mut rollout: labels::Rollout, version: u32) -> LabelTarget {
    let freed: u32 = rollout
        .arms
        .iter_mut()
        .filter(|a| a.version == version)
        .map(|a| std::mem::take(&mut a.weight))
        .sum();
    if let Some(control) = rollout.arms.first_mut() {
        control.weight += freed;
    }
    let live: Vec<u32> = rollout
        .arms
        .iter()
        .filter(|a| a.weight > 0)
        .map(|a| a.version)
        .collect();
    match live.as_slice() {
        [only] => LabelTarget::Version(*only),
        _ => LabelTarget::Rollout(rollout),
    }
}

fn add_version(
    record: &mut PromptRecord,
    number: u32,
    hash: &str,
    spec: &VersionSpec,
    actor: &Actor,
) {
    record.versions.insert(
        number,
        StoredVersion {
            hash: hash.to_owned(),
            spec: spec.clone(),
            created_at: now_rfc3339(),
            created_by: actor.name.clone(),
        },
    );
    let event = record.audit(&actor.name, &actor.source, Action::CreateVersion);
    event.version = Some(number);
}

fn version_view(id: &str, number: u32, stored: &StoredVersion) -> VersionView {
    VersionView {
        prompt: id.to_owned(),
        version: number,
        hash: stored.hash.clone(),
        created_at: stored.created_at.clone(),
        created_by: stored.created_by.clone(),
        spec: stored.spec.clone(),
    }
}

#[derive(Debug, Serialize)]
pub struct LabelChange {
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    pub target: Option<LabelTarget>,
}

fn label_change(
    record: &PromptRecord,
    label: &str,
    action: Option<Action>,
    changed: bool,
) -> ChangeOutcome<LabelChange> {
    ChangeOutcome {
        revision: record.revision,
        changed,
        detail: LabelChange {
            label: label.to_owned(),
            action: if changed { action } else { None },
            target: record.labels.get(label).cloned(),
        },
    }
}

fn check_label(label: &str) -> Result<(), ApiError> {
    if is_valid_name(label) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            format!("{label:?} is not a valid label name (letters, digits, `-`, `_`, `.`)"),
            Some("label"),
        ))
    }
}

fn names<T: ToString>(items: impl Iterator<Item = T>) -> String {
    let names: Vec<String> = items.map(|i| i.to_string()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::labels::{Arm, Rollout};
    use super::*;

    fn rollout(weights: &[(u32, u32)]) -> Rollout {
        Rollout {
            arms: weights
                .iter()
                .map(|&(version, weight)| Arm { version, weight })
                .collect(),
            salt: "s".into(),
            experiment: None,
        }
    }

    #[test]
    fn an_arm_taken_out_gives_its_users_to_the_control() {
        assert_eq!(
            taken_out(rollout(&[(1, 50), (2, 50)]), 2),
            LabelTarget::Version(1)
        );
        let LabelTarget::Rollout(left) = taken_out(rollout(&[(1, 40), (2, 30), (3, 30)]), 2) else {
            panic!("two arms are left");
        };
        assert_eq!(left.arms, rollout(&[(1, 70), (2, 0), (3, 30)]).arms);
        // A user of the removed arm now lands on the control; the third arm keeps its users.
        let before = rollout(&[(1, 40), (2, 30), (3, 30)]);
        for user in 0..2_000 {
            let user = user.to_string();
            match before.assign(&user) {
                1 => assert_eq!(left.assign(&user), 0),
                2 => assert_eq!(left.assign(&user), 2),
                _ => {}
            }
        }
    }
}
