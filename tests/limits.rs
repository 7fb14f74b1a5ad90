//! Tokens per minute, concurrent requests, budgets and the usage book, through the OpenAI surface
//! and the admin API: parallel requests cannot overspend a budget, spend survives a restart and
//! is shared by replicas on Redis, cache hits are free but counted as money saved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::redis_server::RedisServer;
use common::{Gateway, KEY_A, user};
use serde_json::{Value, json};

/// Every mock answer reports 11 prompt and 7 completion tokens; at these prices one costs
/// (11 + 7) × 1000 / 1e6 = 0.018 USD.
const COST: f64 = 0.018;

fn config(store: &str, extra: &str) -> String {
    format!(
        r#"
        [keys]
        [cache]
        {store}
        {extra}
        [prices.ok]
        input = 1000.0
        output = 1000.0
        [prices.slow-200]
        input = 1000.0
        output = 1000.0
        [prices.slow-300]
        input = 1000.0
        output = 1000.0
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.slow]
        targets = [{{ provider = "mock", model = "slow-200" }}]
        [routes.slower]
        targets = [{{ provider = "mock", model = "slow-300" }}]
        [routes.cached]
        targets = [{{ provider = "mock", model = "ok" }}]
        cache = {{ enabled = true }}
        [routes.long]
        targets = [{{ provider = "mock", model = "long-stream" }}]
        [routes.embed]
        targets = [{{ provider = "mock", model = "emb" }}]
        [prices.emb]
        input = 1000.0
        output = 0.0
        [routes.unpriced]
        targets = [{{ provider = "mock", model = "free" }}]
        "#
    )
}

fn sled(dir: &tempfile::TempDir) -> String {
    format!("path = \"{}\"", dir.path().join("store").display())
}

async fn create_key(gw: &Gateway, limits: Value) -> (String, String) {
    gw.create_key(json!({"name": "limited", "tenant": "t", "limits": limits}))
        .await
}

async fn chat(gw: &Gateway, secret: &str, body: Value) -> reqwest::Response {
    gw.chat_with(secret, body, &[]).await
}

fn ask(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": user(text), "max_tokens": 7})
}

async fn key_view(gw: &Gateway, id: &str) -> Value {
    let (status, view) = gw
        .admin(reqwest::Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(status, 200, "{view}");
    view
}

/// Polls the key's budget until nothing is held (every request settled).
async fn settled_budget(gw: &Gateway, id: &str) -> Value {
    for _ in 0..150 {
        let view = key_view(gw, id).await;
        if view["budget"]["held_usd"].as_f64() == Some(0.0) {
            return view["budget"].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the budget of {id} still holds money: {}",
        key_view(gw, id).await
    );
}

/// Sends requests from `workers` concurrent clients, each until the budget refuses it twice in
/// a row (a refusal can be due to holds of requests still settling); how many were answered.
async fn spend_until_refused(gateways: &[&Gateway], secret: &str, workers: usize) -> usize {
    let answered = Arc::new(AtomicUsize::new(0));
    futures::future::join_all((0..workers).map(|i| {
        let gw = gateways[i % gateways.len()];
        let answered = Arc::clone(&answered);
        async move {
            let mut refused = false;
            loop {
                let response = chat(gw, secret, ask("slow", &format!("question {i}"))).await;
                match response.status().as_u16() {
                    200 => {
                        answered.fetch_add(1, Ordering::Relaxed);
                        refused = false;
                    }
                    429 => {
                        let body: Value = response.json().await.unwrap();
                        assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
                        assert_eq!(body["error"]["type"], "insufficient_quota");
                        if refused {
                            return;
                        }
                        refused = true;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    other => panic!("status {other}"),
                }
            }
        }
    }))
    .await;
    answered.load(Ordering::Relaxed)
}

/// What one request of `spend_until_refused` holds at most: its input bound ("question N" is
/// at most 12 bytes, plus 8 for the message and 3 for the reply) and its 7 output tokens.
const HOLD: f64 = (12.0 + 8.0 + 3.0 + 7.0) * 1000.0 / 1e6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_parallel_requests_never_overspend_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&sled(&dir), "")).await;
    let budget = 50.0 * COST;
    let (id, secret) = create_key(&gw, json!({"budget": {"usd": budget, "period": "day"}})).await;

    let answered = spend_until_refused(&[&gw], &secret, 200).await;
    let standing = settled_budget(&gw, &id).await;
    let spent = standing["spent_usd"].as_f64().unwrap();
    eprintln!(
        "budget {budget:.3} USD, 200 concurrent clients: {answered} answered, {spent:.4} USD spent"
    );
    assert!(
        spent <= budget + HOLD + 1e-9,
        "overspent: {spent} of {budget}"
    );
    assert!(
        spent >= budget - 2.0 * HOLD,
        "the budget was not used up: {spent} of {budget}"
    );
    assert!(
        (spent - answered as f64 * COST).abs() < 1e-6,
        "spend is what was answered"
    );
    assert_eq!(
        gw.mock.calls("slow-200"),
        answered,
        "nothing went upstream uncounted"
    );
    assert_eq!(
        standing["remaining_usd"].as_f64().unwrap(),
        (budget - spent).max(0.0)
    );
}

