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
