//! The prompt store through HTTP: resolution by label and version, rendering, sticky rollouts,
//! the admin API with its audit trail, persistence across restarts and cache separation between
//! versions. Runs on sled, or on a real Redis with `REPRISE_TEST_STORE=redis` (`make test` runs
//! both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::redis_server::RedisServer;
use common::{ADMIN, Gateway, KEY_A, KEY_B, Mock, header};
use serde_json::{Value, json};

const V1: &str = r#"
description = "support reply"
model = "chat"

[parameters]
temperature = 0.2

[variables.product]
type = "string"
default = "Acme"

[variables.question]
type = "string"
free_text = true

[[messages]]
role = "system"
content = "You support {{ product }}. Be brief."

[[messages]]
role = "user"
content = "{{ question }}"
"#;

fn v2() -> String {
    V1.replace("Be brief.", "Answer with numbered steps.")
}

const LABELS: &str = r#"
production = { version = 1 }
staging = { version = 2 }

[canary]
rollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]
salt = "test-salt"
"#;

struct Prompted {
    gw: Gateway,
    dir: tempfile::TempDir,
    redis: Option<RedisServer>,
}

fn on_redis_requested() -> bool {
    std::env::var("REPRISE_TEST_STORE").is_ok_and(|store| store == "redis")
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn prompts_dir(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("prompts")
}

fn config(dir: &tempfile::TempDir, redis: Option<&RedisServer>) -> String {
    let store = match redis {
        Some(redis) => format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
        None => format!("path = \"{}\"", dir.path().join("store").display()),
    };
    format!(
        r#"
        [cache]
        enabled = true
        {store}
        [prompts]
        dir = "{prompts}"
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.other]
        targets = [{{ provider = "mock2", model = "ok" }}]
        "#,
        prompts = prompts_dir(dir).display()
    )
}

impl Prompted {
    async fn start() -> Prompted {
        let dir = tempfile::tempdir().unwrap();
        let prompts = prompts_dir(&dir);
        write(&prompts.join("reply/v1.toml"), V1);
        write(&prompts.join("reply/v2.toml"), &v2());
        write(&prompts.join("reply/labels.toml"), LABELS);
        let redis = on_redis_requested().then(RedisServer::start);
        let gw = Gateway::start(&config(&dir, redis.as_ref())).await;
        Prompted { gw, dir, redis }
    }

    async fn restart(self) -> Prompted {
        let Prompted { gw, dir, redis } = self;
        let mock: Mock = gw.mock.clone();
        assert!(gw.server.stop().await.unwrap());
        let gw = Gateway::start_with(mock, &config(&dir, redis.as_ref())).await;
        Prompted { gw, dir, redis }
    }

