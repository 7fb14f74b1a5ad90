//! `[server]` and `[log]`: how the gateway listens and logs.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Requests with a larger body are refused with 413 before they are parsed.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after SIGTERM before the process exits anyway.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Upper bound on requests served at once; beyond it new requests wait for a free slot.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Threads serving requests. Unset: one per core (tokio's multi-threaded scheduler). 1: a
    /// single-threaded runtime without cross-thread wake-ups: less CPU per request, and on a
    /// machine with few cores no loss of throughput (see the README's benchmark section).
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body_bytes(),
            shutdown_grace: default_shutdown_grace(),
            max_in_flight: default_max_in_flight(),
            worker_threads: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_max_in_flight() -> usize {
    10_000
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `reprise=debug,tower_http=info`; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".to_owned()
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        if self.max_body_bytes == 0 {
            return Err(FieldError::new("server.max_body_bytes", "must be above 0"));
        }
        if self.worker_threads == Some(0) {
            return Err(FieldError::new(
                "server.worker_threads",
                "must be at least 1 (leave it out for one per core)",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(FieldError::new("server.max_in_flight", "must be above 0"));
        }
        Ok(())
    }
}

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(drop)
            .map_err(|e| FieldError::new("log.level", e.to_string()))
    }
}
