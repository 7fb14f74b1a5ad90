//! The semantic cache through HTTP, with the real embedding model and a mock upstream that counts
//! its calls: "served from cache" is asserted as "the upstream was not called again".
//!
//! Needs the model (`make test` fetches it and sets `REPRISE_EMBED_MODEL_DIR`): the tests are
//! ignored by a plain `cargo test` and fail if run without it (see `common/prerequisites.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{ADMIN, Gateway, KEY_A, KEY_B, Mock, header, stream_chunks, streamed_text, user};
use serde_json::{Value, json};

struct Semantic {
    gw: Gateway,
    config: String,
    _dir: tempfile::TempDir,
}

fn config(model_dir: &str, store: &str, extra: &str) -> String {
    format!(
        r#"
        [cache]
        enabled = true
        semantic = true
        semantic_threshold = 0.8
        {store}
        [semantic]
        model_dir = "{model_dir}"
        sync_interval = "100ms"
        {extra}
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.exact-only]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.exact-only.cache]
        semantic = false
        [routes.faq]
        targets = [{{ provider = "mock", model = "constant" }}]
        [routes.strict]
        targets = [{{ provider = "mock", model = "ok" }}]
        [routes.strict.cache]
        semantic_threshold = 0.99
        [routes.faq-agreeing]
        targets = [{{ provider = "mock", model = "constant" }}]
        [routes.faq-agreeing.cache]
        semantic_answer_agreement = 2
        [routes.faq-strict]
        targets = [{{ provider = "mock", model = "constant" }}]
        [routes.faq-strict.cache]
        semantic_threshold = 0.99
        semantic_answer_agreement = 0
        "#
    )
}

async fn start(extra: &str) -> Semantic {
    let model_dir = common::prerequisites::embed_model_dir();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("path = \"{}\"", dir.path().join("store").display());
    let config = config(&model_dir, &store, extra);
    let gw = Gateway::start(&config).await;
    let s = Semantic {
        gw,
        config,
        _dir: dir,
    };
    s.wait_loaded().await;
    s
}

fn ask(text: &str) -> Value {
    json!({"model": "chat", "messages": user(text)})
}

impl Semantic {
    async fn send(&self, key: &str, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let response = self.gw.chat_with(key, body, headers).await;
        assert_eq!(response.status(), 200);
        response
    }

    async fn stats(&self) -> Value {
        self.gw.get_json("/admin/cache/stats", ADMIN).await
    }

    async fn indexed(&self) -> u64 {
        self.stats().await["semantic"]["indexed_entries"]
            .as_u64()
            .unwrap()
    }

