//! [`Event`]: one input record as the handler sees it.
//!
//! It carries the same fields as the WIT `event` record, plus helpers to decode the
//! payload as JSON, look up a header, and build test events.

use serde::de::DeserializeOwned;

use crate::Error;

/// One input record, as the host read it from JetStream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The NATS subject the record was published on.
    pub subject: String,
    /// The key the function's binding extracted; state is scoped to it.
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// Event time in milliseconds since the Unix epoch, as the binding extracted it.
    pub event_time_ms: i64,
    /// The record's JetStream stream sequence: unique per stream, stable across redelivery.
    pub sequence: u64,
}

impl Event {
    /// Decodes the payload as JSON. A payload that does not decode is rejected: sending
    /// it again would not help.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::reject(format!(
                "payload is not valid JSON for {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// The value of the first header called `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// This event with `event_time_ms` set to `ms`.
    pub fn with_time(mut self, ms: i64) -> Self {
        self.event_time_ms = ms;
        self
    }

    /// This event with one more header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// This event with `sequence` set to `n`.
    pub fn with_sequence(mut self, n: u64) -> Self {
        self.sequence = n;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::Event;
    use crate::Error;

    fn event(payload: &str) -> Event {
        Event {
            payload: payload.as_bytes().to_vec(),
            ..Event::default()
        }
    }

    #[test]
    fn json_decodes_the_payload() {
        let value: Vec<u32> = event("[1,2,3]").json().expect("valid JSON");
        assert_eq!(value, [1, 2, 3]);
    }

    #[test]
    fn bad_json_is_a_reject_naming_the_type() {
        let err = event("{nope").json::<Vec<u32>>().expect_err("invalid JSON");
        let Error::Reject(reason) = err else {
            panic!("expected a reject, got {err:?}");
        };
        assert!(reason.starts_with("payload is not valid JSON for alloc::vec::Vec<u32>: "));
    }

    #[test]
    fn header_lookup_ignores_case() {
        let e = Event::default()
            .with_header("Content-Type", "application/json")
            .with_header("x-a", "1")
            .with_time(7)
            .with_sequence(9);
        assert_eq!(e.header("content-type"), Some("application/json"));
        assert_eq!(e.header("X-A"), Some("1"));
        assert_eq!(e.header("x-b"), None);
        assert_eq!((e.event_time_ms, e.sequence), (7, 9));
    }
}
