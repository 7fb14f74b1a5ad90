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
    /// Free-form `NAME=VALUE` metadata; repeat for several.
    #[arg(long = "meta", value_parser = meta_pair)]
    metadata: Vec<(String, String)>,
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
    if let Some(rpm) = fields.rpm {
        body.insert("limits".into(), json!({"rpm": rpm}));
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
                    "{}\t{}…\t{}\t{}\t{}",
                    key["id"].as_str().unwrap_or_default(),
                    key["prefix"].as_str().unwrap_or_default(),
                    key["tenant"].as_str().unwrap_or_default(),
                    key["status"].as_str().unwrap_or_default(),
                    key["name"].as_str().unwrap_or_default(),
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
