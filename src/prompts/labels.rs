//! Labels (`production`, `staging`, any name) and what they point to: one version, or a rollout
//! of weighted versions with sticky assignment.
//!
//! Assignment hashes the end user with the rollout's salt into one of 10,000 buckets, and the arms
//! own consecutive bucket ranges in the order they are listed. So a user keeps their arm across
//! requests, restarts and replicas; and moving weight from the first arm to the second (90/10 →
//! 80/20) moves only the users in the ceded range, never back and forth.

use serde::{Deserialize, Serialize};

use super::experiment::ExperimentSpec;

const BUCKETS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub version: u32,
    /// Percent of users; the weights of a rollout sum to 100.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub arms: Vec<Arm>,
    /// Mixed into the user's hash: a new salt reshuffles who lands where, keeping the shares.
    pub salt: String,
    /// Tests the arms against the first (the control) and acts on the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<Box<ExperimentSpec>>,
}

/// What a label points to. Written as `{version = 3}` or
/// `{rollout = [{version = 3, weight = 90}, {version = 4, weight = 10}], salt = "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TargetForm", into = "TargetForm")]
pub enum LabelTarget {
    Version(u32),
    Rollout(Rollout),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetForm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rollout: Option<Vec<Arm>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    salt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    experiment: Option<Box<ExperimentSpec>>,
}

impl TryFrom<TargetForm> for LabelTarget {
    type Error = String;

    fn try_from(form: TargetForm) -> Result<Self, String> {
        match (form.version, form.rollout) {
            (Some(version), None) if form.salt.is_none() && form.experiment.is_none() => {
                Ok(LabelTarget::Version(version))
            }
            (Some(_), None) => {
                Err("`salt` and `experiment` belong to a rollout, not to a single version".into())
            }
            (None, Some(arms)) => Ok(LabelTarget::Rollout(Rollout {
                arms,
                salt: form.salt.unwrap_or_default(),
                experiment: form.experiment,
            })),
            (Some(_), Some(_)) => {
                Err("a label points to `version` or to `rollout`, not both".into())
            }
            (None, None) => Err("a label needs `version` or `rollout`".into()),
        }
    }
}

impl From<LabelTarget> for TargetForm {
    fn from(target: LabelTarget) -> Self {
        match target {
            LabelTarget::Version(version) => TargetForm {
                version: Some(version),
                rollout: None,
                salt: None,
                experiment: None,
            },
            LabelTarget::Rollout(rollout) => TargetForm {
                version: None,
                rollout: Some(rollout.arms),
                salt: Some(rollout.salt),
                experiment: rollout.experiment,
            },
        }
    }
}

impl LabelTarget {
    pub fn versions(&self) -> Vec<u32> {
        match self {
            LabelTarget::Version(version) => vec![*version],
            LabelTarget::Rollout(rollout) => rollout.arms.iter().map(|a| a.version).collect(),
        }
    }

    /// Checks the shape (weights, duplicates) and that every version exists; fills in a missing
    /// salt so assignment never depends on an empty one.
    pub fn validated(
        mut self,
        prompt: &str,
        label: &str,
        exists: impl Fn(u32) -> bool,
    ) -> Result<Self, String> {
        if let LabelTarget::Rollout(rollout) = &mut self {
            if rollout.arms.is_empty() {
                return Err("a rollout needs at least one arm".into());
            }
            let total: u32 = rollout.arms.iter().map(|a| a.weight).sum();
            if total != 100 {
                return Err(format!(
                    "the weights of a rollout must sum to 100, not {total}"
                ));
            }
            let mut seen = Vec::new();
            for arm in &rollout.arms {
                if seen.contains(&arm.version) {
                    return Err(format!(
                        "version {} appears twice in the rollout",
                        arm.version
                    ));
                }
                seen.push(arm.version);
            }
            if rollout.salt.is_empty() {
                rollout.salt = format!("{prompt}/{label}");
            }
            if rollout.experiment.is_some() && rollout.arms.len() < 2 {
                return Err("an experiment compares arms: the rollout needs at least two".into());
            }
        }
        for version in self.versions() {
            if !exists(version) {
                return Err(format!("version {version} of {prompt:?} does not exist"));
            }
        }
        Ok(self)
    }
}

