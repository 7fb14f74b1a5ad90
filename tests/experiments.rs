//! Prompt experiments that decide, simulated end to end: a real gateway, a mock upstream, users
//! sent through a rollout, and feedback scripted from a seeded random source.
//!
//! - an arm whose upstream fails 20% of the time is rolled back by its error-rate guardrail
//!   within a few hundred of its requests, with the evidence in the audit trail; undoing that
//!   with the label's rollback does not bring the same decision back;
//! - an arm with a 60% success rate against the control's 55% is promoted within the samples
//!   the test's power calculation gives for 95% power;
//! - a hundred A/A experiments (two identical arms), served by two replicas sharing Redis, make
//!   a wrong decision in at most five.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{Gateway, KEY_A, Mock, header};
use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use reqwest::Method;
use serde_json::{Value, json};

fn version_file(model: &str, prefix: &str) -> String {
    format!(
        r#"
model = "{model}"

[[messages]]
role = "user"
content = "{prefix}{{{{ question }}}}"

[variables.question]
type = "string"
free_text = true
"#
    )
}

/// Writes prompt `id` with versions `(model, prefix)` and `labels` (a `labels.toml`).
fn write_prompt(root: &std::path::Path, id: &str, versions: &[(&str, &str)], labels: &str) {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    for (index, (model, prefix)) in versions.iter().enumerate() {
        std::fs::write(
            dir.join(format!("v{}.toml", index + 1)),
            version_file(model, prefix),
        )
        .unwrap();
    }
    std::fs::write(dir.join("labels.toml"), labels).unwrap();
}

fn config(dir: &tempfile::TempDir, routes: &str) -> String {
    config_on(
        dir,
        &format!("path = \"{}\"", dir.path().join("store").display()),
        routes,
    )
}

fn config_on(dir: &tempfile::TempDir, store: &str, routes: &str) -> String {
    format!(
        r#"
        [cache]
        {store}
        [prompts]
        dir = "{prompts}"
        experiments = {{ check_interval = "100ms", flush_interval = "50ms" }}
        [feedback.metrics.resolved]
        type = "boolean"
        {routes}
        "#,
        prompts = dir.path().join("prompts").display(),
    )
}

struct Served {
    version: u32,
    request_id: String,
    status: u16,
}

