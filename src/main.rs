//! `reprise serve` runs the gateway; `reprise check-config` validates a config file and prints the
//! resolved routes with secrets masked; `reprise prompts ...` manages the prompt store.

mod admin_client;
mod keys_cli;
mod logs_cli;
mod prompts_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use reprise::config::{Config, ProviderKind, Strategy};
use secrecy::ExposeSecret;

#[derive(Parser)]
#[command(
    name = "reprise",
    version,
    about = "Self-hosted, OpenAI-compatible LLM API gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (TOML).
        #[arg(
            long,
            short,
            env = "REPRISE_CONFIG",
            default_value = "config/reprise.toml"
        )]
        config: PathBuf,
    },
    /// Validate a config file and print the resolved routes (secrets masked).
    CheckConfig {
        /// Config file (TOML).
        #[arg(env = "REPRISE_CONFIG")]
        config: PathBuf,
    },
    /// Manage versioned prompts through a running gateway's admin API.
    Prompts(prompts_cli::PromptsArgs),
    /// Manage gateway keys (`[keys]`) through a running gateway's admin API.
    Keys(keys_cli::KeysArgs),
    /// Requests, tokens, cost, cache hits and money saved by day, tenant, key, route and model.
    Usage(keys_cli::UsageArgs),
    /// The request log: recent requests, filtered; `--follow` for a live tail.
    Logs(logs_cli::LogsArgs),
}

/// glibc raises its mmap threshold to the largest block freed so far, so after one burst of
/// multi-megabyte requests every later large buffer comes from heap it never hands back (the
/// gateway stayed 30% larger after twelve 4 MB prompts; with the threshold fixed, 6%; see
/// docs/reliability.md). glibc reads a fixed threshold only from its environment at start (in
/// process it takes `mallopt`, which is unsafe), so `serve` re-executes itself once with it set.
fn with_fixed_mmap_threshold() {
    #[cfg(all(unix, target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        const THRESHOLD: &str = "MALLOC_MMAP_THRESHOLD_";
        if std::env::var_os(THRESHOLD).is_some() {
            return;
        }
        let Ok(executable) = std::env::current_exe() else {
            return;
        };
        // glibc's default starting threshold, kept fixed.
        let error = std::process::Command::new(executable)
            .args(std::env::args_os().skip(1))
            .env(THRESHOLD, "131072")
            .exec();
        eprintln!("warning: running without a fixed {THRESHOLD} ({error})");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            with_fixed_mmap_threshold();
            serve(config)
        }
        Command::Prompts(args) => prompts_cli::run(args),
        Command::Keys(args) => keys_cli::run(args),
        Command::Usage(args) => keys_cli::run_usage(args),
        Command::Logs(args) => logs_cli::run(args),
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(config) => {
                print!("{}", describe(&config));
                for warning in config.warnings() {
                    println!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(2)
            }
        },
    }
}

fn serve(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    reprise::telemetry::init_logging(&config.log);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // Requests are served by threads of their own (`reprise::runtime`); this runtime starts the
    // gateway and runs its background work, which one thread keeps up with.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let server = reprise::server::start(&config).await?;
        tracing::info!(addr = %server.addr, config = %path.display(), "reprise listening");
        let shutdown = server.shutdown_handle();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: draining in-flight requests");
            shutdown.trigger();
        });
        let drained = server.wait().await?;
        if !drained {
            tracing::warn!("grace period over: in-flight requests were cut off");
        }
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "gateway failed");
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn mask(secret: Option<&secrecy::SecretString>) -> String {
    match secret.map(|s| s.expose_secret()) {
        None | Some("") => "(none)".to_owned(),
        Some(s) if s.len() > 12 => format!("set, {} chars, ends …{}", s.len(), &s[s.len() - 2..]),
        Some(s) => format!("set, {} chars", s.len()),
    }
}

fn describe(config: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "config OK");
    let _ = writeln!(out, "listen: {}", config.server.listen);
    let _ = writeln!(out, "admin key: {}", mask(config.auth.admin_key.as_ref()));
    let tenants: Vec<&str> = config.auth.keys.iter().map(|k| k.tenant.as_str()).collect();
    let _ = writeln!(
        out,
        "gateway keys: {} (tenants: {})",
        tenants.len(),
        tenants.join(", ")
    );
    let _ = writeln!(out, "providers:");
    for (name, provider) in &config.providers {
        let kind = match provider.kind {
            ProviderKind::OpenAi => "openai-compatible",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Echo => "echo (built-in demo)",
        };
        match &provider.base_url {
            Some(url) => {
                let _ = writeln!(
                    out,
                    "  {name}: {kind} at {url} (api key: {})",
                    mask(provider.api_key.as_ref())
                );
            }
            None => {
                let _ = writeln!(out, "  {name}: {kind}");
            }
        }
    }
    let _ = writeln!(out, "routes:");
    for (name, route) in &config.routes {
        let strategy = match route.strategy {
            Strategy::Ordered => "ordered",
            Strategy::Weighted => "weighted",
        };
        let targets: Vec<String> = route
            .targets
            .iter()
            .map(|t| match route.strategy {
                Strategy::Weighted => format!("{}/{} (weight {})", t.provider, t.model, t.weight),
                Strategy::Ordered => format!("{}/{}", t.provider, t.model),
            })
            .collect();
        let _ = writeln!(out, "  {name} [{strategy}]: {}", targets.join(" -> "));
        let t = &route.timeouts;
        let _ = writeln!(
            out,
            "    attempts/target {}, timeouts: attempt {:?}, first token {:?}, idle {:?}, total {:?}{}",
            route.retry.attempts_per_target,
            t.attempt,
            t.first_token,
            t.stream_idle,
            t.total,
            route
                .hedge_after
                .map(|h| format!(", hedge after {h:?}"))
                .unwrap_or_default()
        );
    }
    out
}
