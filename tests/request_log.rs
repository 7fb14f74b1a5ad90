//! The request log: every API request leaves one record, found by its `x-request-id` and by
//! filters through the admin API, kept across a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Gateway, KEY_A, KEY_B, user};
use serde_json::{Value, json};

fn config(dir: &tempfile::TempDir) -> String {
    format!(
        r#"
        [request_log]
        path = "{log}"
        [cache]
        path = "{store}"
        [prices.ok]
        input = 1000.0
        output = 1000.0
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        cache = {{ enabled = true }}
        "#,
        log = dir.path().join("requests").display(),
        store = dir.path().join("store").display(),
    )
}

/// The record of `id`, once the writer has stored it.
async fn record(gw: &Gateway, id: &str) -> Value {
    for _ in 0..150 {
        let (status, record) = gw
            .admin(reqwest::Method::GET, &format!("/admin/requests/{id}"), None)
            .await;
        if status == 200 {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no record of {id}");
}

fn request_id(response: &reqwest::Response) -> String {
    common::header(response, "x-request-id").unwrap().to_owned()
}

#[tokio::test]
async fn every_request_leaves_a_record_found_by_id_and_by_filters() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(&dir);
    let gw = Gateway::start(&text).await;
    let ask = json!({"model": "chat", "messages": user("hello"), "user": "end-user-7"});
    let miss = gw.chat(ask.clone()).await;
    assert_eq!(miss.status(), 200);
    let hit = gw.chat(ask).await;
    assert_eq!(common::header(&hit, "x-reprise-cache"), Some("hit"));
    let unknown = gw
        .chat(json!({"model": "nope", "messages": user("x")}))
        .await;
    assert_eq!(unknown.status(), 404);
    let other_tenant = gw
        .post(
            "/v1/chat/completions",
            KEY_B,
            json!({"model": "chat", "messages": user("b")}),
        )
        .await;
    assert_eq!(other_tenant.status(), 200);

    let first = record(&gw, &request_id(&miss)).await;
    assert_eq!(first["tenant"], "a", "{first}");
    assert_eq!(first["route"], "chat");
    assert_eq!(first["target"], "mock/ok");
    assert_eq!(first["cache"], "miss");
    assert_eq!(first["status"], 200);
    assert_eq!(first["user"], "end-user-7");
    assert_eq!(
        (
            first["input_tokens"].as_u64(),
            first["output_tokens"].as_u64()
        ),
        (Some(11), Some(7))
    );
    assert!((first["cost_usd"].as_f64().unwrap() - 0.018).abs() < 1e-9);
    let second = record(&gw, &request_id(&hit)).await;
    assert_eq!(second["cache"], "hit", "{second}");
    assert!((second["saved_usd"].as_f64().unwrap() - 0.018).abs() < 1e-9);
    let failed = record(&gw, &request_id(&unknown)).await;
    assert_eq!(
        (failed["status"].as_u64(), failed["error"].as_str()),
        (Some(404), Some("model_not_found"))
    );
    record(&gw, &request_id(&other_tenant)).await;

    let list = |query: &'static str| {
        let gw = &gw;
        async move {
            let (status, body) = gw
                .admin(
                    reqwest::Method::GET,
                    &format!("/admin/requests?{query}"),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            body["data"].as_array().unwrap().clone()
        }
    };
    let tenant_a = list("tenant=a").await;
    assert_eq!(tenant_a.len(), 3, "{tenant_a:?}");
    assert_eq!(tenant_a[0]["status"], 404, "newest first");
    assert_eq!(list("tenant=b").await.len(), 1);
    assert_eq!(list("cache=hit").await.len(), 1);
    assert_eq!(list("status=404").await.len(), 1);
    assert_eq!(list("tenant=a&limit=1").await.len(), 1);
    assert_eq!(
        list("since=2020-01-01T00:00:00Z&until=2020-01-02T00:00:00Z")
            .await
            .len(),
        0
    );
    let (status, body) = gw
        .admin(
            reqwest::Method::GET,
            "/admin/requests?since=yesterday",
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("since"))
    );
    let forbidden = gw
        .client
        .get(gw.url("/admin/requests"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403, "a gateway key cannot read the log");

    // The last request goes in just before the stop: a graceful stop stores it.
    let last = gw
        .chat(json!({"model": "chat", "messages": user("last")}))
        .await;
    let Gateway { mock, server, .. } = gw;
    assert!(server.stop().await.unwrap());
    let gw = Gateway::start_with(mock, &text).await;
    let kept = record(&gw, &request_id(&miss)).await;
    assert_eq!(kept, first, "the log survives a restart");
    let (status, _) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/requests/{}", request_id(&last)),
            None,
        )
        .await;
    assert_eq!(status, 200, "the record queued at the stop was stored");
}

