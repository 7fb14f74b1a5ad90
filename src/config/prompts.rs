//! `[prompts]`: the versioned prompt store; off without this section.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

/// The prompt store (`[prompts]`). Prompts live in the same store as the cache (`[cache]`'s
/// `store`, `path`, `redis_url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptsConfig {
    /// The folder of prompt files imported at startup (one folder per prompt id).
    #[serde(default = "default_prompts_dir")]
    pub dir: PathBuf,
    /// With Redis: how often to look for prompt changes made through another replica.
    #[serde(default = "default_prompt_sync", with = "humantime_serde")]
    pub sync_interval: Duration,
}

fn default_prompts_dir() -> PathBuf {
    "prompts".into()
}
fn default_prompt_sync() -> Duration {
    Duration::from_millis(250)
}

impl PromptsConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        if self.sync_interval.is_zero() {
            return Err(FieldError::new("prompts.sync_interval", "must be above 0"));
        }
        Ok(())
    }
}
