//! OpenTelemetry export: an OTLP/HTTP receiver on loopback decodes what the gateway sends and
//! the tests check the span tree and its GenAI attributes for a cached hit, a failover and a
//! stream, and that the client's `traceparent` continues into the upstream call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use common::{Gateway, Mock, user};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use parking_lot::Mutex;
use prost::Message;
use serde_json::json;

/// A collector: every span it was sent, with the resource's `service.name`.
#[derive(Default)]
struct Received {
    spans: Mutex<Vec<(String, Span)>>,
    content_types: Mutex<Vec<String>>,
}

async fn receive(
    State(received): State<Arc<Received>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::http::StatusCode {
    received.content_types.lock().push(
        headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    );
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.spans.lock().push((service.clone(), span));
            }
        }
    }
    axum::http::StatusCode::OK
}

fn text(value: &Any) -> Option<String> {
    match value {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

async fn collector() -> (String, Arc<Received>) {
    let received = Arc::new(Received::default());
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(Arc::clone(&received));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

/// A span's attributes, as strings.
fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|a| {
            let value = match a.value.as_ref()?.value.as_ref()? {
                Any::StringValue(s) => s.clone(),
                Any::IntValue(i) => i.to_string(),
                Any::DoubleValue(d) => d.to_string(),
                Any::BoolValue(b) => b.to_string(),
                _ => return None,
            };
            Some((a.key.clone(), value))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of the request whose `reprise.request_id` is `id`, once they all arrived: the
/// request span first, then its children.
async fn trace_of(received: &Received, id: &str, children: usize) -> (Span, Vec<Span>) {
    for _ in 0..200 {
        {
            let spans = received.spans.lock();
            let root = spans
                .iter()
                .map(|(_, s)| s)
                .find(|s| attributes(s).get("reprise.request_id").map(String::as_str) == Some(id));
            if let Some(root) = root {
                let kids: Vec<Span> = spans
                    .iter()
                    .map(|(_, s)| s)
                    .filter(|s| s.trace_id == root.trace_id && s.parent_span_id == root.span_id)
                    .cloned()
                    .collect();
                if kids.len() >= children {
                    return (root.clone(), kids);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the collector never got the spans of {id}");
}

fn config(endpoint: &str, routes: &str) -> String {
    format!(
        r#"
        [otlp]
        endpoint = "{endpoint}"
        service_name = "reprise-under-test"
        [prices.ok]
        input = 1000.0
        output = 2000.0
        {routes}
        "#
    )
}

fn request_id(response: &reqwest::Response) -> String {
    common::header(response, "x-request-id").unwrap().to_owned()
}

#[tokio::test]
async fn a_cached_hit_is_a_request_span_with_a_cache_lookup_and_no_upstream_call() {
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        r#"
        [cache]
        path = "{}"
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        cache = {{ enabled = true }}
        "#,
        dir.path().join("store").display()
    );
    let gw = Gateway::start(&config(&endpoint, &routes)).await;
    let ask = json!({"model": "chat", "messages": user("what is a span?")});
    let miss = gw.chat(ask.clone()).await;
    assert_eq!(miss.status(), 200);
    let hit = gw.chat(ask).await;
    assert_eq!(common::header(&hit, "x-reprise-cache"), Some("hit"));

    let (root, children) = trace_of(&received, &request_id(&hit), 1).await;
    let attrs = attributes(&root);
    assert_eq!(root.name, "chat chat");
    assert_eq!(root.kind, SpanKind::Server as i32);
    assert_eq!(attrs["gen_ai.operation.name"], "chat");
    assert_eq!(attrs["gen_ai.request.model"], "chat");
    assert_eq!(attrs["reprise.cache.outcome"], "hit");
    assert_eq!(attrs["http.response.status_code"], "200");
    assert_eq!(attrs["reprise.tenant"], "a");
    assert!(
        !attrs.contains_key("gen_ai.usage.input_tokens"),
        "a hit bills nothing: {attrs:?}"
    );
    assert!(
        root.parent_span_id.is_empty(),
        "no traceparent, so a new trace"
    );
    assert_eq!(children.len(), 1, "only the cache lookup: {children:?}");
    assert_eq!(children[0].name, "cache lookup");
    assert_eq!(children[0].kind, SpanKind::Internal as i32);
    assert!(children[0].start_time_unix_nano >= root.start_time_unix_nano);
    assert!(children[0].end_time_unix_nano <= root.end_time_unix_nano);

    // The miss before it: a lookup, then one upstream call with the GenAI usage.
    let (root, children) = trace_of(&received, &request_id(&miss), 2).await;
    let attrs = attributes(&root);
    assert_eq!(attrs["reprise.cache.outcome"], "miss");
    assert_eq!(attrs["gen_ai.provider.name"], "mock");
    assert_eq!(attrs["gen_ai.response.model"], "ok");
    assert_eq!(attrs["gen_ai.usage.input_tokens"], "11");
    assert_eq!(attrs["gen_ai.usage.output_tokens"], "7");
    let client = children
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    assert_eq!(client.name, "chat ok");
    assert_eq!(attributes(client)["gen_ai.request.model"], "ok");
    let service: Vec<String> = received
        .spans
        .lock()
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    assert!(
        service.iter().all(|s| s == "reprise-under-test"),
        "{service:?}"
    );
    assert!(
        received
            .content_types
            .lock()
            .iter()
            .all(|c| c == "application/x-protobuf")
    );
}

#[tokio::test]
async fn a_failover_is_one_client_span_per_attempt_and_the_clients_trace_continues_upstream() {
    let (endpoint, received) = collector().await;
    let routes = r#"
        [routes.chat]
        targets = [{ provider = "mock", model = "status-500" }, { provider = "mock2", model = "ok" }]
        retry = { attempts_per_target = 1 }
        "#;
    let gw = Gateway::start(&config(&endpoint, routes)).await;
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let answer = gw
        .chat_with(
            common::KEY_A,
            json!({"model": "chat", "messages": user("fail over please")}),
            &[
                (
                    "traceparent",
                    &format!("00-{client_trace}-{client_span}-01"),
                ),
                ("tracestate", "vendor=opaque"),
            ],
        )
        .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(common::header(&answer, "x-reprise-attempts"), Some("2"));

    let (root, children) = trace_of(&received, &request_id(&answer), 2).await;
    assert_eq!(hex(&root.trace_id), client_trace);
    assert_eq!(hex(&root.parent_span_id), client_span);
    let mut attempts: Vec<&Span> = children
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "{children:?}");
    let (failed, served) = (attributes(attempts[0]), attributes(attempts[1]));
    assert_eq!(failed["reprise.target"], "mock/status-500");
    assert_eq!(failed["http.response.status_code"], "500");
    assert_eq!(failed["error.type"], "status_5xx");
    assert_eq!(failed["reprise.attempt.kind"], "first");
    assert_eq!(attempts[0].status.as_ref().unwrap().code, 2, "error status");
    assert_eq!(served["reprise.target"], "mock2/ok");
    assert_eq!(served["reprise.attempt.kind"], "failover");
    assert_eq!(served["gen_ai.usage.output_tokens"], "7");
    assert!(!served.contains_key("error.type"));
    assert!(attempts[1].start_time_unix_nano >= attempts[0].end_time_unix_nano);

    // Each upstream call carried the trace, with its own attempt span as the parent.
    for (model, span) in [("status-500", attempts[0]), ("ok", attempts[1])] {
        let (headers, _) = gw.mock.last_request(model).unwrap();
        let sent = headers.get("traceparent").unwrap().to_str().unwrap();
        assert_eq!(
            sent,
            format!("00-{client_trace}-{}-01", hex(&span.span_id)),
            "{model}"
        );
        assert_eq!(headers.get("tracestate").unwrap(), "vendor=opaque");
    }

    // A client that did not sample its trace is not exported, and says so upstream.
    let unsampled = gw
        .chat_with(
            common::KEY_A,
            json!({"model": "chat", "messages": user("quietly")}),
            &[(
                "traceparent",
                &format!("00-{client_trace}-{client_span}-00"),
            )],
        )
        .await;
    assert_eq!(unsampled.status(), 200);
    let (headers, _) = gw.mock.last_request("ok").unwrap();
    assert!(headers["traceparent"].to_str().unwrap().ends_with("-00"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let id = request_id(&unsampled);
    assert!(
        !received
            .spans
            .lock()
            .iter()
            .any(|(_, s)| attributes(s).get("reprise.request_id") == Some(&id)),
        "an unsampled trace was exported"
    );
}

#[tokio::test]
async fn a_stream_span_covers_the_whole_stream_with_its_usage_and_first_token() {
    let (endpoint, received) = collector().await;
    let routes = r#"
        [routes.chat]
        targets = [{ provider = "mock", model = "slow-150" }]
        "#;
    let gw = Gateway::start(&config(&endpoint, routes)).await;
    let response = gw
        .chat(json!({"model": "chat", "messages": user("stream it"), "stream": true}))
        .await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let body = response.text().await.unwrap();
    assert!(body.contains("[DONE]"));
    assert!(
        !body.contains("\"usage\":{"),
        "the usage chunk the gateway asked for is not shown to a client that did not: {body}"
    );

    let (root, children) = trace_of(&received, &id, 1).await;
    let attrs = attributes(&root);
    assert_eq!(attrs["reprise.stream"], "true");
    assert_eq!(attrs["gen_ai.usage.input_tokens"], "11");
    assert_eq!(attrs["gen_ai.usage.output_tokens"], "7");
    let first_token: f64 = attrs["reprise.first_token_ms"].parse().unwrap();
    assert!(first_token >= 150.0, "{first_token}");
    let attempt = children
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    let attempt_attrs = attributes(attempt);
    let upstream_first: f64 = attempt_attrs["reprise.first_token_ms"].parse().unwrap();
    assert!(upstream_first >= 150.0, "{upstream_first}");
    assert!(attempt.end_time_unix_nano <= root.end_time_unix_nano);
    assert!(
        attempt.end_time_unix_nano - attempt.start_time_unix_nano >= 150_000_000,
        "the attempt span lasts until the stream's end"
    );
    assert!(gw.metrics().await.contains(
        "reprise_upstream_time_to_first_token_seconds_count{target=\"mock/slow-150\"} 1"
    ));
}

#[tokio::test]
async fn an_unreachable_collector_costs_requests_nothing_and_is_counted() {
    // Nothing listens on port 1.
    let routes = r#"
        [routes.chat]
        targets = [{ provider = "mock", model = "ok" }]
        "#;
    let gw = Gateway::start_with(Mock::start().await, &config("http://127.0.0.1:1", routes)).await;
    let answer = gw
        .chat(json!({"model": "chat", "messages": user("hello")}))
        .await;
    assert_eq!(answer.status(), 200);
    for _ in 0..200 {
        if gw
            .metrics()
            .await
            .contains("reprise_otlp_spans_total{result=\"failed\"}")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("a failed export was not counted");
}