#[tokio::test]
async fn spend_survives_a_restart_and_a_spent_budget_stays_spent() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &sled(&dir),
        "[tenants.a]\nbudget = { usd = 0.05, period = \"month\" }",
    );
    let gw = Gateway::start(&text).await;
    let (id, secret) = create_key(&gw, json!({"budget": {"usd": 1.0}})).await;
    for _ in 0..3 {
        assert_eq!(chat(&gw, &secret, ask("chat", "hi")).await.status(), 200);
    }
    // Tenant a's static key: two requests fit 0.05 USD, the third's hold does not.
    let statuses: Vec<u16> = futures::future::join_all(
        (0..2).map(|_| async { chat(&gw, KEY_A, ask("chat", "hi")).await.status().as_u16() }),
    )
    .await;
    assert_eq!(statuses, [200, 200]);
    let before = settled_budget(&gw, &id).await;
    assert!(
        (before["spent_usd"].as_f64().unwrap() - 3.0 * COST).abs() < 1e-9,
        "{before}"
    );
    let Gateway { mock, server, .. } = gw;
    assert!(server.stop().await.unwrap());

    let gw = Gateway::start_with(mock, &text).await;
    let after = settled_budget(&gw, &id).await;
    assert_eq!(after["spent_usd"], before["spent_usd"], "{after}");
    let refused = chat(&gw, KEY_A, ask("chat", "hi")).await;
    assert_eq!(refused.status(), 429, "the tenant's spend survived too");
    assert_eq!(common::header(&refused, "x-should-retry"), Some("false"));
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant"),
        "{body}"
    );
    // The usage book was written on shutdown: the same requests, after the restart.
    let (_, usage) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/usage?key={id}&group_by=key"),
            None,
        )
        .await;
    assert_eq!(usage["data"][0]["requests"], 3, "{usage}");
    let (_, tenants) = gw.admin(reqwest::Method::GET, "/admin/tenants", None).await;
    let tenant = &tenants["data"][0];
    assert_eq!(tenant["tenant"], "a", "{tenants}");
    assert!((tenant["budget"]["spent_usd"].as_f64().unwrap() - 2.0 * COST).abs() < 1e-9);
    assert!((tenant["spend"]["today_usd"].as_f64().unwrap() - 2.0 * COST).abs() < 1e-9);
    assert!((usage["data"][0]["cost_usd"].as_f64().unwrap() - 3.0 * COST).abs() < 1e-9);
}

