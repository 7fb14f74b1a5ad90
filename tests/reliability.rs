//! The gateway under a flaky upstream: degraded targets keep serving what they can, a dead one is
//! skipped, and a route never answers "no healthy target" while a target still answers requests.
//! Loopback only, bounded in request count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Gateway, KEY_A, header, user};
use futures::StreamExt;
use serde_json::json;

/// Sends `count` chat requests at `concurrency` and counts the answers by status.
async fn drive(gw: &Gateway, count: usize, concurrency: usize) -> BTreeMap<u16, usize> {
    let statuses: Vec<u16> = futures::stream::iter(0..count)
        .map(|i| async move {
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(KEY_A)
                .json(&json!({"model": "r", "messages": user(&format!("hello {i}"))}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut by_status = BTreeMap::new();
    for status in statuses {
        *by_status.entry(status).or_insert(0) += 1;
    }
    by_status
}

fn success_share(by_status: &BTreeMap<u16, usize>) -> f64 {
    let total: usize = by_status.values().sum();
    by_status.get(&200).copied().unwrap_or(0) as f64 / total as f64
}

/// Default breaker and retries; only the route's targets (and optionally its retries) are given.
fn route(targets: &str, retry: &str) -> String {
    format!("[breaker]\n[routes.r]\ntargets = [{targets}]\n{retry}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_target_failing_a_fifth_of_calls_still_serves_with_default_retries() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "chance-20-500" }"#,
        "",
    ))
    .await;
    let by_status = drive(&gw, 10_000, 128).await;
    let share = success_share(&by_status);
    eprintln!("{share:.4} succeeded: {by_status:?}");
    assert!(share >= 0.95, "{share:.4} succeeded: {by_status:?}");
    assert!(
        !by_status.contains_key(&503),
        "the breaker never left the route with nothing to try: {by_status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retries_a_single_flaky_target_serves_what_it_answers() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "chance-20-500" }"#,
        "[routes.r.retry]\nattempts_per_target = 1",
    ))
    .await;
    // 20,000 draws: the success share's standard deviation is 0.3 points, so 79% is 3.5 of them
    // below the 80% the upstream gives.
    let by_status = drive(&gw, 20_000, 128).await;
    let share = success_share(&by_status);
    eprintln!("{share:.4} succeeded: {by_status:?}");
    assert!(share >= 0.79, "{share:.4} succeeded: {by_status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_flaky_targets_serve_nearly_everything() {
    let gw = Gateway::start(&route(
        r#"{ provider = "mock", model = "chance-20-500" }, { provider = "mock2", model = "chance-20-502" }"#,
        "",
    ))
    .await;
    let by_status = drive(&gw, 10_000, 128).await;
    let share = success_share(&by_status);
    let mut breakers = Vec::new();
    for target in ["mock/chance-20-500", "mock2/chance-20-502"] {
        breakers.push((target, gw.breaker_state(target).await));
    }
    eprintln!("{share:.4} succeeded: {by_status:?}; breakers {breakers:?}");
    assert!(
        share >= 0.995,
        "{share:.4} succeeded: {by_status:?}; breakers {breakers:?}"
    );
    for (target, state) in breakers {
        assert_eq!(
            state, "closed",
            "a 20% error rate is no reason to open {target}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_refuses_connections_is_skipped_within_a_second() {
    let gw = Gateway::start(&route(
        r#"{ provider = "dead", model = "m" }, { provider = "mock", model = "ok" }"#,
        "",
    ))
    .await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        drive(&gw, 16, 16).await;
    }
    for _ in 0..20 {
        let response = gw
            .chat(json!({"model": "r", "messages": user("hello")}))
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-reprise-attempts"),
            Some("1"),
            "the dead target is not tried first any more"
        );
    }
    assert_eq!(gw.breaker_state("dead/m").await, "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_whose_only_target_refuses_connections_fails_fast_rather_than_panicking() {
    let gw = Gateway::start(&route(r#"{ provider = "dead", model = "m" }"#, "")).await;
    drive(&gw, 10, 1).await;
    let started = Instant::now();
    let response = gw
        .chat(json!({"model": "r", "messages": user("hello")}))
        .await;
    assert_eq!(response.status(), 503);
    assert!(header(&response, "retry-after").is_some());
    assert!(started.elapsed() < Duration::from_millis(200));
}

#[tokio::test]
async fn error_bodies_name_the_target_and_the_failure_but_no_address() {
    let gw = Gateway::start(&route(
        r#"{ provider = "dead", model = "m" }"#,
        "[routes.r.retry]\nattempts_per_target = 1",
    ))
    .await;
    let response = gw
        .chat(json!({"model": "r", "messages": user("hello")}))
        .await;
    assert_eq!(response.status(), 502);
    let body = response.text().await.unwrap();
    assert!(body.contains("dead/m: could not connect"), "{body}");
    for internal in ["127.0.0.1", "http://", ":1/", "tcp connect", "os error"] {
        assert!(!body.contains(internal), "{internal} in {body}");
    }
}
