//! Output records: what a guest may publish, under which message id, and
//! how dead letters are addressed.
//!
//! Every output carries a `Nats-Msg-Id` derived from (function, input stream
//! sequence, output index), so a replayed batch publishes the same ids and
//! JetStream's duplicate window drops the copies.
//!
//! When traced, each record is published under its own `send <subject>`
//! span, whose context replaces the record's `traceparent`.

use std::future::IntoFuture;

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use async_nats::jetstream;
use bytes::Bytes;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt};
use opentelemetry::{Context, KeyValue};

use crate::traces::Tracing;

/// One record a guest published during an applied event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    /// Deterministic id for JetStream de-duplication.
    pub msg_id: String,
}

/// Header names Weir writes on dead letters.
pub mod dead_letter_headers {
    pub const FUNCTION: &str = "Weir-Function";
    pub const VERSION: &str = "Weir-Function-Version";
    pub const REASON: &str = "Weir-Error";
    pub const KIND: &str = "Weir-Error-Kind";
    pub const ATTEMPTS: &str = "Weir-Attempts";
    pub const SUBJECT: &str = "Weir-Original-Subject";
    pub const SEQUENCE: &str = "Weir-Original-Sequence";
}

/// The message id of output `index` of the event at `sequence`.
pub fn output_msg_id(function: &str, sequence: u64, index: usize) -> String {
    format!("weir:{function}:{sequence}:{index}")
}

/// The message id of the dead letter of the event at `sequence`.
pub fn dead_letter_msg_id(function: &str, sequence: u64) -> String {
    format!("weir:{function}:{sequence}:dlq")
}

/// Why outputs could not be published.
#[derive(Debug, thiserror::Error)]
#[error("publishing to `{subject}` failed: {reason}")]
pub struct PublishError {
    /// The position of the record that failed.
    pub index: usize,
    pub subject: String,
    pub reason: String,
    /// JetStream refused the record itself (its size, its headers): sending
    /// it again cannot succeed. Otherwise the caller keeps the records and
    /// tries again.
    pub permanent: bool,
}

/// Whether a publish error is JetStream refusing the message for good, as
/// opposed to an outage (no stream responding, a timeout, a lost
/// connection, a server that is temporarily unavailable).
fn is_permanent(error: &jetstream::context::PublishError) -> bool {
    use jetstream::context::PublishErrorKind as Kind;
    match error.kind() {
        Kind::WrongLastMessageId | Kind::WrongLastSequence | Kind::MaxPayloadExceeded => true,
        Kind::Other => std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<jetstream::Error>())
            .is_some_and(|api| api.code() != 503),
        _ => false,
    }
}

/// The trace each record of a publish descends from, by position.
#[derive(Debug, Default)]
pub struct SendTraces {
    tracing: Tracing,
    parents: Vec<Option<Context>>,
}

impl SendTraces {
    /// Publish untraced (records keep the trace headers they carry).
    pub fn none() -> Self {
        Self::default()
    }

    /// Record `i` is sent under a span child of `parents[i]`.
    pub fn new(tracing: &Tracing, parents: Vec<Option<Context>>) -> Self {
        Self {
            tracing: tracing.clone(),
            parents,
        }
    }

    /// Opens the `send` span of `record` and returns it with the trace
    /// headers that point at it.
    fn start(
        &self,
        index: usize,
        record: &OutputRecord,
    ) -> Option<(Context, Vec<(String, String)>)> {
        let parent = self.parents.get(index)?.as_ref()?;
        // Most events are not sampled: build nothing for them.
        if !parent.span().span_context().is_sampled() {
            return None;
        }
        let span = self.tracing.start_child(
            parent,
            format!("send {}", record.subject),
            SpanKind::Producer,
            vec![
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "send"),
                KeyValue::new("messaging.destination.name", record.subject.clone()),
                KeyValue::new("messaging.message.id", record.msg_id.clone()),
                KeyValue::new("messaging.message.body.size", record.payload.len() as i64),
            ],
        )?;
        let mut headers = Vec::with_capacity(2);
        self.tracing.inject(&span, &mut headers);
        Some((span, headers))
    }
}