#[tokio::test]
async fn tokens_per_minute_count_the_estimate_then_the_real_usage() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&sled(&dir), "")).await;
    let (_, secret) = create_key(&gw, json!({"tpm": 100})).await;
    // "hello" is estimated at 2 + 4 + 3 = 9 input tokens, plus 50 asked for: 59 at admission;
    // the mock's usage then says 18.
    let body = json!({"model": "chat", "messages": user("hello"), "max_tokens": 50});
    let first = chat(&gw, &secret, body.clone()).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        common::header(&first, "x-ratelimit-limit-tokens"),
        Some("100")
    );
    assert_eq!(
        common::header(&first, "x-ratelimit-remaining-tokens"),
        Some("41")
    );
    assert!(
        common::header(&first, "x-ratelimit-reset-tokens")
            .unwrap()
            .ends_with('s')
    );
    let mut remaining = Vec::new();
    for _ in 0..2 {
        // The correction is written just after the answer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = chat(&gw, &secret, body.clone()).await;
        assert_eq!(response.status(), 200);
        remaining.push(
            common::header(&response, "x-ratelimit-remaining-tokens")
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        remaining,
        ["23", "5"],
        "each answer counted at its 18 real tokens"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = chat(&gw, &secret, body.clone()).await;
    assert_eq!(refused.status(), 429);
    assert!(common::header(&refused, "retry-after").is_some());
    assert_eq!(
        common::header(&refused, "x-ratelimit-remaining-tokens"),
        Some("46")
    );
    let error: Value = refused.json().await.unwrap();
    assert_eq!(
        (
            error["error"]["type"].as_str(),
            error["error"]["code"].as_str()
        ),
        (Some("tokens"), Some("rate_limit_exceeded"))
    );

    let huge = json!({"model": "chat", "messages": user("hello"), "max_tokens": 500});
    let response = chat(&gw, &secret, huge).await;
    assert_eq!(
        response.status(),
        400,
        "a request over the whole limit can never pass"
    );
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "max_tokens");
}

#[tokio::test]
async fn concurrent_requests_beyond_the_limit_get_429_until_a_slot_frees() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&sled(&dir), "")).await;
    let (_, secret) = create_key(&gw, json!({"max_concurrent": 2})).await;
    let responses = futures::future::join_all(
        (0..5).map(|i| chat(&gw, &secret, ask("slower", &format!("q{i}")))),
    )
    .await;
    let mut statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    let refused = responses.iter().find(|r| r.status() == 429).unwrap();
    assert_eq!(common::header(refused, "retry-after"), Some("1"));

    // A stream holds its slot until it ends, or until its client goes away.
    let long = json!({"model": "long", "messages": user("s"), "stream": true});
    let first = chat(&gw, &secret, long.clone()).await;
    assert_eq!(first.status(), 200);
    let second = chat(&gw, &secret, long.clone()).await;
    assert_eq!(second.status(), 200);
    assert_eq!(
        chat(&gw, &secret, ask("chat", "x")).await.status(),
        429,
        "two streams open"
    );
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        chat(&gw, &secret, ask("chat", "x")).await.status(),
        200,
        "the slot of a stream whose client left is free"
    );
    drop(second);
}

#[tokio::test]
async fn cache_hits_are_free_against_a_budget_and_counted_as_money_saved() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&sled(&dir), "")).await;
    // Room for one miss (its hold is (5 + 8 + 3 + 7) × 1000 / 1e6 = 0.023), not two.
    let (id, secret) = create_key(&gw, json!({"budget": {"usd": 0.03, "soft": 0.5}})).await;
    let first = chat(&gw, &secret, ask("cached", "hello")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(common::header(&first, "x-reprise-cache"), Some("miss"));
    assert!(
        common::header(&first, "x-reprise-budget-warning").is_some(),
        "past half of the budget once the hold is counted"
    );
    let remaining: f64 = common::header(&first, "x-reprise-budget-remaining-usd")
        .unwrap()
        .parse()
        .unwrap();
    assert!((remaining - (0.03 - 0.023)).abs() < 1e-6, "{remaining}");
    settled_budget(&gw, &id).await;
    let refused = chat(&gw, &secret, ask("cached", "something new")).await;
    assert_eq!(refused.status(), 429, "a miss needs budget");
    for _ in 0..3 {
        let hit = chat(&gw, &secret, ask("cached", "hello")).await;
        assert_eq!(
            hit.status(),
            200,
            "a hit costs nothing: it is served past the budget"
        );
        assert_eq!(common::header(&hit, "x-reprise-cache"), Some("hit"));
    }
    let (_, usage) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/usage?key={id}&group_by=key,route,model"),
            None,
        )
        .await;
    let row = &usage["data"][0];
    assert_eq!(
        (row["route"].as_str(), row["model"].as_str()),
        (Some("cached"), Some("ok")),
        "{usage}"
    );
    assert_eq!(
        row["requests"], 4,
        "the refused request is not usage: {usage}"
    );
    assert_eq!(row["cache_hits"], 3);
    assert_eq!(
        (row["input_tokens"].as_u64(), row["output_tokens"].as_u64()),
        (Some(11), Some(7))
    );
    assert!(
        (row["cost_usd"].as_f64().unwrap() - COST).abs() < 1e-9,
        "{row}"
    );
    assert_eq!(row["tokens_saved"], 3 * 18);
    assert!(
        (row["saved_usd"].as_f64().unwrap() - 3.0 * COST).abs() < 1e-9,
        "{row}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"reprise_limit_refusals_total{scope="key",limit="budget"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"reprise_budget_soft_limit_total{scope="key",limit="budget"} 1"#));
}

#[tokio::test]
async fn a_budget_on_an_unpriced_model_is_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&sled(&dir), "")).await;
    let (_, secret) = create_key(&gw, json!({"budget": {"usd": 10}})).await;
    let response = chat(&gw, &secret, ask("unpriced", "hi")).await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_priced");
    assert!(!body.to_string().contains("127.0.0.1"));
    let (_, unlimited) = create_key(&gw, json!({})).await;
    assert_eq!(
        chat(&gw, &unlimited, ask("unpriced", "hi")).await.status(),
        200
    );

    let (status, body) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"name": "x", "tenant": "t", "limits": {"budget": {"usd": -1}}})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("limits.budget"))
    );
}

