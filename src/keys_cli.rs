//! `reprise keys ...`: the run-time keys' admin API from a shell, against a running gateway.

use std::process::ExitCode;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::admin_client::{self, AdminClient, CliError, GatewayArgs, print, segment};

#[derive(clap::Args)]
pub struct KeysArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(subcommand)]
    command: KeysCommand,
}

/// The fields `create` and `update` share.
#[derive(clap::Args)]
struct KeyFields {
    /// Models (route aliases) the key may use; repeat for several. Unset: all.
    #[arg(long = "model")]
    models: Vec<String>,
    /// When the key stops working: a duration from now (`30d`, `12h`).
    #[arg(long)]
    expires_in: Option<String>,
    /// Requests per minute, across every replica (429 beyond it).
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens (input and output) per minute.
    #[arg(long)]
    tpm: Option<u64>,
    /// Requests going upstream at the same time.
    #[arg(long)]
    max_concurrent: Option<u64>,
    /// A budget in USD per `--budget-period` (429 insufficient_quota once spent).
    #[arg(long)]
    budget_usd: Option<f64>,
    /// `day` or `month` (UTC calendar).
    #[arg(long, default_value = "month", requires = "budget_usd")]
    budget_period: String,
    /// The share of the budget past which answers carry a warning header.
    #[arg(long, requires = "budget_usd")]
    budget_soft: Option<f64>,
    /// Free-form `NAME=VALUE` metadata; repeat for several.
    #[arg(long = "meta", value_parser = meta_pair)]
    metadata: Vec<(String, String)>,
}

impl KeyFields {
    /// `current` limits with the ones given on the command line set; `None` if none is given.
    fn limits(&self, current: Option<&Value>) -> Option<Value> {
        let given = self.rpm.is_some()
            || self.tpm.is_some()
            || self.max_concurrent.is_some()
            || self.budget_usd.is_some();
        if !given {
            return None;
        }
        let mut limits = current
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut set = |name: &str, value: Option<Value>| {
            if let Some(value) = value {
                limits.insert(name.into(), value);
            }
        };
        set("rpm", self.rpm.map(Value::from));
        set("tpm", self.tpm.map(Value::from));
        set("max_concurrent", self.max_concurrent.map(Value::from));
        set(
            "budget",
            self.budget_usd.map(|usd| {
                let mut budget = json!({"usd": usd, "period": self.budget_period});
                if let Some(soft) = self.budget_soft {
                    budget["soft"] = json!(soft);
                }
                budget
            }),
        );
        Some(Value::Object(limits))
    }
}

fn meta_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected NAME=VALUE".to_owned())
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Makes a key; its secret is printed this once.
    Create {
        name: String,
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        fields: KeyFields,
    },
    /// Every key (optionally one tenant's): id, prefix, name, tenant, status.
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    Show {
        id: String,
    },
    /// Changes a key's name, models, expiry or metadata.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Lets the key use every model again.
        #[arg(long, conflicts_with = "models")]
        all_models: bool,
        #[command(flatten)]
        fields: KeyFields,
    },
    /// A new secret (printed once); the old one keeps working for `--grace`.
    Rotate {
        id: String,
        #[arg(long, default_value = "0s")]
        grace: String,
    },
    /// Ends a key on every replica within a second.
    Revoke {
        id: String,
    },
}

pub fn run(args: KeysArgs) -> ExitCode {
    admin_client::run(execute(&args))
}

fn change(fields: &KeyFields, body: &mut Map<String, Value>) {
    if !fields.models.is_empty() {
        body.insert("models".into(), json!(fields.models));
    }
    if let Some(within) = &fields.expires_in {
        body.insert("expires_in".into(), json!(within));
    }
    if let Some(limits) = fields.limits(body.get("limits")) {
        body.insert("limits".into(), limits);
    }
    if !fields.metadata.is_empty() {
        let metadata: Map<String, Value> = fields
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        body.insert("metadata".into(), Value::Object(metadata));
    }
}

fn issued(answer: &Value) {
    println!(
        "{}\t{}\nsecret (shown once): {}",
        answer["id"].as_str().unwrap_or_default(),
        answer["name"].as_str().unwrap_or_default(),
        answer["secret"].as_str().unwrap_or_default()
    );
}