    async fn ask(&self, prompt: Value) -> reqwest::Response {
        self.gw
            .chat_with(KEY_A, json!({"model": "ignored", "prompt": prompt}), &[])
            .await
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .gw
            .client
            .request(method, self.gw.url(path))
            .bearer_auth(ADMIN)
            .header("x-reprise-actor", "alice");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.admin(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

fn question(text: &str) -> Value {
    json!({"question": text})
}

fn upstream_messages(gw: &Gateway, model: &str) -> Value {
    gw.mock.last_request(model).unwrap().1["messages"].clone()
}

#[tokio::test]
async fn a_label_or_a_pinned_version_renders_into_the_upstream_request() {
    let p = Prompted::start().await;
    let response = p
        .ask(json!({"id": "reply", "variables": question("How do I reset my password?")}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-reprise-prompt"), Some("reply"));
    assert_eq!(header(&response, "x-reprise-prompt-version"), Some("1"));
    assert_eq!(
        header(&response, "x-reprise-prompt-label"),
        Some("production")
    );
    // The version's model alias replaces the request's.
    assert_eq!(header(&response, "x-reprise-route"), Some("chat"));
    let (_, sent) = p.gw.mock.last_request("ok").unwrap();
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You support Acme. Be brief."},
            {"role": "user", "content": "How do I reset my password?"},
        ])
    );
    assert_eq!(sent["temperature"], json!(0.2));

    // Pinned version, a variable overriding its default, the request's own temperature winning,
    // and a client turn appended after the template's.
    let response = p
        .gw
        .chat_with(
            KEY_A,
            json!({
                "model": "ignored",
                "temperature": 0.7,
                "messages": [{"role": "user", "content": "And on mobile?"}],
                "prompt": {"id": "reply", "version": 2, "variables": {"question": "Reset?", "product": "Zeta"}},
            }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-reprise-prompt-version"), Some("2"));
    assert_eq!(header(&response, "x-reprise-prompt-label"), None);
    let (_, sent) = p.gw.mock.last_request("ok").unwrap();
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You support Zeta. Answer with numbered steps."},
            {"role": "user", "content": "Reset?"},
            {"role": "user", "content": "And on mobile?"},
        ])
    );
    assert_eq!(sent["temperature"], json!(0.7));
    assert!(
        sent.get("prompt").is_none(),
        "the prompt field is not sent upstream"
    );

    // The header form, for SDKs that cannot add a body field.
    let response =
        p.gw.chat_with(
            KEY_A,
            json!({"model": "ignored", "messages": []}),
            &[
                ("x-reprise-prompt", "reply@staging"),
                (
                    "x-reprise-prompt-variables",
                    r#"{"question": "Where is my invoice?"}"#,
                ),
            ],
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-reprise-prompt-version"), Some("2"));
    assert_eq!(
        upstream_messages(&p.gw, "ok")[1]["content"],
        "Where is my invoice?"
    );
    let response =
        p.gw.chat_with(
            KEY_A,
            json!({"model": "x", "messages": []}),
            &[
                ("x-reprise-prompt", "reply@v1"),
                ("x-reprise-prompt-variables", r#"{"question": "q"}"#),
            ],
        )
        .await;
    assert_eq!(header(&response, "x-reprise-prompt-version"), Some("1"));
}

#[tokio::test]
async fn bad_references_and_variables_are_clear_errors_that_reach_no_upstream() {
    let p = Prompted::start().await;
    let cases = [
        (
            json!({"id": "nope", "variables": question("q")}),
            404,
            "prompt.id",
            "does not exist",
        ),
        (
            json!({"id": "reply", "label": "gold", "variables": question("q")}),
            404,
            "prompt.label",
            "no label \"gold\"",
        ),
        (
            json!({"id": "reply", "version": 9, "variables": question("q")}),
            404,
            "prompt.version",
            "no version 9",
        ),
        (
            json!({"id": "reply", "version": 1, "label": "production", "variables": question("q")}),
            400,
            "prompt.version",
            "not both",
        ),
        (
            json!({"id": "reply"}),
            400,
            "prompt.variables.question",
            "required",
        ),
        (
            json!({"id": "reply", "variables": {"question": "q", "tone": "warm"}}),
            400,
            "prompt.variables.tone",
            "not a variable",
        ),
        (
            json!({"id": "reply", "variables": {"question": 42}}),
            400,
            "prompt.variables.question",
            "type string",
        ),
        (
            json!({"id": "reply", "versoin": 1}),
            400,
            "prompt.versoin",
            "unknown field",
        ),
        (json!("reply"), 400, "prompt", "invalid type"),
    ];
    for (prompt, status, param, says) in cases {
        let response = p.ask(prompt.clone()).await;
        assert_eq!(response.status().as_u16(), status, "{prompt}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["param"], param, "{prompt}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{prompt}: {message}");
    }
    let both =
        p.gw.chat_with(
            KEY_A,
            json!({"model": "x", "prompt": {"id": "reply", "variables": question("q")}}),
            &[("x-reprise-prompt", "reply")],
        )
        .await;
    assert_eq!(both.status(), 400);
    let bad_header =
        p.gw.chat_with(
            KEY_A,
            json!({"model": "x", "messages": []}),
            &[
                ("x-reprise-prompt", "reply"),
                ("x-reprise-prompt-variables", "[1]"),
            ],
        )
        .await;
    assert_eq!(bad_header.status(), 400);
    let body: Value = bad_header.json().await.unwrap();
    assert_eq!(body["error"]["param"], "x-reprise-prompt-variables");
    assert_eq!(p.gw.mock.total_calls(), 0);

    // A variable holding template syntax is sent as the characters it holds.
    let sneaky = "{{ product }} {% for x in range(3) %}x{% endfor %}";
    let response = p
        .ask(json!({"id": "reply", "variables": question(sneaky)}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream_messages(&p.gw, "ok")[1]["content"], sneaky);
}

#[tokio::test]
async fn rollout_arms_are_sticky_per_user_across_requests_and_restarts() {
    let p = Prompted::start().await;
    let mut arms = std::collections::HashMap::new();
    for user in 0..60 {
        let user = format!("user-{user}");
        let body = json!({"model": "x", "user": user, "prompt": {"id": "reply", "label": "canary", "variables": question("hi")}});
        let first = p.gw.chat_with(KEY_A, body.clone(), &[]).await;
        let version = header(&first, "x-reprise-prompt-version")
            .unwrap()
            .to_owned();
        let arm = header(&first, "x-reprise-prompt-arm").unwrap().to_owned();
        assert_eq!(arm, format!("{version}/2"), "arms are listed v1, v2");
        let again = p.gw.chat_with(KEY_A, body, &[]).await;
        assert_eq!(header(&again, "x-reprise-prompt-version").unwrap(), version);
        // The header wins over the body's `user`.
        let by_header = p
            .gw
            .chat_with(
                KEY_A,
                json!({"model": "x", "prompt": {"id": "reply", "label": "canary", "variables": question("hi")}}),
                &[("x-reprise-user", &user)],
            )
            .await;
        assert_eq!(
            header(&by_header, "x-reprise-prompt-version").unwrap(),
            version
        );
        arms.insert(user, version);
    }
    let on_v2 = arms.values().filter(|v| *v == "2").count();
    assert!(
        (15..=45).contains(&on_v2),
        "{on_v2} of 60 users on v2 at 50%"
    );

    let p = p.restart().await;
    for (user, version) in &arms {
        let body = json!({"model": "x", "user": user, "prompt": {"id": "reply", "label": "canary", "variables": question("hi")}});
        let response = p.gw.chat_with(KEY_A, body, &[]).await;
        assert_eq!(
            header(&response, "x-reprise-prompt-version").unwrap(),
            version,
            "{user}"
        );
    }
}

#[tokio::test]
async fn versions_never_share_cached_answers_and_repeats_within_one_hit() {
    let p = Prompted::start().await;
    let ask = |version: u32| json!({"id": "reply", "version": version, "variables": question("Can I pay by card?")});
    let first = p.ask(ask(1)).await;
    assert_eq!(header(&first, "x-reprise-cache"), Some("miss"));
    let key_v1 = header(&first, "x-reprise-cache-key").unwrap().to_owned();
    common::wait_until("the answer is stored", || p.gw.mock.calls("ok") == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let repeat = p.ask(ask(1)).await;
    assert_eq!(header(&repeat, "x-reprise-cache"), Some("hit"));
    let other_version = p.ask(ask(2)).await;
    assert_eq!(header(&other_version, "x-reprise-cache"), Some("miss"));
    assert_ne!(
        header(&other_version, "x-reprise-cache-key").unwrap(),
        key_v1
    );
    // By label, production is v1: the same entry.
    let by_label = p
        .ask(json!({"id": "reply", "variables": question("Can I pay by card?")}))
        .await;
    assert_eq!(header(&by_label, "x-reprise-cache"), Some("hit"));
    assert_eq!(p.gw.mock.calls("ok"), 2);
    // Tenants stay apart even on one prompt version.
    let tenant_b =
        p.gw.chat_with(KEY_B, json!({"model": "x", "prompt": ask(1)}), &[])
            .await;
    assert_eq!(header(&tenant_b, "x-reprise-cache"), Some("miss"));
}

#[tokio::test]
async fn admin_changes_are_audited_and_a_rollback_restores_the_label() {
    use reqwest::Method;
    let p = Prompted::start().await;
    let spec: Value = toml::from_str::<Value>(&V1.replace("Be brief.", "Be warm.")).unwrap();
    let (status, created) = p
        .admin(
            Method::POST,
            "/admin/prompts/reply/versions",
            Some(spec.clone()),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["version"], 3);
    assert_eq!(created["changed"], true);
    let revision = created["revision"].as_u64().unwrap();
    // The same content again is that version, not a new one.
    let (status, same) = p
        .admin(
            Method::POST,
            "/admin/prompts/reply/versions",
            Some(spec.clone()),
        )
        .await;
    assert_eq!(
        (status, same["version"].clone(), same["changed"].clone()),
        (200, json!(3), json!(false))
    );
    // Other content under a taken number is refused.
    let mut clash = spec.clone();
    clash["version"] = json!(2);
    let (status, body) = p
        .admin(Method::POST, "/admin/prompts/reply/versions", Some(clash))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("immutable")
    );
    // A template error is refused with its field, and nothing is stored.
    let mut broken = spec.clone();
    broken["messages"][0]["content"] = json!("Hello {{ nobody }}");
    let (status, body) = p
        .admin(Method::POST, "/admin/prompts/reply/versions", Some(broken))
        .await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("messages[0].content")),
        "{body}"
    );

    // Move production to v3: traffic follows at once.
    let (status, moved) = p
        .admin(
            Method::PUT,
            "/admin/prompts/reply/labels/production",
            Some(json!({"version": 3, "if_revision": revision})),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["action"], "move-label");
    let response = p
        .ask(json!({"id": "reply", "variables": question("q")}))
        .await;
    assert_eq!(header(&response, "x-reprise-prompt-version"), Some("3"));
    // A stale revision, a bad rollout and a missing version change nothing.
    let bad = [
        (json!({"version": 1, "if_revision": revision}), 409),
        (
            json!({"rollout": [{"version": 1, "weight": 90}, {"version": 3, "weight": 20}]}),
            400,
        ),
        (json!({"version": 7}), 400),
        (json!({"version": 1, "rollout": []}), 400),
    ];
    for (body, status) in bad {
        let (got, answer) = p
            .admin(
                Method::PUT,
                "/admin/prompts/reply/labels/production",
                Some(body.clone()),
            )
            .await;
        assert_eq!(got, status, "{body}: {answer}");
    }
    let shown = p.get("/admin/prompts/reply").await;
    assert_eq!(shown["labels"]["production"], json!({"version": 3}));
    assert_eq!(shown["revision"].as_u64().unwrap(), revision + 1);

    // Start a rollout on production, adjust it, then roll back to the plain v3.
    let (status, started) = p
        .admin(
            Method::PUT,
            "/admin/prompts/reply/labels/production",
            Some(json!({"rollout": [{"version": 3, "weight": 90}, {"version": 2, "weight": 10}]})),
        )
        .await;
    assert_eq!(
        (status, started["action"].clone()),
        (200, json!("start-rollout"))
    );
    let (_, adjusted) = p
        .admin(
            Method::PUT,
            "/admin/prompts/reply/labels/production",
            Some(json!({"rollout": [{"version": 3, "weight": 80}, {"version": 2, "weight": 20}]})),
        )
        .await;
    assert_eq!(adjusted["action"], "adjust-rollout");
    assert_eq!(adjusted["target"]["salt"], "reply/production");
    let (status, rolled) = p
        .admin(
            Method::POST,
            "/admin/prompts/reply/labels/production/rollback",
            None,
        )
        .await;
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(rolled["action"], "rollback");
    assert_eq!(
        rolled["target"]["rollout"][1]["weight"], 10,
        "back to 90/10"
    );

    let history = p.get("/admin/prompts/reply/history").await;
    let actions: Vec<(&str, &str)> = history["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions[actions.len() - 5..],
        [
            ("create-version", "alice"),
            ("move-label", "alice"),
            ("start-rollout", "alice"),
            ("adjust-rollout", "alice"),
            ("rollback", "alice"),
        ]
    );
    assert!(actions.starts_with(&[("create-version", "startup"), ("create-version", "startup")]));
    let audit = p.get("/admin/prompts/audit?limit=3").await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 3);
    assert_eq!(audit["data"][0]["prompt"], "reply");
    assert_eq!(audit["data"][0]["action"], "rollback");

    let diff = p.get("/admin/prompts/reply/diff?from=1&to=3").await;
    let diff = diff["diff"].as_str().unwrap();
    assert!(
        diff.contains("-content = \"You support {{ product }}. Be brief.\""),
        "{diff}"
    );
    assert!(
        diff.contains("+content = \"You support {{ product }}. Be warm.\""),
        "{diff}"
    );
    let exported = p.get("/admin/prompts/reply/export").await;
    let v3: Value = toml::from_str(exported["files"]["v3.toml"].as_str().unwrap()).unwrap();
    assert_eq!(v3["messages"], spec["messages"]);

    // Only the admin key may do any of this.
    let response =
        p.gw.client
            .get(p.gw.url("/admin/prompts"))
            .bearer_auth(KEY_A)
            .send()
            .await
            .unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn concurrent_admin_changes_lose_no_update() {
    let p = Prompted::start().await;
    let creates = (0..12).map(|i| {
        let spec: Value =
            toml::from_str(&V1.replace("Be brief.", &format!("Variant {i}."))).unwrap();
        p.admin(
            reqwest::Method::POST,
            "/admin/prompts/reply/versions",
            Some(spec),
        )
    });
    let created = futures::future::join_all(creates).await;
    let mut numbers: Vec<u64> = created
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 201, "{body}");
            body["version"].as_u64().unwrap()
        })
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (3..15).collect::<Vec<u64>>());
    let paths: Vec<String> = (3..15)
        .map(|version| format!("/admin/prompts/reply/labels/l{version}"))
        .collect();
    let moves = paths.iter().zip(3..15).map(|(path, version)| {
        p.admin(
            reqwest::Method::PUT,
            path,
            Some(json!({"version": version})),
        )
    });
    for (status, body) in futures::future::join_all(moves).await {
        assert_eq!(status, 200, "{body}");
    }
    let shown = p.get("/admin/prompts/reply").await;
    assert_eq!(shown["versions"].as_array().unwrap().len(), 14);
    assert_eq!(shown["labels"].as_object().unwrap().len(), 3 + 12);
    let history = p.get("/admin/prompts/reply/history").await;
    assert_eq!(history["data"].as_array().unwrap().len(), 2 + 3 + 24);
}

