//! The web console's sign-in and session, over HTTP: the page and its assets only for a signed-in
//! browser, the admin API with the session only together with its CSRF token, sign-out ending
//! the session. (The pages themselves are tested in a browser by the console's browser tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{ADMIN, Gateway, KEY_A};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, COOKIE, SET_COOKIE};

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn sign_in(gw: &Gateway, key: &str) -> reqwest::Response {
    browser()
        .post(gw.url("/console/login"))
        .form(&[("key", key)])
        .send()
        .await
        .unwrap()
}

fn csrf_of(page: &str) -> String {
    let start = page.find("name=\"reprise-csrf\" content=\"").unwrap() + 29;
    page[start..start + 64].to_owned()
}

async fn get(
    gw: &Gateway,
    path: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
) -> (StatusCode, String) {
    let mut request = browser().get(gw.url(path));
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    if let Some(csrf) = csrf {
        request = request.header("x-reprise-csrf", csrf);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test]
async fn a_console_session_reaches_the_admin_api_only_with_its_csrf_token_until_sign_out() {
    let gw = Gateway::start(
        r#"
        [routes.chat]
        targets = [{ provider = "mock", model = "ok" }]
        "#,
    )
    .await;

    // Signed out: the sign-in form, nothing else.
    let response = browser().get(gw.url("/console")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let page = response.text().await.unwrap();
    assert!(
        page.contains("<label for=\"key\">Admin key</label>"),
        "{page}"
    );
    assert!(!page.contains("reprise-csrf"));
    assert_eq!(get(&gw, "/console/console.js", None, None).await.0, 404);

    // Not a form: the sign-in page again, with a 400.
    let response = browser()
        .post(gw.url("/console/login"))
        .json(&serde_json::json!({"key": ADMIN}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("Send the sign-in form.")
    );

    // A wrong key, or a tenant's key, does not sign in.
    for key in ["not-a-key", KEY_A] {
        let response = sign_in(&gw, key).await;
        assert_eq!(response.status(), 401);
        assert!(response.headers().get(SET_COOKIE).is_none());
    }

    let response = sign_in(&gw, ADMIN).await;
    assert_eq!(response.status(), 303);
    let set_cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains(ADMIN));
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let (status, page) = get(&gw, "/console", Some(&cookie), None).await;
    assert_eq!(status, 200);
    let csrf = csrf_of(&page);
    assert!(page.contains("<script src=\"/console/console.js\" defer>"));
    let (status, script) = get(&gw, "/console/console.js", Some(&cookie), None).await;
    assert_eq!(status, 200);
    assert!(script.contains("x-reprise-csrf"));

    // The cookie alone (what a forged cross-site request carries) is refused; with the token,
    // the admin API answers.
    assert_eq!(get(&gw, "/admin/prompts", Some(&cookie), None).await.0, 403);
    assert_eq!(
        get(&gw, "/admin/prompts", Some(&cookie), Some(&"0".repeat(64)))
            .await
            .0,
        403
    );
    assert_eq!(
        get(&gw, "/v1/health/providers", Some(&cookie), Some(&csrf))
            .await
            .0,
        200
    );
    // A tampered session is no session.
    let tampered = format!("{}0", &cookie[..cookie.len() - 1]);
    let tampered = if tampered == cookie {
        format!("{}1", &cookie[..cookie.len() - 1])
    } else {
        tampered
    };
    assert_eq!(
        get(&gw, "/v1/health/providers", Some(&tampered), Some(&csrf))
            .await
            .0,
        401
    );

    // Sign-out needs the page's token, then ends the session.
    let response = browser()
        .post(gw.url("/console/logout"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = browser()
        .post(gw.url("/console/logout"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    assert!(
        response.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_eq!(
        get(&gw, "/v1/health/providers", Some(&cookie), Some(&csrf))
            .await
            .0,
        401
    );
    let (_, page) = get(&gw, "/console", Some(&cookie), None).await;
    assert!(page.contains("Admin key"));
}

/// Signs in, opens every page and signs out in headless Chromium (`tests/console/browser.py`,
/// Playwright for Python), against a real gateway with a prompt experiment, the semantic cache,
/// the request log, a key with a budget and a mock upstream. Screenshots go to
/// `target/console-screenshots/`.
#[ignore = "needs chromium, Playwright and the embedding model (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_reads_the_console_and_signs_out() {
    let python = common::prerequisites::sdk_python();
    let chromium = common::prerequisites::browser();
    let model_dir = common::prerequisites::embed_model_dir();
    let dir = tempfile::tempdir().unwrap();
    let prompt = dir.path().join("prompts/support");
    std::fs::create_dir_all(&prompt).unwrap();
    for (file, prefix) in [("v1.toml", "Answer: "), ("v2.toml", "Answer kindly: ")] {
        std::fs::write(
            prompt.join(file),
            format!(
                "model = \"chat\"\n[[messages]]\nrole = \"user\"\ncontent = \"{prefix}{{{{ q }}}}\"\n[variables.q]\ntype = \"string\"\n"
            ),
        )
        .unwrap();
    }
    std::fs::write(
        prompt.join("labels.toml"),
        "[production]\nrollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]\n[production.experiment]\n[staging]\nversion = 1\n",
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        r#"
        [cache]
        enabled = true
        semantic = true
        semantic_threshold = 0.8
        path = "{store}"
        [semantic]
        model_dir = "{model_dir}"
        [request_log]
        path = "{log}"
        [keys]
        [prompts]
        dir = "{prompts}"
        [prices.ok]
        input = 1.0
        output = 2.0
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.flaky]
        targets = [{{ provider = "mock", model = "status-503" }}, {{ provider = "mock2", model = "ok" }}]
        [routes.flaky.cache]
        enabled = false
        semantic = false
        "#,
        store = dir.path().join("store").display(),
        log = dir.path().join("requests").display(),
        prompts = dir.path().join("prompts").display(),
    ))
    .await;
    let traffic = console_traffic(&gw).await;
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    let mut command = std::process::Command::new(python);
    command
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/browser.py"))
        .args([gw.base.as_str(), ADMIN])
        .arg(&shots)
        .arg(&traffic.failover_request)
        .arg(traffic.failover_attempts.to_string())
        .env("REPRISE_BROWSER", chromium);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("signed out"), "{printed}");
    for page in [
        "sign-in.png",
        "overview.png",
        "cache.png",
        "prompts.png",
        "rollout-changed.png",
        "providers.png",
        "keys.png",
        "requests.png",
        "request-detail.png",
    ] {
        assert!(shots.join(page).metadata().unwrap().len() > 1000, "{page}");
    }
    // What the page changed is in the store, by the console, with the experiment kept.
    let (_, history) = gw
        .admin(reqwest::Method::GET, "/admin/prompts/support/history", None)
        .await;
    let changes: Vec<(String, String)> = history["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        changes.ends_with(&[
            ("adjust-rollout".into(), "console".into()),
            ("rollback".into(), "console".into()),
            ("start-rollout".into(), "console".into()),
            ("stop-rollout".into(), "console".into())
        ]),
        "{changes:?}"
    );
    let (_, view) = gw
        .admin(reqwest::Method::GET, "/admin/prompts/support", None)
        .await;
    assert_eq!(view["labels"]["production"]["rollout"][0]["weight"], 50);
    assert!(view["labels"]["production"].get("experiment").is_some());
    assert_eq!(view["labels"]["staging"]["version"], 2);
    // The hit marked wrong in the cache review no longer answers the paraphrase.
    let again = gw.chat(ask(PARAPHRASE)).await;
    assert_eq!(common::header(&again, "x-reprise-cache"), Some("miss"));
    assert_eq!(
        common::header(&again, "x-reprise-cache-semantic"),
        Some("rejected-feedback")
    );
    // The review is per tenant, and feedback names the tenant whose entry it is.
    let (_, review) = gw
        .admin(reqwest::Method::GET, "/admin/cache/review?tenant=a", None)
        .await;
    let marked = &review["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["request_text"] == PARAPHRASE && r["entry"].is_string())
        .unwrap();
    assert_eq!(marked["marked"], "wrong");
    assert_eq!(marked["entry_text"], QUESTION);
    let (_, other) = gw
        .admin(reqwest::Method::GET, "/admin/cache/review?tenant=b", None)
        .await;
    assert_eq!(other["data"], serde_json::json!([]));
    let (status, body) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/cache/feedback",
            Some(serde_json::json!({"tenant": "b", "entry": marked["entry"], "correct": false})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (404, Some("entry"))
    );
    let (status, _) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/cache/feedback",
            Some(serde_json::json!({"tenant": "a"})),
        )
        .await;
    assert_eq!(status, 400);
}

const QUESTION: &str = "How do I cancel my order?";
const PARAPHRASE: &str = "How can I cancel my order?";

fn ask(text: &str) -> serde_json::Value {
    serde_json::json!({"model": "chat", "messages": common::user(text)})
}

struct Traffic {
    /// A request that failed over from a 503 to the next target, and its upstream attempts.
    failover_request: String,
    failover_attempts: usize,
}

/// What the pages show: a miss, an exact hit and a semantic hit, a guard's refusal, a request
/// that failed over, and a key with a budget that spent some of it.
async fn console_traffic(gw: &Gateway) -> Traffic {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while gw
        .admin(reqwest::Method::GET, "/admin/cache/stats", None)
        .await
        .1["semantic"]["loaded"]
        != true
    {
        assert!(
            std::time::Instant::now() < deadline,
            "semantic index never loaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (id, secret) = gw
        .create_key(serde_json::json!({
            "name": "support bot", "tenant": "a",
            "limits": {"rpm": 600, "budget": {"usd": 5.0, "period": "month"}},
        }))
        .await;
    assert!(id.starts_with("key_"), "{id}");
    let send = |text: &'static str| {
        gw.client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&ask(text))
            .send()
    };
    let first = send(QUESTION).await.unwrap();
    assert_eq!(common::header(&first, "x-reprise-cache"), Some("miss"));
    // Both entries are written after the answer: wait for them before asking again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats = gw
            .admin(reqwest::Method::GET, "/admin/cache/stats", None)
            .await
            .1;
        let exact: u64 = stats["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|row| row["entries"].as_u64())
            .sum();
        if exact >= 1 && stats["semantic"]["indexed_entries"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the entries never landed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let again = send(QUESTION).await.unwrap();
    assert_eq!(common::header(&again, "x-reprise-cache"), Some("hit"));
    let hit = send(PARAPHRASE).await.unwrap();
    assert_eq!(
        common::header(&hit, "x-reprise-cache"),
        Some("semantic-hit")
    );
    // A guard refuses an order number that differs.
    send("Cancel order 1234").await.unwrap();
    while gw
        .admin(reqwest::Method::GET, "/admin/cache/stats", None)
        .await
        .1["semantic"]["indexed_entries"]
        .as_u64()
        < Some(2)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the entry was never indexed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let refused = send("Cancel order 1243").await.unwrap();
    assert_eq!(
        common::header(&refused, "x-reprise-cache-semantic"),
        Some("rejected-numbers")
    );
    let failover = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&serde_json::json!({"model": "flaky", "messages": common::user("hello")}))
        .send()
        .await
        .unwrap();
    assert_eq!(failover.status(), 200);
    let failover_request = common::header(&failover, "x-request-id")
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let failover_attempts = loop {
        let (status, record) = gw
            .admin(
                reqwest::Method::GET,
                &format!("/admin/requests/{failover_request}"),
                None,
            )
            .await;
        if status == 200 {
            break record["upstream"].as_array().unwrap().len();
        }
        assert!(std::time::Instant::now() < deadline, "never logged");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(failover_attempts >= 2, "{failover_attempts}");
    Traffic {
        failover_request,
        failover_attempts,
    }
}