/// Publishes `records` in order with their message ids and waits for
/// JetStream to store every one.
pub async fn publish_all(
    js: &jetstream::Context,
    records: &[OutputRecord],
    traces: &SendTraces,
) -> Result<(), PublishError> {
    let failed = |index: usize, error: jetstream::context::PublishError| PublishError {
        index,
        subject: records[index].subject.clone(),
        permanent: is_permanent(&error),
        reason: error.to_string(),
    };
    let mut pending = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        let mut headers = HeaderMap::new();
        for (name, value) in &record.headers {
            if let Ok(name) = HeaderName::try_from(name.as_str()) {
                headers.append(name, value.as_str());
            }
        }
        headers.insert("Nats-Msg-Id", record.msg_id.as_str());
        let span = traces.start(index, record).map(|(span, trace_headers)| {
            for (name, value) in trace_headers {
                headers.insert(name.as_str(), value.as_str());
            }
            span
        });
        let ack = js
            .publish_with_headers(record.subject.clone(), headers, record.payload.clone())
            .await
            .map_err(|e| failed(index, e))?;
        pending.push((index, ack, span));
    }
    for (index, ack, span) in pending {
        let stored = ack.into_future().await;
        if let Some(span) = span {
            if let Err(error) = &stored {
                span.span().set_status(Status::error(error.to_string()));
            }
            span.span().end();
        }
        stored.map_err(|e| failed(index, e))?;
    }
    Ok(())
}

/// Whether a guest-supplied header can go on a NATS message as it is: a
/// non-empty name of printable ASCII without `:`, and a value without a line
/// break (it would end the header block) or U+0000.
pub fn is_valid_header(name: &str, value: &str) -> bool {
    !name.is_empty() && HeaderName::try_from(name).is_ok() && !value.contains(['\r', '\n', '\0'])
}