    async fn wait_loaded(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.stats().await["semantic"]["loaded"] != true {
            assert!(Instant::now() < deadline, "the semantic index never loaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until this gateway's index holds `count` entries (writes land after the answer).
    /// The index's size once no write has landed for 100 ms (at most 5 s).
    async fn settled_indexed(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut count = self.indexed().await;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.indexed().await;
            if now == count || Instant::now() >= deadline {
                return now;
            }
            count = now;
        }
    }

    async fn wait_indexed(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.indexed().await < count {
            assert!(
                Instant::now() < deadline,
                "semantic entries never reached {count}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `first`, waits for its entry, then sends `second`: the response to `second`.
    async fn pair(&self, first: Value, second: Value) -> reqwest::Response {
        // Earlier misses are stored in the background: let them land first, or the count below
        // could grow by one of theirs and `second` go out before `first`'s entry exists.
        let before = self.settled_indexed().await;
        self.send(KEY_A, first, &[]).await;
        self.wait_indexed(before + 1).await;
        self.send(KEY_A, second, &[]).await
    }

    fn calls(&self) -> usize {
        self.gw.mock.calls("ok")
    }
}

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn a_paraphrase_is_answered_from_the_cache() {
    let s = start("").await;
    let first = s.send(KEY_A, ask("How do I cancel my order?"), &[]).await;
    assert_eq!(header(&first, "x-reprise-cache"), Some("miss"));
    assert_eq!(header(&first, "x-reprise-cache-semantic"), Some("miss"));
    s.wait_indexed(1).await;
    let hit = s.send(KEY_A, ask("How can I cancel my order?"), &[]).await;
    assert_eq!(header(&hit, "x-reprise-cache"), Some("semantic-hit"));
    assert_eq!(header(&hit, "x-reprise-cache-semantic"), Some("hit"));
    let similarity: f32 = header(&hit, "x-reprise-cache-similarity")
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.8..1.0).contains(&similarity), "{similarity}");
    let entry = header(&hit, "x-reprise-cache-entry").unwrap().to_owned();
    assert!(entry.starts_with("chat/-/"), "{entry}");
    let body: Value = hit.json().await.unwrap();
    assert_eq!(content(&body), "echo: How do I cancel my order?");
    assert_eq!(s.calls(), 1, "the paraphrase did not reach the upstream");

    // Streamed, the same entry is replayed as a stream.
    let mut streamed = ask("how do i cancel my order");
    streamed["stream"] = json!(true);
    let response = s.send(KEY_A, streamed, &[]).await;
    assert_eq!(header(&response, "x-reprise-cache"), Some("semantic-hit"));
    let chunks = stream_chunks(&response.text().await.unwrap());
    assert_eq!(streamed_text(&chunks), "echo: How do I cancel my order?");
    assert_eq!(s.calls(), 1);

    let metrics = s.gw.metrics().await;
    assert!(
        metrics
            .contains(r#"reprise_semantic_lookups_total{tenant="a",route="chat",outcome="hit"} 2"#),
        "{metrics}"
    );
    let stats = s.stats().await;
    let row = stats["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tenant"] == "a" && r["route"] == "chat")
        .unwrap();
    assert_eq!(row["semantic_hits"], 2);
    assert_eq!(row["semantic_entries"], 1);
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn a_paraphrase_in_other_words_passes_the_word_check() {
    let s = start("").await;
    for (first, second) in [
        (
            "Where is the nearest store?",
            "Which store is closest to me?",
        ),
        (
            "What are your opening hours?",
            "At what times are you open?",
        ),
        // "time" is said by "when" on the other side: a grammar word is a counterpart too.
        (
            "When will the Elm Street store close?",
            "At what time does the Elm Street store close?",
        ),
    ] {
        let response = s.pair(ask(first), ask(second)).await;
        assert_eq!(
            header(&response, "x-reprise-cache-semantic"),
            Some("hit"),
            "{first:?} ~ {second:?}"
        );
        assert_eq!(
            content(&response.json().await.unwrap()),
            format!("echo: {first}")
        );
    }
    assert_eq!(s.calls(), 3);
}

/// Wordings of one intent that the word check keeps apart ("donuts" and "squishee" have no
/// counterparts in each other), and a third that is near both and that the word check keeps
/// apart from each ("donuts" or "squishee" is left over).
const ONE_INTENT: [&str; 2] = [
    "Where can I buy donuts near me?",
    "Where can I buy a squishee near me?",
];
const NEAR_ALL_OF_THEM: &str = "Where can I buy a squishee and donuts near me?";
const WORDS_WITH_AGREEMENT: &str = "verifier = \"rules+words\"\nanswer_agreement = 2";

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn answer_agreement_serves_what_the_upstream_answered_alike_and_nothing_else() {
    // Agreement extends the word check, which refuses these wordings as paraphrases.
    let s = start(WORDS_WITH_AGREEMENT).await;
    let on = |route: &str, text: &str| json!({"model": route, "messages": user(text)});
    // Two wordings, each a miss: the word check rejects them as paraphrases of each other.
    for (route, answers_alike) in [("faq", true), ("chat", false)] {
        for (i, text) in ONE_INTENT.iter().enumerate() {
            let before = s.indexed().await;
            let response = s.send(KEY_A, on(route, text), &[]).await;
            assert_ne!(
                header(&response, "x-reprise-cache"),
                Some("semantic-hit"),
                "{route}: wording {i} {text:?}"
            );
            s.wait_indexed(before + 1).await;
        }
        let calls = s.gw.mock.calls("constant") + s.calls();
        let response = s.send(KEY_A, on(route, NEAR_ALL_OF_THEM), &[]).await;
        let semantic = header(&response, "x-reprise-cache-semantic").map(str::to_owned);
        if answers_alike {
            // The upstream gave both one answer: the third wording gets it from the cache.
            assert_eq!(semantic.as_deref(), Some("hit-agreement"));
            assert_eq!(header(&response, "x-reprise-cache"), Some("semantic-hit"));
            assert!(header(&response, "x-reprise-cache-entry").is_some());
            assert_eq!(content(&response.json().await.unwrap()), "the one answer");
            assert_eq!(s.gw.mock.calls("constant") + s.calls(), calls);
        } else {
            // Two different answers: no agreement, and the upstream answers.
            assert_ne!(semantic.as_deref(), Some("hit-agreement"));
            assert_ne!(header(&response, "x-reprise-cache"), Some("semantic-hit"));
            assert_eq!(s.gw.mock.calls("constant") + s.calls(), calls + 1);
        }
    }
    for (text, refused_by) in [
        // A word that neither wording has ("cheap"): the upstream's one answer says nothing
        // about it (0.88 alike, and the rules pass).
        (
            "Do you know where I can buy donuts and a squishee near me for cheap?",
            None,
        ),
        // Agreement does not lift the rules: a day makes it another question (this one is
        // alike enough to both wordings, 0.74 and 0.85).
        (
            "Where can I buy a squishee and donuts near me tomorrow?",
            Some("rejected-times"),
        ),
    ] {
        let calls = s.gw.mock.calls("constant");
        let response = s.send(KEY_A, on("faq", text), &[]).await;
        let semantic = header(&response, "x-reprise-cache-semantic").unwrap();
        match refused_by {
            Some(outcome) => assert_eq!(semantic, outcome, "{text}"),
            None => assert!(
                semantic == "miss" || semantic.starts_with("rejected-"),
                "{text}: {semantic}"
            ),
        }
        assert_eq!(s.gw.mock.calls("constant"), calls + 1, "{text}");
    }
    // Nor does it cross tenants.
    let response = s.send(KEY_B, on("faq", NEAR_ALL_OF_THEM), &[]).await;
    assert_ne!(header(&response, "x-reprise-cache"), Some("semantic-hit"));
}

impl Semantic {
    /// Stores `ONE_INTENT`'s wordings on `route`, then asks `NEAR_ALL_OF_THEM`: answered by
    /// agreement (and not by the upstream) exactly when `agreed`.
    async fn expect_agreement(&self, route: &str, agreed: bool) {
        let on = |text: &str| json!({"model": route, "messages": user(text)});
        for text in ONE_INTENT {
            let before = self.indexed().await;
            self.send(KEY_A, on(text), &[]).await;
            self.wait_indexed(before + 1).await;
        }
        let calls = self.gw.mock.calls("constant");
        let response = self.send(KEY_A, on(NEAR_ALL_OF_THEM), &[]).await;
        let semantic = header(&response, "x-reprise-cache-semantic");
        assert_eq!(
            semantic == Some("hit-agreement"),
            agreed,
            "{route}: {semantic:?}"
        );
        let asked_upstream = self.gw.mock.calls("constant") > calls;
        assert_eq!(asked_upstream, !agreed, "{route}");
    }
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn answer_agreement_is_off_by_default_and_set_per_route() {
    let s = start(r#"verifier = "rules+words""#).await;
    s.expect_agreement("faq", false).await;
    // A route may switch it on for itself.
    s.expect_agreement("faq-agreeing", true).await;
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn a_route_switches_answer_agreement_off_for_itself() {
    let s = start(WORDS_WITH_AGREEMENT).await;
    // On for every route by default; a route held to a strict threshold opts out.
    s.expect_agreement("faq-strict", false).await;
    s.expect_agreement("faq", true).await;
}

/// Pairs an embedding puts close together but whose answers differ, and the guard that must
/// catch each.
const LOOKALIKES: &[(&str, &str, &str)] = &[
    ("Send 5 USD to Alice", "Send 50 USD to Alice", "numbers"),
    (
        "Mute notifications for one hour",
        "Mute notifications for two hours",
        "numbers",
    ),
    (
        "Book a table for tonight",
        "Book a table for tomorrow",
        "times",
    ),
    (
        "Turn on the lights in the kitchen",
        "Turn off the lights in the kitchen",
        "polarity",
    ),
    (
        "Is the pharmacy open on Sunday?",
        "Is the pharmacy not open on Sunday?",
        "negation",
    ),
    (
        "What is the price of the Model S?",
        "What is the price of the Model X?",
        "entities",
    ),
    (
        "What is the number for the Central Plaza store?",
        "When does the Central Plaza store close?",
        "content",
    ),
];

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn each_guard_blocks_its_lookalike_which_a_plain_threshold_would_serve() {
    let plain = start(r#"verifier = "off""#).await;
    let words = start(r#"verifier = "rules+words""#).await;
    let calibrated = start("").await;
    for (i, (first, second, guard)) in LOOKALIKES.iter().enumerate() {
        // A plain threshold (the guards off) serves the first answer to the second request:
        // these are real false hits, not pairs the embedding already tells apart.
        let response = plain.pair(ask(first), ask(second)).await;
        assert_eq!(
            header(&response, "x-reprise-cache"),
            Some("semantic-hit"),
            "{first:?} ~ {second:?} is not similar enough to test the {guard} guard"
        );
        assert_eq!(
            content(&response.json().await.unwrap()),
            format!("echo: {first}")
        );
        // The calibrated default vetoes numbers, times, polarity and negation by rule; another
        // name or another content word lowers the fitted score below the cut-off.
        let calibrated_guard = match *guard {
            "entities" | "content" => "score",
            rule => rule,
        };
        for (guarded, guard) in [(&words, *guard), (&calibrated, calibrated_guard)] {
            let response = guarded.pair(ask(first), ask(second)).await;
            assert_eq!(
                header(&response, "x-reprise-cache"),
                Some("miss"),
                "{first:?} ~ {second:?}"
            );
            assert_eq!(
                header(&response, "x-reprise-cache-semantic"),
                Some(format!("rejected-{guard}").as_str()),
                "{first:?} ~ {second:?}"
            );
            assert_eq!(
                content(&response.json().await.unwrap()),
                format!("echo: {second}")
            );
            assert_eq!(guarded.calls(), 2 * (i + 1));
        }
    }
    for (guarded, guards) in [
        (
            &words,
            &[
                "numbers", "times", "polarity", "negation", "entities", "content",
            ][..],
        ),
        (
            &calibrated,
            &["numbers", "times", "polarity", "negation", "score"][..],
        ),
    ] {
        let metrics = guarded.gw.metrics().await;
        for guard in guards {
            assert!(
                metrics.contains(&format!(
                    "reprise_semantic_rejections_total{{guard=\"{guard}\"}}"
                )),
                "{guard}: {metrics}"
            );
        }
    }
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn scopes_never_cross() {
    let s = start("").await;
    let question = "How do I reset my password?";
    let paraphrase = "How can I reset my password?";
    let with_system = |system: &str, text: &str| {
        json!({"model": "chat", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": text}]})
    };
    let after_turns = |earlier: &str, text: &str| {
        json!({"model": "chat", "messages": [
            {"role": "user", "content": earlier},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": text}]})
    };
    let with_temperature =
        |t: f64, text: &str| json!({"model": "chat", "messages": user(text), "temperature": t});
    s.send(KEY_A, ask(question), &[]).await;
    s.send(KEY_A, with_system("You are a bank.", question), &[])
        .await;
    s.send(KEY_A, after_turns("I use the mobile app.", question), &[])
        .await;
    s.send(KEY_A, with_temperature(0.0, question), &[]).await;
    s.wait_indexed(4).await;
    assert_eq!(s.gw.mock.total_calls(), 4);

    type Headers = Vec<(&'static str, &'static str)>;
    let cases: Vec<(&str, &str, Value, Headers)> = vec![
        ("another tenant", KEY_B, ask(paraphrase), vec![]),
        (
            "another system prompt",
            KEY_A,
            with_system("You are an airline.", paraphrase),
            vec![],
        ),
        (
            "other earlier turns",
            KEY_A,
            after_turns("I use the website.", paraphrase),
            vec![],
        ),
        (
            "another temperature",
            KEY_A,
            with_temperature(0.5, paraphrase),
            vec![],
        ),
        (
            "another namespace",
            KEY_A,
            ask(paraphrase),
            vec![("x-reprise-cache-namespace", "other")],
        ),
    ];
    for (what, key, body, headers) in cases {
        let calls = s.calls();
        let response = s.send(key, body, &headers).await;
        assert_eq!(
            header(&response, "x-reprise-cache"),
            Some("miss"),
            "{what} must not share answers"
        );
        assert_eq!(s.calls(), calls + 1, "{what}");
    }
    // ...while within each scope the paraphrase hits.
    let same_scope = [
        ask(paraphrase),
        with_system("You are a bank.", paraphrase),
        after_turns("I use the mobile app.", paraphrase),
        with_temperature(0.0, paraphrase),
    ];
    let calls = s.calls();
    for body in same_scope {
        let response = s.send(KEY_A, body.clone(), &[]).await;
        assert_eq!(
            header(&response, "x-reprise-cache"),
            Some("semantic-hit"),
            "{body}"
        );
    }
    assert_eq!(s.calls(), calls);
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn requests_that_are_not_semantically_cached_say_why() {
    let s = start("").await;
    s.pair(
        ask("What are your opening hours?"),
        ask("When are you open?"),
    )
    .await;
    let tools = json!([{"type": "function", "function": {"name": "hours", "parameters": {"type": "object"}}}]);
    let image = json!([{"role": "user", "content": [
        {"type": "text", "text": "What are your opening hours?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]);
    type Headers = Vec<(&'static str, &'static str)>;
    let cases: Vec<(Value, Headers, &str)> = vec![
        (
            json!({"model": "chat", "messages": user("What are your opening hours today?"), "temperature": 1.5}),
            vec![],
            "skipped-temperature",
        ),
        (
            json!({"model": "chat", "messages": user("What are your opening hours today?"), "tools": tools}),
            vec![],
            "skipped-tools",
        ),
        (
            json!({"model": "chat", "messages": image}),
            vec![],
            "skipped-non-text",
        ),
        (
            ask("What are your opening hours today?"),
            vec![("x-reprise-cache-semantic", "off")],
            "skipped-request",
        ),
    ];
    for (body, headers, why) in cases {
        let calls = s.calls();
        let response = s.send(KEY_A, body, &headers).await;
        assert_eq!(header(&response, "x-reprise-cache-semantic"), Some(why));
        assert_eq!(header(&response, "x-reprise-cache"), Some("miss"));
        assert_eq!(s.calls(), calls + 1, "{why}");
    }
    // A route with the stage off, and a route whose threshold only a near-repeat meets.
    let mut body = ask("What are your opening hours?");
    body["model"] = json!("exact-only");
    s.send(KEY_A, body.clone(), &[]).await;
    body["messages"] = user("When are you open?");
    let response = s.send(KEY_A, body, &[]).await;
    assert_eq!(header(&response, "x-reprise-cache-semantic"), None);
    assert_eq!(header(&response, "x-reprise-cache"), Some("miss"));
    let mut strict = ask("What are your opening hours?");
    strict["model"] = json!("strict");
    let mut paraphrase = strict.clone();
    paraphrase["messages"] = user("When are you open?");
    let response = s.pair(strict, paraphrase).await;
    assert_eq!(header(&response, "x-reprise-cache-semantic"), Some("miss"));
    let bad =
        s.gw.client
            .post(s.gw.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .header("x-reprise-cache-semantic", "maybe")
            .json(&ask("hello"))
            .send()
            .await
            .unwrap();
    assert_eq!(bad.status(), 400);
    let error: Value = bad.json().await.unwrap();
    assert_eq!(error["error"]["param"], "x-reprise-cache-semantic");
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn feedback_about_a_wrong_hit_stops_the_entry_matching_there() {
    let s = start("").await;
    let hit = s
        .pair(
            ask("Where can I park my car?"),
            ask("Where should I park my car?"),
        )
        .await;
    assert_eq!(header(&hit, "x-reprise-cache"), Some("semantic-hit"));
    let entry = header(&hit, "x-reprise-cache-entry").unwrap().to_owned();
    let similarity: f32 = header(&hit, "x-reprise-cache-similarity")
        .unwrap()
        .parse()
        .unwrap();

    let feedback = |key: &'static str, body: Value| {
        let s = &s;
        async move {
            s.gw.client
                .post(s.gw.url("/v1/cache/feedback"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    // Another tenant cannot touch the entry: for it, the entry does not exist.
    let response = feedback(
        KEY_B,
        json!({"entry": entry, "similarity": similarity, "correct": false}),
    )
    .await;
    assert_eq!(response.status(), 404);
    for (bad, param) in [
        (json!({"entry": "nonsense", "correct": false}), "entry"),
        (
            json!({"entry": entry, "similarity": 7, "correct": false}),
            "similarity",
        ),
        (json!({"entry": entry}), "correct"),
    ] {
        let response = feedback(KEY_A, bad.clone()).await;
        assert_eq!(response.status(), 400, "{bad}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{bad}: {error}");
    }
    let response = feedback(
        KEY_A,
        json!({"entry": entry, "similarity": similarity, "correct": false}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let outcome: Value = response.json().await.unwrap();
    assert!(outcome["threshold"].as_f64().unwrap() > f64::from(similarity));

    let again = s.send(KEY_A, ask("Where should I park my car?"), &[]).await;
    assert_eq!(header(&again, "x-reprise-cache"), Some("miss"));
    assert_eq!(
        header(&again, "x-reprise-cache-semantic"),
        Some("rejected-feedback")
    );
    assert_eq!(s.calls(), 2);
    // The exact repeat of the original question is still a (exact) hit.
    let exact = s.send(KEY_A, ask("Where can I park my car?"), &[]).await;
    assert_eq!(header(&exact, "x-reprise-cache"), Some("hit"));
    assert!(
        s.gw.metrics()
            .await
            .contains(r#"reprise_semantic_feedback_total{verdict="wrong"} 1"#)
    );
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn entries_survive_a_restart() {
    let s = start("").await;
    s.send(KEY_A, ask("How do I change my delivery address?"), &[])
        .await;
    s.wait_indexed(1).await;
    let Semantic { gw, config, _dir } = s;
    let mock: Mock = gw.mock.clone();
    assert!(gw.server.stop().await.unwrap());
    let gw = Gateway::start_with(mock, &config).await;
    let s = Semantic { gw, config, _dir };
    s.wait_loaded().await;
    assert_eq!(s.stats().await["semantic"]["loaded_at_startup"], 1);
    let embedded_before = s.stats().await["semantic"]["embedded_texts"]
        .as_u64()
        .unwrap();
    let hit = s
        .send(KEY_A, ask("How can I change my delivery address?"), &[])
        .await;
    assert_eq!(header(&hit, "x-reprise-cache"), Some("semantic-hit"));
    assert_eq!(s.calls(), 1);
    // The entry was stored with its words in context: judging it took no forward pass of its
    // own, only the request's.
    let embedded_after = s.stats().await["semantic"]["embedded_texts"]
        .as_u64()
        .unwrap();
    assert_eq!(embedded_after - embedded_before, 1);
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn a_purge_removes_semantic_entries_too() {
    let s = start("").await;
    s.send(KEY_A, ask("How do I close my account?"), &[]).await;
    s.wait_indexed(1).await;
    let purged: Value =
        s.gw.post("/admin/cache/purge", ADMIN, json!({"tenant": "a"}))
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(purged["purged"], 2, "the exact and the semantic entry");
    let response = s.send(KEY_A, ask("How can I close my account?"), &[]).await;
    assert_eq!(header(&response, "x-reprise-cache"), Some("miss"));
    assert_eq!(s.calls(), 2);
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn two_gateways_on_one_redis_share_semantic_hits_within_a_second() {
    let model_dir = common::prerequisites::embed_model_dir();
    let redis = RedisServer::start();
    let store = format!("store = \"redis\"\nredis_url = \"{}\"", redis.url());
    let config = config(&model_dir, &store, "");
    let one = Semantic {
        gw: Gateway::start(&config).await,
        config: config.clone(),
        _dir: tempfile::tempdir().unwrap(),
    };
    let two = Semantic {
        gw: Gateway::start_with(one.gw.mock.clone(), &config).await,
        config,
        _dir: tempfile::tempdir().unwrap(),
    };
    one.wait_loaded().await;
    two.wait_loaded().await;
    one.send(KEY_A, ask("Can I return a gift without a receipt?"), &[])
        .await;
    one.wait_indexed(1).await;
    let written = Instant::now();
    loop {
        let response = two
            .send(
                KEY_A,
                ask("How can I return a gift without a receipt?"),
                &[("cache-control", "no-store")],
            )
            .await;
        if header(&response, "x-reprise-cache") == Some("semantic-hit") {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "the other replica's entry was not a hit within a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("replica sync took {:?}", written.elapsed());
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn a_prompt_embeds_only_its_free_text_and_versions_and_variables_stay_apart() {
    let prompts = tempfile::tempdir().unwrap();
    let version = |instruction: &str| {
        format!(
            r#"
            model = "chat"
            [variables.product]
            type = "string"
            default = "Acme"
            [variables.question]
            type = "string"
            free_text = true
            [[messages]]
            role = "system"
            content = "You support {{{{ product }}}}. {instruction}"
            [[messages]]
            role = "user"
            content = "A customer of {{{{ product }}}} writes: {{{{ question }}}} (answer in two sentences)"
            "#
        )
    };
    let folder = prompts.path().join("reply");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("v1.toml"), version("Be brief.")).unwrap();
    std::fs::write(folder.join("v2.toml"), version("Use numbered steps.")).unwrap();
    std::fs::write(folder.join("labels.toml"), "production = { version = 1 }\n").unwrap();
    let extra = format!("[prompts]\ndir = \"{}\"", prompts.path().display());
    let s = start(&extra).await;
    let ask = |question: &str, version: u32, product: &str| {
        json!({"model": "x", "prompt": {"id": "reply", "version": version,
            "variables": {"question": question, "product": product}}})
    };
    let hit = s
        .pair(
            ask("How do I cancel my order?", 1, "Acme"),
            ask("How can I cancel my order?", 1, "Acme"),
        )
        .await;
    assert_eq!(header(&hit, "x-reprise-cache"), Some("semantic-hit"));
    assert_eq!(header(&hit, "x-reprise-prompt-version"), Some("1"));
    assert_eq!(s.calls(), 1);
    // Another value of a variable that is not free text, or another version: never a hit.
    for (product, version) in [("Zeta", 1), ("Acme", 2)] {
        let response = s
            .send(
                KEY_A,
                ask("How can I cancel my order?", version, product),
                &[],
            )
            .await;
        assert_eq!(
            header(&response, "x-reprise-cache"),
            Some("miss"),
            "{product} v{version}"
        );
    }
    assert_eq!(s.calls(), 3);
    // The guards read the free text: a different order number is not a hit.
    let guarded = s
        .pair(
            ask("Cancel order 1234", 1, "Acme"),
            ask("Cancel order 1243", 1, "Acme"),
        )
        .await;
    assert_eq!(
        header(&guarded, "x-reprise-cache-semantic"),
        Some("rejected-numbers")
    );
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn verification_asks_the_upstream_and_learns_whether_it_answers_alike() {
    // Every hit is checked (a band this wide makes even confident ones uncertain): it is served
    // from the cache, and the upstream is asked behind it and the two answers compared.
    let s = start("verify_share = 1.0\nverify_band = 0.5").await;
    let (question, paraphrase) = ("How do I cancel my order?", "How can I cancel my order?");
    let on = |route: &str, text: &str| json!({"model": route, "messages": user(text)});
    // "chat" echoes each prompt: the upstream answers the two wordings differently.
    let response = s.pair(ask(question), ask(paraphrase)).await;
    assert_eq!(header(&response, "x-reprise-cache"), Some("semantic-hit"));
    assert_eq!(
        content(&response.json().await.unwrap()),
        format!("echo: {question}")
    );
    // "faq" answers everything alike: the upstream agrees with the cached answer.
    let response = s.pair(on("faq", question), on("faq", paraphrase)).await;
    assert_eq!(header(&response, "x-reprise-cache"), Some("semantic-hit"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = s.gw.metrics().await;
        let counted = |result: &str| {
            metrics.contains(&format!(
                "reprise_semantic_verifications_total{{kind=\"hit\",result=\"{result}\"}} 1"
            ))
        };
        if counted("agree") && counted("disagree") {
            assert!(
                metrics.contains("reprise_semantic_verified_error_ratio 0.5"),
                "{metrics}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two misses and the two checks behind the hits.
    assert_eq!(s.gw.mock.total_calls(), 4);
    // The entry the echo contradicted is closed: the paraphrase is no longer served from it.
    let response = s.send(KEY_A, ask(paraphrase), &[]).await;
    assert_eq!(header(&response, "x-reprise-cache"), Some("miss"));
    // How an entry opens and closes on what the upstream said is unit-tested in verify.rs.
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn a_model_file_that_cannot_be_used_stops_startup_naming_the_field() {
    let model_dir = common::prerequisites::embed_model_dir();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("path = \"{}\"", dir.path().join("store").display());
    let stale = dir.path().join("stale.json");
    std::fs::write(
        &stale,
        r#"{"features": ["cosine"], "vetoes": [], "mean": [0], "scale": [1], "weights": [1],
            "bias": 0, "min_similarity": 0.5, "rival_margin": 0.5, "operating_points": []}"#,
    )
    .unwrap();
    for (model, expected) in [
        (dir.path().join("missing.json"), "No such file"),
        (stale, "make fit"),
    ] {
        let mock = Mock::start().await;
        let text = format!(
            "{}\n{}",
            common::base_config(&mock),
            config(
                &model_dir,
                &store,
                &format!("model = \"{}\"", model.display())
            )
        );
        let config = reprise::config::Config::from_toml_str(&text, "t.toml", &|_| None).unwrap();
        let error = reprise::server::start(&config)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("semantic.model:"), "{error}");
        assert!(error.contains(expected), "{error}");
    }
}

/// A semantic gateway that takes bodies of up to 8 MiB.
async fn start_with_large_bodies() -> (Gateway, tempfile::TempDir) {
    let model_dir = common::prerequisites::embed_model_dir();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("path = \"{}\"", dir.path().join("store").display());
    let gw =
        Gateway::start_with_server("max_body_bytes = 8388608", &config(&model_dir, &store, ""))
            .await;
    (gw, dir)
}

/// A user turn of `bytes` bytes of ordinary words, different from any other call's.
fn long_text(seed: &str, bytes: usize) -> String {
    let words = [
        "please",
        "summarise",
        "the",
        "following",
        "report",
        "about",
        "quarterly",
        "sales",
        "figures",
        "and",
        "regional",
        "growth",
        "in",
        "detail",
    ];
    let mut text = format!("{seed}: ");
    let mut i = 0;
    while text.len() < bytes {
        text.push_str(words[i % words.len()]);
        text.push(' ');
        i += 1;
    }
    text
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test]
async fn a_turn_longer_than_the_model_reads_skips_the_semantic_stage() {
    let (gw, _dir) = start_with_large_bodies().await;
    // Two turns alike in their first few hundred tokens and different after: embedded by their
    // beginning only, the second would be served the first's answer.
    let shared = long_text("report", 1_200);
    for ending in ["for the north region only", "for the south region only"] {
        let response = gw
            .chat_with(KEY_A, ask(&format!("{shared} {ending}")), &[])
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-reprise-cache-semantic"),
            Some("skipped-too-long")
        );
        let body: Value = response.json().await.unwrap();
        assert!(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .ends_with(ending),
            "each got its own answer"
        );
    }
    let started = Instant::now();
    let response = gw
        .chat_with(KEY_A, ask(&long_text("huge", 3_500_000)), &[])
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-reprise-cache-semantic"),
        Some("skipped-too-long")
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "a 3.5 MB turn took {took:?}");
    assert!(gw.server.stop().await.unwrap(), "drained");
}

#[ignore = "needs the embedding model (make test)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_turns_from_one_tenant_do_not_hold_up_another_tenants_lookups() {
    let (gw, _dir) = start_with_large_bodies().await;
    let question = "how do I reset my password?";
    let send_b = || gw.chat_with(KEY_B, ask(question), &[]);
    assert_eq!(send_b().await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut quiet = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let response = send_b().await;
        assert_eq!(header(&response, "x-reprise-cache"), Some("hit"));
        quiet.push(started.elapsed());
    }
    let huge: Vec<Value> = (0..3)
        .map(|i| ask(&long_text(&format!("huge {i}"), 3_500_000)))
        .collect();
    let flood = {
        let (client, url) = (gw.client.clone(), gw.url("/v1/chat/completions"));
        tokio::spawn(async move {
            futures::future::join_all(huge.into_iter().map(|body| {
                client
                    .post(url.clone())
                    .bearer_auth(KEY_A)
                    .json(&body)
                    .send()
            }))
            .await
        })
    };
    let mut busy = Vec::new();
    while !flood.is_finished() {
        let started = Instant::now();
        let response = send_b().await;
        assert_eq!(header(&response, "x-reprise-cache"), Some("hit"));
        busy.push(started.elapsed());
    }
    for answer in flood.await.unwrap() {
        assert_eq!(answer.unwrap().status(), 200);
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let worst = busy.iter().max().copied().unwrap_or_default();
    let (quiet, busy_median) = (median(quiet), median(busy.clone()));
    eprintln!(
        "tenant b's hits: {quiet:?} median alone, {busy_median:?} median and {worst:?} worst of {} during three 3.5 MB turns of tenant a",
        busy.len()
    );
    // Before, each huge turn held the embedding thread for seconds and every lookup queued
    // behind it (issue 15: 14.6 s). The 50 ms target is measured on the release build by
    // `make chaos` (docs/reliability.md); a debug build sharing two cores with other tests
    // shows the mechanism: lookups keep their pace, and none waits behind a huge turn.
    assert!(
        busy_median < quiet + Duration::from_millis(50),
        "median {busy_median:?} against {quiet:?} alone"
    );
    assert!(worst < Duration::from_secs(1), "worst {worst:?}");
}
