//! Gateway keys made at run time through the admin API, used through the OpenAI surface: shown
//! once, stored as digests, restricted to models, rotated with a grace period, expired, revoked on
//! every replica within a second, and kept across a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{Gateway, Mock, user};
use serde_json::{Value, json};

fn routes(store: &str) -> String {
    format!(
        r#"
        [keys]
        [cache]
        {store}
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.other]
        targets = [{{ provider = "mock", model = "ok" }}]
        "#
    )
}

fn sled(dir: &tempfile::TempDir) -> String {
    format!("path = \"{}\"", dir.path().join("store").display())
}

async fn chat(gw: &Gateway, secret: &str, model: &str) -> reqwest::Response {
    gw.client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(secret)
        .json(&json!({"model": model, "messages": user("hello")}))
        .send()
        .await
        .unwrap()
}

async fn chat_status(gw: &Gateway, secret: &str, model: &str) -> (u16, Value) {
    let response = chat(gw, secret, model).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_key_is_shown_once_kept_as_a_digest_and_works_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&routes(&sled(&dir))).await;
    let (id, secret) = gw
        .create_key(json!({"name": "support bot", "tenant": "support", "metadata": {"team": "cx"}}))
        .await;
    assert!(secret.starts_with("rpr_") && secret.len() > 40, "{secret}");
    assert_eq!(chat_status(&gw, &secret, "chat").await.0, 200);
    assert_eq!(chat_status(&gw, "rpr_0000", "chat").await.0, 401);

    let (status, shown) = gw
        .admin(reqwest::Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["tenant"], "support");
    assert_eq!(shown["metadata"]["team"], "cx");
    assert!(secret.starts_with(shown["prefix"].as_str().unwrap()));
    let (_, listed) = gw
        .admin(reqwest::Method::GET, "/admin/keys?tenant=support", None)
        .await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let everything = format!("{shown}{listed}");
    assert!(
        !everything.contains(&secret),
        "the secret is never shown again"
    );
    assert!(
        !everything.contains(&secret[10..]),
        "nor any part past the prefix"
    );

    // The store holds no secret either.
    drop(gw);
    let stored = std::fs::read_dir(dir.path().join("store"))
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path()).ok())
        .any(|bytes| bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    assert!(!stored, "the secret is not in the store's files");
}

#[tokio::test]
async fn a_key_may_be_limited_to_some_models_and_changed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&routes(&sled(&dir))).await;
    let (id, secret) = gw
        .create_key(json!({"name": "n", "tenant": "t", "models": ["chat"]}))
        .await;
    assert_eq!(chat_status(&gw, &secret, "chat").await.0, 200);
    let (status, body) = chat_status(&gw, &secret, "other").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    let models: Value = gw
        .client
        .get(gw.url("/v1/models"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat"]);

    let path = format!("/admin/keys/{id}");
    let (status, _) = gw
        .admin(reqwest::Method::PATCH, &path, Some(json!({"models": null})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        chat_status(&gw, &secret, "other").await.0,
        200,
        "the change applies at once"
    );
    for (bad, param) in [
        (json!({"tenant": "else"}), "tenant"),
        (json!({"models": []}), "models"),
        (json!({"expires_at": "yesterday"}), "expires_at"),
        (json!({"name": ""}), "name"),
    ] {
        let (status, body) = gw
            .admin(reqwest::Method::PATCH, &path, Some(bad.clone()))
            .await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some(param)),
            "{bad}"
        );
    }
    let (status, _) = gw
        .admin(
            reqwest::Method::PATCH,
            "/admin/keys/key_nope",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, body) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("tenant"))
    );
    let not_admin = gw
        .client
        .get(gw.url("/admin/keys"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(not_admin.status(), 403, "a gateway key cannot manage keys");
}

#[tokio::test]
async fn rotation_keeps_the_old_secret_for_its_grace_and_expiry_ends_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&routes(&sled(&dir))).await;
    let (id, old) = gw.create_key(json!({"name": "n", "tenant": "t"})).await;
    let (status, rotated) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/admin/keys/{id}/rotate"),
            Some(json!({"grace": "1s"})),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(chat_status(&gw, &new, "chat").await.0, 200);
    assert_eq!(
        chat_status(&gw, &old, "chat").await.0,
        200,
        "within the grace period"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(chat_status(&gw, &old, "chat").await.0, 401, "after it");
    assert_eq!(chat_status(&gw, &new, "chat").await.0, 200);

    let (_, short) = gw
        .create_key(json!({"name": "short", "tenant": "t", "expires_in": "1s"}))
        .await;
    assert_eq!(chat_status(&gw, &short, "chat").await.0, 200);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(chat_status(&gw, &short, "chat").await.0, 401);
}