#[tokio::test]
async fn a_record_lists_every_attempt_and_a_stream_is_recorded_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
        [request_log]
        path = "{log}"
        [prices.long-stream]
        input = 1000.0
        output = 1000.0
        [routes.chat]
        targets = [{{ provider = "mock", model = "status-503" }}, {{ provider = "mock2", model = "ok" }}]
        retry = {{ attempts_per_target = 2, backoff_base = "10ms" }}
        [routes.long]
        targets = [{{ provider = "mock", model = "long-stream" }}]
        "#,
        log = dir.path().join("requests").display(),
    );
    let gw = Gateway::start(&text).await;
    let answer = gw
        .chat(json!({"model": "chat", "messages": user("try twice, then fail over")}))
        .await;
    assert_eq!(answer.status(), 200);
    let kept = record(&gw, &request_id(&answer)).await;
    let attempts = kept["upstream"].as_array().unwrap();
    let summary: Vec<(&str, &str, &str, Option<u64>)> = attempts
        .iter()
        .map(|a| {
            (
                a["target"].as_str().unwrap(),
                a["kind"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
                a["status"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("mock/status-503", "first", "status_5xx", Some(503)),
            ("mock/status-503", "retry", "status_5xx", Some(503)),
            ("mock2/ok", "failover", "ok", Some(200)),
        ],
        "{kept}"
    );
    assert_eq!(kept["attempts"], 3);
    let starts: Vec<f64> = attempts
        .iter()
        .map(|a| a["start_ms"].as_f64().unwrap())
        .collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
    assert!(kept["trace_id"].as_str().unwrap().len() == 32);

    // A stream: its record is made when it ends, with the tokens and cost of its usage chunk.
    let stream = gw
        .chat(json!({"model": "long", "messages": user("go on"), "stream": true}))
        .await;
    let id = request_id(&stream);
    let body = stream.text().await.unwrap();
    assert!(body.contains("[DONE]"));
    let kept = record(&gw, &id).await;
    assert_eq!(kept["stream"], true);
    assert_eq!(
        (
            kept["input_tokens"].as_u64(),
            kept["output_tokens"].as_u64()
        ),
        (Some(11), Some(7))
    );
    assert!(
        (kept["cost_usd"].as_f64().unwrap() - 0.018).abs() < 1e-9,
        "{kept}"
    );
    assert!(
        kept["latency_ms"].as_f64().unwrap() >= 200.0 * 20.0 * 0.9,
        "{kept}"
    );
    let first_token = kept["first_token_ms"].as_f64().unwrap();
    assert!(first_token < 1000.0, "{first_token}");
    assert!(kept.get("error").is_none(), "{kept}");

    // A client that leaves mid-stream: recorded as such.
    let mut left = gw
        .chat(json!({"model": "long", "messages": user("leave early"), "stream": true}))
        .await;
    let id = request_id(&left);
    left.chunk().await.unwrap();
    drop(left);
    let kept = record(&gw, &id).await;
    assert_eq!(kept["error"], "client_closed", "{kept}");
    assert!(kept["latency_ms"].as_f64().unwrap() < 3000.0);

    let (status, errors) = gw
        .admin(reqwest::Method::GET, "/admin/requests?error=true", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(errors["data"].as_array().unwrap().len(), 1, "{errors}");
}

#[tokio::test]
async fn payloads_are_captured_only_where_configured_and_redacted_before_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
        [request_log]
        path = "{log}"
        [request_log.payloads]
        routes = ["support"]
        max_bytes = 400
        redact_fields = ["user"]
        redact_patterns = ['[\w.+-]+@[\w-]+\.[\w.]+']
        [routes.support]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        "#,
        log = dir.path().join("requests").display(),
    );
    let gw = Gateway::start(&text).await;
    let ask = |model: &str, text: &str, stream: bool| json!({"model": model, "messages": user(text), "user": "customer-42", "stream": stream});
    let captured = gw
        .chat(ask("support", "my mail is ann@example.com", false))
        .await;
    let kept = record(&gw, &request_id(&captured)).await;
    let payload = &kept["payload"];
    assert_eq!(
        payload["request"]["messages"][0]["content"], "my mail is [redacted]",
        "{kept}"
    );
    assert_eq!(payload["request"]["user"], "[redacted]");
    assert_eq!(
        payload["response"]["choices"][0]["message"]["content"],
        "echo: my mail is [redacted]"
    );
    let raw = std::fs::read_dir(dir.path().join("requests"))
        .unwrap()
        .flatten()
        .filter(|f| f.path().is_file())
        .any(|f| {
            std::fs::read(f.path())
                .unwrap()
                .windows(b"ann@example.com".len())
                .any(|w| w == b"ann@example.com")
        });
    assert!(!raw, "the unredacted address reached the disk");

    let streamed = gw
        .chat(ask("support", "stream to ann@example.com", true))
        .await;
    let id = request_id(&streamed);
    streamed.text().await.unwrap();
    let kept = record(&gw, &id).await;
    assert_eq!(
        kept["payload"]["response"], "echo: stream to [redacted]",
        "{kept}"
    );

    let big = gw.chat(ask("support", &"long ".repeat(200), false)).await;
    let kept = record(&gw, &request_id(&big)).await;
    assert_eq!(kept["payload"]["request"]["truncated"], true, "{kept}");
    assert!(kept["payload"]["request"]["text"].as_str().unwrap().len() <= 400);

    let elsewhere = gw.chat(ask("chat", "not captured", false)).await;
    let kept = record(&gw, &request_id(&elsewhere)).await;
    assert!(kept.get("payload").is_none(), "{kept}");
}

#[test]
fn a_payload_route_that_does_not_exist_is_refused_at_startup() {
    let text = r#"
        [auth]
        [request_log.payloads]
        routes = ["nope"]
        [providers.p]
        kind = "openai"
        base_url = "http://127.0.0.1:9/v1"
        [routes.chat]
        targets = [{ provider = "p", model = "m" }]
        "#;
    let error = reprise::config::Config::from_toml_str(text, "t.toml", &|_| None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("request_log.payloads.routes"), "{error}");
}

/// `reprise logs ARGS` against `gw`: whether it succeeded, and its output.
fn logs_cli(gw: &Gateway, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_reprise"))
        .arg("logs")
        .args(["--url", &gw.base])
        .args(args)
        .env("REPRISE_ADMIN_KEY", common::ADMIN)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn the_logs_cli_lists_shows_and_follows_requests() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&dir)).await;
    let first = gw
        .chat(json!({"model": "chat", "messages": user("one")}))
        .await;
    let id = request_id(&first);
    record(&gw, &id).await;
    gw.post(
        "/v1/chat/completions",
        KEY_B,
        json!({"model": "chat", "messages": user("two")}),
    )
    .await;
    let gw = std::sync::Arc::new(gw);

    let (ok, table) = {
        let gw = std::sync::Arc::clone(&gw);
        tokio::task::spawn_blocking(move || logs_cli(&gw, &["--tenant", "a"]))
            .await
            .unwrap()
    };
    assert!(ok, "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("time (UTC)"), "{table}");
    assert_eq!(
        lines.len(),
        2,
        "a header and tenant a's one request: {table}"
    );
    assert!(
        lines[1].contains(&id) && lines[1].contains("mock/ok"),
        "{table}"
    );

    let (ok, shown) = {
        let (gw, id) = (std::sync::Arc::clone(&gw), id.clone());
        tokio::task::spawn_blocking(move || logs_cli(&gw, &[&id]))
            .await
            .unwrap()
    };
    assert!(ok, "{shown}");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["upstream"][0]["target"], "mock/ok");

    let (ok, missing) = {
        let gw = std::sync::Arc::clone(&gw);
        tokio::task::spawn_blocking(move || logs_cli(&gw, &["no-such-request"]))
            .await
            .unwrap()
    };
    assert!(!ok && missing.contains("404"), "{missing}");

    // A live tail: only tenant b's requests, one JSON record per line, as they finish.
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_reprise"))
        .args([
            "logs", "--url", &gw.base, "--follow", "--json", "--tenant", "b", "--since", "1s",
        ])
        .env("REPRISE_ADMIN_KEY", common::ADMIN)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = line_tx.send(line);
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.chat(json!({"model": "chat", "messages": user("tenant a, not shown")}))
        .await;
    let followed = gw
        .post(
            "/v1/chat/completions",
            KEY_B,
            json!({"model": "chat", "messages": user("tenant b, live")}),
        )
        .await;
    let followed_id = request_id(&followed);
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        while let Ok(line) = line_rx.recv_timeout(Duration::from_secs(10)) {
            let record: Value = serde_json::from_str(&line).unwrap();
            let found = record["id"] == followed_id.as_str();
            seen.push(record);
            if found {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    tail.kill().unwrap();
    tail.wait().unwrap();
    assert!(
        seen.last()
            .is_some_and(|r| r["tenant"] == "b" && r["upstream"].is_array()),
        "{seen:?}"
    );
    assert!(seen.iter().all(|r| r["tenant"] == "b"), "{seen:?}");
}

/// The log's files, in bytes.
fn size_of_dir(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|f| f.metadata().unwrap().len())
        .sum()
}

