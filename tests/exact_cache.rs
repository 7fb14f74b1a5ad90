//! The exact cache through HTTP, with a mock upstream that counts its calls: "served from cache"
//! is asserted as "the upstream was not called again".
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::{Gateway, KEY_A, KEY_B, Mock, header, sse_data, streamed_text, user};
use serde_json::{Value, json};

struct Cached {
    gw: Gateway,
    dir: tempfile::TempDir,
    /// The suite runs on the embedded store, or on a real Redis with `REPRISE_TEST_STORE=redis` (`make test`
    /// runs it both ways).
    redis: Option<RedisServer>,
}

fn on_redis_requested() -> bool {
    std::env::var("REPRISE_TEST_STORE").is_ok_and(|store| store == "redis")
}

fn cache_config(dir: &tempfile::TempDir, route_extra: &str) -> String {
    cache_config_with(
        &format!("path = \"{}\"", dir.path().join("store").display()),
        route_extra,
    )
}

fn redis_cache_config(redis: &RedisServer, route_extra: &str) -> String {
    cache_config_with(
        &format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
        route_extra,
    )
}

fn cache_config_with(store: &str, route_extra: &str) -> String {
    format!(
        r#"
        [cache]
        enabled = true
        {store}
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.flaky]
        targets = [{{ provider = "mock", model = "flaky-1-500" }}]
        [routes.flaky.retry]
        attempts_per_target = 1
        [routes.broken-stream]
        targets = [{{ provider = "mock", model = "drop" }}]
        [routes.tools]
        targets = [{{ provider = "mock", model = "tool" }}]
        [routes.pretty]
        targets = [{{ provider = "mock", model = "pretty" }}]
        [routes.slow]
        targets = [{{ provider = "mock", model = "slow-300" }}]
        [routes.slowfail]
        targets = [{{ provider = "mock", model = "slowfail-300" }}]
        [routes.slowfail.retry]
        attempts_per_target = 1
        [routes.uncached]
        targets = [{{ provider = "mock2", model = "ok" }}]
        [routes.uncached.cache]
        enabled = false
        [routes.chat.cache]
        max_temperature = 1.0
        {route_extra}
        "#
    )
}

async fn cached(route_extra: &str) -> Cached {
    let dir = tempfile::tempdir().unwrap();
    let redis = on_redis_requested().then(RedisServer::start);
    let config = match &redis {
        Some(redis) => redis_cache_config(redis, route_extra),
        None => cache_config(&dir, route_extra),
    };
    let gw = Gateway::start(&config).await;
    Cached { gw, dir, redis }
}

impl Cached {
    fn config(&self, route_extra: &str) -> String {
        match &self.redis {
            Some(redis) => redis_cache_config(redis, route_extra),
            None => cache_config(&self.dir, route_extra),
        }
    }
}

fn ask(text: &str) -> Value {
    json!({"model": "chat", "messages": user(text), "temperature": 0})
}

impl Cached {
    async fn request(&self, key: &str, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
        self.gw.chat_with(key, body, headers).await
    }

    async fn writes(&self) -> u64 {
        self.gw
            .metrics()
            .await
            .lines()
            .find_map(|line| line.strip_prefix("reprise_cache_writes_total "))
            .map(|n| n.trim().parse().unwrap())
            .unwrap_or(0)
    }