#[tokio::test]
async fn the_usage_book_answers_by_day_tenant_key_route_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&sled(&dir), "")).await;
    let (id, secret) = create_key(&gw, json!({})).await;
    for (key, model) in [
        (secret.as_str(), "chat"),
        (secret.as_str(), "slow"),
        (KEY_A, "chat"),
    ] {
        assert_eq!(chat(&gw, key, ask(model, "hi")).await.status(), 200);
    }
    let (status, by_key) = gw
        .admin(
            reqwest::Method::GET,
            "/admin/usage?group_by=tenant,key",
            None,
        )
        .await;
    assert_eq!(status, 200, "{by_key}");
    let rows = by_key["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{by_key}");
    let ours = rows.iter().find(|r| r["key"] == id.as_str()).unwrap();
    assert_eq!(
        (ours["tenant"].as_str(), ours["requests"].as_u64()),
        (Some("t"), Some(2))
    );
    let static_key = rows.iter().find(|r| r["key"] == "-").unwrap();
    assert_eq!(static_key["tenant"], "a");
    assert_eq!(by_key["total"]["requests"], 3);
    assert!((by_key["total"]["cost_usd"].as_f64().unwrap() - 3.0 * COST).abs() < 1e-9);

    let (_, by_model) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/usage?key={id}&group_by=model"),
            None,
        )
        .await;
    let models: Vec<&str> = by_model["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["ok", "slow-200"]);

    for (query, param) in [
        ("group_by=colour", "group_by"),
        ("from=yesterday", "from"),
        ("from=2026-12-02&to=2026-12-01", "to"),
    ] {
        let (status, body) = gw
            .admin(reqwest::Method::GET, &format!("/admin/usage?{query}"), None)
            .await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some(param)),
            "{query}"
        );
    }
    let response = gw
        .client
        .get(gw.url("/admin/usage"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "a gateway key cannot read usage");
}

