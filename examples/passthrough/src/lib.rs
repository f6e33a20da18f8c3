//! `passthrough`: publishes every event unchanged to `bench.out`.
//!
//! The payload and headers are copied as they are; it exists to measure the platform's
//! own cost per event.

use weir_sdk::{Error, Event, emit};

/// Where every event goes.
pub const OUTPUT_SUBJECT: &str = "bench.out";

#[weir_sdk::handler]
fn handle(event: Event) -> Result<(), Error> {
    emit::publish(OUTPUT_SUBJECT, &event.payload, &event.headers);
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // the harness is native-only
mod tests {
    use super::{OUTPUT_SUBJECT, handle};
    use weir_sdk::testing::{Emitted, Harness, event};

    #[test]
    fn publishes_payload_and_headers_unchanged() {
        let mut h = Harness::new();
        let input = event("bench.in", "k", &b"\x00not json\xff"[..])
            .with_header("x-id", "42")
            .with_header("content-type", "application/octet-stream");
        h.call(handle, input.clone()).expect("ok");
        assert_eq!(
            h.emitted(),
            [Emitted {
                subject: OUTPUT_SUBJECT.to_owned(),
                payload: input.payload,
                headers: input.headers,
            }]
        );
    }
}
