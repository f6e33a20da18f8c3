//! The guest side of the `weir:function/event-handler` world (wasm32 only).
//!
//! wit-bindgen generates the imports and a hidden export macro here; `#[weir_sdk::handler]`
//! expands to an impl of [`Guest`] that calls [`dispatch`], and to that export macro.

wit_bindgen::generate!({
    path: "../wit",
    world: "event-handler",
    pub_export_macro: true,
    export_macro_name: "__export_event_handler",
    default_bindings_module: "::weir_sdk::__bindings",
});

use weir::function::log::Level as WitLevel;

/// Runs `handler` on an event the host passed in, converting to and from the SDK types.
pub fn dispatch(
    handler: fn(crate::Event) -> Result<(), crate::Error>,
    event: Event,
) -> Result<(), Error> {
    let event = crate::Event {
        subject: event.subject,
        key: event.key,
        payload: event.payload,
        headers: event.headers,
        event_time_ms: event.event_time_ms,
        sequence: event.sequence,
    };
    handler(event).map_err(|e| match e {
        crate::Error::Retry(reason) => Error::Retry(reason),
        crate::Error::Reject(reason) => Error::Reject(reason),
    })
}

impl From<crate::log::Level> for WitLevel {
    fn from(level: crate::log::Level) -> Self {
        use crate::log::Level;
        match level {
            Level::Trace => Self::Trace,
            Level::Debug => Self::Debug,
            Level::Info => Self::Info,
            Level::Warn => Self::Warn,
            Level::Error => Self::Error,
        }
    }
}
