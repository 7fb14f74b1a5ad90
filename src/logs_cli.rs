//! `reprise logs`: the request log of a running gateway, as a table or JSON lines, filtered like
//! `GET /admin/requests`; `--follow` keeps printing new requests as they finish.

use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;

use crate::admin_client::{self, AdminClient, CliError, GatewayArgs, print};

#[derive(clap::Args)]
pub struct LogsArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// One request's whole record, by its `x-request-id`.
    id: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    /// A key id.
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    route: Option<String>,
    /// The target that answered (`provider/model`).
    #[arg(long)]
    target: Option<String>,
    /// An HTTP status.
    #[arg(long)]
    status: Option<u16>,
    /// `hit`, `semantic-hit`, `miss`, `bypass` or `refresh`.
    #[arg(long)]
    cache: Option<String>,
    /// `id`, `id@v<version>` or `id@<label>`.
    #[arg(long)]
    prompt: Option<String>,
    /// Only requests that ended in an error.
    #[arg(long)]
    errors: bool,
    /// RFC 3339, or a duration back from now.
    #[arg(long, default_value = "1h")]
    since: String,
    #[arg(long)]
    until: Option<String>,
    /// The newest this many (at most 1,000).
    #[arg(long, short = 'n', default_value_t = 50)]
    limit: u32,
    /// Keep printing requests as they finish, until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// One JSON record per line instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: LogsArgs) -> ExitCode {
    admin_client::run(logs(args))
}

async fn logs(args: LogsArgs) -> Result<(), CliError> {
    let client = AdminClient::new(&args.gateway, "cli");
    if let Some(id) = &args.id {
        let record = client
            .call(
                Method::GET,
                &format!("/admin/requests/{}", admin_client::segment(id)),
                None,
            )
            .await?;
        print(&record);
        return Ok(());
    }
    let filters = filters(&args);
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(&filters);
    query.append_pair("since", &args.since);
    if let Some(until) = &args.until {
        query.append_pair("until", until);
    }
    query.append_pair("limit", &args.limit.to_string());
    let listed = client
        .call(
            Method::GET,
            &format!("/admin/requests?{}", query.finish()),
            None,
        )
        .await?;
    let mut records: Vec<Value> = listed["data"].as_array().cloned().unwrap_or_default();
    records.reverse();
    if !args.json {
        println!("{}", header());
    }
    for record in &records {
        show(record, args.json);
    }
    if !args.follow {
        return Ok(());
    }
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(&filters);
    query.append_pair("follow", "true");
    let response = client
        .stream(&format!("/admin/requests?{}", query.finish()))
        .await?;
    let mut events = response.bytes_stream();
    let mut pending = String::new();
    while let Some(chunk) = events.next().await {
        let chunk = chunk.map_err(|e| CliError::Api(format!("the gateway stopped: {e}")))?;
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            on_event(&event, args.json);
        }
    }
    Ok(())
}

fn filters(args: &LogsArgs) -> Vec<(&'static str, String)> {
    let mut pairs = Vec::new();
    for (name, value) in [
        ("tenant", &args.tenant),
        ("key", &args.key),
        ("route", &args.route),
        ("target", &args.target),
        ("cache", &args.cache),
        ("prompt", &args.prompt),
    ] {
        if let Some(value) = value {
            pairs.push((name, value.clone()));
        }
    }
    if let Some(status) = args.status {
        pairs.push(("status", status.to_string()));
    }
    if args.errors {
        pairs.push(("error", "true".to_owned()));
    }
    pairs
}

/// One server-sent event: a record, or how many records a slow reader missed.
fn on_event(event: &str, json: bool) {
    let mut name = "message";
    let mut data = String::new();
    for line in event.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = value.trim();
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    match name {
        "lagged" => eprintln!(
            "({} requests not shown: the terminal fell behind)",
            data.trim()
        ),
        _ if data.is_empty() => {}
        _ => match serde_json::from_str::<Value>(&data) {
            Ok(record) => show(&record, json),
            Err(_) => eprintln!("(an unreadable record)"),
        },
    }
}

fn header() -> String {
    format!(
        "{:<23} {:>3} {:<10} {:<12} {:<22} {:<12} {:>3} {:>7} {:>7} {:>10} {:>9}  {} {}",
        "time (UTC)",
        "st",
        "tenant",
        "route",
        "target",
        "cache",
        "try",
        "in",
        "out",
        "cost $",
        "ms",
        "request id",
        "error"
    )
}

fn show(record: &Value, json: bool) {
    if json {
        println!("{record}");
        return;
    }
    let text = |field: &str| record[field].as_str().unwrap_or("-").to_owned();
    let number = |field: &str| record[field].as_u64().unwrap_or(0);
    let time = record["at_ms"]
        .as_u64()
        .map(|ms| {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        })
        .unwrap_or_default();
    println!(
        "{:<23} {:>3} {:<10} {:<12} {:<22} {:<12} {:>3} {:>7} {:>7} {:>10.6} {:>9.1}  {} {}",
        time.trim_end_matches('Z'),
        number("status"),
        text("tenant"),
        text("route"),
        text("target"),
        text("cache"),
        number("attempts"),
        number("input_tokens"),
        number("output_tokens"),
        record["cost_usd"].as_f64().unwrap_or(0.0),
        record["latency_ms"].as_f64().unwrap_or(0.0),
        text("id"),
        record["error"].as_str().unwrap_or_default(),
    );
}
