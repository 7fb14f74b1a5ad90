//! What the store keeps per prompt: one record with its versions, labels and audit trail.
//!
//! Keeping all of a prompt in one record makes every change one atomic compare-and-swap: a
//! version and the audit event that says who created it are written together or not at all, and
//! two admins changing the same prompt at once cannot lose either change (the loser re-reads and
//! re-applies). Prompt records are small (a template is a few KiB), so this stays cheap.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::labels::LabelTarget;
use super::spec::VersionSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub id: String,
    /// Goes up by one with every change; an admin can make a change conditional on it.
    pub revision: u64,
    pub versions: BTreeMap<u32, StoredVersion>,
    pub labels: BTreeMap<String, LabelTarget>,
    /// The hash of the `labels.toml` last applied, so an unchanged file does not undo label moves
    /// made through the admin API since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_file: Option<String>,
    pub history: Vec<AuditEvent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredVersion {
    pub hash: String,
    pub spec: VersionSpec,
    pub created_at: String,
    pub created_by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    CreateVersion,
    MoveLabel,
    StartRollout,
    AdjustRollout,
    StopRollout,
    DeleteLabel,
    Rollback,
    /// An experiment took an arm out: it breached a guardrail, or lost on the primary metric.
    ExperimentRollback,
    /// An experiment's winning arm became the label's version.
    ExperimentPromote,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub revision: u64,
    pub at: String,
    pub actor: String,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<LabelTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<LabelTarget>,
    /// Where the change came from (`prompts/support-reply/v2.toml`, `admin api`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The experiment a decision belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// What a decision was based on: the test, its statistic and threshold, each arm's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl PromptRecord {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            revision: 0,
            versions: BTreeMap::new(),
            labels: BTreeMap::new(),
            labels_file: None,
            history: Vec::new(),
        }
    }

    /// Appends an event for the change being made (it lands with the next revision).
    pub fn audit(&mut self, actor: &str, source: &str, action: Action) -> &mut AuditEvent {
        self.history.push(AuditEvent {
            revision: self.revision + 1,
            at: now_rfc3339(),
            actor: actor.to_owned(),
            action,
            version: None,
            label: None,
            before: None,
            after: None,
            source: Some(source.to_owned()),
            experiment: None,
            evidence: None,
        });
        let last = self.history.len() - 1;
        &mut self.history[last]
    }

    /// Points `label` at `target`, recording it as a move, or as starting, adjusting or stopping
    /// a rollout; `None` if the label already points there.
    pub fn set_label(
        &mut self,
        label: &str,
        target: LabelTarget,
        actor: &str,
        source: &str,
        action: Option<Action>,
    ) -> Option<Action> {
        let before = self.labels.get(label).cloned();
        let target = self.with_experiment_id(label, before.as_ref(), target);
        if before.as_ref() == Some(&target) {
            return None;
        }
        let action = action.unwrap_or(match (&before, &target) {
            (Some(LabelTarget::Rollout(_)), LabelTarget::Rollout(_)) => Action::AdjustRollout,
            (_, LabelTarget::Rollout(_)) => Action::StartRollout,
            (Some(LabelTarget::Rollout(_)), LabelTarget::Version(_)) => Action::StopRollout,
            _ => Action::MoveLabel,
        });
        let event = self.audit(actor, source, action);
        event.label = Some(label.to_owned());
        event.before = before;
        event.after = Some(target.clone());
        self.labels.insert(label.to_owned(), target);
        Some(action)
    }

    /// Gives a new experiment its id and start; one whose design, salt and versions are those
    /// of the label's current experiment (a change of weights) keeps them.
    fn with_experiment_id(
        &self,
        label: &str,
        before: Option<&LabelTarget>,
        mut target: LabelTarget,
    ) -> LabelTarget {
        let LabelTarget::Rollout(rollout) = &mut target else {
            return target;
        };
        let versions = |r: &super::labels::Rollout| {
            let mut versions: Vec<u32> = r.arms.iter().map(|a| a.version).collect();
            versions.sort_unstable();
            versions
        };
        let running = match before {
            Some(LabelTarget::Rollout(previous))
                if previous.salt == rollout.salt && versions(previous) == versions(rollout) =>
            {
                previous.experiment.as_ref()
            }
            _ => None,
        };
        if let Some(experiment) = &mut rollout.experiment
            && experiment.id.is_empty()
        {
            match running.filter(|r| r.same_design(experiment)) {
                Some(running) => {
                    experiment.id.clone_from(&running.id);
                    experiment.started_at.clone_from(&running.started_at);
                }
                None => {
                    experiment.id = format!("{label}-r{}", self.revision + 1);
                    experiment.started_at = now_rfc3339();
                }
            }
        }
        target
    }

    /// The arms an experiment has decided on (rolled back, or promoted), from the audit trail:
    /// a decision undone by a rollback is not made again.
    pub fn decided_arms(&self, experiment: &str) -> Vec<u32> {
        self.history
            .iter()
            .filter(|e| e.experiment.as_deref() == Some(experiment))
            .filter_map(|e| e.version)
            .collect()
    }

    /// What `label` pointed to before its current target: the `before` of the latest event that
    /// set it to what it is now.
    pub fn previous_target(&self, label: &str) -> Option<LabelTarget> {
        let current = self.labels.get(label)?;
        self.history
            .iter()
            .rev()
            .find(|e| e.label.as_deref() == Some(label) && e.after.as_ref() == Some(current))
            .and_then(|e| e.before.clone())
    }

    pub fn latest_version(&self) -> Option<u32> {
        self.versions.keys().next_back().copied()
    }
}
