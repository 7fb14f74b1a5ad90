//! Every failover rule of the router, observed from the outside: what the client gets, which target
//! served it, how many attempts it took, and how often each upstream was called.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use std::sync::atomic::Ordering::SeqCst;

use common::{Gateway, header, sse_data, user, wait_until};
use futures::StreamExt;
use serde_json::{Value, json};

/// The request answered within `limit` of `started` (the point of a timeout or a skip).
fn assert_within(started: Instant, limit: Duration) {
    assert!(
        started.elapsed() < limit,
        "took {:?}, limit {limit:?}",
        started.elapsed()
    );
}

/// A route named `r` over `targets` with fast backoff, plus extra TOML for `[routes.r]`.
fn route(targets: &str, extra: &str) -> String {
    format!(
        r#"
        [routes.r]
        targets = [{targets}]
        {extra}
        [routes.r.retry]
        attempts_per_target = 2
        backoff_base = "10ms"
        backoff_max = "50ms"
        "#
    )
}

fn ask() -> Value {
    json!({"model": "r", "messages": user("hello")})
}

fn ask_stream() -> Value {
    json!({"model": "r", "messages": user("hello"), "stream": true})
}

async fn served_by(response: reqwest::Response) -> (u16, Option<String>, Option<String>, Value) {
    let status = response.status().as_u16();
    let target = header(&response, "x-reprise-target").map(str::to_owned);
    let attempts = header(&response, "x-reprise-attempts").map(str::to_owned);
    let body = response.json().await.unwrap_or(Value::Null);
    (status, target, attempts, body)
}

#[tokio::test]
async fn server_errors_are_retried_on_the_same_target_then_fail_over() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "status-503" }, { provider = "mock2", model = "ok" }"#,
        "",
    ))
    .await;
    let (status, target, attempts, body) = served_by(gw.chat(ask()).await).await;
    assert_eq!(
        (status, target.as_deref(), attempts.as_deref()),
        (200, Some("mock2/ok"), Some("3"))
    );
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hello");
    assert_eq!(gw.mock.calls("status-503"), 2);
    assert_eq!(gw.mock.calls("ok"), 1);
}