impl Rollout {
    /// The arm (index into `arms`) of `user`.
    pub fn assign(&self, user: &str) -> usize {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.salt.as_bytes());
        hasher.update(b"\0");
        hasher.update(user.as_bytes());
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        let bucket = u64::from_le_bytes(first) % BUCKETS;
        let mut upper = 0;
        for (index, arm) in self.arms.iter().enumerate() {
            upper += u64::from(arm.weight) * BUCKETS / 100;
            if bucket < upper {
                return index;
            }
        }
        self.arms.len().saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(weights: &[(u32, u32)]) -> Rollout {
        Rollout {
            arms: weights
                .iter()
                .map(|&(version, weight)| Arm { version, weight })
                .collect(),
            salt: "support-reply/production".into(),
            experiment: None,
        }
    }

    #[test]
    fn shares_follow_the_weights_within_three_points_over_ten_thousand_users() {
        for weights in [
            &[(1, 90), (2, 10)][..],
            &[(1, 50), (2, 50)],
            &[(1, 20), (2, 30), (3, 50)],
        ] {
            let rollout = rollout(weights);
            let mut counts = vec![0u32; weights.len()];
            for user in 0..10_000 {
                counts[rollout.assign(&format!("user-{user}"))] += 1;
            }
            for (count, &(_, weight)) in counts.iter().zip(weights) {
                let share = f64::from(*count) / 100.0;
                assert!(
                    (share - f64::from(weight)).abs() <= 3.0,
                    "{weights:?}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn a_user_keeps_their_arm_and_moving_weight_moves_only_the_ceded_users() {
        let before = rollout(&[(1, 90), (2, 10)]);
        let after = rollout(&[(1, 80), (2, 20)]);
        let mut moved = 0;
        for user in 0..10_000 {
            let user = format!("user-{user}");
            let arm = before.assign(&user);
            assert_eq!(arm, before.assign(&user));
            let new_arm = after.assign(&user);
            assert!(
                !(arm == 1 && new_arm == 0),
                "{user} went back from the new arm"
            );
            moved += usize::from(arm != new_arm);
        }
        assert!((700..=1300).contains(&moved), "{moved} users moved");
    }

    #[test]
    fn another_salt_reshuffles_users() {
        let a = rollout(&[(1, 50), (2, 50)]);
        let mut b = a.clone();
        b.salt = "other".into();
        let differ = (0..1000)
            .filter(|u| a.assign(&u.to_string()) != b.assign(&u.to_string()))
            .count();
        assert!(differ > 300, "{differ}");
    }

    #[test]
    fn bad_targets_are_refused_with_a_reason() {
        let exists = |v: u32| v <= 2;
        let cases = [
            (
                LabelTarget::Rollout(rollout(&[(1, 90), (2, 20)])),
                "sum to 100",
            ),
            (LabelTarget::Rollout(rollout(&[(1, 50), (1, 50)])), "twice"),
            (
                LabelTarget::Rollout(rollout(&[(1, 50), (3, 50)])),
                "version 3",
            ),
            (LabelTarget::Version(7), "version 7"),
            (LabelTarget::Rollout(rollout(&[])), "at least one"),
        ];
        for (target, says) in cases {
            let error = target.validated("p", "production", exists).unwrap_err();
            assert!(error.contains(says), "{error}");
        }
        let parsed: Result<LabelTarget, _> =
            toml::from_str::<LabelTarget>("version = 1\nrollout = []");
        assert!(parsed.is_err());
    }

    #[test]
    fn a_missing_salt_is_filled_in_per_prompt_and_label() {
        let mut target = rollout(&[(1, 50), (2, 50)]);
        target.salt.clear();
        let LabelTarget::Rollout(filled) = LabelTarget::Rollout(target)
            .validated("p", "production", |_| true)
            .unwrap()
        else {
            panic!("not a rollout");
        };
        assert_eq!(filled.salt, "p/production");
    }
}
