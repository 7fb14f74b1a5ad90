//! The `reprise` binary: `check-config`, `--help`, and `serve` with a graceful SIGTERM drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{ADMIN, Gateway, KEY_A, Mock, base_config, user};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_reprise");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("reprise.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_prints_routes_and_masks_secrets() {
    let output = Command::new(BIN)
        .args(["check-config", "config/reprise.toml"])
        .env("REPRISE_ADMIN_KEY", "admin-secret-value-1234")
        .env("REPRISE_API_KEY", "tenant-secret-value-5678")
        .env("OPENAI_API_KEY", "sk-live-secret-value-9999")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(
            "chat-default [ordered]: openai/gpt-4o-mini -> anthropic/claude-3-5-haiku-latest"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("openai: openai-compatible at https://api.openai.com/v1 (api key: set"),
        "{stdout}"
    );
    for secret in [
        "admin-secret-value-1234",
        "tenant-secret-value-5678",
        "sk-live-secret-value-9999",
    ] {
        assert!(!stdout.contains(secret), "{stdout}");
    }
}

#[test]
fn an_invalid_config_fails_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[auth]\n[providers.p]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\n[routes.r]\ntargets = [{ provider = \"q\", model = \"m\" }]\n",
            "routes.r.targets[0].provider",
        ),
        (
            "[auth]\nadmin_key = \"${REPRISE_TEST_SURELY_UNSET}\"\n[providers]\n[routes]\n",
            "auth.admin_key",
        ),
        (
            "[auth]\n[providers.p]\nkind = \"openia\"\nbase_url = \"http://x/v1\"\n[routes]\n",
            "providers.p.kind",
        ),
        (
            "[auth]\n[providers.p]\nkind = \"openai\"\nbase_url = \"not a url\"\n[routes]\n",
            "providers.p.base_url",
        ),
        ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
        ("[auth\n", "invalid TOML"),
    ];
    for (text, field) in cases {
        let path = write_config(&dir, text);
        for args in [
            vec!["check-config", path.to_str().unwrap()],
            vec!["serve", "--config", path.to_str().unwrap()],
        ] {
            let output = Command::new(BIN).args(&args).output().unwrap();
            let stderr = String::from_utf8(output.stderr).unwrap();
            assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains(field),
                "{args:?}: expected {field:?} in {stderr:?}"
            );
        }
    }
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["check-config", "--help"],
        vec!["prompts", "--help"],
        vec!["prompts", "rollout", "--help"],
        vec!["keys", "--help"],
        vec!["usage", "--help"],
        vec!["logs", "--help"],
    ] {
        let output = Command::new(BIN).args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        assert!(
            String::from_utf8(output.stdout).unwrap().contains("Usage"),
            "{args:?}"
        );
    }
}