#[tokio::test]
async fn a_failed_request_gives_its_hold_back_and_counts_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(&sled(&dir), "")
        + "\n[routes.broken]\ntargets = [{ provider = \"mock\", model = \"status-500\" }]\nretry = { attempts_per_target = 1 }\n[prices.status-500]\ninput = 1000.0\noutput = 1000.0\n";
    let gw = Gateway::start(&text).await;
    let (id, secret) = create_key(&gw, json!({"budget": {"usd": 0.03}})).await;
    for _ in 0..3 {
        let response = chat(&gw, &secret, ask("broken", "hello")).await;
        assert!(response.status().is_server_error());
        settled_budget(&gw, &id).await;
    }
    let standing = settled_budget(&gw, &id).await;
    assert_eq!(standing["spent_usd"], 0.0, "{standing}");
    assert_eq!(chat(&gw, &secret, ask("chat", "hello")).await.status(), 200);
    let (_, usage) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/usage?key={id}&group_by=route"),
            None,
        )
        .await;
    let broken = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "broken")
        .unwrap();
    assert_eq!(
        (broken["requests"].as_u64(), broken["errors"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(broken["cost_usd"], 0.0);
}

/// Two gateways sharing one new `redis-server` (kept running while the first is held).
async fn two_replicas_on_redis() -> (RedisServer, Gateway, Gateway) {
    let redis = RedisServer::start();
    let text = config(
        &format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
        "",
    );
    let one = Gateway::start(&text).await;
    let two = Gateway::start(&text).await;
    (redis, one, two)
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_share_one_budget_and_never_overspend_it() {
    let (_redis, one, two) = two_replicas_on_redis().await;
    let budget = 50.0 * COST;
    let (id, secret) = create_key(&one, json!({"budget": {"usd": budget, "period": "day"}})).await;

    let answered = spend_until_refused(&[&one, &two], &secret, 200).await;
    let standing = settled_budget(&two, &id).await;
    let spent = standing["spent_usd"].as_f64().unwrap();
    eprintln!(
        "two replicas on Redis, budget {budget:.3} USD, 200 concurrent clients: {answered} answered, {spent:.4} USD spent"
    );
    assert!(
        spent <= budget + HOLD + 1e-9,
        "overspent: {spent} of {budget}"
    );
    assert!(spent >= budget - 2.0 * HOLD, "{spent} of {budget}");
    assert!((spent - answered as f64 * COST).abs() < 1e-6);
    assert_eq!(
        one.mock.calls("slow-200") + two.mock.calls("slow-200"),
        answered
    );
    assert_eq!(
        settled_budget(&one, &id).await["spent_usd"],
        standing["spent_usd"],
        "both replicas see one budget"
    );
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_enforce_tokens_and_concurrency_once() {
    let (_redis, one, two) = two_replicas_on_redis().await;
    let (_, secret) = create_key(&one, json!({"max_concurrent": 3, "tpm": 1000})).await;
    let responses = futures::future::join_all((0..10).map(|i| {
        let gw = if i % 2 == 0 { &one } else { &two };
        chat(gw, &secret, ask("slower", &format!("q{i}")))
    }))
    .await;
    let answered = responses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(answered, 3, "three slots across both replicas");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Each answer was corrected to its 18 real tokens: 54 of 1000 are used, on both replicas.
    let response = chat(&two, &secret, ask("chat", "hi")).await;
    assert_eq!(response.status(), 200);
    let remaining: u64 = common::header(&response, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    // 54 settled, plus this request's own estimate: 1 + 4 + 3 input and 7 output.
    assert_eq!(remaining, 1000 - 54 - 15);
}

#[tokio::test]
async fn embeddings_count_against_tokens_and_budgets_and_in_the_usage_book() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&sled(&dir), "")).await;
    let (id, secret) = create_key(&gw, json!({"tpm": 100, "budget": {"usd": 1}})).await;
    for _ in 0..2 {
        let response = gw
            .post(
                "/v1/embeddings",
                &secret,
                json!({"model": "embed", "input": ["one text", "another"]}),
            )
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            common::header(&response, "x-ratelimit-limit-tokens"),
            Some("100")
        );
        assert!(common::header(&response, "x-reprise-budget-remaining-usd").is_some());
    }
    // The mock reports 3 input tokens per call, at 1000 USD per million.
    let standing = settled_budget(&gw, &id).await;
    assert!(
        (standing["spent_usd"].as_f64().unwrap() - 0.006).abs() < 1e-9,
        "{standing}"
    );
    let (_, usage) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/usage?key={id}&group_by=route,model"),
            None,
        )
        .await;
    let row = &usage["data"][0];
    assert_eq!(
        (row["route"].as_str(), row["model"].as_str()),
        (Some("embed"), Some("emb"))
    );
    assert_eq!(
        (row["requests"].as_u64(), row["input_tokens"].as_u64()),
        (Some(2), Some(6))
    );
    let huge = gw
        .post(
            "/v1/embeddings",
            &secret,
            json!({"model": "embed", "input": "x".repeat(1000)}),
        )
        .await;
    assert_eq!(
        huge.status(),
        400,
        "250 estimated tokens can never fit 100 per minute"
    );
}
