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