#[tokio::test]
async fn a_transient_error_is_retried_on_the_same_target() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "flaky-1-500" }, { provider = "mock2", model = "ok" }"#,
        "",
    ))
    .await;
    let (status, target, attempts, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!(
        (status, target.as_deref(), attempts.as_deref()),
        (200, Some("mock/flaky-1-500"), Some("2"))
    );
    assert_eq!(gw.mock.calls("ok"), 0);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "retry-after-1" }, { provider = "mock2", model = "ok" }"#,
        "",
    ))
    .await;
    let started = Instant::now();
    let (status, target, _, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!(
        (status, target.as_deref()),
        (200, Some("mock/retry-after-1"))
    );
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited only {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_retry_after_longer_than_the_limit_fails_over_at_once() {
    let routes = route(
        r#"{ provider = "mock", model = "retry-after-30" }, { provider = "mock2", model = "ok" }"#,
        "",
    )
    .replace(
        "backoff_max = \"50ms\"",
        "backoff_max = \"50ms\"\nmax_retry_after = \"2s\"",
    );
    let gw = Gateway::start(&routes).await;
    let started = Instant::now();
    let (status, target, _, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!((status, target.as_deref()), (200, Some("mock2/ok")));
    assert_within(started, Duration::from_secs(2));
    assert_eq!(gw.mock.calls("retry-after-30"), 1);
}

#[tokio::test]
async fn errors_caused_by_the_request_are_returned_as_is_without_failover() {
    for code in [400u16, 413, 422] {
        let gw = Gateway::start(&route(
            &format!(r#"{{ provider = "mock", model = "status-{code}" }}, {{ provider = "mock2", model = "ok" }}"#),
            "",
        ))
        .await;
        let (status, _, attempts, body) = served_by(gw.chat(ask()).await).await;
        assert_eq!(status, code);
        assert_eq!(attempts.as_deref(), Some("1"));
        assert_eq!(body["error"]["message"], format!("mock error {code}"));
        assert_eq!(body["error"]["code"], format!("mock_{code}"));
        assert_eq!(body["error"]["type"], "mock_error");
        assert_eq!(gw.mock.calls("ok"), 0, "{code} must not fail over");
        assert_eq!(
            gw.mock.calls(&format!("status-{code}")),
            1,
            "{code} must not be retried"
        );
        assert_eq!(
            gw.breaker_state(&format!("mock/status-{code}")).await,
            "closed"
        );
    }
}

#[tokio::test]
async fn a_refused_provider_key_fails_over_and_marks_the_target_unhealthy() {
    for code in [401u16, 403] {
        let gw = Gateway::start(&route(
            &format!(r#"{{ provider = "mock", model = "status-{code}" }}, {{ provider = "mock2", model = "ok" }}"#),
            "",
        ))
        .await;
        let (status, target, attempts, _) = served_by(gw.chat(ask()).await).await;
        assert_eq!(
            (status, target.as_deref(), attempts.as_deref()),
            (200, Some("mock2/ok"), Some("2"))
        );
        assert_eq!(
            gw.breaker_state(&format!("mock/status-{code}")).await,
            "open"
        );
        let (_, target, attempts, _) = served_by(gw.chat(ask()).await).await;
        assert_eq!(
            (target.as_deref(), attempts.as_deref()),
            (Some("mock2/ok"), Some("1"))
        );
        assert_eq!(
            gw.mock.calls(&format!("status-{code}")),
            1,
            "the unhealthy target is skipped"
        );
    }
}

#[tokio::test]
async fn connect_errors_and_unknown_models_fail_over() {
    let gw = Gateway::start(&route(
        r#"{ provider = "dead", model = "x" }, { provider = "mock", model = "status-404" }, { provider = "mock2", model = "ok" }"#,
        "",
    ))
    .await;
    let (status, target, attempts, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!(
        (status, target.as_deref(), attempts.as_deref()),
        (200, Some("mock2/ok"), Some("3"))
    );
}

#[tokio::test]
async fn a_hanging_target_loses_to_the_attempt_timeout() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "hang" }, { provider = "mock2", model = "ok" }"#,
        "[routes.r.timeouts]\nattempt = \"200ms\"",
    ))
    .await;
    let started = Instant::now();
    let (status, target, _, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!((status, target.as_deref()), (200, Some("mock2/ok")));
    assert_within(started, Duration::from_secs(2));
}

#[tokio::test]
async fn a_stream_slow_to_its_first_token_loses_to_the_next_target() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "slow-3000" }, { provider = "mock2", model = "ok" }"#,
        "[routes.r.timeouts]\nfirst_token = \"300ms\"",
    ))
    .await;
    let started = Instant::now();
    let response = gw.chat(ask_stream()).await;
    assert_eq!(header(&response, "x-reprise-target"), Some("mock2/ok"));
    let data = sse_data(&response.text().await.unwrap());
    assert_within(started, Duration::from_secs(2));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        gw.mock.calls("slow-3000"),
        1,
        "a slow target is not retried"
    );
}

#[tokio::test]
async fn a_stream_that_breaks_before_its_first_token_fails_over() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "drop-early" }, { provider = "mock2", model = "ok" }"#,
        "",
    ))
    .await;
    let response = gw.chat(ask_stream()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-reprise-target"), Some("mock2/ok"));
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn a_stream_that_breaks_after_its_first_token_ends_with_an_error_event() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "drop" }, { provider = "mock2", model = "ok" }"#,
        "",
    ))
    .await;
    let response = gw.chat(ask_stream()).await;
    assert_eq!(response.status(), 200);
    let data = sse_data(&response.text().await.unwrap());
    assert!(
        !data.iter().any(|d| d == "[DONE]"),
        "a broken stream must not look complete: {data:?}"
    );
    let first: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["content"], "echo: ");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{last}");
    assert_eq!(
        gw.mock.calls("ok"),
        0,
        "no failover once bytes reached the client"
    );
}

