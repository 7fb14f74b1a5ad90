//! What the request log costs a request, measured in one process (the load benchmark compares
//! separate gateway processes, whose own differences are as large as the log's cost): making a
//! typical record from the pipeline's trace and queueing it, with the real writer thread
//! draining the queue to a file meanwhile (queueing includes adding it to the console
//! overview's timeline, also timed alone). Run: `cargo bench --bench request_log`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use reprise::cache::CacheStatus;
use reprise::otel::TraceContext;
use reprise::pipeline::{Caller, Trace};
use reprise::prices::PriceTable;
use reprise::request_log::{Ending, RequestLog, RequestRecord};
use reprise::router::Attempt;
use reprise::telemetry::Metrics;
use serde_json::json;

fn trace() -> Trace {
    let mut trace = Trace {
        route: Some("chat".into()),
        target: Some("openai/gpt-4o-mini".into()),
        attempts: 1,
        caller: Some(Caller {
            request_id: "3f1c2a5e-8d7b-4f21-9c3e-2b6a1d0e4f57".into(),
            tenant: Arc::from("support"),
            key: Some("key_01hx7".into()),
            user: Some("end-user-42".into()),
            trace: TraceContext::root(),
        }),
        tried: vec![Attempt {
            target: "openai/gpt-4o-mini".into(),
            kind: "first",
            started: SystemTime::now(),
            duration: Duration::from_millis(412),
            first_token: None,
            outcome: "ok",
            status: Some(200),
            span_id: [7; 8],
        }],
        cache_lookup: Some((SystemTime::now(), Duration::from_micros(40))),
        ..Trace::default()
    };
    trace.cache.status = Some(CacheStatus::Miss);
    trace
}

fn record_and_queue(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config: reprise::config::RequestLogConfig = toml::from_str(&format!(
        "path = \"{}\"\nmax_bytes = 67108864\nqueue = 1000000\n",
        dir.path().display()
    ))
    .unwrap();
    let log = runtime
        .block_on(async { RequestLog::open(&config, Arc::new(Metrics::new())) })
        .unwrap();
    let prices = PriceTable::from_config(&Default::default());
    let trace = trace();
    let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
        "model": "gpt-4o-mini", "choices": [{"index": 0, "message": {"role": "assistant",
        "content": "Yes. Open your orders page and choose 'change address'."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}});
    let answer = reprise::protocol::answer::AnswerFacts::of_value(&answer);
    let ending = || Ending {
        endpoint: "chat_completions",
        status: 200,
        elapsed: Duration::from_millis(415),
        response: Some(&answer),
        first_token: None,
        error: None,
        payload: None,
    };
    let mut group = c.benchmark_group("request_log");
    group.bench_function("make the record", |b| {
        b.iter(|| black_box(RequestRecord::of(&trace, ending(), &prices)))
    });
    let timeline = reprise::request_log::Timeline::default();
    let record = RequestRecord::of(&trace, ending(), &prices).unwrap();
    group.bench_function("add it to the overview's timeline", |b| {
        b.iter(|| timeline.add(black_box(&record)))
    });
    group.bench_function("make the record and queue it", |b| {
        b.iter(|| {
            let record = Arc::new(RequestRecord::of(&trace, ending(), &prices).unwrap());
            log.push(&record);
        })
    });
    group.finish();
    drop(log);
}

criterion_group!(benches, record_and_queue);
criterion_main!(benches);