#[tokio::test]
async fn prompt_changes_survive_a_restart_and_the_label_file_applies_when_it_changes() {
    use reqwest::Method;
    let p = Prompted::start().await;
    let spec: Value = toml::from_str(&V1.replace("Be brief.", "Be warm.")).unwrap();
    let (status, _) = p
        .admin(Method::POST, "/admin/prompts/reply/versions", Some(spec))
        .await;
    assert_eq!(status, 201);
    let (status, _) = p
        .admin(
            Method::PUT,
            "/admin/prompts/reply/labels/production",
            Some(json!({"version": 3})),
        )
        .await;
    assert_eq!(status, 200);
    let before = p.get("/admin/prompts/reply/history").await;

    let p = p.restart().await;
    let shown = p.get("/admin/prompts/reply").await;
    assert_eq!(
        shown["labels"]["production"],
        json!({"version": 3}),
        "an unchanged labels.toml does not undo API moves"
    );
    assert_eq!(p.get("/admin/prompts/reply/history").await, before);
    let response = p
        .ask(json!({"id": "reply", "variables": question("q")}))
        .await;
    assert_eq!(header(&response, "x-reprise-prompt-version"), Some("3"));

    // A changed labels.toml is applied at the next start, and audited as coming from the file.
    write(
        &prompts_dir(&p.dir).join("reply/labels.toml"),
        "production = { version = 2 }\n",
    );
    let p = p.restart().await;
    let shown = p.get("/admin/prompts/reply").await;
    assert_eq!(shown["labels"]["production"], json!({"version": 2}));
    let history = p.get("/admin/prompts/reply/history").await;
    let last = history["data"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["actor"], "startup");
    assert!(last["source"].as_str().unwrap().ends_with("labels.toml"));
}

