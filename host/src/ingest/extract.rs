//! Turns a JetStream message into an [`Event`]: the key and event time come
//! from the places the function's binding names.
//!
//! A message whose key or time cannot be found is a bad event: it goes to the
//! dead-letter subject with the reason, and the events behind it flow on.

use async_nats::HeaderMap;

use crate::config::{KeySource, TimeSource};
use crate::outcome::{Failure, FailureKind};
use crate::sandbox::Event;

/// The parts of a message extraction reads.
#[derive(Debug)]
pub struct RawMessage<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a [u8],
    pub sequence: u64,
    /// When JetStream stored the message, in ms since the Unix epoch.
    pub stored_at_ms: i64,
}

/// Extracts events for one function binding.
#[derive(Debug, Clone)]
pub struct Extractor {
    key: KeySource,
    time: TimeSource,
}

/// Longest key accepted; keys are primary-key columns and cache keys.
pub const MAX_KEY_BYTES: usize = 1024;

impl Extractor {
    pub fn new(key: KeySource, time: TimeSource) -> Self {
        Self { key, time }
    }

    pub fn event(&self, message: &RawMessage<'_>) -> Result<Event, Failure> {
        let needs_json = matches!(self.key, KeySource::JsonPointer(_))
            || matches!(self.time, TimeSource::JsonPointer(_));
        let json = if needs_json {
            Some(
                serde_json::from_slice::<serde_json::Value>(message.payload).map_err(|e| {
                    bad(format!(
                        "payload is not JSON, so the key/time pointer cannot apply: {e}"
                    ))
                })?,
            )
        } else {
            None
        };
        let key = self.key(message, json.as_ref())?;
        let event_time_ms = self.time(message, json.as_ref())?;
        let headers = message
            .headers
            .map(|headers| {
                headers
                    .iter()
                    .flat_map(|(name, values)| {
                        values
                            .iter()
                            .map(move |v| (name.to_string(), v.as_str().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Event {
            subject: message.subject.to_string(),
            key,
            payload: message.payload.to_vec(),
            headers,
            event_time_ms,
            sequence: message.sequence,
        })
    }

    fn key(
        &self,
        message: &RawMessage<'_>,
        json: Option<&serde_json::Value>,
    ) -> Result<String, Failure> {
        let key = self.raw_key(message, json)?;
        check_key(&key)?;
        Ok(key)
    }

    /// The key where the binding says it is, unchecked.
    fn raw_key(
        &self,
        message: &RawMessage<'_>,
        json: Option<&serde_json::Value>,
    ) -> Result<String, Failure> {
        Ok(match &self.key {
            KeySource::SubjectToken(index) => message
                .subject
                .split('.')
                .nth(*index)
                .map(str::to_string)
                .ok_or_else(|| {
                    bad(format!(
                        "subject `{}` has no token at position {index} for the key",
                        message.subject
                    ))
                })?,
            KeySource::Header(name) => header(message, name)
                .ok_or_else(|| bad(format!("the key header `{name}` is missing")))?
                .to_string(),
            KeySource::JsonPointer(pointer) => match json.and_then(|j| j.pointer(pointer)) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(other) => {
                    return Err(bad(format!(
                        "the key at `{pointer}` must be a string or a number, found {}",
                        json_kind(other)
                    )));
                }
                None => return Err(bad(format!("the payload has no key at `{pointer}`"))),
            },
        })
    }

    fn time(
        &self,
        message: &RawMessage<'_>,
        json: Option<&serde_json::Value>,
    ) -> Result<i64, Failure> {
        match &self.time {
            TimeSource::MessageTimestamp => Ok(message.stored_at_ms),
            TimeSource::Header(name) => {
                let value = header(message, name)
                    .ok_or_else(|| bad(format!("the event-time header `{name}` is missing")))?;
                value.trim().parse::<i64>().map_err(|_| {
                    bad(format!(
                        "the event-time header `{name}` must be integer milliseconds, found `{value}`"
                    ))
                })
            }
            TimeSource::JsonPointer(pointer) => match json.and_then(|j| j.pointer(pointer)) {
                Some(value) => value.as_i64().ok_or_else(|| {
                    bad(format!(
                        "the event time at `{pointer}` must be integer milliseconds, found {}",
                        json_kind(value)
                    ))
                }),
                None => Err(bad(format!("the payload has no event time at `{pointer}`"))),
            },
        }
    }
}

/// Refuses a key that state cannot be stored under: an empty one, one over
/// [`MAX_KEY_BYTES`], or one holding U+0000, which a Postgres `TEXT` column
/// rejects (every load of the batch would fail, not just this event's).
/// Other control characters are stored faithfully and are let through.
fn check_key(key: &str) -> Result<(), Failure> {
    if key.is_empty() {
        return Err(bad("the key is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(bad(format!(
            "the key is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if let Some(at) = key.find('\0') {
        return Err(bad(format!(
            "the key holds U+0000 (NUL) at byte {at}; state cannot be stored under such a key"
        )));
    }
    Ok(())
}

fn header<'m>(message: &'m RawMessage<'_>, name: &str) -> Option<&'m str> {
    message.headers?.get(name).map(|v| v.as_str())
}

fn bad(message: impl Into<String>) -> Failure {
    Failure::new(FailureKind::BadEvent, message)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a non-integer number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw<'a>(
        subject: &'a str,
        headers: Option<&'a HeaderMap>,
        payload: &'a [u8],
    ) -> RawMessage<'a> {
        RawMessage {
            subject,
            headers,
            payload,
            sequence: 7,
            stored_at_ms: 1_000,
        }
    }

    #[test]
    fn key_from_subject_token() {
        let x = Extractor::new(KeySource::SubjectToken(2), TimeSource::MessageTimestamp);
        let event = x.event(&raw("cards.tx.c-1", None, b"{}")).expect("event");
        assert_eq!(event.key, "c-1");
        assert_eq!(event.event_time_ms, 1_000);
        assert_eq!(event.sequence, 7);
        let failure = x
            .event(&raw("cards.tx", None, b"{}"))
            .expect_err("no token");
        assert_eq!(failure.kind, FailureKind::BadEvent);
        assert!(failure.message.contains("position 2"), "{failure}");
    }

    #[test]
    fn key_and_time_from_json() {
        let x = Extractor::new(
            KeySource::JsonPointer("/card".into()),
            TimeSource::JsonPointer("/ts".into()),
        );
        let event = x
            .event(&raw("s", None, br#"{"card":"c-9","ts":1700000000123}"#))
            .expect("event");
        assert_eq!(
            (event.key.as_str(), event.event_time_ms),
            ("c-9", 1_700_000_000_123)
        );
        let numeric = x
            .event(&raw("s", None, br#"{"card":42,"ts":5}"#))
            .expect("event");
        assert_eq!(numeric.key, "42");
        let cases: [(&[u8], &str); 5] = [
            (b"not json", "not JSON"),
            (br#"{"ts":5}"#, "no key at `/card`"),
            (br#"{"card":{},"ts":5}"#, "an object"),
            (br#"{"card":"c"}"#, "no event time"),
            (br#"{"card":"c","ts":"soon"}"#, "a string"),
        ];
        for (payload, reason) in cases {
            let failure = x.event(&raw("s", None, payload)).expect_err("bad event");
            assert_eq!(failure.kind, FailureKind::BadEvent);
            assert!(
                failure.message.contains(reason),
                "{failure} should say {reason}"
            );
        }
    }

    #[test]
    fn key_and_time_from_headers() {
        let x = Extractor::new(
            KeySource::Header("Card".into()),
            TimeSource::Header("Ts".into()),
        );
        let mut headers = HeaderMap::new();
        headers.insert("Card", "c-3");
        headers.insert("Ts", "1234");
        headers.insert("Other", "v");
        let event = x
            .event(&raw("s", Some(&headers), b"opaque"))
            .expect("event");
        assert_eq!((event.key.as_str(), event.event_time_ms), ("c-3", 1234));
        assert!(
            event
                .headers
                .contains(&("Other".to_string(), "v".to_string()))
        );
        headers.insert("Ts", "later");
        let failure = x
            .event(&raw("s", Some(&headers), b""))
            .expect_err("bad time");
        assert!(
            failure.message.contains("integer milliseconds"),
            "{failure}"
        );
        let failure = x.event(&raw("s", None, b"")).expect_err("no key");
        assert!(failure.message.contains("`Card` is missing"), "{failure}");
    }

    #[test]
    fn empty_and_oversized_keys_are_bad_events() {
        let x = Extractor::new(
            KeySource::JsonPointer("/k".into()),
            TimeSource::MessageTimestamp,
        );
        assert!(x.event(&raw("s", None, br#"{"k":""}"#)).is_err());
        let long = format!(r#"{{"k":"{}"}}"#, "x".repeat(MAX_KEY_BYTES + 1));
        let failure = x
            .event(&raw("s", None, long.as_bytes()))
            .expect_err("too long");
        assert!(failure.message.contains("limit"), "{failure}");
    }

    #[test]
    fn keys_holding_nul_are_bad_events() {
        let by_pointer = Extractor::new(
            KeySource::JsonPointer("/k".into()),
            TimeSource::MessageTimestamp,
        );
        let by_token = Extractor::new(KeySource::SubjectToken(1), TimeSource::MessageTimestamp);
        let by_header = Extractor::new(KeySource::Header("K".into()), TimeSource::MessageTimestamp);
        let mut headers = HeaderMap::new();
        headers.insert("K", "a\u{0}b");
        let failures = [
            by_pointer.event(&raw("s", None, br#"{"k":"a\u0000b"}"#)),
            by_token.event(&raw("cards.a\u{0}b", None, b"")),
            by_header.event(&raw("s", Some(&headers), b"")),
        ];
        for failure in failures {
            let failure = failure.expect_err("a NUL key");
            assert_eq!(failure.kind, FailureKind::BadEvent);
            assert!(failure.message.contains("U+0000"), "{failure}");
            assert!(failure.message.contains("byte 1"), "{failure}");
        }
        // Other control characters are stored as they are.
        let tab = by_pointer
            .event(&raw("s", None, br#"{"k":"a\tb"}"#))
            .expect("a key with a tab");
        assert_eq!(tab.key, "a\tb");
    }
}
