//! Feedback on prompt requests (`POST /v1/feedback`): kept with the prompt version and arm that
//! served the request, only for the tenant that made it, replacing a repeated report, valid
//! across a restart and across replicas sharing Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis_server::RedisServer;
use common::{Gateway, KEY_A, KEY_B, Mock, header, user};
use serde_json::{Value, json};

const PROMPT: &str = r#"
model = "chat"

[[messages]]
role = "user"
content = "{{ question }}"

[variables.question]
type = "string"
free_text = true
"#;

const LABELS: &str = r#"
production = { version = 1 }

[canary]
rollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]
salt = "feedback-salt"
"#;

fn config(dir: &tempfile::TempDir, store: &str) -> String {
    let prompts = dir.path().join("prompts");
    for (file, text) in [
        ("reply/v1.toml", PROMPT.to_owned()),
        (
            "reply/v2.toml",
            PROMPT.replace("{{ question }}", "Briefly: {{ question }}"),
        ),
        ("reply/labels.toml", LABELS.to_owned()),
    ] {
        let path = prompts.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    format!(
        r#"
        [cache]
        {store}
        [prompts]
        dir = "{prompts}"
        [feedback.metrics.thumbs_up]
        type = "boolean"
        [feedback.metrics.rating]
        type = "number"
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        cache = {{ enabled = true }}
        "#,
        prompts = prompts.display()
    )
}

fn sled(dir: &tempfile::TempDir) -> String {
    format!("path = \"{}\"", dir.path().join("store").display())
}

async fn ask(gw: &Gateway, key: &str, question: &str, user_id: &str) -> reqwest::Response {
    let answer = gw
        .chat_with(
            key,
            json!({"model": "ignored", "user": user_id,
                   "prompt": {"id": "reply", "label": "canary", "variables": {"question": question}}}),
            &[],
        )
        .await;
    assert_eq!(answer.status(), 200);
    answer
}

fn request_id(response: &reqwest::Response) -> String {
    header(response, "x-request-id").unwrap().to_owned()
}

/// `POST /v1/feedback` with `key`: its status and body. The attribution is written off the
/// response path, so a first 404 is retried briefly.
async fn report(gw: &Gateway, key: &str, body: Value) -> (u16, Value) {
    let mut last = (0, Value::Null);
    for _ in 0..50 {
        let response = gw.post("/v1/feedback", key, body.clone()).await;
        let status = response.status().as_u16();
        last = (status, response.json().await.unwrap_or(Value::Null));
        if status != 404 {
            return last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    last
}

#[tokio::test]
async fn feedback_is_kept_with_the_version_and_arm_that_served_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(&dir, &sled(&dir));
    let gw = Gateway::start(&text).await;
    let answer = ask(&gw, KEY_A, "how do I reset my password?", "user-1").await;
    let id = request_id(&answer);
    let version: u32 = header(&answer, "x-reprise-prompt-version")
        .unwrap()
        .parse()
        .unwrap();
    let arm = header(&answer, "x-reprise-prompt-arm").unwrap().to_owned();

    let (status, recorded) = report(
        &gw,
        KEY_A,
        json!({"request_id": id, "metric": "thumbs_up", "value": true, "comment": "helpful"}),
    )
    .await;
    assert_eq!(status, 200, "{recorded}");
    assert_eq!(recorded["prompt"], "reply");
    assert_eq!(recorded["version"], version);
    assert_eq!(recorded["arm"], arm.as_str());
    assert_eq!(recorded["value"], 1.0);
    assert_eq!(recorded["cached"], false);

    // Another metric on the same request is kept apart; a repeat replaces.
    let (status, _) = report(
        &gw,
        KEY_A,
        json!({"request_id": id, "metric": "rating", "value": 4}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, again) = report(
        &gw,
        KEY_A,
        json!({"request_id": id, "metric": "thumbs_up", "value": false}),
    )
    .await;
    assert_eq!((status, again["value"].as_f64()), (200, Some(0.0)));

    // Wrong shapes are 400, naming the field.
    for (body, param) in [
        (
            json!({"request_id": id, "metric": "nps", "value": 3}),
            "metric",
        ),
        (
            json!({"request_id": id, "metric": "thumbs_up", "value": 1}),
            "value",
        ),
        (
            json!({"request_id": id, "metric": "rating", "value": "five"}),
            "value",
        ),
        (
            json!({"request_id": id, "metric": "rating", "value": 1, "comment": "x".repeat(5000)}),
            "comment",
        ),
    ] {
        let response = gw.post("/v1/feedback", KEY_A, body).await;
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
    }

    // Another tenant cannot score this request, nor learn that it exists.
    let response = gw
        .post(
            "/v1/feedback",
            KEY_B,
            json!({"request_id": id, "metric": "thumbs_up", "value": true}),
        )
        .await;
    assert_eq!(response.status(), 404);

    // A request that used no prompt has no version to score.
    let plain = gw
        .chat(json!({"model": "chat", "messages": user("no prompt")}))
        .await;
    let (status, _) = report(
        &gw,
        KEY_A,
        json!({"request_id": request_id(&plain), "metric": "thumbs_up", "value": true}),
    )
    .await;
    assert_eq!(status, 404);

    // A cached answer is marked as such: a replay, not a new sample of its version.
    let cached = ask(&gw, KEY_A, "how do I reset my password?", "user-1").await;
    assert_eq!(header(&cached, "x-reprise-cache"), Some("hit"));
    let (status, recorded) = report(
        &gw,
        KEY_A,
        json!({"request_id": request_id(&cached), "metric": "rating", "value": 5}),
    )
    .await;
    assert_eq!((status, recorded["cached"].as_bool()), (200, Some(true)));

    // Which version served a request survives a restart.
    let Gateway { mock, server, .. } = gw;
    assert!(server.stop().await.unwrap());
    let gw = Gateway::start_with(mock, &text).await;
    let (status, recorded) = report(
        &gw,
        KEY_A,
        json!({"request_id": id, "metric": "rating", "value": 2}),
    )
    .await;
    assert_eq!(
        (status, recorded["version"].as_u64()),
        (200, Some(u64::from(version)))
    );
}

#[test]
fn feedback_without_a_prompt_store_is_refused_at_startup() {
    let text = r#"
        [auth]
        [feedback.metrics.ok]
        type = "boolean"
        [providers.p]
        kind = "openai"
        base_url = "http://127.0.0.1:9/v1"
        [routes.chat]
        targets = [{ provider = "p", model = "m" }]
        "#;
    let error = reprise::config::Config::from_toml_str(text, "t.toml", &|_| None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("feedback"), "{error}");
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn feedback_reaches_a_request_another_replica_answered() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &dir,
        &format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
    );
    let mock = Mock::start().await;
    let one = Gateway::start_with(mock.clone(), &text).await;
    let two = Gateway::start_with(mock, &text).await;
    let answer = ask(&one, KEY_A, "answered by the first replica", "user-9").await;
    let (status, recorded) = report(
        &two,
        KEY_A,
        json!({"request_id": request_id(&answer), "metric": "thumbs_up", "value": true}),
    )
    .await;
    assert_eq!(status, 200, "{recorded}");
    assert_eq!(recorded["prompt"], "reply");
}

#[tokio::test]
async fn results_per_version_count_each_request_once_with_replays_apart() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&dir, &sled(&dir))).await;
    let mut expected: std::collections::BTreeMap<u64, (u64, f64)> = Default::default();
    let mut first = None;
    for i in 0..12 {
        let answer = ask(&gw, KEY_A, &format!("question {i}"), &format!("user-{i}")).await;
        let version: u64 = header(&answer, "x-reprise-prompt-version")
            .unwrap()
            .parse()
            .unwrap();
        let good = i % 3 != 0;
        let id = request_id(&answer);
        let (status, _) = report(
            &gw,
            KEY_A,
            json!({"request_id": id, "metric": "thumbs_up", "value": good}),
        )
        .await;
        assert_eq!(status, 200);
        let entry = expected.entry(version).or_default();
        entry.0 += 1;
        entry.1 += f64::from(u8::from(good));
        first.get_or_insert((id, version, good));
    }
    // A change of mind replaces the earlier report: the count stays, the sum moves.
    let (id, version, good) = first.unwrap();
    let (status, _) = report(
        &gw,
        KEY_A,
        json!({"request_id": id, "metric": "thumbs_up", "value": !good}),
    )
    .await;
    assert_eq!(status, 200);
    expected.get_mut(&version).unwrap().1 += if good { -1.0 } else { 1.0 };
    // A replay from the cache is counted apart.
    let replay = ask(&gw, KEY_A, "question 1", "user-1").await;
    assert_eq!(header(&replay, "x-reprise-cache"), Some("hit"));
    let replay_version: u64 = header(&replay, "x-reprise-prompt-version")
        .unwrap()
        .parse()
        .unwrap();
    let (status, _) = report(
        &gw,
        KEY_A,
        json!({"request_id": request_id(&replay), "metric": "thumbs_up", "value": true}),
    )
    .await;
    assert_eq!(status, 200);

    let (status, results) = gw
        .admin(reqwest::Method::GET, "/admin/prompts/reply/feedback", None)
        .await;
    assert_eq!(status, 200, "{results}");
    let rows = results["data"].as_array().unwrap();
    for (version, (n, sum)) in &expected {
        let row = rows
            .iter()
            .find(|r| r["version"] == *version && r["metric"] == "thumbs_up")
            .unwrap_or_else(|| panic!("no row for version {version}: {results}"));
        assert_eq!(row["fresh"]["n"], *n, "{row}");
        let mean = row["fresh"]["mean"].as_f64().unwrap();
        assert!((mean - sum / *n as f64).abs() < 1e-9, "{row}");
        if *n >= 2 {
            let ci = row["fresh"]["ci95"].as_array().unwrap();
            assert!(ci[0].as_f64().unwrap() <= mean && mean <= ci[1].as_f64().unwrap());
        }
    }
    let replayed = rows
        .iter()
        .find(|r| r["version"] == replay_version && r["metric"] == "thumbs_up")
        .unwrap();
    assert_eq!(replayed["cached"]["n"], 1, "{replayed}");

    let metrics = gw.metrics().await;
    for (version, (n, _)) in &expected {
        let line = format!(
            "reprise_prompt_feedback_count{{prompt=\"reply\",version=\"{version}\",metric=\"thumbs_up\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line} not in the metrics");
    }

    let forbidden = gw
        .client
        .get(gw.url("/admin/prompts/reply/feedback"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
}

/// Keys in `redis` matching `pattern`, by `redis-cli` (installed with the server).
fn redis_keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let output = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--scan",
            "--pattern",
            pattern,
        ])
        .output()
        .expect("redis-cli is installed with redis-server");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn feedback_older_than_its_retention_is_deleted_from_the_store() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &dir,
        &format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
    )
    .replace(
        "[feedback.metrics.thumbs_up]",
        "[feedback]\nretention = \"2s\"\n[feedback.metrics.thumbs_up]",
    );
    let gw = Gateway::start(&text).await;
    let answer = ask(&gw, KEY_A, "kept for two seconds", "user-1").await;
    let id = request_id(&answer);
    let (status, _) = report(
        &gw,
        KEY_A,
        json!({"request_id": id, "metric": "thumbs_up", "value": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(redis_keys(&redis, "*feedback/v1/served/*").len(), 1);
    assert_eq!(redis_keys(&redis, "*feedback/v1/value/*").len(), 1);

    // The sweep runs every half retention: within about 3 s of the answer, both are gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while !redis_keys(&redis, "*feedback/v1/*/a/*").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "expired feedback still stored: {:?}",
            redis_keys(&redis, "*feedback/v1/*")
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The per-version tally (a sum, not a report) stays; the request can no longer be scored.
    assert_eq!(redis_keys(&redis, "*feedback/v1/stats/*").len(), 1);
    let response = gw
        .post(
            "/v1/feedback",
            KEY_A,
            json!({"request_id": id, "metric": "thumbs_up", "value": false}),
        )
        .await;
    assert_eq!(response.status(), 404);
}