async fn ask(gw: &Gateway, prompt: &str, user: &str) -> Served {
    let answer = gw
        .chat_with(
            KEY_A,
            json!({"model": "ignored", "user": user,
                   "prompt": {"id": prompt, "variables": {"question": format!("question of {user}")}}}),
            &[],
        )
        .await;
    Served {
        version: header(&answer, "x-reprise-prompt-version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        request_id: header(&answer, "x-request-id")
            .unwrap_or_default()
            .to_owned(),
        status: answer.status().as_u16(),
    }
}

/// Reports `resolved` on a request; the attribution is written off the response path, so a
/// first 404 is retried briefly.
async fn report(gw: &Gateway, request_id: &str, resolved: bool) {
    for _ in 0..100 {
        let response = gw
            .post(
                "/v1/feedback",
                KEY_A,
                json!({"request_id": request_id, "metric": "resolved", "value": resolved}),
            )
            .await;
        match response.status().as_u16() {
            200 => return,
            404 => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!(
                "feedback answered {other}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }
    panic!("request {request_id} never became known to feedback");
}

async fn label_target(gw: &Gateway, prompt: &str) -> Value {
    let (status, view) = gw
        .admin(Method::GET, &format!("/admin/prompts/{prompt}"), None)
        .await;
    assert_eq!(status, 200, "{view}");
    view["labels"]["production"].clone()
}

async fn experiment(gw: &Gateway, prompt: &str) -> Value {
    let (status, view) = gw
        .admin(
            Method::GET,
            &format!("/admin/prompts/{prompt}/experiments/production"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{view}");
    view
}

/// The audit events of `prompt` that are experiment decisions.
async fn decisions_of(gw: &Gateway, prompt: &str) -> Vec<Value> {
    let (_, history) = gw
        .admin(
            Method::GET,
            &format!("/admin/prompts/{prompt}/history"),
            None,
        )
        .await;
    history["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("experiment").is_some())
        .cloned()
        .collect()
}

fn arm(evidence: &Value, version: u32) -> &Value {
    evidence["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["version"] == version)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm_with_a_fifth_of_upstream_errors_is_rolled_back_within_a_few_hundred_requests() {
    let dir = tempfile::tempdir().unwrap();
    write_prompt(
        &dir.path().join("prompts"),
        "support",
        &[("good", "Answer: "), ("bad", "Answer briefly: ")],
        r#"
[production]
rollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]
salt = "errors"
[production.experiment]
guardrails = { max_error_rate = 0.05 }
"#,
    );
    let gw = Gateway::start(&config(
        &dir,
        r#"
        [routes.good]
        targets = [{ provider = "mock", model = "ok" }]
        [routes.bad]
        targets = [{ provider = "mock", model = "chance-20-500" }]
        retry = { attempts_per_target = 1 }
        "#,
    ))
    .await;
    let started = experiment(&gw, "support").await;
    assert_eq!(started["state"], "running", "{started}");
    let id = started["experiment"]["id"].as_str().unwrap().to_owned();

    let mut user = 0;
    let mut second_arm_requests = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while label_target(&gw, "support").await.get("rollout").is_some() {
        assert!(Instant::now() < deadline, "no decision within a minute");
        for _ in 0..20 {
            user += 1;
            let served = ask(&gw, "support", &format!("user-{user}")).await;
            second_arm_requests += u32::from(served.version == 2);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(label_target(&gw, "support").await, json!({"version": 1}));

    let made = decisions_of(&gw, "support").await;
    assert_eq!(made.len(), 1, "{made:?}");
    let decision = &made[0];
    assert_eq!(decision["action"], "experiment-rollback");
    assert_eq!(decision["actor"], "experiment");
    assert_eq!(decision["experiment"], id.as_str());
    assert_eq!(decision["version"], 2);
    let evidence = &decision["evidence"];
    assert_eq!(evidence["test"]["test"], "error_rate");
    assert!(
        evidence["test"]["log_likelihood_ratio"].as_f64().unwrap()
            >= evidence["test"]["threshold"].as_f64().unwrap()
    );
    let counted = arm(evidence, 2)["requests"].as_u64().unwrap();
    let error_rate = arm(evidence, 2)["error_rate"].as_f64().unwrap();
    eprintln!(
        "rolled back after {counted} requests on the arm ({second_arm_requests} sent), error rate {error_rate:.3}"
    );
    assert!(counted <= 300, "{counted} requests before the rollback");
    assert!(error_rate > 0.05, "{error_rate}");
    assert!(arm(evidence, 1)["error_rate"].as_f64().unwrap() < 0.05);

    // Every user now gets the control.
    for n in 0..20 {
        assert_eq!(ask(&gw, "support", &format!("after-{n}")).await.version, 1);
    }

    // The existing rollback undoes it, and the experiment does not decide on that arm again.
    let (status, undone) = gw
        .admin(
            Method::POST,
            "/admin/prompts/support/labels/production/rollback",
            None,
        )
        .await;
    assert_eq!(status, 200, "{undone}");
    assert!(undone["target"].get("rollout").is_some(), "{undone}");
    for n in 0..100 {
        ask(&gw, "support", &format!("undone-{n}")).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(label_target(&gw, "support").await.get("rollout").is_some());
    let held = experiment(&gw, "support").await;
    assert_eq!(held["state"], "held", "{held}");
    assert_eq!(held["decisions"].as_array().unwrap().len(), 1);
    assert_eq!(decisions_of(&gw, "support").await.len(), 1);
}

/// Sends `users` (prompt, user) with at most 16 in flight and scripted feedback: a user served
/// version `v` reports `resolved = true` with probability `rates[v - 1]`.
async fn traffic(gw: &Arc<Gateway>, users: Vec<(String, usize)>, rates: &[f64], rng: &mut StdRng) {
    // The draws are made up front so the script does not depend on completion order.
    let draws: Vec<f64> = users.iter().map(|_| rng.random::<f64>()).collect();
    let rates = rates.to_vec();
    futures::stream::iter(users.into_iter().zip(draws))
        .map(|((prompt, user), draw)| {
            let (gw, rates) = (Arc::clone(gw), rates.clone());
            async move {
                let served = ask(&gw, &prompt, &format!("user-{user}")).await;
                assert_eq!(served.status, 200);
                let rate = rates[served.version as usize - 1];
                report(&gw, &served.request_id, draw < rate).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

fn users_of(prompt: &str, users: std::ops::Range<usize>) -> Vec<(String, usize)> {
    users.map(|u| (prompt.to_owned(), u)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_point_better_arm_is_promoted_within_the_samples_its_power_calculation_predicts() {
    let dir = tempfile::tempdir().unwrap();
    write_prompt(
        &dir.path().join("prompts"),
        "support",
        &[("chat", "Answer: "), ("chat", "Answer kindly: ")],
        r#"
[production]
rollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]
salt = "promotion"
[production.experiment]
primary = "resolved"
min_effect = 0.05
promote = "auto"
"#,
    );
    let gw = Arc::new(
        Gateway::start(&config(
            &dir,
            r#"
            [routes.chat]
            targets = [{ provider = "mock", model = "ok" }]
            "#,
        ))
        .await,
    );
    let before = experiment(&gw, "support").await;
    let predicted = before["power"]["samples_per_arm_95"].as_u64().unwrap();
    eprintln!("power calculation: {predicted} per arm for 95% power");

    let mut rng = StdRng::seed_from_u64(60_55);
    let mut sent = 0;
    while label_target(&gw, "support").await.get("rollout").is_some() {
        assert!(
            sent < 4 * predicted as usize,
            "no decision after {sent} users"
        );
        traffic(
            &gw,
            users_of("support", sent..sent + 200),
            &[0.55, 0.60],
            &mut rng,
        )
        .await;
        sent += 200;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(label_target(&gw, "support").await, json!({"version": 2}));
    let made = decisions_of(&gw, "support").await;
    assert_eq!(made.len(), 1, "{made:?}");
    let decision = &made[0];
    assert_eq!(decision["action"], "experiment-promote");
    assert_eq!(decision["version"], 2);
    let evidence = &decision["evidence"];
    assert_eq!(evidence["test"]["test"], "primary");
    assert_eq!(evidence["test"]["verdict"], "better");
    let samples = |version| {
        arm(evidence, version)["feedback"]["resolved"]["n"]
            .as_f64()
            .unwrap()
    };
    let (control, treatment) = (samples(1), samples(2));
    eprintln!(
        "promoted with {control} and {treatment} scored answers per arm ({sent} users sent); \
         means {} and {}",
        arm(evidence, 1)["feedback"]["resolved"]["mean"],
        arm(evidence, 2)["feedback"]["resolved"]["mean"]
    );
    assert!(
        control.max(treatment) <= predicted as f64,
        "promoted after {control}/{treatment} samples, predicted {predicted}"
    );
    let ended = experiment(&gw, "support").await;
    assert_eq!(ended["state"], "ended");
    assert_eq!(ended["last_decision"]["action"], "experiment-promote");
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_arms_make_a_wrong_decision_in_at_most_five_of_a_hundred_experiments() {
    const EXPERIMENTS: usize = 100;
    const USERS: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    for n in 0..EXPERIMENTS {
        write_prompt(
            &dir.path().join("prompts"),
            &format!("aa-{n}"),
            &[("chat", "Answer: "), ("chat", "Answer:  ")],
            &format!(
                r#"
[production]
rollout = [{{ version = 1, weight = 50 }}, {{ version = 2, weight = 50 }}]
salt = "aa-{n}"
[production.experiment]
primary = "resolved"
promote = "auto"
guardrails = {{ max_error_rate = 0.05 }}
"#
            ),
        );
    }
    // Two replicas on one Redis, taking turns: the evidence is the sum of both, and a decision
    // is made once.
    let redis = RedisServer::start();
    let text = config_on(
        &dir,
        &format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
        r#"
        [routes.chat]
        targets = [{ provider = "mock", model = "ok" }]
        "#,
    );
    let mock = Mock::start().await;
    let replicas = [
        Arc::new(Gateway::start_with(mock.clone(), &text).await),
        Arc::new(Gateway::start_with(mock, &text).await),
    ];
    let gw = Arc::clone(&replicas[0]);
    // All experiments run at once, each looked at every check while its samples grow.
    let mut rng = StdRng::seed_from_u64(55);
    for round in 0..USERS / 20 {
        let users: Vec<(String, usize)> = (0..EXPERIMENTS)
            .flat_map(|n| users_of(&format!("aa-{n}"), round * 20..(round + 1) * 20))
            .collect();
        traffic(&replicas[round % 2], users, &[0.55, 0.55], &mut rng).await;
    }
    // The last counts reach the store and the tests within a few checks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut wrong = Vec::new();
    for n in 0..EXPERIMENTS {
        if !decisions_of(&gw, &format!("aa-{n}")).await.is_empty() {
            wrong.push(n);
        }
    }
    let last = experiment(&gw, &format!("aa-{}", EXPERIMENTS - 1)).await;
    eprintln!(
        "A/A: {} of {EXPERIMENTS} experiments decided ({wrong:?}); the last one's arms: {}",
        wrong.len(),
        last["arms"]
    );
    assert!(
        last["arms"][0]["feedback"]["resolved"]["n"]
            .as_f64()
            .unwrap()
            > 150.0,
        "the experiments did see their samples: {last}"
    );
    assert!(wrong.len() <= EXPERIMENTS * 5 / 100, "{wrong:?}");
}

/// `reprise prompts --url … ARGS`: whether it succeeded, and what it printed.
async fn prompts_cli(gw: &Gateway, args: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_reprise"));
    command
        .args(["prompts", "--url", &gw.base, "--actor", "dana"])
        .args(args)
        .env("REPRISE_ADMIN_KEY", common::ADMIN);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_experiment_promotes_only_on_command_once_its_test_is_conclusive() {
    let dir = tempfile::tempdir().unwrap();
    write_prompt(
        &dir.path().join("prompts"),
        "support",
        &[("chat", "Answer: "), ("chat", "Answer kindly: ")],
        "production = { version = 1 }\n",
    );
    let gw = Arc::new(
        Gateway::start(&config(
            &dir,
            r#"
            [routes.chat]
            targets = [{ provider = "mock", model = "ok" }]
            "#,
        ))
        .await,
    );
    // Started from the CLI; the first arm is the control.
    let (ok, out) = prompts_cli(
        &gw,
        &[
            "experiment",
            "start",
            "support",
            "production",
            "1=50",
            "2=50",
            "--primary",
            "resolved",
            "--min-samples",
            "30",
            "--max-error-rate",
            "0.1",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("start-rollout"), "{out}");
    let started = experiment(&gw, "support").await;
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(started["experiment"]["promote"], "manual");

    let (status, refused) = gw
        .admin(
            Method::POST,
            "/admin/prompts/support/experiments/production/promote",
            None,
        )
        .await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no arm beats the control"),
        "{refused}"
    );

    // 30% against 80% resolved: conclusive within a couple of hundred users.
    let mut rng = StdRng::seed_from_u64(8);
    let mut sent = 0;
    loop {
        traffic(
            &gw,
            users_of("support", sent..sent + 50),
            &[0.3, 0.8],
            &mut rng,
        )
        .await;
        sent += 50;
        tokio::time::sleep(Duration::from_millis(250)).await;
        if experiment(&gw, "support").await["state"] == "ready_to_promote" {
            break;
        }
        assert!(sent < 1_000, "not conclusive after {sent} users");
    }
    // Not promoted on its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(label_target(&gw, "support").await.get("rollout").is_some());

    let (ok, shown) = prompts_cli(&gw, &["experiment", "status", "support"]).await;
    assert!(ok, "{shown}");
    for expected in [
        "support/production: ready_to_promote",
        "v1\tcontrol",
        "v2\ttreatment",
        "primary resolved",
        "-> better",
        "pending: promote v2",
        "power:",
    ] {
        assert!(
            shown.contains(expected),
            "{expected:?} missing from:\n{shown}"
        );
    }

    let (ok, out) = prompts_cli(&gw, &["experiment", "promote", "support", "production"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("promoted v2"), "{out}");
    assert_eq!(label_target(&gw, "support").await, json!({"version": 2}));
    let made = decisions_of(&gw, "support").await;
    assert_eq!(made.len(), 1);
    assert_eq!(made[0]["actor"], "dana");
    assert_eq!(made[0]["action"], "experiment-promote");
    assert!(
        made[0]["evidence"]["reason"]
            .as_str()
            .unwrap()
            .contains("beats the control")
    );
    let (ok, history) = prompts_cli(&gw, &["history", "support"]).await;
    assert!(ok && history.contains("experiment-promote v2"), "{history}");
    assert!(
        gw.metrics().await.contains(
            "reprise_experiment_decisions_total{prompt=\"support\",decision=\"promote\"} 1"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_arm_breaches_the_p95_guardrail_and_bad_designs_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write_prompt(
        &dir.path().join("prompts"),
        "support",
        &[("chat", "Answer: "), ("slow", "Answer slowly: ")],
        r#"
[production]
rollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]
[production.experiment]
guardrails = { max_p95_latency_ms = 100 }
"#,
    );
    let gw = Arc::new(
        Gateway::start(&config(
            &dir,
            r#"
            [feedback.metrics.rating]
            type = "number"
            [routes.chat]
            targets = [{ provider = "mock", model = "ok" }]
            [routes.slow]
            targets = [{ provider = "mock", model = "slow-150" }]
            "#,
        ))
        .await,
    );
    let mut user = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while label_target(&gw, "support").await.get("rollout").is_some() {
        assert!(Instant::now() < deadline, "no decision within a minute");
        let batch: Vec<_> = (0..10)
            .map(|_| {
                user += 1;
                let (gw, user) = (Arc::clone(&gw), format!("user-{user}"));
                tokio::spawn(async move { ask(&gw, "support", &user).await })
            })
            .collect();
        for served in batch {
            assert_eq!(served.await.unwrap().status, 200);
        }
    }
    assert_eq!(label_target(&gw, "support").await, json!({"version": 1}));
    let made = decisions_of(&gw, "support").await;
    assert_eq!(made[0]["evidence"]["test"]["test"], "p95_latency");
    let slow_arm = arm(&made[0]["evidence"], 2);
    assert!(
        slow_arm["latency_p95_ms"].as_f64().unwrap() >= 150.0,
        "{slow_arm}"
    );
    eprintln!(
        "slow arm rolled back after {} requests",
        slow_arm["requests"]
    );
    assert!(slow_arm["requests"].as_u64().unwrap() <= 100, "{slow_arm}");

    for (experiment, field) in [
        (json!({"primary": "happiness"}), "target.experiment.primary"),
        (json!({"primary": "rating"}), "target.experiment.min_effect"),
        (
            json!({"primary": "resolved", "confidence": 1.5}),
            "target.experiment.confidence",
        ),
        (
            json!({"guardrails": {"metric_bounds": {"resolved": 2.0}}}),
            "target.experiment.guardrails.metric_bounds.resolved",
        ),
        (
            json!({"guardrails": {"max_error_rate": 0}}),
            "target.experiment.guardrails.max_error_rate",
        ),
    ] {
        let (status, refused) = gw
            .admin(
                Method::PUT,
                "/admin/prompts/support/labels/canary",
                Some(
                    json!({"rollout": [{"version": 1, "weight": 50}, {"version": 2, "weight": 50}],
                            "experiment": experiment}),
                ),
            )
            .await;
        assert_eq!(status, 400, "{refused}");
        assert_eq!(refused["error"]["param"], field, "{refused}");
    }
    let (status, refused) = gw
        .admin(
            Method::PUT,
            "/admin/prompts/support/labels/canary",
            Some(json!({"rollout": [{"version": 1, "weight": 100}],
                        "experiment": {"primary": "resolved"}})),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least two")
    );

    // A labels file with a bad experiment stops startup, naming the file and the field.
    let bad = tempfile::tempdir().unwrap();
    write_prompt(
        &bad.path().join("prompts"),
        "support",
        &[("chat", "A: "), ("chat", "B: ")],
        r#"
[production]
rollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]
[production.experiment]
primary = "nope"
"#,
    );
    let text = common::base_config(&gw.mock)
        + &config(
            &bad,
            "[routes.chat]\ntargets = [{ provider = \"mock\", model = \"ok\" }]",
        );
    let config = reprise::config::Config::from_toml_str(&text, "t.toml", &|_| None).unwrap();
    let error = reprise::server::start(&config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("labels.toml"), "{error}");
    assert!(error.contains("production.experiment.primary"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiments_evidence_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_prompt(
        &dir.path().join("prompts"),
        "support",
        &[("chat", "Answer: "), ("chat", "Answer kindly: ")],
        r#"
[production]
rollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]
[production.experiment]
primary = "resolved"
"#,
    );
    // Counts are flushed every 10 minutes here: only the shutdown's flush can save them.
    let text = config(
        &dir,
        r#"
        [routes.chat]
        targets = [{ provider = "mock", model = "ok" }]
        "#,
    )
    .replace("flush_interval = \"50ms\"", "flush_interval = \"10m\"");
    let gw = Arc::new(Gateway::start(&text).await);
    let mut rng = StdRng::seed_from_u64(1);
    traffic(&gw, users_of("support", 0..40), &[0.5, 0.5], &mut rng).await;
    let gw = Arc::into_inner(gw).unwrap();
    let Gateway { mock, server, .. } = gw;
    assert!(server.stop().await.unwrap());

    let gw = Gateway::start_with(mock, &text).await;
    let status = experiment(&gw, "support").await;
    let total = |field: &str| -> f64 {
        status["arms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                if field == "resolved" {
                    a["feedback"]["resolved"]["n"].as_f64().unwrap_or(0.0)
                } else {
                    a[field].as_f64().unwrap()
                }
            })
            .sum()
    };
    assert_eq!(total("requests"), 40.0, "{status}");
    assert_eq!(total("resolved"), 40.0, "{status}");
}
