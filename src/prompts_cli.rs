//! `reprise prompts ...`: the prompt store's admin API from a shell. It talks to a running
//! gateway (the store belongs to it: an embedded store has one owner), except `check`, which reads a
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
    /// Experiments on rollouts: start one, see its evidence, promote its winner.
    #[command(subcommand)]
    Experiment(ExperimentCommand),
}

#[derive(Subcommand)]
enum ExperimentCommand {
    /// Arms, tests, the pending decision, power and past decisions of the experiment on a label.
    Status {
        id: String,
        #[arg(default_value = "production")]
        label: String,
        /// The raw JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Starts a rollout with an experiment: `reprise prompts experiment start support-reply
    /// production 1=50 2=50 --primary resolved --max-error-rate 0.05`. The first arm is the
    /// control.
    Start {
        id: String,
        label: String,
        /// `version=weight` pairs; the weights sum to 100.
        #[arg(required = true)]
        arms: Vec<String>,
        /// The feedback metric a treatment must beat the control on.
        #[arg(long)]
        primary: Option<String>,
        #[arg(long, default_value_t = 0.95)]
        confidence: f64,
        /// The smallest difference worth finding, in the metric's units (boolean: 0.05).
        #[arg(long)]
        min_effect: Option<f64>,
        #[arg(long, default_value_t = 100)]
        min_samples: u64,
        /// Promote a winner as soon as the test says so (default: on command).
        #[arg(long)]
        auto_promote: bool,
        #[arg(long)]
        max_error_rate: Option<f64>,
        #[arg(long)]
        max_p95_latency_ms: Option<u64>,
        /// `metric=bound`: the lowest mean an arm may have (highest, where lower is better).
        #[arg(long = "metric-bound")]
        metric_bounds: Vec<String>,
        #[arg(long)]
        salt: Option<String>,
    },
    /// Promotes the arm that beats the control (refused while none does).
    Promote {
        id: String,
        #[arg(default_value = "production")]
        label: String,
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
            let rollout = parse_arms(arms)?;
            let path = format!("{}/labels/{}", prompt(id), segment(label));
            let current = client.call(Method::GET, &prompt(id), None).await?;
            // Keep the current salt, so adjusting weights keeps users where they are, and the
            // running experiment's design (the gateway keeps its evidence if only weights change).
            let salt = salt
                .clone()
                .or_else(|| current["labels"][label]["salt"].as_str().map(str::to_owned));
            let mut body = json!({"rollout": rollout, "salt": salt, "if_revision": if_revision});
            if let Some(experiment) = current["labels"][label].get("experiment") {
                let mut design = experiment.clone();
                if let Some(fields) = design.as_object_mut() {
                    fields.remove("id");
                    fields.remove("started_at");
                }
                body["experiment"] = design;
            }
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
        PromptsCommand::Experiment(command) => experiment(&client, command).await?,
    }
    Ok(())
}

fn parse_arms(arms: &[String]) -> Result<Vec<Value>, CliError> {
    arms.iter()
        .map(|arm| {
            arm.split_once('=')
                .and_then(|(v, w)| {
                    Some(json!({
                        "version": v.trim_start_matches('v').parse::<u32>().ok()?,
                        "weight": w.parse::<u32>().ok()?,
                    }))
                })
                .ok_or_else(|| {
                    CliError::Usage(format!("{arm:?}: an arm is `version=weight`, e.g. 2=10"))
                })
        })
        .collect()
}

async fn experiment(client: &AdminClient, command: &ExperimentCommand) -> Result<(), CliError> {
    let path = |id: &str, label: &str| {
        format!(
            "/admin/prompts/{}/experiments/{}",
            segment(id),
            segment(label)
        )
    };
    match command {
        ExperimentCommand::Status { id, label, json } => {
            let status = client.call(Method::GET, &path(id, label), None).await?;
            if *json {
                print(&status);
            } else {
                print_experiment(&status);
            }
        }
        ExperimentCommand::Start {
            id,
            label,
            arms,
            primary,
            confidence,
            min_effect,
            min_samples,
            auto_promote,
            max_error_rate,
            max_p95_latency_ms,
            metric_bounds,
            salt,
        } => {
            let mut bounds = serde_json::Map::new();
            for bound in metric_bounds {
                let parsed = bound
                    .split_once('=')
                    .and_then(|(m, v)| Some((m.to_owned(), v.parse::<f64>().ok()?)));
                let Some((metric, value)) = parsed else {
                    return Err(CliError::Usage(format!(
                        "{bound:?}: a metric bound is `metric=value`, e.g. resolved=0.5"
                    )));
                };
                bounds.insert(metric, json!(value));
            }
            let body = json!({
                "rollout": parse_arms(arms)?,
                "salt": salt,
                "experiment": {
                    "primary": primary,
                    "confidence": confidence,
                    "min_effect": min_effect,
                    "min_samples": min_samples,
                    "promote": if *auto_promote { "auto" } else { "manual" },
                    "guardrails": {
                        "max_error_rate": max_error_rate,
                        "max_p95_latency_ms": max_p95_latency_ms,
                        "metric_bounds": bounds,
                    },
                },
            });
            let body = without_nulls(body);
            let label_path = format!("/admin/prompts/{}/labels/{}", segment(id), segment(label));
            report_label(&client.call(Method::PUT, &label_path, Some(body)).await?);
        }
        ExperimentCommand::Promote { id, label } => {
            let done = client
                .call(Method::POST, &format!("{}/promote", path(id, label)), None)
                .await?;
            println!(
                "promoted v{} on {label}: {}",
                done["decision"]["version"],
                done["decision"]["reason"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// The experiment's JSON without the `null`s of options not given (the gateway refuses an
/// explicit `null` for a number).
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

fn number(value: &Value, digits: usize) -> String {
    value
        .as_f64()
        .map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn print_experiment(status: &Value) {
    let spec = &status["experiment"];
    println!(
        "{}/{}: {}{}",
        status["prompt"].as_str().unwrap_or_default(),
        status["label"].as_str().unwrap_or_default(),
        status["state"].as_str().unwrap_or_default(),
        spec["id"].as_str().map_or(String::new(), |id| format!(
            " (experiment {id}, started {})",
            spec["started_at"].as_str().unwrap_or_default()
        ))
    );
    if let Some(last) = status.get("last_decision") {
        println!("last decision: {}", describe_event(last));
        if let Some(reason) = last["evidence"]["reason"].as_str() {
            println!("  {reason}");
        }
        return;
    }
    let primary = spec["primary"].as_str();
    println!(
        "primary {}, confidence {}, promote {}",
        primary.unwrap_or("-"),
        spec["confidence"],
        spec["promote"].as_str().unwrap_or_default()
    );
    println!("version	role	weight	requests	cached	errors	p50 ms	p95 ms	cost usd	feedback");
    for arm in status["arms"].as_array().into_iter().flatten() {
        let feedback: Vec<String> = arm["feedback"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, row)| {
                let interval = row["ci95"].as_array().map_or(String::new(), |ci| {
                    format!(" [{}, {}]", number(&ci[0], 3), number(&ci[1], 3))
                });
                format!(
                    "{name} {} n={}{interval}",
                    number(&row["mean"], 3),
                    row["n"]
                )
            })
            .collect();
        println!(
            "v{}	{}{}	{}	{}	{}	{} ({})	{}	{}	{}	{}",
            arm["version"],
            arm["role"].as_str().unwrap_or_default(),
            if arm["decided"] == json!(true) {
                " (decided)"
            } else {
                ""
            },
            arm["weight"],
            arm["requests"],
            arm["cached"],
            arm["errors"],
            number(&arm["error_rate"], 3),
            number(&arm["latency_p50_ms"], 1),
            number(&arm["latency_p95_ms"], 1),
            number(&arm["cost_usd"], 4),
            feedback.join("; ")
        );
    }
    println!("tests (conclusive at ln Λ ≥ threshold):");
    for test in status["tests"].as_array().into_iter().flatten() {
        println!(
            "  v{} {}{}: estimate {} against {}, n {}, ln Λ {} / {} -> {}",
            test["version"],
            test["test"].as_str().unwrap_or_default(),
            test["metric"]
                .as_str()
                .map_or(String::new(), |m| format!(" {m}")),
            number(&test["estimate"], 4),
            number(&test["against"], 4),
            test["n"],
            number(&test["log_likelihood_ratio"], 2),
            number(&test["threshold"], 2),
            test["verdict"].as_str().unwrap_or_default()
        );
    }
    if let Some(power) = status.get("power").filter(|p| !p.is_null()) {
        println!(
            "power: a difference of {} is found within {} samples per arm with 80% probability, {} with 95%",
            power["effect"], power["samples_per_arm_80"], power["samples_per_arm_95"]
        );
    }
    match status.get("pending_decision").filter(|d| !d.is_null()) {
        Some(decision) => println!(
            "pending: {} v{}: {}",
            decision["action"].as_str().unwrap_or_default(),
            decision["version"],
            decision["reason"].as_str().unwrap_or_default()
        ),
        None => println!("pending: nothing conclusive yet"),
    }
    for event in status["decisions"].as_array().into_iter().flatten() {
        println!("decided: {}", describe_event(event));
    }
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
    if let Some(reason) = event["evidence"]["reason"].as_str() {
        line.push_str(&format!("\t{reason}"));
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
