//! Proves the wire format with clients nobody here wrote: the official `openai` and `anthropic`
//! Python SDKs (installed from PyPI by `make test` into `.venv`) drive a real gateway.
//!
//! The interpreter comes from `REPRISE_SDK_PYTHON`, which `make test` sets: ignored by a plain
//! `cargo test`, failing if run without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Gateway, KEY_A};

#[ignore = "needs Python with the official SDKs (make test)"]
#[tokio::test]
async fn official_python_sdks_work_unchanged() {
    let python = common::prerequisites::sdk_python();
    // A prompt, to check that the SDK's `extra_body` and `extra_headers` reach the prompt store.
    let dir = tempfile::tempdir().unwrap();
    let greet = dir.path().join("prompts/greet");
    std::fs::create_dir_all(&greet).unwrap();
    std::fs::write(
        greet.join("v1.toml"),
        "model = \"chat\"\n[variables.name]\ntype = \"string\"\n[[messages]]\nrole = \"user\"\ncontent = \"Say hello to {{ name }}\"\n",
    )
    .unwrap();
    std::fs::write(greet.join("labels.toml"), "production = { version = 1 }\n").unwrap();
    let gw = Gateway::start(&format!(
        r#"
        [cache]
        path = "{store}"
        [prompts]
        dir = "{prompts}"
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.tools]
        targets = [{{ provider = "mock", model = "tool" }}]
        [routes.drop]
        targets = [{{ provider = "mock", model = "drop" }}]
        [routes.embed]
        targets = [{{ provider = "mock", model = "emb" }}]
        [routes.claude]
        targets = [{{ provider = "claude", model = "claude-ok" }}]
        "#,
        store = dir.path().join("store").display(),
        prompts = dir.path().join("prompts").display(),
    ))
    .await;
    let output = tokio::process::Command::new(python)
        .arg("tests/sdk/check_sdks.py")
        .env("REPRISE_BASE", &gw.base)
        .env("REPRISE_KEY", KEY_A)
        .output()
        .await
        .expect("the SDK python interpreter runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all SDK checks passed"), "{stdout}");
}

/// A gateway with run-time keys, a store in `dir`, `extra` config lines and the route `chat`.
async fn keyed_gateway(dir: &tempfile::TempDir, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "[keys]\n[cache]\npath = \"{}\"\n{extra}[routes.chat]\ntargets = [{{ provider = \"mock\", model = \"ok\" }}]\n",
        dir.path().join("store").display()
    ))
    .await
}

/// Runs a Python script with the official SDKs against `gw` as the key `secret`; its output,
/// after checking that it succeeded.
async fn run_script(gw: &Gateway, secret: &str, script: &str) -> String {
    let output = tokio::process::Command::new(common::prerequisites::sdk_python())
        .args(["-c", script])
        .env("REPRISE_BASE", &gw.base)
        .env("REPRISE_KEY", secret)
        .output()
        .await
        .expect("the SDK python interpreter runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    stdout
}

/// The key's one request a minute is spent first; the SDK then meets 429 with `Retry-After`
/// (up to a minute), waits it out by itself and succeeds, without the caller doing anything.
#[ignore = "needs Python with the official SDKs (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_waits_out_a_rate_limit_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let gw = keyed_gateway(&dir, "").await;
    let (_, secret) = gw
        .create_key(serde_json::json!({"name": "sdk", "tenant": "t", "limits": {"rpm": 1}}))
        .await;
    let first = gw
        .chat_with(
            &secret,
            serde_json::json!({"model": "chat", "messages": common::user("first")}),
            &[],
        )
        .await;
    assert_eq!(first.status(), 200);
    let script = r#"
import os, time, openai
client = openai.OpenAI(base_url=os.environ["REPRISE_BASE"] + "/v1", api_key=os.environ["REPRISE_KEY"], max_retries=2, timeout=90)
started = time.monotonic()
raw = client.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "second"}])
print("status", raw.http_response.status_code, "retries", raw.retries_taken, "waited %.1f" % (time.monotonic() - started))
print("answer", raw.parse().choices[0].message.content)
"#;
    let stdout = run_script(&gw, &secret, script).await;
    eprintln!("{stdout}");
    assert!(stdout.contains("status 200 retries 1"), "{stdout}");
    assert!(stdout.contains("answer echo: second"), "{stdout}");
}

/// A spent budget is not a rate limit: the SDK raises `RateLimitError` with OpenAI's
/// `insufficient_quota` code at once, without retrying (the gateway says `x-should-retry: false`).
#[ignore = "needs Python with the official SDKs (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_stops_at_a_spent_budget_without_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let gw = keyed_gateway(&dir, "[prices.ok]\ninput = 1000.0\noutput = 1000.0\n").await;
    let (_, secret) = gw
        .create_key(
            serde_json::json!({"name": "sdk", "tenant": "t", "limits": {"budget": {"usd": 0.03}}}),
        )
        .await;
    let script = r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["REPRISE_BASE"] + "/v1", api_key=os.environ["REPRISE_KEY"], max_retries=3)
first = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=7)
print("first", first.choices[0].message.content)
try:
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "again"}], max_tokens=7)
    print("not refused")
except openai.RateLimitError as error:
    print("refused", error.status_code, error.code)
"#;
    let stdout = run_script(&gw, &secret, script).await;
    assert!(stdout.contains("first echo: hi"), "{stdout}");
    assert!(
        stdout.contains("refused 429 insufficient_quota"),
        "{stdout}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"reprise_limit_refusals_total{scope="key",limit="budget"} 1"#),
        "one attempt, no retries: {metrics}"
    );
}