/// Text fit for a header value: control characters become spaces, and it is
/// cut to a readable length.
pub fn header_text(text: &str) -> String {
    text.chars()
        .take(1024)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Whether `subject` matches the NATS subject `pattern` (`*` is one token,
/// a trailing `>` is one or more tokens).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(s)) if !s.is_empty() => {}
            (p, Some(s)) if p == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Whether `text` is a subject pattern: non-empty tokens, `>` only last.
pub fn is_subject_pattern(text: &str) -> bool {
    let tokens: Vec<&str> = text.split('.').collect();
    !text.is_empty()
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
        && tokens.iter().all(|t| !t.is_empty())
        && tokens.iter().rev().skip(1).all(|t| *t != ">")
}

/// Whether every subject `pattern` matches is matched by `owned` (both may
/// hold wildcards): the subject set of one within the other's.
pub fn is_within(pattern: &str, owned: &str) -> bool {
    if !is_subject_pattern(pattern) || !is_subject_pattern(owned) {
        return false;
    }
    if !pattern.contains(['*', '>']) {
        return subject_matches(owned, pattern);
    }
    let mut tokens = pattern.split('.');
    for own in owned.split('.') {
        let Some(token) = tokens.next() else {
            // `owned` needs more tokens than `pattern` has.
            return false;
        };
        match (own, token) {
            // One or more tokens of anything: whatever is left of
            // `pattern` (at least this token) is within.
            (">", _) => return true,
            // `>` in `pattern` reaches past any single-token position.
            (_, ">") => return false,
            ("*", _) => {}
            (_, "*") => return false,
            (own, token) if own == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// The first of `outputs` (patterns or subjects) that no single stream's
/// subjects capture whole: what it publishes could never be stored.
pub fn uncaptured<'a>(outputs: &'a [String], stream_subjects: &[String]) -> Option<&'a String> {
    outputs
        .iter()
        .find(|output| !stream_subjects.iter().any(|s| is_within(output, s)))
}

/// Every subject pattern some stream on the server captures.
pub async fn stream_subjects(js: &jetstream::Context) -> Result<Vec<String>, String> {
    use futures::TryStreamExt;
    let infos: Vec<jetstream::stream::Info> = js
        .streams()
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(infos
        .into_iter()
        .flat_map(|info| info.config.subjects)
        .collect())
}

/// Whether `subject` is a valid subject to publish to: non-empty tokens, no
/// wildcards, no whitespace or control characters (U+0000 included: the
/// outbox keeps subjects in a Postgres `TEXT` column), and not a `$` system
/// subject (the JetStream API lives under `$JS`).
pub fn is_publishable_subject(subject: &str) -> bool {
    !subject.is_empty()
        && !subject.starts_with('$')
        && !subject.contains(|c: char| c.is_whitespace() || c.is_control())
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_captured_whole_by_one_stream() {
        let streams = vec!["orders.>".to_string(), "alerts.high".to_string()];
        let fine: Vec<String> = ["orders.new", "orders.*.x", "alerts.high"]
            .map(String::from)
            .to_vec();
        assert_eq!(uncaptured(&fine, &streams), None);
        let partly: Vec<String> = vec!["alerts.*".into()];
        assert_eq!(uncaptured(&partly, &streams), Some(&partly[0]));
    }

    #[test]
    fn subject_patterns() {
        let cases = [
            ("alerts.velocity", "alerts.velocity", true),
            ("alerts.velocity", "alerts.velocity.x", false),
            ("alerts.*", "alerts.velocity", true),
            ("alerts.*", "alerts", false),
            ("alerts.*", "alerts.a.b", false),
            ("alerts.>", "alerts.a.b", true),
            ("alerts.>", "alerts", false),
            ("*.x", "a.x", true),
            ("a.b", "a.c", false),
        ];
        for (pattern, subject, expected) in cases {
            assert_eq!(
                subject_matches(pattern, subject),
                expected,
                "{pattern} vs {subject}"
            );
        }
    }

    #[test]
    fn publishable_subjects() {
        assert!(is_publishable_subject("orders.enriched"));
        assert!(!is_publishable_subject("orders.*"));
        assert!(!is_publishable_subject("orders..x"));
        assert!(!is_publishable_subject("orders x"));
        assert!(!is_publishable_subject(""));
        assert!(!is_publishable_subject("$JS.API.STREAM.DELETE.ORDERS"));
    }

    #[test]
    fn subjects_with_nul_or_control_characters_are_not_publishable() {
        for subject in [
            "orders.a\u{0}b",
            "orders.\u{0}",
            "orders.a\tb",
            "orders.a\rb",
            "orders.a\u{7f}",
            "orders.a\u{85}b",
            "orders.a\u{a0}b",
        ] {
            assert!(!is_publishable_subject(subject), "{subject:?}");
        }
        assert!(is_publishable_subject("orders.é-ü_1"));
    }

    #[test]
    fn header_checks() {
        assert!(is_valid_header("content-type", "application/json"));
        assert!(!is_valid_header("bad:name", "v"));
        assert!(!is_valid_header("name", "two\r\nlines"));
        assert!(!is_valid_header("name", "bare\rreturn"));
        assert!(!is_valid_header("name", "bare\nfeed"));
        assert!(!is_valid_header("name", "a\u{0}b"));
        assert!(!is_valid_header("a\u{0}b", "v"));
        assert!(!is_valid_header("two words", "v"));
        assert!(!is_valid_header("", "v"));
        assert!(is_valid_header("name", "tabs\tare fine"));
        assert_eq!(header_text("a\nb\tc"), "a b c");
        assert_eq!(header_text(&"x".repeat(5000)).len(), 1024);
    }

    #[test]
    fn message_ids_are_stable_and_distinct() {
        assert_eq!(output_msg_id("f", 7, 0), output_msg_id("f", 7, 0));
        assert_ne!(output_msg_id("f", 7, 0), output_msg_id("f", 7, 1));
        assert_ne!(output_msg_id("f", 7, 0), dead_letter_msg_id("f", 7));
    }
}