#[tokio::test]
async fn retention_keeps_the_log_within_its_size_dropping_the_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("requests");
    let text = format!(
        r#"
        [request_log]
        path = "{log}"
        max_bytes = 1048576
        [request_log.payloads]
        routes = ["chat"]
        max_bytes = 8192
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        "#,
        log = log_dir.display(),
    );
    let gw = Gateway::start(&text).await;
    let mut ids = Vec::new();
    // About 9 KB a record (the request and its echo, 4 KB each): three times the bound.
    for i in 0..330 {
        let text = format!("{i:04} {}", "x".repeat(4000));
        let answer = gw
            .chat(json!({"model": "chat", "messages": user(&text)}))
            .await;
        ids.push(request_id(&answer));
    }
    record(&gw, ids.last().unwrap()).await;
    let size = size_of_dir(&log_dir);
    assert!(size <= 1_048_576 + 64 * 1024, "{size} bytes on disk");
    let (status, _) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/requests/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(status, 404, "the oldest record went first");
    let (_, listed) = gw
        .admin(reqwest::Method::GET, "/admin/requests?limit=1000", None)
        .await;
    let kept = listed["data"].as_array().unwrap().len();
    assert!((60..330).contains(&kept), "{kept} records kept");
}

/// `GET /admin/overview`'s totals once `expected` requests are counted (records are added as
/// they are queued, and after a restart once the log is read back).
async fn overview(gw: &Gateway, query: &str, expected: u64) -> Value {
    for _ in 0..250 {
        let (status, body) = gw
            .admin(
                reqwest::Method::GET,
                &format!("/admin/overview{query}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        if body["total"]["requests"] == expected {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the overview never counted {expected} requests");
}

#[tokio::test]
async fn the_overview_counts_requests_over_time_by_route_and_tenant_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(&dir);
    let gw = Gateway::start(&text).await;
    let ask = json!({"model": "chat", "messages": user("hello")});
    gw.chat(ask.clone()).await;
    // The exact entry lands after the answer.
    let mut hit = gw.chat(ask.clone()).await;
    let mut total = 2;
    for _ in 0..100 {
        if common::header(&hit, "x-reprise-cache") == Some("hit") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        hit = gw.chat(ask.clone()).await;
        total += 1;
    }
    assert_eq!(common::header(&hit, "x-reprise-cache"), Some("hit"));
    gw.post("/v1/chat/completions", KEY_B, ask.clone()).await;
    gw.chat(json!({"model": "nope", "messages": user("x")}))
        .await;
    total += 2;
    let before = overview(&gw, "", total).await;
    let body = &before;
    assert_eq!(body["window"], "1h");
    assert_eq!(body["step_seconds"], 60);
    assert_eq!(body["points"].as_array().unwrap().len(), 60);
    let points_sum: u64 = body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(points_sum, total);
    assert_eq!(body["total"]["exact_hits"], 1);
    assert!(body["total"]["spend_usd"].as_f64().unwrap() > 0.0);
    assert!(body["total"]["saved_usd"].as_f64().unwrap() > 0.0);
    assert!(body["total"]["latency_p95_ms"].as_f64().unwrap() > 0.0);
    let tenants: Vec<&str> = body["by_tenant"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, ["a", "b"]);
    assert_eq!(body["targets"][0]["target"], "mock/ok");

    let b = overview(&gw, "?tenant=b&window=7d", 1).await;
    assert_eq!(b["points"].as_array().unwrap().len(), 168);
    assert_eq!(b["by_tenant"].as_array().unwrap().len(), 1);

    let (status, body) = gw
        .admin(reqwest::Method::GET, "/admin/overview?window=2h", None)
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("window"))
    );
    let forbidden = gw
        .client
        .get(gw.url("/admin/overview"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(
        forbidden.status(),
        403,
        "a gateway key cannot read the figures"
    );

    // The figures are read back from the log after a restart.
    let Gateway { mock, server, .. } = gw;
    assert!(server.stop().await.unwrap());
    let gw = Gateway::start_with(mock, &text).await;
    let again = overview(&gw, "", total).await;
    assert_eq!(again["total"], before["total"]);
    assert_eq!(again["by_route"], before["by_route"]);
    assert_eq!(again["by_tenant"], before["by_tenant"]);
}
