//! What some tests need beyond Rust: the embedding model, a Python with the official SDKs (and
//! Playwright), a `redis-server`, Chromium. Tests that need one are `#[ignore = "needs ..."]`, so a plain `cargo test`
//! (and `make check`) lists them as ignored instead of passing them; `make test` installs every
//! prerequisite and runs them with `--include-ignored`. A test run without its prerequisite
//! fails, naming it; `tests/prerequisites.rs` fails under `CI=true` if any is missing.
#![allow(dead_code)]

fn required(variable: &str, what: &str) -> String {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{variable} is not set: this test needs {what} (run `make test`)"),
    }
}

/// The embedding model's folder (`make test` fetches it and sets `REPRISE_EMBED_MODEL_DIR`).
pub fn embed_model_dir() -> String {
    let dir = required("REPRISE_EMBED_MODEL_DIR", "the embedding model");
    assert!(
        std::path::Path::new(&dir).join("model.onnx").exists()
            || std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()),
        "REPRISE_EMBED_MODEL_DIR={dir} holds no model (run `make test`)"
    );
    dir
}

/// A Python interpreter with the pinned `openai` and `anthropic` SDKs (`make test` makes `.venv`).
pub fn sdk_python() -> String {
    required("REPRISE_SDK_PYTHON", "Python with the official SDKs")
}

/// Headless Chromium from Debian's packages (`make test` installs it and sets
/// `REPRISE_BROWSER`); Playwright for Python is in the SDKs' venv.
pub fn browser() -> String {
    required("REPRISE_BROWSER", "Chromium (the console's browser tests)")
}

/// Whether `redis-server` is on the PATH (`make test` installs it from Debian's packages).
pub fn has_redis_server() -> bool {
    std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every prerequisite that is missing, by name.
pub fn missing() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if std::env::var("REPRISE_EMBED_MODEL_DIR").is_err() {
        missing.push("REPRISE_EMBED_MODEL_DIR (the embedding model)");
    }
    if std::env::var("REPRISE_SDK_PYTHON").is_err() {
        missing.push("REPRISE_SDK_PYTHON (Python with the official SDKs)");
    }
    if !has_redis_server() {
        missing.push("redis-server");
    }
    if std::env::var("REPRISE_BROWSER").is_ok_and(|v| v.is_empty())
        || std::env::var("REPRISE_BROWSER").is_err()
    {
        missing.push("REPRISE_BROWSER (Chromium, for the console's browser tests)");
    }
    missing
}
