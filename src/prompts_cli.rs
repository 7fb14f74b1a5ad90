//! `reprise prompts ...`: the prompt store's admin API from a shell. It talks to a running
//! gateway (the store belongs to it: a sled store has one owner), except `check`, which reads a
//! `prompts/` folder offline, as a CI step before a merge.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::admin_client::{self, AdminClient, CliError, GatewayArgs, print, segment};

#[derive(clap::Args)]
pub struct PromptsArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Who makes the change, for the audit trail.
    #[arg(long, env = "USER", default_value = "cli")]
    actor: String,
    #[command(subcommand)]
    command: PromptsCommand,
}

#[derive(Subcommand)]
enum PromptsCommand {
    /// Every prompt with its labels.
    List,
    /// A prompt's versions and labels, or one version.
    Show {
        id: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// A unified diff of two versions.
    Diff { id: String, from: u32, to: u32 },
    /// Creates a version from a version file (`v<N>.toml` format).
    Create {
        id: String,
        /// The version file.
        file: PathBuf,
        /// The version number (default: the next one).
        #[arg(long)]
        version: Option<u32>,
    },
    /// Points a label at one version (this also stops a rollout on that label).
    Label {
        id: String,
        label: String,
        version: u32,
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// Starts or adjusts a rollout: `reprise prompts rollout support-reply production 1=90 2=10`.
    Rollout {
        id: String,
        label: String,
        /// `version=weight` pairs; the weights sum to 100.
        #[arg(required = true)]
        arms: Vec<String>,
        /// Reshuffles who gets which arm (default: kept, or `id/label` for a new rollout).
        #[arg(long)]
        salt: Option<String>,
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// Points a label back at what it pointed to before its last change.
    Rollback { id: String, label: String },
    /// Removes a label.
    Unlabel { id: String, label: String },
    /// A prompt's audit trail.
    History { id: String },
    /// The newest audit events of all prompts.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Requests, cache hit ratio, latency, tokens, cost and errors per version.
    Stats,
    /// Writes a prompt's versions and labels as files into `dir/<id>/`.
    Export {
        id: String,
        #[arg(long, default_value = "prompts")]
        dir: PathBuf,
    },
    /// Checks a prompts folder offline (syntax, templates, variables, labels).
    Check {
        #[arg(default_value = "prompts")]
        dir: PathBuf,
    },
}

pub fn run(args: PromptsArgs) -> ExitCode {
    if let PromptsCommand::Check { dir } = &args.command {
        return check(dir);
    }
    admin_client::run(execute(&args))
}

fn check(dir: &std::path::Path) -> ExitCode {
    match reprise::prompts::files::read_dir(dir) {
        Ok(prompts) => {
            for prompt in &prompts {
                let versions: Vec<String> = prompt
                    .versions
                    .iter()
                    .map(|v| format!("v{}", v.number))
                    .collect();
                let labels: Vec<&str> = prompt
                    .labels
                    .iter()
                    .flat_map(|l| l.labels.keys().map(String::as_str))
                    .collect();
                println!(
                    "{}: {} (labels: {})",
                    prompt.id,
                    versions.join(", "),
                    if labels.is_empty() {
                        "none".into()
                    } else {
                        labels.join(", ")
                    }
                );
            }
            println!("{} prompt(s) OK", prompts.len());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

async fn execute(args: &PromptsArgs) -> Result<(), CliError> {
    let client = AdminClient::new(&args.gateway, &args.actor);
    let prompt = |id: &str| format!("/admin/prompts/{}", segment(id));
    match &args.command {
        PromptsCommand::List => {
            let list = client.call(Method::GET, "/admin/prompts", None).await?;
            for prompt in list["data"].as_array().into_iter().flatten() {
                let labels: Vec<String> = prompt["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, target)| format!("{name}={}", describe_target(target)))
                    .collect();
                println!(
                    "{}\trevision {}\t{} version(s)\t{}",
                    prompt["id"].as_str().unwrap_or_default(),
                    prompt["revision"],
                    prompt["versions"],
                    labels.join(" ")
                );
            }
        }
        PromptsCommand::Show { id, version } => {
            let path = match version {
                Some(n) => format!("{}/versions/{n}", prompt(id)),
                None => prompt(id),
            };
            print(&client.call(Method::GET, &path, None).await?);
        }
        PromptsCommand::Diff { id, from, to } => {
            let path = format!("{}/diff?from={from}&to={to}", prompt(id));
            let diff = client.call(Method::GET, &path, None).await?;
            print!("{}", diff["diff"].as_str().unwrap_or_default());
        }
        PromptsCommand::Create { id, file, version } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
            let spec: reprise::prompts::spec::VersionSpec = toml::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
            let mut body =
                serde_json::to_value(spec).map_err(|e| CliError::Usage(e.to_string()))?;
            if let (Some(n), Some(object)) = (version, body.as_object_mut()) {
                object.insert("version".into(), json!(n));
            }
            let created = client
                .call(
                    Method::POST,
                    &format!("{}/versions", prompt(id)),
                    Some(body),
                )
                .await?;
            println!(
                "{} version {} ({}), revision {}",
                if created["changed"] == json!(true) {
                    "created"
                } else {
                    "unchanged: already"
                },
                created["version"],
                created["hash"]
                    .as_str()
                    .unwrap_or_default()
                    .get(..12)
                    .unwrap_or_default(),
                created["revision"]
            );
        }
        PromptsCommand::Label {
            id,
            label,
            version,
            if_revision,
        } => {
            let body = json!({"version": version, "if_revision": if_revision});
            let path = format!("{}/labels/{}", prompt(id), segment(label));
            report_label(&client.call(Method::PUT, &path, Some(body)).await?);
        }
        PromptsCommand::Rollout {
            id,
            label,
            arms,
            salt,
            if_revision,
        } => {
            let mut rollout = Vec::new();
            for arm in arms {
                let parsed = arm.split_once('=').and_then(|(v, w)| {
                    Some((
                        v.trim_start_matches('v').parse::<u32>().ok()?,
                        w.parse::<u32>().ok()?,
                    ))
                });
                let Some((version, weight)) = parsed else {
                    return Err(CliError::Usage(format!(
                        "{arm:?}: an arm is `version=weight`, e.g. 2=10"
                    )));
                };
                rollout.push(json!({"version": version, "weight": weight}));
            }
            let path = format!("{}/labels/{}", prompt(id), segment(label));
            let salt = match salt {
                Some(salt) => Some(salt.clone()),
                None => {
                    // Keep the current salt, so adjusting weights keeps users where they are.
                    let current = client.call(Method::GET, &prompt(id), None).await?;
                    current["labels"][label]["salt"].as_str().map(str::to_owned)
                }
            };
            let body = json!({"rollout": rollout, "salt": salt, "if_revision": if_revision});
            report_label(&client.call(Method::PUT, &path, Some(body)).await?);
        }
        PromptsCommand::Rollback { id, label } => {
            let path = format!("{}/labels/{}/rollback", prompt(id), segment(label));
            report_label(&client.call(Method::POST, &path, None).await?);
        }
        PromptsCommand::Unlabel { id, label } => {
            let path = format!("{}/labels/{}", prompt(id), segment(label));
            report_label(&client.call(Method::DELETE, &path, None).await?);
        }
        PromptsCommand::History { id } => {
            let history = client
                .call(Method::GET, &format!("{}/history", prompt(id)), None)
                .await?;
            for event in history["data"].as_array().into_iter().flatten() {
                println!("{}", describe_event(event));
            }
        }
        PromptsCommand::Audit { limit } => {
            let audit = client
                .call(
                    Method::GET,
                    &format!("/admin/prompts/audit?limit={limit}"),
                    None,
                )
                .await?;
            for event in audit["data"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}",
                    event["prompt"].as_str().unwrap_or_default(),
                    describe_event(event)
                );
            }
        }
        PromptsCommand::Stats => {
            print(
                &client
                    .call(Method::GET, "/admin/prompts/stats", None)
                    .await?,
            );
        }
        PromptsCommand::Export { id, dir } => {
            let exported = client
                .call(Method::GET, &format!("{}/export", prompt(id)), None)
                .await?;
            let folder = dir.join(id);
            std::fs::create_dir_all(&folder)
                .map_err(|e| CliError::Usage(format!("{}: {e}", folder.display())))?;
            for (name, text) in exported["files"].as_object().into_iter().flatten() {
                let path = folder.join(name);
                std::fs::write(&path, text.as_str().unwrap_or_default())
                    .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
                println!("wrote {}", path.display());
            }
        }
        PromptsCommand::Check { .. } => {}
    }
    Ok(())
}

fn describe_target(target: &Value) -> String {
    if let Some(version) = target.get("version") {
        return format!("v{version}");
    }
    let arms: Vec<String> = target["rollout"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|arm| format!("v{}:{}%", arm["version"], arm["weight"]))
        .collect();
    format!("rollout[{}]", arms.join(","))
}

fn describe_event(event: &Value) -> String {
    let mut line = format!(
        "r{}\t{}\t{}\t{}",
        event["revision"],
        event["at"].as_str().unwrap_or_default(),
        event["actor"].as_str().unwrap_or_default(),
        event["action"].as_str().unwrap_or_default()
    );
    if let Some(version) = event.get("version") {
        line.push_str(&format!(" v{version}"));
    }
    if let Some(label) = event["label"].as_str() {
        line.push_str(&format!(" {label}:"));
        let before = event.get("before").map_or("-".into(), describe_target);
        let after = event.get("after").map_or("-".into(), describe_target);
        line.push_str(&format!(" {before} -> {after}"));
    }
    if let Some(source) = event["source"].as_str() {
        line.push_str(&format!("\t({source})"));
    }
    line
}

fn report_label(change: &Value) {
    let target = change
        .get("target")
        .filter(|t| !t.is_null())
        .map_or("(removed)".into(), describe_target);
    println!(
        "{} {} -> {}, revision {}",
        change["action"].as_str().unwrap_or("unchanged:"),
        change["label"].as_str().unwrap_or_default(),
        target,
        change["revision"]
    );
}
