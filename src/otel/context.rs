//! W3C Trace Context: the client's `traceparent` continues into the gateway's spans and on to
//! the upstream, so one trace shows the application, the gateway and the provider call.
//!
//! The request's context travels as a task-local rather than through every stage's signature:
//! only the provider client reads it (to add the header), and the router's attempts run in the
//! handler's task, each inside its own `upstream` scope.

use std::sync::Arc;

use axum::http::HeaderMap;

/// The trace a request belongs to and the span the gateway opens for it.
#[derive(Debug, Clone)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The gateway's span for this request.
    pub span_id: [u8; 8],
    /// The client's span, when it sent a `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// The caller's sampling decision (a fresh trace is sampled).
    pub sampled: bool,
    /// The vendors' `tracestate`, passed on untouched.
    pub tracestate: Option<Arc<str>>,
}

/// The headers an upstream attempt carries.
#[derive(Debug, Clone)]
pub struct Propagation {
    pub traceparent: String,
    pub tracestate: Option<Arc<str>>,
}

tokio::task_local! {
    static REQUEST: TraceContext;
    static UPSTREAM: Propagation;
}

pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

impl TraceContext {
    /// The context a request's headers continue, or a new trace. A malformed `traceparent` is
    /// ignored, as the W3C spec asks, rather than refused.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let parsed = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let tracestate = parsed.and(
            headers
                .get("tracestate")
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty() && s.len() <= 512)
                .map(Arc::from),
        );
        match parsed {
            Some((trace_id, parent, sampled)) => Self {
                trace_id,
                span_id: new_span_id(),
                parent: Some(parent),
                sampled,
                tracestate,
            },
            None => Self::root(),
        }
    }

    pub fn root() -> Self {
        Self {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent: None,
            sampled: true,
            tracestate: None,
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// What an upstream call made in span `span` carries.
    fn propagation(&self, span: [u8; 8]) -> Propagation {
        Propagation {
            traceparent: format!(
                "00-{}-{}-{:02x}",
                hex(&self.trace_id),
                hex(&span),
                u8::from(self.sampled)
            ),
            tracestate: self.tracestate.clone(),
        }
    }

    /// Runs `work` (a request's handling) with this context current. Not an `async fn`: that
    /// would hold `work` twice (before and inside the task-local future), doubling the size of
    /// every request's future, which is copied whenever it moves.
    pub fn scope<F: Future>(self, work: F) -> impl Future<Output = F::Output> {
        REQUEST.scope(self, work)
    }
}

/// `version-traceid-parentid-flags`; a future version's extra fields are ignored, as the spec
/// asks.
fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2
        || version.eq_ignore_ascii_case("ff")
        || (version == "00" && parts.next().is_some())
    {
        return None;
    }
    u8::from_str_radix(version, 16).ok()?;
    let trace_id: [u8; 16] = unhex(trace)?;
    let parent: [u8; 8] = unhex(parent)?;
    let flags: [u8; 1] = unhex(flags)?;
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags[0] & 1 == 1))
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// Runs an upstream attempt made in span `span` of the current request, so the provider client
/// sends the matching `traceparent`. Outside a request (a background check) nothing is sent.
pub async fn upstream<F: Future>(span: [u8; 8], attempt: F) -> F::Output {
    match REQUEST.try_with(|context| context.propagation(span)) {
        Ok(propagation) => UPSTREAM.scope(propagation, attempt).await,
        Err(_) => attempt.await,
    }
}

/// The trace headers of the upstream attempt being made, if any.
pub fn upstream_headers() -> Option<Propagation> {
    UPSTREAM.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_forms() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (trace, parent, sampled) = parse_traceparent(ok).unwrap();
        assert_eq!(hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&parent), "00f067aa0ba902b7");
        assert!(sampled);
        assert!(
            !parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .2
        );
        // A later version may add fields; version 00 may not.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