#[tokio::test]
async fn the_breaker_skips_a_failing_target_then_probes_it_after_the_cooldown() {
    let gw = Gateway::start(&format!(
        "[breaker]\nconsecutive_failures = 2\ncooldown = \"400ms\"\nrecovery = \"300ms\"\n{}",
        route(
            r#"{ provider = "mock", model = "flaky-3-500" }, { provider = "mock2", model = "ok" }"#,
            ""
        )
        .replace("attempts_per_target = 2", "attempts_per_target = 1")
    ))
    .await;
    for _ in 0..2 {
        let (_, target, _, _) = served_by(gw.chat(ask()).await).await;
        assert_eq!(target.as_deref(), Some("mock2/ok"));
    }
    assert_eq!(gw.breaker_state("mock/flaky-3-500").await, "open");
    let started = Instant::now();
    let (_, target, attempts, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!(
        (target.as_deref(), attempts.as_deref()),
        (Some("mock2/ok"), Some("1"))
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(
        gw.mock.calls("flaky-3-500"),
        2,
        "open breaker: the target is skipped"
    );

    tokio::time::sleep(Duration::from_millis(450)).await;
    served_by(gw.chat(ask()).await).await;
    assert_eq!(
        gw.mock.calls("flaky-3-500"),
        3,
        "one probe after the cooldown"
    );
    assert_eq!(
        gw.breaker_state("mock/flaky-3-500").await,
        "open",
        "a failed probe reopens"
    );

    tokio::time::sleep(Duration::from_millis(450)).await;
    let (_, target, _, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!(
        target.as_deref(),
        Some("mock/flaky-3-500"),
        "the recovered target serves again"
    );
    assert_eq!(
        gw.breaker_state("mock/flaky-3-500").await,
        "half_open",
        "its share of traffic grows over the recovery period"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(gw.breaker_state("mock/flaky-3-500").await, "closed");
}

#[tokio::test]
async fn when_every_breaker_is_open_the_request_fails_fast() {
    let gw = Gateway::start(&format!(
        "[breaker]\nconsecutive_failures = 1\n{}",
        route(r#"{ provider = "mock", model = "status-500" }"#, "")
            .replace("attempts_per_target = 2", "attempts_per_target = 1")
    ))
    .await;
    let (status, _, _, body) = served_by(gw.chat(ask()).await).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "upstream_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mock/status-500"),
        "{body}"
    );
    let response = gw.chat(ask()).await;
    let retry_after: u64 = header(&response, "retry-after")
        .expect("503 says when to come back")
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let (status, _, _, body) = served_by(response).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "no_healthy_target");
    assert_eq!(gw.mock.calls("status-500"), 1);
}

#[tokio::test]
async fn hedging_races_a_slow_target_against_the_next() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "slow-3000" }, { provider = "mock2", model = "ok" }"#,
        "hedge_after = \"100ms\"",
    ))
    .await;
    let started = Instant::now();
    let (status, target, attempts, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!(
        (status, target.as_deref(), attempts.as_deref()),
        (200, Some("mock2/ok"), Some("2"))
    );
    assert_within(started, Duration::from_secs(2));

    let started = Instant::now();
    let response = gw.chat(ask_stream()).await;
    assert_eq!(header(&response, "x-reprise-target"), Some("mock2/ok"));
    assert!(sse_data(&response.text().await.unwrap()).ends_with(&["[DONE]".to_owned()]));
    assert_within(started, Duration::from_secs(2));
}

#[tokio::test]
async fn the_overall_deadline_ends_the_request_with_504() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "hang" }"#,
        "[routes.r.timeouts]\ntotal = \"300ms\"\nattempt = \"10s\"",
    ))
    .await;
    let started = Instant::now();
    let (status, _, _, body) = served_by(gw.chat(ask()).await).await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["code"], "deadline_exceeded");
    assert_within(started, Duration::from_secs(2));
}