#[tokio::test]
async fn keys_survive_a_restart_and_a_revoked_key_stays_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let config = routes(&sled(&dir));
    let mock = Mock::start().await;
    let gw = Gateway::start_with(mock.clone(), &config).await;
    let (_, kept) = gw.create_key(json!({"name": "kept", "tenant": "t"})).await;
    let (revoked_id, revoked) = gw.create_key(json!({"name": "gone", "tenant": "t"})).await;
    assert_eq!(chat_status(&gw, &revoked, "chat").await.0, 200);
    let (status, body) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/admin/keys/{revoked_id}/revoke"),
            None,
        )
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("revoked")));
    assert_eq!(
        chat_status(&gw, &revoked, "chat").await.0,
        401,
        "at once on this replica"
    );
    assert!(gw.server.stop().await.unwrap());

    let gw = Gateway::start_with(mock, &config).await;
    assert_eq!(chat_status(&gw, &kept, "chat").await.0, 200);
    assert_eq!(chat_status(&gw, &revoked, "chat").await.0, 401);
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn a_key_revoked_on_one_replica_is_refused_on_another_within_a_second() {
    let redis = RedisServer::start();
    let config = routes(&format!(
        "store = \"redis\"\nredis_url = \"{}\"",
        redis.url()
    ));
    let one = Gateway::start(&config).await;
    let two = Gateway::start(&config).await;
    let (id, secret) = one
        .create_key(json!({"name": "shared", "tenant": "t"}))
        .await;
    assert_eq!(
        chat_status(&two, &secret, "chat").await.0,
        200,
        "made on one, used on two"
    );
    let (status, _) = one
        .admin(
            reqwest::Method::POST,
            &format!("/admin/keys/{id}/revoke"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let revoked = Instant::now();
    while chat_status(&two, &secret, "chat").await.0 == 200 {
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "still accepted on the other replica a second later"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("refused on the other replica after {:?}", revoked.elapsed());
}

#[tokio::test]
async fn a_key_over_its_request_limit_gets_429_with_openai_headers() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&routes(&sled(&dir))).await;
    let (_, limited) = gw
        .create_key(json!({"name": "n", "tenant": "t", "limits": {"rpm": 3}}))
        .await;
    let (_, other) = gw.create_key(json!({"name": "o", "tenant": "t"})).await;
    for remaining in ["2", "1", "0"] {
        let response = chat(&gw, &limited, "chat").await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            common::header(&response, "x-ratelimit-limit-requests"),
            Some("3")
        );
        assert_eq!(
            common::header(&response, "x-ratelimit-remaining-requests"),
            Some(remaining)
        );
        let reset = common::header(&response, "x-ratelimit-reset-requests").unwrap();
        assert!(reset.ends_with('s'), "{reset}");
    }
    let refused = chat(&gw, &limited, "chat").await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = common::header(&refused, "retry-after")
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        common::header(&refused, "x-ratelimit-remaining-requests"),
        Some("0")
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(
        chat(&gw, &other, "chat").await.status(),
        200,
        "other keys are not limited"
    );
    let (status, body) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"name": "z", "tenant": "t", "limits": {"rpm": 0}})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("limits.rpm"))
    );
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_enforce_a_request_limit_once_not_twice() {
    let redis = RedisServer::start();
    let config = routes(&format!(
        "store = \"redis\"\nredis_url = \"{}\"",
        redis.url()
    ));
    let one = Gateway::start(&config).await;
    let two = Gateway::start(&config).await;
    let (_, secret) = one
        .create_key(json!({"name": "shared", "tenant": "t", "limits": {"rpm": 100}}))
        .await;
    let statuses = futures::future::join_all((0..300).map(|i| {
        let gateway = if i % 2 == 0 { &one } else { &two };
        let secret = secret.clone();
        async move { chat_status(gateway, &secret, "chat").await.0 }
    }))
    .await;
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    eprintln!(
        "two replicas, 300 concurrent requests, limit 100/min: {accepted} accepted, {refused} refused"
    );
    assert!((100..=105).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted + refused, 300);
}

#[tokio::test]
async fn a_tenant_limit_is_shared_by_every_key_of_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!("[tenants.a]\nrpm = 3\n{}", routes(&sled(&dir)))).await;
    let (_, runtime_key) = gw.create_key(json!({"name": "n", "tenant": "a"})).await;
    let mut statuses = Vec::new();
    for secret in [
        common::KEY_A,
        runtime_key.as_str(),
        common::KEY_A,
        runtime_key.as_str(),
    ] {
        statuses.push(chat_status(&gw, secret, "chat").await);
    }
    let codes: Vec<u16> = statuses.iter().map(|(status, _)| *status).collect();
    assert_eq!(
        codes,
        [200, 200, 200, 429],
        "static and run-time keys count together"
    );
    let message = statuses[3].1["error"]["message"].as_str().unwrap();
    assert!(message.contains("for this tenant"), "{message}");
    assert_eq!(
        chat_status(&gw, common::KEY_B, "chat").await.0,
        200,
        "tenant b has its own"
    );
}
