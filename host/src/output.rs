//! Output records: what a guest may publish, under which message id, and
//! how dead letters are addressed.
//!
//! Every output carries a `Nats-Msg-Id` derived from (function, input stream
//! sequence, output index), so a replayed batch publishes the same ids and
//! JetStream's duplicate window drops the copies.

use std::future::IntoFuture;

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use async_nats::jetstream;
use bytes::Bytes;

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

/// Why outputs could not be published; the caller keeps them and tries again.
#[derive(Debug, thiserror::Error)]
#[error("publishing to `{subject}` failed: {reason}")]
pub struct PublishError {
    pub subject: String,
    pub reason: String,
}

/// Publishes `records` in order with their message ids and waits for
/// JetStream to store every one.
pub async fn publish_all(
    js: &jetstream::Context,
    records: &[OutputRecord],
) -> Result<(), PublishError> {
    let failed = |record: &OutputRecord, reason: String| PublishError {
        subject: record.subject.clone(),
        reason,
    };
    let mut pending = Vec::with_capacity(records.len());
    for record in records {
        let mut headers = HeaderMap::new();
        for (name, value) in &record.headers {
            if let Ok(name) = HeaderName::try_from(name.as_str()) {
                headers.append(name, value.as_str());
            }
        }
        headers.insert("Nats-Msg-Id", record.msg_id.as_str());
        let ack = js
            .publish_with_headers(record.subject.clone(), headers, record.payload.clone())
            .await
            .map_err(|e| failed(record, e.to_string()))?;
        pending.push((record, ack));
    }
    for (record, ack) in pending {
        ack.into_future()
            .await
            .map_err(|e| failed(record, e.to_string()))?;
    }
    Ok(())
}

/// Whether a guest-supplied header can go on a NATS message as it is.
pub fn is_valid_header(name: &str, value: &str) -> bool {
    HeaderName::try_from(name).is_ok() && !value.contains(['\r', '\n'])
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

/// Whether `subject` is a valid subject to publish to: non-empty tokens, no
/// wildcards, no whitespace.
pub fn is_publishable_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(char::is_whitespace))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn header_checks() {
        assert!(is_valid_header("content-type", "application/json"));
        assert!(!is_valid_header("bad:name", "v"));
        assert!(!is_valid_header("name", "two\r\nlines"));
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