    /// Cache writes happen after the answer; wait until `n` have landed.
    async fn wait_for_writes(&self, n: u64) {
        for _ in 0..150 {
            if self.writes().await >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("expected {n} cache writes, saw {}", self.writes().await);
    }
}

#[tokio::test]
async fn the_upstreams_answer_text_is_served_as_it_came_and_replayed_the_same_from_the_cache() {
    let c = cached("").await;
    let ask_pretty = json!({"model": "pretty", "messages": user("as it came"), "temperature": 0});
    let expected = common::mock_upstream::pretty_answer_text("as it came");
    let first = c.request(KEY_A, ask_pretty.clone(), &[]).await;
    assert_eq!(header(&first, "x-reprise-cache"), Some("miss"));
    assert_eq!(header(&first, "content-type"), Some("application/json"));
    assert_eq!(first.text().await.unwrap(), expected);
    c.wait_for_writes(1).await;
    let second = c.request(KEY_A, ask_pretty, &[]).await;
    assert_eq!(header(&second, "x-reprise-cache"), Some("hit"));
    assert_eq!(header(&second, "x-reprise-cache-tokens-saved"), Some("18"));
    assert_eq!(header(&second, "content-type"), Some("application/json"));
    assert_eq!(
        second.text().await.unwrap(),
        expected.trim_end(),
        "the stored text, byte for byte"
    );
    assert_eq!(c.gw.mock.calls("pretty"), 1);
}

#[tokio::test]
async fn identical_requests_are_answered_from_the_cache() {
    let c = cached("").await;
    let first = c.request(KEY_A, ask("hello"), &[]).await;
    assert_eq!(header(&first, "x-reprise-cache"), Some("miss"));
    let first_body: Value = first.json().await.unwrap();
    c.wait_for_writes(1).await;

    // Same request with a different field order, user and stream_options-free extras: still a hit.
    let reordered: Value = serde_json::from_str(r#"{"temperature": 0, "user": "someone-else", "messages": [{"content": "hello", "role": "user"}], "model": "chat"}"#).unwrap();
    let second = c.request(KEY_A, reordered, &[]).await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-reprise-cache"), Some("hit"));
    assert_eq!(header(&second, "x-reprise-cache-tokens-saved"), Some("18"));
    assert!(header(&second, "x-reprise-cache-age").is_some());
    assert!(
        header(&second, "x-reprise-target").is_none(),
        "no upstream served a hit"
    );
    assert_eq!(
        second.json::<Value>().await.unwrap(),
        first_body,
        "the original answer, usage included"
    );
    assert_eq!(c.gw.mock.calls("ok"), 1);

    let metrics = c.gw.metrics().await;
    assert!(
        metrics
            .contains(r#"reprise_cache_requests_total{tenant="a",route="chat",outcome="hit"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"reprise_cache_tokens_saved_total{route="chat"} 18"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn answer_changing_fields_miss() {
    let c = cached("").await;
    c.request(KEY_A, ask("hello"), &[]).await;
    c.wait_for_writes(1).await;
    let mut changed = ask("hello");
    changed["temperature"] = json!(0.5);
    assert_eq!(
        header(&c.request(KEY_A, changed, &[]).await, "x-reprise-cache"),
        Some("miss")
    );
    let mut changed = ask("hello");
    changed["max_tokens"] = json!(5);
    assert_eq!(
        header(&c.request(KEY_A, changed, &[]).await, "x-reprise-cache"),
        Some("miss")
    );
    assert_eq!(
        header(
            &c.request(KEY_A, ask("hello!"), &[]).await,
            "x-reprise-cache"
        ),
        Some("miss")
    );
    assert_eq!(c.gw.mock.calls("ok"), 4);
}

#[tokio::test]
async fn one_tenants_answer_is_never_served_to_another() {
    let c = cached("").await;
    c.request(KEY_A, ask("secret plans"), &[]).await;
    c.wait_for_writes(1).await;
    let other = c.request(KEY_B, ask("secret plans"), &[]).await;
    assert_eq!(header(&other, "x-reprise-cache"), Some("miss"));
    assert_eq!(c.gw.mock.calls("ok"), 2);
    // ... whatever the client sends: a namespace cannot reach into another tenant either.
    let other = c
        .request(
            KEY_B,
            ask("secret plans"),
            &[("x-reprise-cache-namespace", "a")],
        )
        .await;
    assert_eq!(header(&other, "x-reprise-cache"), Some("miss"));
}

#[tokio::test]
async fn namespaces_partition_a_tenants_cache() {
    let c = cached("").await;
    c.request(KEY_A, ask("hi"), &[("x-reprise-cache-namespace", "exp-1")])
        .await;
    c.wait_for_writes(1).await;
    let same = c
        .request(KEY_A, ask("hi"), &[("x-reprise-cache-namespace", "exp-1")])
        .await;
    assert_eq!(header(&same, "x-reprise-cache"), Some("hit"));
    let other = c
        .request(KEY_A, ask("hi"), &[("x-reprise-cache-namespace", "exp-2")])
        .await;
    assert_eq!(header(&other, "x-reprise-cache"), Some("miss"));
    let none = c.request(KEY_A, ask("hi"), &[]).await;
    assert_eq!(header(&none, "x-reprise-cache"), Some("miss"));
    let bad = c
        .request(KEY_A, ask("hi"), &[("x-reprise-cache-namespace", "../x")])
        .await;
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<Value>().await.unwrap()["error"]["param"],
        "x-reprise-cache-namespace"
    );
}

#[tokio::test]
async fn a_whole_answer_replays_as_a_stream_and_a_stream_as_a_whole_answer() {
    let c = cached("").await;
    let whole: Value = c
        .request(KEY_A, ask("one two three four five"), &[])
        .await
        .json()
        .await
        .unwrap();
    c.wait_for_writes(1).await;
    let mut streamed = ask("one two three four five");
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = c.request(KEY_A, streamed, &[]).await;
    assert_eq!(header(&response, "x-reprise-cache"), Some("hit"));
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks = common::stream_chunks_of(&data);
    assert!(
        chunks.len() >= 4,
        "replayed in several chunks: {}",
        chunks.len()
    );
    let text = streamed_text(&chunks);
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);

    // The other way: a stream stored, then asked for whole. The client did not ask for usage, so
    // its stream has none, but the entry does.
    let mut first = ask("six seven");
    first["stream"] = json!(true);
    let data = sse_data(&c.request(KEY_A, first, &[]).await.text().await.unwrap());
    assert!(
        data.iter().all(|d| d == "[DONE]"
            || serde_json::from_str::<Value>(d)
                .unwrap()
                .get("usage")
                .is_none()),
        "{data:?}"
    );
    c.wait_for_writes(2).await;
    let hit = c.request(KEY_A, ask("six seven"), &[]).await;
    assert_eq!(header(&hit, "x-reprise-cache"), Some("hit"));
    let body: Value = hit.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: six seven");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 18);
    assert_eq!(c.gw.mock.calls("ok"), 2);
}

#[tokio::test]
async fn tool_calls_are_cached_and_replayed() {
    let c = cached("[routes.tools.cache]\nenabled = true").await;
    let body = json!({"model": "tools", "messages": user("weather?")});
    let first: Value = c
        .request(KEY_A, body.clone(), &[])
        .await
        .json()
        .await
        .unwrap();
    c.wait_for_writes(1).await;
    let second = c.request(KEY_A, body, &[]).await;
    assert_eq!(header(&second, "x-reprise-cache"), Some("hit"));
    assert_eq!(second.json::<Value>().await.unwrap(), first);
}

#[tokio::test]
async fn bypass_refresh_no_store_and_max_age() {
    let c = cached("").await;
    c.request(KEY_A, ask("hi"), &[]).await;
    c.wait_for_writes(1).await;
    let bypass = c
        .request(KEY_A, ask("hi"), &[("x-reprise-cache-mode", "bypass")])
        .await;
    assert_eq!(header(&bypass, "x-reprise-cache"), Some("bypass"));
    assert_eq!(c.gw.mock.calls("ok"), 2);
    let refresh = c
        .request(KEY_A, ask("hi"), &[("cache-control", "no-cache")])
        .await;
    assert_eq!(header(&refresh, "x-reprise-cache"), Some("refresh"));
    assert_eq!(c.gw.mock.calls("ok"), 3);
    c.wait_for_writes(2).await;
    let fresh = c
        .request(KEY_A, ask("hi"), &[("cache-control", "max-age=0")])
        .await;
    assert_eq!(
        header(&fresh, "x-reprise-cache"),
        Some("miss"),
        "an entry older than max-age is not served"
    );
    // ... and the fresh answer replaces the old entry.
    c.wait_for_writes(3).await;
    let hit = c
        .request(KEY_A, ask("hi"), &[("cache-control", "max-age=3600")])
        .await;
    assert_eq!(header(&hit, "x-reprise-cache"), Some("hit"));

    let writes = c.writes().await;
    let no_store = c
        .request(KEY_A, ask("not stored"), &[("cache-control", "no-store")])
        .await;
    assert_eq!(header(&no_store, "x-reprise-cache"), Some("miss"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.writes().await, writes, "no-store answers are not written");
    let again = c.request(KEY_A, ask("not stored"), &[]).await;
    assert_eq!(header(&again, "x-reprise-cache"), Some("miss"));
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let c = cached("").await;
    c.request(KEY_A, ask("short-lived"), &[("x-reprise-cache-ttl", "1")])
        .await;
    c.wait_for_writes(1).await;
    assert_eq!(
        header(
            &c.request(KEY_A, ask("short-lived"), &[]).await,
            "x-reprise-cache"
        ),
        Some("hit")
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        header(
            &c.request(KEY_A, ask("short-lived"), &[]).await,
            "x-reprise-cache"
        ),
        Some("miss")
    );
}

#[tokio::test]
async fn answers_over_the_entry_size_bound_are_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let config = cache_config_with(
        &format!(
            "path = \"{}\"\nmax_entry_bytes = 2000",
            dir.path().join("store").display()
        ),
        "",
    );
    let c = Cached {
        gw: Gateway::start(&config).await,
        dir,
        redis: None,
    };
    let long = "a long question that the mock echoes back ".repeat(60);
    for _ in 0..2 {
        let response = c.request(KEY_A, ask(&long), &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-reprise-cache"), Some("miss"));
    }
    assert_eq!(c.gw.mock.calls("ok"), 2);
    assert!(
        c.gw.metrics()
            .await
            .contains(r#"reprise_cache_writes_skipped_total{kind="too_large"} 2"#)
    );
    c.request(KEY_A, ask("short"), &[]).await;
    c.wait_for_writes(1).await;
    assert_eq!(
        header(
            &c.request(KEY_A, ask("short"), &[]).await,
            "x-reprise-cache"
        ),
        Some("hit"),
        "small answers are still cached"
    );
}

#[tokio::test]
async fn failures_and_broken_streams_are_not_cached() {
    let c = cached(
        "[routes.flaky.cache]\nenabled = true\n[routes.broken-stream.cache]\nenabled = true",
    )
    .await;
    let body = json!({"model": "flaky", "messages": user("x")});
    assert_eq!(c.request(KEY_A, body.clone(), &[]).await.status(), 502);
    let second = c.request(KEY_A, body, &[]).await;
    assert_eq!(second.status(), 200);
    assert_eq!(
        header(&second, "x-reprise-cache"),
        Some("miss"),
        "a failure is not a cached answer"
    );

    let stream = json!({"model": "broken-stream", "messages": user("a b c"), "stream": true});
    let data = sse_data(
        &c.request(KEY_A, stream.clone(), &[])
            .await
            .text()
            .await
            .unwrap(),
    );
    assert!(!data.iter().any(|d| d == "[DONE]"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = c.request(KEY_A, stream, &[]).await;
    assert_eq!(
        header(&again, "x-reprise-cache"),
        Some("miss"),
        "a truncated stream is never stored"
    );
    c.wait_for_writes(1).await;
    assert_eq!(
        c.writes().await,
        1,
        "only the flaky route's good answer was stored"
    );
}

#[tokio::test]
async fn routes_without_caching_and_hot_requests_skip_the_cache() {
    let c = cached("").await;
    let body = json!({"model": "uncached", "messages": user("x")});
    let response = c.request(KEY_A, body.clone(), &[]).await;
    assert!(header(&response, "x-reprise-cache").is_none());
    c.request(KEY_A, body, &[]).await;
    assert_eq!(c.gw.mock.calls("ok"), 2);

    let mut hot = ask("be creative");
    hot["temperature"] = json!(1.5);
    assert_eq!(
        header(&c.request(KEY_A, hot, &[]).await, "x-reprise-cache"),
        Some("bypass")
    );
}

#[tokio::test]
async fn entries_survive_a_restart() {
    let c = cached("").await;
    let first: Value = c
        .request(KEY_A, ask("remember me"), &[])
        .await
        .json()
        .await
        .unwrap();
    c.wait_for_writes(1).await;
    let config = c.config("");
    let Cached { gw, dir, redis } = c;
    let mock: Mock = gw.mock.clone();
    assert!(gw.server.stop().await.unwrap());
    let gw = Gateway::start_with(mock, &config).await;
    let c = Cached { gw, dir, redis };
    let again = c.request(KEY_A, ask("remember me"), &[]).await;
    assert_eq!(header(&again, "x-reprise-cache"), Some("hit"));
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(c.gw.mock.calls("ok"), 1);
}

#[tokio::test]
async fn concurrent_identical_misses_make_one_upstream_call() {
    let c = cached("[routes.slow.cache]\nenabled = true").await;
    let requests = (0..8).map(|i| {
        let mut body = json!({"model": "slow", "messages": user("same question")});
        if i % 2 == 1 {
            body["stream"] = json!(true);
        }
        c.request(KEY_A, body, &[])
    });
    let responses = futures::future::join_all(requests).await;
    let mut statuses = Vec::new();
    for response in responses {
        assert_eq!(response.status(), 200);
        statuses.push(header(&response, "x-reprise-cache").unwrap().to_owned());
        let streamed = header(&response, "content-type") == Some("text/event-stream");
        let body = response.text().await.unwrap();
        let text = if streamed {
            sse_data(&body)
                .iter()
                .filter(|d| *d != "[DONE]")
                .filter_map(|d| {
                    serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect::<String>()
        } else {
            serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(text, "echo: same question");
    }
    assert_eq!(c.gw.mock.calls("slow-300"), 1, "statuses: {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| *s == "miss").count(),
        1,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_failure_is_not_shared_with_waiting_requests() {
    let c = cached("[routes.slowfail.cache]\nenabled = true").await;
    let requests = (0..4).map(|_| {
        c.request(
            KEY_A,
            json!({"model": "slowfail", "messages": user("q")}),
            &[],
        )
    });
    let responses = futures::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 502));
    assert_eq!(
        c.gw.mock.calls("slowfail-300"),
        4,
        "each waiting request asked upstream itself"
    );
}

async fn on_redis(redis: &RedisServer) -> Cached {
    let gw = Gateway::start(&redis_cache_config(redis, "")).await;
    Cached {
        gw,
        dir: tempfile::tempdir().unwrap(),
        redis: None,
    }
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn redis_backend_serves_hits_and_keeps_tenants_apart() {
    let redis = RedisServer::start();
    let c = on_redis(&redis).await;
    let first: Value = c
        .request(KEY_A, ask("via redis"), &[])
        .await
        .json()
        .await
        .unwrap();
    c.wait_for_writes(1).await;
    let hit = c.request(KEY_A, ask("via redis"), &[]).await;
    assert_eq!(header(&hit, "x-reprise-cache"), Some("hit"));
    assert_eq!(hit.json::<Value>().await.unwrap(), first);
    let other_tenant = c.request(KEY_B, ask("via redis"), &[]).await;
    assert_eq!(header(&other_tenant, "x-reprise-cache"), Some("miss"));
    let mut stream = ask("via redis");
    stream["stream"] = json!(true);
    let replay = c.request(KEY_A, stream, &[]).await;
    assert_eq!(header(&replay, "x-reprise-cache"), Some("hit"));
    assert_eq!(
        sse_data(&replay.text().await.unwrap())
            .last()
            .map(String::as_str),
        Some("[DONE]")
    );
    assert_eq!(c.gw.mock.calls("ok"), 2);
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn two_gateways_on_one_redis_share_hits() {
    let redis = RedisServer::start();
    let one = on_redis(&redis).await;
    let two = Cached {
        gw: Gateway::start_with(one.gw.mock.clone(), &redis_cache_config(&redis, "")).await,
        dir: tempfile::tempdir().unwrap(),
        redis: None,
    };
    one.request(KEY_A, ask("shared"), &[]).await;
    one.wait_for_writes(1).await;
    let hit = two.request(KEY_A, ask("shared"), &[]).await;
    assert_eq!(
        header(&hit, "x-reprise-cache"),
        Some("hit"),
        "a replica serves what another stored"
    );
    assert_eq!(one.gw.mock.calls("ok"), 1);
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn when_redis_goes_away_requests_go_upstream_and_caching_resumes_when_it_returns() {
    let mut redis = RedisServer::start();
    let c = on_redis(&redis).await;
    c.request(KEY_A, ask("before"), &[]).await;
    c.wait_for_writes(1).await;
    redis.stop();
    for i in 0..3 {
        let response = c.request(KEY_A, ask("before"), &[]).await;
        assert_eq!(
            response.status(),
            200,
            "request {i} is served from upstream"
        );
        assert_eq!(header(&response, "x-reprise-cache"), Some("miss"));
    }
    let metrics = c.gw.metrics().await;
    assert!(
        metrics.contains("reprise_cache_errors_total{kind=\"lookup\"}"),
        "{metrics}"
    );
    redis.restart();
    // The restarted Redis is empty; once the gateway reconnected, answers are stored again.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        c.request(KEY_A, ask("after"), &[]).await;
        let hit = c.request(KEY_A, ask("after"), &[]).await;
        if header(&hit, "x-reprise-cache") == Some("hit") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "caching did not resume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Cached {
    async fn admin_stats(&self) -> Value {
        let response = self
            .gw
            .client
            .get(self.gw.url("/admin/cache/stats"))
            .bearer_auth(common::ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn purge(&self, selector: Value) -> reqwest::Response {
        self.gw
            .client
            .post(self.gw.url("/admin/cache/purge"))
            .bearer_auth(common::ADMIN)
            .json(&selector)
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn admin_stats_report_hits_tokens_and_cost_per_tenant_and_route() {
    let c = cached("[prices]\nok = { input = 1.0, output = 2.0 }").await;
    c.request(KEY_A, ask("hello"), &[]).await;
    c.wait_for_writes(1).await;
    c.request(KEY_A, ask("hello"), &[]).await;
    c.request(KEY_A, ask("hello"), &[]).await;
    c.request(KEY_B, ask("hello"), &[]).await;
    let stats = c.admin_stats().await;
    let row = |tenant: &str| {
        stats["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["tenant"] == tenant && r["route"] == "chat")
            .cloned()
            .unwrap()
    };
    let a = row("a");
    assert_eq!(
        (
            a["hits"].as_u64(),
            a["misses"].as_u64(),
            a["entries"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{a}"
    );
    assert_eq!(a["tokens_saved"], 36);
    assert!(
        (a["cost_saved_usd"].as_f64().unwrap() - 2.0 * (11.0 + 14.0) / 1e6).abs() < 1e-12,
        "{a}"
    );
    assert!((a["hit_ratio"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(row("b")["hits"], 0);
    // Savings on a model without a price would read as 0: the stats name such models.
    assert!(stats["unpriced_models"].get("ok").is_none(), "{stats}");
    assert_eq!(
        stats["unpriced_models"]["tool"],
        json!(["tools"]),
        "{stats}"
    );
    let denied =
        c.gw.client
            .get(c.gw.url("/admin/cache/stats"))
            .bearer_auth(KEY_A)
            .send()
            .await
            .unwrap();
    assert_eq!(denied.status(), 403);
    let metrics = c.gw.metrics().await;
    assert!(
        metrics
            .contains(r#"reprise_cache_requests_total{tenant="a",route="chat",outcome="hit"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("reprise_cache_cost_saved_usd_total{route=\"chat\"} 0.00005"),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_purges_by_key_namespace_tenant_and_everything() {
    let c = cached("").await;
    let first = c.request(KEY_A, ask("one"), &[]).await;
    let key = header(&first, "x-reprise-cache-key").unwrap().to_owned();
    c.request(KEY_A, ask("two"), &[]).await;
    c.request(KEY_A, ask("three"), &[("x-reprise-cache-namespace", "n1")])
        .await;
    c.request(KEY_B, ask("four"), &[]).await;
    c.wait_for_writes(4).await;
    let status = |r: reqwest::Response| header(&r, "x-reprise-cache").map(str::to_owned);

    let purged: Value = c
        .purge(json!({"tenant": "a", "route": "chat", "key": key}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], 1);
    assert_eq!(
        status(c.request(KEY_A, ask("one"), &[]).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        status(c.request(KEY_A, ask("two"), &[]).await).as_deref(),
        Some("hit")
    );

    let purged: Value = c
        .purge(json!({"namespace": "n1"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], 1);
    let three = c
        .request(KEY_A, ask("three"), &[("x-reprise-cache-namespace", "n1")])
        .await;
    assert_eq!(status(three).as_deref(), Some("miss"));

    let purged: Value = c.purge(json!({"tenant": "b"})).await.json().await.unwrap();
    assert_eq!(purged["purged"], 1);
    assert_eq!(
        status(c.request(KEY_A, ask("two"), &[]).await).as_deref(),
        Some("hit"),
        "other tenants keep their entries"
    );

    c.wait_for_writes(6).await;
    for nothing_said in [json!({}), json!({"all": false}), json!(null)] {
        let response = c.purge(nothing_said.clone()).await;
        assert_eq!(response.status(), 400, "{nothing_said} purges nothing");
    }
    let response = c.purge(json!({"all": true, "tenant": "a"})).await;
    assert_eq!(response.status(), 400, "all with a selector is ambiguous");
    assert_eq!(
        status(c.request(KEY_A, ask("two"), &[]).await).as_deref(),
        Some("hit"),
        "refused purges removed nothing"
    );
    let purged: Value = c.purge(json!({"all": true})).await.json().await.unwrap();
    assert!(purged["purged"].as_u64().unwrap() >= 3, "{purged}");
    assert_eq!(
        status(c.request(KEY_A, ask("two"), &[]).await).as_deref(),
        Some("miss")
    );

    for (selector, param) in [
        (json!({"tenant": "nobody"}), "tenant"),
        (json!({"route": "nope"}), "route"),
        (json!({"tenant": "a", "route": "chat", "key": "abc"}), "key"),
        (json!({"key": key}), "key"),
    ] {
        let response = c.purge(selector.clone()).await;
        assert_eq!(response.status(), 400, "{selector}");
        assert_eq!(
            response.json::<Value>().await.unwrap()["error"]["param"],
            param,
            "{selector}"
        );
    }
    assert_eq!(
        c.purge(json!({"tenat": "a"})).await.status(),
        400,
        "unknown fields are refused"
    );
}

#[tokio::test]
async fn a_corrupt_entry_is_a_logged_miss_not_an_error() {
    let c = cached("").await;
    let first = c.request(KEY_A, ask("fragile"), &[]).await;
    let key = header(&first, "x-reprise-cache-key").unwrap().to_owned();
    c.wait_for_writes(1).await;
    let config = c.config("");
    let Cached { gw, dir, redis } = c;
    let mock = gw.mock.clone();
    assert!(gw.server.stop().await.unwrap());
    // Overwrite the entry with bytes that are not an entry, through the store the gateway uses.
    let path = format!("cache/v1/a/chat/-/{key}");
    let store: Box<dyn reprise::store::Store> = match &redis {
        Some(redis) => Box::new(reprise::store::RedisStore::new(&redis.url(), "reprise:").unwrap()),
        None => Box::new(
            reprise::store::FjallStore::open(&dir.path().join("store"), 1 << 20, None).unwrap(),
        ),
    };
    store
        .put(&path, b"\xff not json".to_vec(), None)
        .await
        .unwrap();
    drop(store);
    let gw = Gateway::start_with(mock, &config).await;
    let c = Cached { gw, dir, redis };
    let response = c.request(KEY_A, ask("fragile"), &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-reprise-cache"), Some("miss"));
    let metrics = c.gw.metrics().await;
    assert!(
        metrics.contains(r#"reprise_cache_errors_total{kind="corrupt_entry"} 1"#),
        "{metrics}"
    );
    c.wait_for_writes(1).await;
    assert_eq!(
        header(
            &c.request(KEY_A, ask("fragile"), &[]).await,
            "x-reprise-cache"
        ),
        Some("hit"),
        "the fresh answer replaced it"
    );
}