/// An admin API call to a spawned gateway: the answer's body.
async fn admin_json(addr: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut request = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .bearer_auth(ADMIN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap().json().await.unwrap()
}

type LogLines = std::sync::Arc<parking_lot::Mutex<Vec<String>>>;

/// Runs `reprise serve` on a config with JSON logs; returns the process, its address and its log.
/// Sends SIGTERM, as a process manager stopping the gateway would.
fn terminate(child: &std::process::Child) {
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// The gateway's exit status, which must come within 10 s of `since`.
async fn exit_after_sigterm(
    child: &mut std::process::Child,
    since: Instant,
) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the gateway did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_gateway(config: &std::path::Path) -> (std::process::Child, String, LogLines) {
    spawn_gateway_with_env(config, &[])
}

fn spawn_gateway_with_env(
    config: &std::path::Path,
    env: &[(&str, &str)],
) -> (std::process::Child, String, LogLines) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let log_lines = LogLines::default();
    let lines = std::sync::Arc::clone(&log_lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<Value>(&line)
                && let Some(addr) = entry["addr"].as_str()
            {
                let _ = addr_tx.send(addr.to_owned());
            }
            lines.lock().push(line);
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the gateway logs its address");
    (child, addr, log_lines)
}

#[tokio::test]
async fn a_cached_answer_survives_kill_9() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n[cache]\nenabled = true\npath = \"{}\"\n[routes.chat]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n",
        base_config(&mock),
        dir.path().join("store").display()
    );
    let path = write_config(&dir, &config);
    let client = reqwest::Client::new();
    let body = json!({"model": "chat", "messages": user("survive")});

    let (mut child, addr, _) = spawn_gateway(&path);
    let first: Value = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("reprise_cache_writes_total 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the answer was not stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL: no shutdown code runs
    child.wait().unwrap();

    let (mut child, addr, _) = spawn_gateway(&path);
    let again = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.headers()["x-reprise-cache"], "hit");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(mock.calls("ok"), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n[routes.slow]\ntargets = [{{ provider = \"mock\", model = \"slow-1500\" }}]\n",
        base_config(&mock)
    );
    let path = write_config(&dir, &config);
    let (mut child, addr, log_lines) = spawn_gateway(&path);
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/chat/completions");
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(url)
                .bearer_auth(KEY_A)
                .json(&json!({"model": "slow", "messages": user("drain me")}))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sent_at = Instant::now();
    terminate(&child);

    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: drain me");

    let status = exit_after_sigterm(&mut child, sent_at).await;
    assert!(status.success(), "{status:?}");
    assert!(
        client
            .post(&url)
            .bearer_auth(KEY_A)
            .json(&json!({}))
            .send()
            .await
            .is_err(),
        "no new connections after shutdown"
    );
    let lines = log_lines.lock().join("\n");
    assert!(
        lines.contains("request finished"),
        "one log line per request: {lines}"
    );
    assert!(
        !lines.contains(KEY_A) && !lines.contains("sk-upstream-secret"),
        "no secret in logs: {lines}"
    );
}

const PROMPT_V1: &str = r#"
description = "support reply"
model = "chat"
[variables.question]
type = "string"
free_text = true
[[messages]]
role = "system"
content = "Be brief."
[[messages]]
role = "user"
content = "{{ question }}"
"#;

#[test]
fn prompts_check_accepts_the_shipped_examples_and_names_the_file_and_line_of_a_bad_one() {
    let output = Command::new(BIN)
        .args(["prompts", "check", "prompts"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("support-reply: v1, v2 (labels: production, staging)"),
        "{stdout}"
    );
    assert!(stdout.contains("3 prompt(s) OK"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reply/v1.toml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, PROMPT_V1.replace("{{ question }}", "{{ questoin }}")).unwrap();
    let output = Command::new(BIN)
        .args(["prompts", "check", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(&format!("{}:12: messages[1].content", file.display())),
        "{stderr}"
    );
    assert!(stderr.contains("questoin"), "{stderr}");
}

/// Runs `reprise prompts ARGS` against the gateway at `addr`; its exit success and stdout.
fn prompts_cli(addr: &str, args: &[&str]) -> (bool, String) {
    admin_cli(addr, &[&["prompts", "--actor", "carol"], args].concat())
}

/// `reprise SUBCOMMAND --url ... ARGS` with the admin key: whether it succeeded, and its output.
fn admin_cli(addr: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(BIN)
        .arg(args[0])
        .args(["--url", &format!("http://{addr}")])
        .args(&args[1..])
        .env("REPRISE_ADMIN_KEY", ADMIN)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    (output.status.success(), format!("{stdout}{stderr}"))
}

#[tokio::test]
async fn the_prompts_cli_manages_a_running_gateway_and_its_changes_survive_kill_9() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts");
    std::fs::create_dir_all(prompts.join("reply")).unwrap();
    std::fs::write(prompts.join("reply/v1.toml"), PROMPT_V1).unwrap();
    std::fs::write(
        prompts.join("reply/labels.toml"),
        "production = { version = 1 }\n",
    )
    .unwrap();
    let v2 = dir.path().join("v2.toml");
    std::fs::write(&v2, PROMPT_V1.replace("Be brief.", "Use numbered steps.")).unwrap();
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n[cache]\npath = \"{}\"\n[prompts]\ndir = \"{}\"\n[routes.chat]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n",
        base_config(&mock),
        dir.path().join("store").display(),
        prompts.display()
    );
    let path = write_config(&dir, &config);
    let (mut child, addr, _) = spawn_gateway(&path);
    let run = |args: &[&str]| {
        let addr = addr.clone();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            prompts_cli(&addr, &args)
        })
    };

    let (ok, out) = run(&["create", "reply", v2.to_str().unwrap()])
        .await
        .unwrap();
    assert!(ok && out.contains("created version 2"), "{out}");
    let (ok, out) = run(&["rollout", "reply", "production", "1=90", "2=10"])
        .await
        .unwrap();
    assert!(
        ok && out.contains("start-rollout production -> rollout[v1:90%,v2:10%]"),
        "{out}"
    );
    let (ok, out) = run(&["rollout", "reply", "production", "1=150"])
        .await
        .unwrap();
    assert!(!ok && out.contains("sum to 100"), "{out}");
    let (ok, out) = run(&["label", "reply", "staging", "2"]).await.unwrap();
    assert!(ok && out.contains("move-label staging -> v2"), "{out}");
    let (ok, out) = run(&["diff", "reply", "1", "2"]).await.unwrap();
    assert!(
        ok && out.contains("+content = \"Use numbered steps.\""),
        "{out}"
    );
    let (ok, out) = run(&["list"]).await.unwrap();
    assert!(
        ok && out.contains("reply\trevision 5\t2 version(s)"),
        "{out}"
    );
    let (ok, out) = run(&["show", "reply", "--version", "9"]).await.unwrap();
    assert!(
        !ok && out.contains("404") && out.contains("no version 9"),
        "{out}"
    );

    child.kill().unwrap(); // SIGKILL: what was acknowledged must be on disk already
    child.wait().unwrap();
    let (mut child, addr, _) = spawn_gateway(&path);
    let run = |args: &[&str]| prompts_cli(&addr, args);
    let (ok, out) = run(&["rollback", "reply", "production"]);
    assert!(ok && out.contains("rollback production -> v1"), "{out}");
    let (ok, out) = run(&["history", "reply"]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(lines[2].contains("carol\tcreate-version v2"), "{out}");
    assert!(
        lines[5].contains("carol\trollback production: rollout[v1:90%,v2:10%] -> v1"),
        "{out}"
    );
    let exported = dir.path().join("exported");
    let (ok, out) = run(&["export", "reply", "--dir", exported.to_str().unwrap()]);
    assert!(ok && out.contains("v2.toml"), "{out}");
    let (ok, out) = tokio::task::spawn_blocking(move || {
        let output = Command::new(BIN)
            .args(["prompts", "check", exported.to_str().unwrap()])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8(output.stdout).unwrap(),
        )
    })
    .await
    .unwrap();
    assert!(
        ok && out.contains("reply: v1, v2 (labels: production, staging)"),
        "{out}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn the_keys_cli_makes_limits_rotates_and_revokes_keys() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n[keys]\n[cache]\npath = \"{}\"\n[prices.ok]\ninput = 1000.0\noutput = 1000.0\n[routes.chat]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n[routes.other]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n",
        base_config(&mock),
        dir.path().join("store").display(),
    );
    let path = write_config(&dir, &config);
    let (mut child, addr, _) = spawn_gateway(&path);
    let keys = |args: &[&str]| {
        let addr = addr.clone();
        let args: Vec<String> = std::iter::once("keys".to_owned())
            .chain(args.iter().map(|a| (*a).to_owned()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            admin_cli(&addr, &args)
        })
    };
    let chat = |secret: String, model: &'static str| {
        let addr = addr.clone();
        async move {
            reqwest::Client::new()
                .post(format!("http://{addr}/v1/chat/completions"))
                .bearer_auth(secret)
                .json(&serde_json::json!({"model": model, "messages": common::user("hi")}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let (ok, out) = keys(&[
        "create",
        "support bot",
        "--tenant",
        "support",
        "--model",
        "chat",
        "--meta",
        "team=cx",
    ])
    .await
    .unwrap();
    assert!(ok, "{out}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret (shown once): "))
        .unwrap()
        .to_owned();
    let id = out.split('\t').next().unwrap().to_owned();
    assert_eq!(chat(secret.clone(), "chat").await, 200);
    assert_eq!(chat(secret.clone(), "other").await, 403);

    let (ok, out) = keys(&["list", "--tenant", "support"]).await.unwrap();
    assert!(ok && out.contains(&id) && out.contains("active"), "{out}");
    assert!(!out.contains(&secret), "{out}");
    let (ok, out) = keys(&["update", &id, "--all-models"]).await.unwrap();
    assert!(ok && out.contains("\"models\": null"), "{out}");
    assert_eq!(chat(secret.clone(), "other").await, 200);

    let (ok, out) = keys(&["rotate", &id, "--grace", "1h"]).await.unwrap();
    assert!(ok, "{out}");
    let rotated = out
        .lines()
        .find_map(|l| l.strip_prefix("secret (shown once): "))
        .unwrap()
        .to_owned();
    assert_eq!(chat(rotated.clone(), "chat").await, 200);
    assert_eq!(
        chat(secret.clone(), "chat").await,
        200,
        "old secret within its grace"
    );

    let (ok, out) = keys(&["update", &id, "--rpm", "100"]).await.unwrap();
    assert!(ok, "{out}");
    let (ok, out) = keys(&["update", &id, "--budget-usd", "5", "--budget-period", "day"])
        .await
        .unwrap();
    assert!(ok, "{out}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        shown["limits"]["rpm"], 100,
        "the other limits are kept: {out}"
    );
    assert_eq!(
        shown["limits"]["budget"],
        json!({"usd": 5.0, "period": "day"})
    );
    assert_eq!(chat(rotated.clone(), "chat").await, 200);
    let (ok, out) = keys(&["list"]).await.unwrap();
    assert!(
        ok && out.contains("$0.0900 this month"),
        "five answers at 0.018 USD: {out}"
    );
    let usage_addr = addr.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        admin_cli(&usage_addr, &["usage", "--by", "key,model"])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("key\tmodel\trequests\t"), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{id}\tok\t5\t0\t55\t35\t0.090000"))),
        "{out}"
    );

    let (ok, out) = keys(&["revoke", &id]).await.unwrap();
    assert!(ok && out.contains("revoked"), "{out}");
    assert_eq!(chat(rotated, "chat").await, 401);
    assert_eq!(chat(secret, "chat").await, 401);
    let (ok, out) = keys(&["show", "key_missing"]).await.unwrap();
    assert!(!ok && out.contains("404"), "{out}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn spend_answered_before_kill_9_is_still_spent_after_it() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n[keys]\n[cache]\npath = \"{}\"\n[prices.ok]\ninput = 1000.0\noutput = 1000.0\n[routes.chat]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n",
        base_config(&mock),
        dir.path().join("store").display()
    );
    let path = write_config(&dir, &config);
    let client = reqwest::Client::new();

    let (mut child, addr, _) = spawn_gateway(&path);
    let created = admin_json(
        &addr,
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"name": "n", "tenant": "t", "limits": {"budget": {"usd": 100}}})),
    )
    .await;
    let (id, secret) = (
        created["id"].as_str().unwrap(),
        created["secret"].as_str().unwrap(),
    );
    let answered = futures::future::join_all((0..20).map(|i| {
        let request = client
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(secret)
            .json(&json!({"model": "chat", "messages": user(&format!("q{i}"))}))
            .send();
        async move { request.await.unwrap().status() == 200 }
    }))
    .await;
    // SIGKILL the moment the last answer is in: no shutdown code runs.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(answered.iter().all(|ok| *ok));

    let (mut child, addr, _) = spawn_gateway(&path);
    let key = admin_json(
        &addr,
        reqwest::Method::GET,
        &format!("/admin/keys/{id}"),
        None,
    )
    .await;
    // Each answer: 11 + 7 tokens at 1000 USD per million.
    let spent = key["budget"]["spent_usd"].as_f64().unwrap();
    assert!((spent - 20.0 * 0.018).abs() < 1e-9, "{key}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A replica killed mid-stream cannot settle: on Redis its concurrency slot is free again once
/// `hold_lease` has passed, and its budget hold is then counted as spent (the request may well
/// have been answered and billed upstream), never silently given back.
#[ignore = "needs redis-server (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_request_frees_its_slot_and_spends_its_hold_after_the_lease() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let shared = format!(
        "[keys]\n[limits]\nhold_lease = \"2s\"\n[cache]\nstore = \"redis\"\nredis_url = \"{}\"\n[prices.ok]\ninput = 1.0\noutput = 1.0\n[prices.long-stream]\ninput = 1.0\noutput = 1.0\n[routes.chat]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n[routes.long]\ntargets = [{{ provider = \"mock\", model = \"long-stream\" }}]\n",
        redis.url()
    );
    let path = write_config(
        &dir,
        &format!("{}\n[log]\nformat = \"json\"\n{shared}", base_config(&mock)),
    );
    let client = reqwest::Client::new();
    let (mut doomed, addr, _) = spawn_gateway(&path);
    let created = admin_json(
        &addr,
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"name": "n", "tenant": "t", "limits": {"max_concurrent": 1, "budget": {"usd": 1}}})),
    )
    .await;
    let (id, secret) = (
        created["id"].as_str().unwrap().to_owned(),
        created["secret"].as_str().unwrap().to_owned(),
    );
    let mut stream = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&json!({"model": "long", "messages": user("s"), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(
        stream.chunk().await.unwrap().is_some(),
        "the stream is flowing"
    );
    doomed.kill().unwrap();
    doomed.wait().unwrap();

    let survivor = Gateway::start_with(mock, &shared).await;
    let ask = json!({"model": "chat", "messages": user("hi"), "max_tokens": 7});
    let refused = survivor.chat_with(&secret, ask.clone(), &[]).await;
    assert_eq!(
        refused.status(),
        429,
        "the dead replica's slot is still held"
    );
    // "s" holds (1 + 8 + 3) input and the route's 4,096 output tokens at 1 USD per million.
    let held = (1.0 + 8.0 + 3.0 + 4096.0) / 1e6;
    let key = survivor.get_json(&format!("/admin/keys/{id}"), ADMIN).await;
    assert!(
        (key["budget"]["held_usd"].as_f64().unwrap() - held).abs() < 1e-9,
        "{key}"
    );

    tokio::time::sleep(Duration::from_millis(2200)).await;
    let answered = survivor.chat_with(&secret, ask, &[]).await;
    assert_eq!(answered.status(), 200, "the slot lapsed with the lease");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let key = survivor.get_json(&format!("/admin/keys/{id}"), ADMIN).await;
    let spent = key["budget"]["spent_usd"].as_f64().unwrap();
    assert!(
        (spent - (held + 18.0 / 1e6)).abs() < 1e-9,
        "the lapsed hold was spent, plus the new answer: {key}"
    );
}

#[tokio::test]
async fn kill_9_loses_at_most_the_request_log_records_still_queued() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n[request_log]\npath = \"{}\"\n[routes.chat]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n",
        base_config(&mock),
        dir.path().join("requests").display()
    );
    let path = write_config(&dir, &config);
    let client = reqwest::Client::new();
    let (mut child, addr, _) = spawn_gateway(&path);
    let mut ids = Vec::new();
    let mut answered_at = Vec::new();
    for i in 0..200 {
        let answer = client
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .json(&json!({"model": "chat", "messages": user(&format!("n{i}"))}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        ids.push(
            answer.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        answered_at.push(Instant::now());
    }
    child.kill().unwrap(); // SIGKILL, right after the last answer
    let killed_at = Instant::now();
    child.wait().unwrap();

    let (mut child, addr, _) = spawn_gateway(&path);
    let listed = admin_json(
        &addr,
        reqwest::Method::GET,
        "/admin/requests?limit=1000",
        None,
    )
    .await;
    let kept: std::collections::HashSet<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let lost: Vec<usize> = (0..ids.len())
        .filter(|i| !kept.contains(ids[*i].as_str()))
        .collect();
    eprintln!("kill -9 after 200 answers: {} records lost", lost.len());
    // The writer takes the queue every 25 ms: only records of the last moments before the kill
    // can still have been in it (a generous margin for a loaded machine).
    assert!(
        lost.iter()
            .all(|i| killed_at.duration_since(answered_at[*i]) < Duration::from_millis(300)),
        "lost records {lost:?} of {}",
        ids.len()
    );
    assert!(lost.len() < 100, "{lost:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The listening sockets bound to `port` in the LISTEN state, from the kernel's table.
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields[1].ends_with(&format!(":{port:04X}")) && fields[3] == "0A"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_threads_each_listen_on_the_port_and_drain_together() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n[routes.slow]\ntargets = [{{ provider = \"mock\", model = \"slow-700\" }}]\n",
        base_config(&mock).replace("[server]\n", "[server]\n        worker_threads = 4\n")
    );
    let path = write_config(&dir, &config);
    let (mut child, addr, _) = spawn_gateway(&path);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(
        listening_sockets(port),
        4,
        "one listening socket per serving thread"
    );
    // A thread names itself once it runs, which can be a moment after the gateway is listening.
    let serving_threads = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| name.starts_with("reprise-serve-"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut threads = serving_threads();
    while threads.len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        threads = serving_threads();
    }
    assert_eq!(threads.len(), 4, "{threads:?}");

    // Each request on a connection of its own, so the kernel spreads them over the sockets.
    let url = format!("http://{addr}/v1/chat/completions");
    let started = Instant::now();
    let requests: Vec<_> = (0..24)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(url)
                    .bearer_auth(KEY_A)
                    .json(&json!({"model": "slow", "messages": user(&format!("question {i}"))}))
                    .send()
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    terminate(&child);
    for (i, request) in requests.into_iter().enumerate() {
        let response = request
            .await
            .unwrap()
            .expect("in flight at SIGTERM: answered");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("echo: question {i}")
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the 24 slow answers were served concurrently: {:?}",
        started.elapsed()
    );
    let status = exit_after_sigterm(&mut child, Instant::now()).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(listening_sockets(port), 0);
}

/// Upstream calls go through hyper's client unless the environment names a proxy for the
/// upstream; then they go through it, as they did when every call went through reqwest.
#[tokio::test]
async fn an_upstream_behind_the_environments_proxy_is_reached_through_it() {
    // The mock plays the proxy: it is sent the absolute-form request for a host that does not
    // resolve, and answers it.
    let mock = Mock::start().await;
    let proxy = mock.openai_base().trim_end_matches("/v1").to_owned();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[log]\nformat = \"json\"\n[routes.proxied]\ntargets = [{{ provider = \"mock\", model = \"gpt-proxied\" }}]\n",
        base_config(&mock).replacen(&mock.openai_base(), "http://upstream.invalid/v1", 1)
    );
    let path = write_config(&dir, &config);
    let (mut child, addr, _) = spawn_gateway_with_env(
        &path,
        &[("HTTP_PROXY", &proxy), ("NO_PROXY", ""), ("no_proxy", "")],
    );
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&json!({"model": "proxied", "messages": user("through the proxy")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "echo: through the proxy"
    );
    let (headers, _) = mock
        .last_request("gpt-proxied")
        .expect("the proxy was sent it");
    assert_eq!(headers["host"], "upstream.invalid");
    terminate(&child);
    assert!(
        exit_after_sigterm(&mut child, Instant::now())
            .await
            .success()
    );
}