#[tokio::test]
async fn the_retry_budget_stops_retry_storms() {
    let routes = route(r#"{ provider = "mock", model = "status-503" }"#, "").replace(
        "attempts_per_target = 2",
        "attempts_per_target = 3\nbudget_ratio = 0.0\nbudget_min_per_sec = 0",
    );
    let gw = Gateway::start(&routes).await;
    let (status, _, attempts, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!((status, attempts.as_deref()), (502, Some("1")));
    assert_eq!(gw.mock.calls("status-503"), 1);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"reprise_retry_budget_exhausted_total{route="r"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_refused_retry_still_fails_over_to_the_next_target() {
    let routes = route(
        r#"{ provider = "mock", model = "status-503" }, { provider = "mock2", model = "ok" }"#,
        "",
    )
    .replace(
        "attempts_per_target = 2",
        "attempts_per_target = 3\nbudget_ratio = 0.0\nbudget_min_per_sec = 0",
    );
    let gw = Gateway::start(&routes).await;
    let (status, target, attempts, _) = served_by(gw.chat(ask()).await).await;
    assert_eq!(
        (status, target.as_deref(), attempts.as_deref()),
        (200, Some("mock2/ok"), Some("2"))
    );
    assert_eq!(gw.mock.calls("status-503"), 1, "no retry without budget");
}

#[tokio::test]
async fn rate_limits_on_every_target_come_back_as_429() {
    let gw = Gateway::start(&route(r#"{ provider = "mock", model = "status-429" }"#, "")).await;
    let (status, _, attempts, body) = served_by(gw.chat(ask()).await).await;
    assert_eq!((status, attempts.as_deref()), (429, Some("2")));
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn a_request_one_target_cannot_express_goes_to_one_that_can() {
    let gw = Gateway::start(&route(
        r#"{ provider = "claude", model = "claude-x" }, { provider = "mock", model = "ok" }"#,
        "",
    ))
    .await;
    let (status, target, _, _) = served_by(
        gw.chat(json!({"model": "r", "messages": user("hi"), "n": 2}))
            .await,
    )
    .await;
    assert_eq!((status, target.as_deref()), (200, Some("mock/ok")));
    assert_eq!(gw.mock.calls("claude-x"), 0);
    assert_eq!(gw.breaker_state("claude/claude-x").await, "closed");
}

#[tokio::test]
async fn weighted_routes_spread_requests_by_weight() {
    let gw = Gateway::start(
        r#"
        [routes.r]
        strategy = "weighted"
        targets = [{ provider = "mock", model = "ok-a", weight = 3 }, { provider = "mock2", model = "ok-b", weight = 1 }]
        "#,
    )
    .await;
    for _ in 0..200 {
        assert_eq!(gw.chat(ask()).await.status(), 200);
    }
    let b = gw.mock.calls("ok-b");
    assert!(
        (25..=75).contains(&b),
        "expected ~50 of 200 on the weight-1 target, got {b}"
    );
    assert_eq!(gw.mock.calls("ok-a") + b, 200);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_the_upstream_call() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "long-stream" }"#,
        "",
    ))
    .await;
    let response = gw.chat(ask_stream()).await;
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(body);
    let state = &gw.mock.state;
    wait_until("the upstream stream was not cancelled", || {
        state.streams_cancelled.load(SeqCst) == 1
    })
    .await;
    assert_eq!(state.streams_completed.load(SeqCst), 0);
}

/// Sends `body` with a client that gives up after `patience`, then waits until the mock saw the
/// upstream call cancelled.
async fn give_up_and_see_the_upstream_call_cancelled(
    gw: &Gateway,
    body: &Value,
    patience: Duration,
) {
    let impatient = reqwest::Client::builder()
        .timeout(patience)
        .build()
        .unwrap();
    let result = impatient
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(common::KEY_A)
        .json(body)
        .send()
        .await;
    assert!(result.is_err(), "the client timed out");
    let state = &gw.mock.state;
    wait_until("the upstream call outlived its client", || {
        state.calls_cancelled.load(SeqCst) == 1
    })
    .await;
}

/// A large request is served on another runtime than the connection's; hanging up still
/// cancels it.
#[tokio::test]
async fn a_client_that_gives_up_on_a_large_request_cancels_the_upstream_call() {
    let gw = Gateway::start_with_server(
        "max_body_bytes = 4194304",
        &route(r#"{ provider = "mock", model = "hang" }"#, ""),
    )
    .await;
    let large = json!({"model": "r", "messages": user(&"a long question ".repeat(40_000))});
    give_up_and_see_the_upstream_call_cancelled(&gw, &large, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_client_that_gives_up_on_a_whole_answer_cancels_the_upstream_call() {
    let gw = Gateway::start(&route(r#"{ provider = "mock", model = "hang" }"#, "")).await;
    give_up_and_see_the_upstream_call_cancelled(&gw, &ask(), Duration::from_millis(300)).await;
}

#[tokio::test]
async fn embeddings_fail_over_too() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "status-502" }, { provider = "mock2", model = "emb" }"#,
        "",
    ))
    .await;
    let response = gw
        .post(
            "/v1/embeddings",
            common::KEY_A,
            json!({"model": "r", "input": "hi"}),
        )
        .await;
    assert_eq!(header(&response, "x-reprise-target"), Some("mock2/emb"));
    assert_eq!(response.status(), 200);
}