async fn execute(args: &KeysArgs) -> Result<(), CliError> {
    let client = AdminClient::new(&args.gateway, "cli");
    let key = |id: &str| {
        format!(
            "/admin/keys/{}",
            url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
        )
    };
    match &args.command {
        KeysCommand::Create {
            name,
            tenant,
            fields,
        } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            body.insert("tenant".into(), json!(tenant));
            change(fields, &mut body);
            issued(
                &client
                    .call(Method::POST, "/admin/keys", Some(Value::Object(body)))
                    .await?,
            );
        }
        KeysCommand::List { tenant } => {
            let path = match tenant {
                Some(tenant) => format!("/admin/keys?tenant={}", segment(tenant)),
                None => "/admin/keys".to_owned(),
            };
            let list = client.call(Method::GET, &path, None).await?;
            for key in list["data"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}…\t{}\t{}\t{}\t${:.4} this month",
                    key["id"].as_str().unwrap_or_default(),
                    key["prefix"].as_str().unwrap_or_default(),
                    key["tenant"].as_str().unwrap_or_default(),
                    key["status"].as_str().unwrap_or_default(),
                    key["name"].as_str().unwrap_or_default(),
                    key["spend"]["month_usd"].as_f64().unwrap_or_default(),
                );
            }
        }
        KeysCommand::Show { id } => print(&client.call(Method::GET, &key(id), None).await?),
        KeysCommand::Update {
            id,
            name,
            all_models,
            fields,
        } => {
            let mut body = Map::new();
            if let Some(name) = name {
                body.insert("name".into(), json!(name));
            }
            if *all_models {
                body.insert("models".into(), Value::Null);
            }
            if fields.limits(None).is_some() {
                // The API replaces a key's limits whole: the ones not given here are kept.
                let current = client.call(Method::GET, &key(id), None).await?;
                body.insert("limits".into(), current["limits"].clone());
            }
            change(fields, &mut body);
            if body.is_empty() {
                return Err(CliError::Usage("nothing to change".into()));
            }
            print(
                &client
                    .call(Method::PATCH, &key(id), Some(Value::Object(body)))
                    .await?,
            );
        }
        KeysCommand::Rotate { id, grace } => {
            let path = format!("{}/rotate", key(id));
            issued(
                &client
                    .call(Method::POST, &path, Some(json!({"grace": grace})))
                    .await?,
            );
        }
        KeysCommand::Revoke { id } => {
            let path = format!("{}/revoke", key(id));
            let answer = client.call(Method::POST, &path, None).await?;
            println!(
                "{}\t{}",
                answer["id"].as_str().unwrap_or_default(),
                answer["status"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// `reprise usage`: the usage book through a running gateway's admin API.
#[derive(clap::Args)]
pub struct UsageArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// First day (YYYY-MM-DD, UTC); today by default.
    #[arg(long)]
    from: Option<String>,
    /// Last day, inclusive; `--from` by default.
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    /// A key id (`-` for keys from `[auth]`).
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    route: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// Columns to group by, comma-separated: day, tenant, key, route, model.
    #[arg(long, default_value = "day,tenant,key,route,model")]
    by: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run_usage(args: UsageArgs) -> ExitCode {
    admin_client::run(usage(&args))
}

async fn usage(args: &UsageArgs) -> Result<(), CliError> {
    let client = AdminClient::new(&args.gateway, "cli");
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in [
        ("from", &args.from),
        ("to", &args.to),
        ("tenant", &args.tenant),
        ("key", &args.key),
        ("route", &args.route),
        ("model", &args.model),
    ] {
        if let Some(value) = value {
            query.append_pair(name, value);
        }
    }
    query.append_pair("group_by", &args.by);
    let book = client
        .call(
            Method::GET,
            &format!("/admin/usage?{}", query.finish()),
            None,
        )
        .await?;
    if args.json {
        print(&book);
        return Ok(());
    }
    let columns: Vec<&str> = book["group_by"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let figures = [
        "requests",
        "errors",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "cache_hits",
        "tokens_saved",
        "saved_usd",
    ];
    println!("{}", [&columns[..], &figures[..]].concat().join("\t"));
    let cell = |row: &Value, name: &str| match &row[name] {
        Value::String(text) => text.clone(),
        Value::Number(n) if name.ends_with("_usd") => {
            format!("{:.6}", n.as_f64().unwrap_or_default())
        }
        other => other.to_string(),
    };
    for row in book["data"].as_array().into_iter().flatten() {
        let cells: Vec<String> = columns
            .iter()
            .chain(figures.iter())
            .map(|name| cell(row, name))
            .collect();
        println!("{}", cells.join("\t"));
    }
    let total: Vec<String> = figures
        .iter()
        .map(|name| cell(&book["total"], name))
        .collect();
    let padding = vec![""; columns.len().saturating_sub(1)];
    println!(
        "total\t{}{}",
        padding.iter().map(|p| format!("{p}\t")).collect::<String>(),
        total.join("\t")
    );
    Ok(())
}
