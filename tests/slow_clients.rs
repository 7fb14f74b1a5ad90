//! Hostile and slow clients: idle and slowloris connections, bodies that never finish, one tenant
//! flooding the in-flight limit. None of them may slow `/healthz` or another tenant, each is closed
//! after its timeout, and none holds up shutdown. Loopback only, bounded in count and time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN, Gateway, KEY_A, KEY_B, user};
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVER: &str = r#"
max_in_flight = 50
header_timeout = "4s"
body_timeout = "4s"
"#;

fn cached_route(dir: &tempfile::TempDir) -> String {
    format!(
        r#"
        [cache]
        enabled = true
        path = "{}"
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.slow]
        targets = [{{ provider = "mock", model = "slow-1500" }}]
        [routes.slow.cache]
        enabled = false
        "#,
        dir.path().join("store").display()
    )
}

/// A connection that sent part of a request head and stops there.
async fn slowloris(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: reprise\r\nX-Slow: 1")
        .await
        .unwrap();
    stream
}

/// A request with a valid key that announces 1,000 bytes of body and sends 10.
async fn stalled_body(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: reprise\r\nAuthorization: Bearer {KEY_A}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Whether the gateway closed `stream` within `limit` (what it sent before closing is returned).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&received).into()),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99).div_ceil(100) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_neither_slow_others_nor_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start_with_server(SERVER, &cached_route(&dir)).await;
    let addr = gw.server.addr;
    let ask_b = || json!({"model": "chat", "messages": user("what are your opening hours?")});
    assert_eq!(gw.chat_with(KEY_B, ask_b(), &[]).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let opened = Instant::now();
    let mut idle = Vec::new();
    let mut slow = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(addr).await.unwrap());
        slow.push(slowloris(addr).await);
    }
    let mut stalled = Vec::new();
    for _ in 0..50 {
        stalled.push(stalled_body(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut health = Vec::new();
    let mut cached = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let response = gw.client.get(gw.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        health.push(started.elapsed());
        let started = Instant::now();
        let response = gw.chat_with(KEY_B, ask_b(), &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(common::header(&response, "x-reprise-cache"), Some("hit"));
        cached.push(started.elapsed());
    }
    let during = opened.elapsed();
    assert!(
        during < Duration::from_secs(3),
        "measured while all were open: {during:?}"
    );
    let (health_p99, cached_p99) = (p99(health), p99(cached));
    eprintln!(
        "2,000 idle/slow + 50 stalled bodies open: /healthz p99 {health_p99:?}, other tenant's cache hit p99 {cached_p99:?}"
    );
    assert!(health_p99 < Duration::from_millis(50), "{health_p99:?}");
    assert!(cached_p99 < Duration::from_millis(50), "{cached_p99:?}");

    // Every one of them is closed once its timeout (4 s) has passed; the stalled bodies get 408.
    let limit = Duration::from_secs(4) + Duration::from_secs(3)
        - opened.elapsed().min(Duration::from_secs(3));
    for stream in &mut stalled {
        let answer = closed_within(stream, limit)
            .await
            .expect("stalled body closed");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    for stream in idle.iter_mut().chain(slow.iter_mut()) {
        assert!(
            closed_within(stream, Duration::from_secs(3))
                .await
                .is_some(),
            "an idle or slow connection outlived the header timeout"
        );
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"reprise_client_timeouts_total{kind="body"} 50"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_flooding_the_in_flight_limit_leaves_room_for_another() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start_with_server(
        "max_in_flight = 10\nmax_in_flight_per_tenant = 8",
        &cached_route(&dir),
    )
    .await;
    let flood = {
        let (client, url) = (gw.client.clone(), gw.url("/v1/chat/completions"));
        tokio::spawn(async move {
            futures::stream::iter(0..60)
                .map(|i| {
                    let (client, url) = (client.clone(), url.clone());
                    async move {
                        client
                            .post(url)
                            .bearer_auth(KEY_A)
                            .json(&json!({"model": "slow", "messages": user(&format!("q{i}"))}))
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                    }
                })
                .buffer_unordered(60)
                .collect::<Vec<_>>()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut latencies = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        let response = gw
            .chat_with(
                KEY_B,
                json!({"model": "chat", "messages": user(&format!("b{i}"))}),
                &[],
            )
            .await;
        assert_eq!(response.status(), 200);
        latencies.push(started.elapsed());
    }
    assert!(!flood.is_finished(), "tenant a was still flooding");
    let worst = *latencies.iter().max().unwrap();
    eprintln!("tenant b's slowest of 20 answers while a held its 8 slots and queued 52: {worst:?}");
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    let statuses = flood.await.unwrap();
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200))),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_does_not_hold_up_shutdown() {
    let gw = Gateway::start_with_server(
        "",
        "[routes.chat]\ntargets = [{ provider = \"mock\", model = \"ok\" }]",
    )
    .await;
    let mut partial = slowloris(gw.server.addr).await;
    let idle = TcpStream::connect(gw.server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let drained = gw.server.stop().await.unwrap();
    assert!(drained, "everything drained");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shutdown took {:?} (grace 5 s)",
        started.elapsed()
    );
    assert!(
        closed_within(&mut partial, Duration::from_secs(1))
            .await
            .is_some()
    );
    drop(idle);
}

#[tokio::test]
async fn metrics_can_need_a_token_live_on_their_own_port_and_leave_tenants_out() {
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        "[metrics]\ntoken = \"scrape-me\"\nlisten = \"127.0.0.1:0\"\ntenant_labels = false\n{}",
        cached_route(&dir)
    );
    let gw = Gateway::start_with_server("", &routes).await;
    let chat = json!({"model": "chat", "messages": user("hello")});
    assert_eq!(gw.chat(chat).await.status(), 200);
    assert_eq!(
        gw.client
            .get(gw.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "not on the API listener"
    );
    let metrics_url = format!("http://{}/metrics", gw.server.metrics_addr.unwrap());
    let get = |key: Option<&str>| {
        let mut request = gw.client.get(&metrics_url);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some(KEY_A)).await.unwrap().status(), 401);
    assert_eq!(get(Some(ADMIN)).await.unwrap().status(), 200);
    let text = get(Some("scrape-me")).await.unwrap().text().await.unwrap();
    assert!(text.contains("reprise_cache_requests_total"), "{text}");
    assert!(text.contains(r#"tenant="all""#), "{text}");
    assert!(!text.contains(r#"tenant="a""#), "{text}");
}
