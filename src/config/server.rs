//! `[server]` and `[log]`: how the gateway listens and logs.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
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
    /// Upper bound on requests served at once; beyond it new requests wait for a free slot. A
    /// request takes its slot once its body is read, so a slow client holds none.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// The most slots one tenant may hold, so others always find one free. Unset: all but a
    /// tenth of `max_in_flight`. Freed slots go first to the waiting tenant holding fewest.
    #[serde(default)]
    pub max_in_flight_per_tenant: Option<usize>,
    /// Open connections at most; beyond it the gateway stops accepting until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection must send a whole request head within this of opening, or of its previous
    /// answer (so it also bounds how long an idle keep-alive connection stays open).
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A request body must arrive whole within this of its head; else 408 and the connection closes.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Threads serving requests, each a single-threaded runtime with its own listening socket
    /// (`SO_REUSEPORT`) and upstream connections, so that a request never leaves the thread that
    /// accepted it. Unset: one per core.
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
            max_in_flight_per_tenant: None,
            max_connections: default_max_connections(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
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
fn default_max_connections() -> usize {
    10_000
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}

impl ServerConfig {
    /// `max_in_flight_per_tenant`, or its default.
    pub fn tenant_in_flight(&self) -> usize {
        self.max_in_flight_per_tenant
            .unwrap_or_else(|| self.max_in_flight - (self.max_in_flight / 10).max(1))
            .max(1)
    }
}

/// `[metrics]`: who may read `/metrics`, where, and whether tenants appear in it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `/metrics` then needs `Authorization: Bearer <token>` (the admin key is accepted too).
    #[serde(default)]
    pub token: Option<SecretString>,
    /// Serve `/metrics` and `/healthz` on this address (say, a port only the scraper reaches)
    /// instead of the API listener.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Label per-tenant series with the tenant's name; off, they read `tenant="all"`.
    #[serde(default = "default_tenant_labels")]
    pub tenant_labels: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            token: None,
            listen: None,
            tenant_labels: default_tenant_labels(),
        }
    }
}

fn default_tenant_labels() -> bool {
    true
}

impl MetricsConfig {
    pub(super) fn validate(&self, server: &ServerConfig) -> Result<(), FieldError> {
        if self
            .token
            .as_ref()
            .is_some_and(|token| token.expose_secret().is_empty())
        {
            return Err(FieldError::new(
                "metrics.token",
                "must not be empty when set",
            ));
        }
        if self
            .listen
            .is_some_and(|listen| listen == server.listen && listen.port() != 0)
        {
            return Err(FieldError::new(
                "metrics.listen",
                "must differ from server.listen (leave it out to serve /metrics there)",
            ));
        }
        Ok(())
    }
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
        if let Some(per_tenant) = self.max_in_flight_per_tenant
            && (per_tenant == 0 || per_tenant > self.max_in_flight)
        {
            return Err(FieldError::new(
                "server.max_in_flight_per_tenant",
                "must be between 1 and server.max_in_flight",
            ));
        }
        if self.max_connections == 0 {
            return Err(FieldError::new("server.max_connections", "must be above 0"));
        }
        for (field, value) in [
            ("server.header_timeout", self.header_timeout),
            ("server.body_timeout", self.body_timeout),
        ] {
            if value.is_zero() {
                return Err(FieldError::new(field, "must be above 0"));
            }
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

/// `[request_log]`: one record per API request, kept on this replica (`GET /admin/requests`);
/// off without this section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLogConfig {
    #[serde(default = "default_request_log_path")]
    pub path: std::path::PathBuf,
    /// Records older than this are removed.
    #[serde(default = "default_request_log_max_age", with = "humantime_serde")]
    pub max_age: std::time::Duration,
    /// Past this size on disk, the oldest records are removed.
    #[serde(default = "default_request_log_max_bytes")]
    pub max_bytes: u64,
    /// Records waiting to be written; past it a record is dropped (and counted), never waited
    /// for.
    #[serde(default = "default_request_log_queue")]
    pub queue: usize,
    /// Request and answer text in the record: off unless this names the route.
    #[serde(default)]
    pub payloads: PayloadConfig,
}

/// `[request_log.payloads]`: which routes' records keep the request and answer text, how much
/// of it, and what is blanked out before anything is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    #[serde(default)]
    pub routes: Vec<String>,
    /// Each of the request and the answer is cut to this many bytes (of its JSON).
    #[serde(default = "default_payload_max_bytes")]
    pub max_bytes: usize,
    /// JSON fields (by name, at any depth) whose value is replaced by `"[redacted]"`.
    #[serde(default)]
    pub redact_fields: Vec<String>,
    /// Regular expressions; every match in any text is replaced by `[redacted]`.
    #[serde(default)]
    pub redact_patterns: Vec<String>,
}

