//! What `reprise prompts`, `keys`, `usage` and `logs` share: a client of a running gateway's admin API,
//! and how a command's outcome becomes the process's exit code.

use std::future::Future;
use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

/// The development admin key of the shipped config, used when `REPRISE_ADMIN_KEY` is unset.
const DEV_ADMIN_KEY: &str = "reprise-dev-admin";

/// Which gateway an admin command talks to, and with what key.
#[derive(clap::Args)]
pub struct GatewayArgs {
    /// The gateway's address.
    #[arg(long, env = "REPRISE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The gateway's admin key (`make run` and the shipped config use `reprise-dev-admin` when
    /// `REPRISE_ADMIN_KEY` is unset, and so does the CLI).
    #[arg(
        long,
        env = "REPRISE_ADMIN_KEY",
        hide_env_values = true,
        default_value = DEV_ADMIN_KEY
    )]
    admin_key: Option<String>,
}

/// Runs one command on a single-threaded runtime: 0 on success, 1 if the gateway refused or
/// could not be reached, 2 for a usage error.
pub fn run(command: impl Future<Output = Result<(), CliError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Api(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
        Err(CliError::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

pub enum CliError {
    /// The gateway answered with an error, or could not be reached.
    Api(String),
    /// The command line or a local file is wrong.
    Usage(String),
}

pub struct AdminClient {
    http: reqwest::Client,
    url: String,
    admin_key: Option<String>,
    actor: String,
}

impl AdminClient {
    pub fn new(gateway: &GatewayArgs, actor: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: gateway.url.trim_end_matches('/').to_owned(),
            admin_key: gateway.admin_key.clone(),
            actor: actor.to_owned(),
        }
    }

    /// `GET path` for a response read as it arrives (server-sent events).
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{path}", self.url);
        let mut request = self.http.get(&url).header("x-reprise-actor", &self.actor);
        if let Some(key) = &self.admin_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| CliError::Api(format!("cannot reach the gateway at {url}: {e}")))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        Err(CliError::Api(format!("{status}: {message}")))
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.url);
        let mut request = self
            .http
            .request(method, &url)
            .header("x-reprise-actor", &self.actor);
        if let Some(key) = &self.admin_key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| CliError::Api(format!("cannot reach the gateway at {url}: {e}")))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| CliError::Api(format!("{status}: unreadable answer: {e}")))?;
        if status.is_success() {
            Ok(body)
        } else {
            let message = body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            let hint = if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                " (the CLI sends REPRISE_ADMIN_KEY, or --admin-key: is it the gateway's [auth] admin_key?)"
            } else {
                ""
            };
            Err(CliError::Api(format!("{status}: {message}{hint}")))
        }
    }
}

pub fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// `text` made safe as one path segment or query value.
pub fn segment(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