#[tokio::test]
async fn a_changed_version_file_stops_startup_with_its_name() {
    let p = Prompted::start().await;
    let Prompted { gw, dir, redis } = p;
    assert!(gw.server.stop().await.unwrap());
    let v1 = prompts_dir(&dir).join("reply/v1.toml");
    write(&v1, &V1.replace("Be brief.", "Be sneaky."));
    let mock = Mock::start().await;
    let text = format!(
        "{}\n{}",
        common::base_config(&mock),
        config(&dir, redis.as_ref())
    );
    let config = reprise::config::Config::from_toml_str(&text, "test.toml", &|_| None).unwrap();
    let error = match reprise::server::start(&config).await {
        Ok(_) => panic!("a changed version must not start"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains(&v1.display().to_string()), "{error}");
    assert!(error.contains("immutable"), "{error}");
}

#[tokio::test]
async fn stats_and_metrics_compare_versions() {
    let p = Prompted::start().await;
    for version in [1, 1, 2] {
        let response = p
            .ask(json!({"id": "reply", "version": version, "variables": question("stats?")}))
            .await;
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing = p.ask(json!({"id": "reply", "version": 1})).await;
    assert_eq!(missing.status(), 400);
    let stats = p.get("/admin/prompts/stats").await;
    let rows = stats["data"].as_array().unwrap();
    let v1 = rows.iter().find(|r| r["version"] == 1).unwrap();
    assert_eq!(v1["requests"], 2);
    assert_eq!(v1["cache_hits"], 1);
    assert_eq!(v1["hit_ratio"], 0.5);
    assert_eq!(v1["labels"], json!(["canary", "production"]));
    assert!(v1["prompt_tokens"].as_u64().unwrap() > 0, "{v1}");
    let v2 = rows.iter().find(|r| r["version"] == 2).unwrap();
    assert_eq!(
        (v2["requests"].clone(), v2["cache_hits"].clone()),
        (json!(1), json!(0))
    );
    // A stream's tokens are counted from its usage chunk, which a client that did not ask for
    // it does not see.
    let tokens_before = v2["completion_tokens"].as_u64().unwrap();
    assert!(tokens_before > 0);
    let streamed = p
        .gw
        .chat_with(
            KEY_A,
            json!({"model": "x", "stream": true, "prompt": {"id": "reply", "version": 2, "variables": question("streamed?")}}),
            &[],
        )
        .await;
    let chunks = common::stream_chunks(&streamed.text().await.unwrap());
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{chunks:?}"
    );
    let stats = p.get("/admin/prompts/stats").await;
    let v2 = stats["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == 2)
        .unwrap()
        .clone();
    assert_eq!(v2["requests"], 2);
    assert!(
        v2["completion_tokens"].as_u64().unwrap() > tokens_before,
        "{v2}"
    );
    let metrics = p.gw.metrics().await;
    assert!(
        metrics.contains(
            r#"reprise_prompt_requests_total{prompt="reply",version="1",outcome="hit"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"reprise_prompt_request_duration_seconds_count{prompt="reply",version="2"} 2"#
    ));
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn replicas_on_one_redis_follow_each_others_changes_within_a_second() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts_dir(&dir);
    write(&prompts.join("reply/v1.toml"), V1);
    write(&prompts.join("reply/v2.toml"), &v2());
    write(&prompts.join("reply/labels.toml"), LABELS);
    let redis = RedisServer::start();
    let config = config(&dir, Some(&redis));
    let one = Prompted {
        gw: Gateway::start(&config).await,
        dir,
        redis: None,
    };
    let two = Gateway::start(&config).await;
    let (status, _) = one
        .admin(
            Method::PUT,
            "/admin/prompts/reply/labels/production",
            Some(json!({"version": 2})),
        )
        .await;
    assert_eq!(status, 200);
    let started = std::time::Instant::now();
    loop {
        let response = two
            .chat_with(
                KEY_A,
                json!({"model": "x", "prompt": {"id": "reply", "variables": question("q")}}),
                &[],
            )
            .await;
        if header(&response, "x-reprise-prompt-version") == Some("2") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the other replica still serves v1"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A version created on the second replica is known to the first.
    let spec: Value = toml::from_str(&V1.replace("Be brief.", "Be warm.")).unwrap();
    let created = two
        .client
        .post(two.url("/admin/prompts/reply/versions"))
        .bearer_auth(ADMIN)
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let started = std::time::Instant::now();
    loop {
        let (status, _) = one
            .admin(Method::GET, "/admin/prompts/reply/versions/3", None)
            .await;
        if status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "replica one does not know v3"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(redis);
}