impl Default for PayloadConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            max_bytes: default_payload_max_bytes(),
            redact_fields: Vec::new(),
            redact_patterns: Vec::new(),
        }
    }
}

fn default_payload_max_bytes() -> usize {
    16 * 1024
}

/// `[otlp]`: spans sent to an OpenTelemetry collector over OTLP/HTTP (protobuf); off without
/// this section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's base URL (`/v1/traces` is added unless the path already ends with it).
    pub endpoint: url::Url,
    /// Extra headers, for collectors that want a token (`${ENV}` works).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, SecretString>,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// The share of new traces exported; a client's `traceparent` decides for its own.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Requests waiting to be exported; past it their spans are dropped (and counted).
    #[serde(default = "default_request_log_queue")]
    pub queue: usize,
    #[serde(default = "default_otlp_timeout", with = "humantime_serde")]
    pub timeout: std::time::Duration,
}

fn default_service_name() -> String {
    "reprise".into()
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_otlp_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

impl OtlpConfig {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        if !matches!(self.endpoint.scheme(), "http" | "https") {
            return Err(FieldError::new("otlp.endpoint", "must be an http(s) URL"));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(FieldError::new("otlp.sample_ratio", "must be within 0..=1"));
        }
        if self.queue == 0 {
            return Err(FieldError::new("otlp.queue", "must be at least 1"));
        }
        for (name, value) in &self.headers {
            let valid = axum::http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && axum::http::HeaderValue::from_str(value.expose_secret()).is_ok();
            if !valid {
                return Err(FieldError::new(
                    format!("otlp.headers.{name}"),
                    "is not a valid HTTP header",
                ));
            }
        }
        Ok(())
    }

    /// Where spans are posted.
    pub fn traces_url(&self) -> url::Url {
        let mut url = self.endpoint.clone();
        if !url.path().ends_with("/v1/traces") {
            let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        url
    }
}

fn default_request_log_path() -> std::path::PathBuf {
    "data/requests".into()
}
fn default_request_log_max_age() -> std::time::Duration {
    std::time::Duration::from_secs(7 * 86_400)
}
fn default_request_log_max_bytes() -> u64 {
    1 << 30
}
fn default_request_log_queue() -> usize {
    10_000
}

impl RequestLogConfig {
    pub(super) fn validate<'a>(
        &self,
        routes: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), FieldError> {
        for route in &self.payloads.routes {
            if !routes.clone().any(|name| name == route) {
                return Err(FieldError::new(
                    "request_log.payloads.routes",
                    format!("no route is named {route}"),
                ));
            }
        }
        if self.payloads.max_bytes < 256 {
            return Err(FieldError::new(
                "request_log.payloads.max_bytes",
                "must be at least 256",
            ));
        }
        for (i, pattern) in self.payloads.redact_patterns.iter().enumerate() {
            if let Err(e) = regex::Regex::new(pattern) {
                return Err(FieldError::new(
                    format!("request_log.payloads.redact_patterns[{i}]"),
                    format!("not a regular expression: {e}"),
                ));
            }
        }
        if self.queue == 0 {
            return Err(FieldError::new("request_log.queue", "must be at least 1"));
        }
        if self.max_bytes < 1 << 20 {
            return Err(FieldError::new(
                "request_log.max_bytes",
                "must be at least 1 MiB",
            ));
        }
        Ok(())
    }
}
