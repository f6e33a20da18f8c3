//! The guest side of Weir's worlds (wasm32 only): `weir:function/event-handler` and the
//! two `weir:window` worlds, which import the same interfaces (generated once, here).
//!
//! wit-bindgen generates the imports and a hidden export macro per world; `#[weir_sdk::handler]`
//! expands to an impl of [`Guest`] that calls [`dispatch`], and the window macros to impls
//! that call [`fold`], [`merge`], [`fire`] or [`on_window`]. Only the exported world ends up
//! in a component.

wit_bindgen::generate!({
    path: "../wit",
    world: "event-handler",
    pub_export_macro: true,
    export_macro_name: "__export_event_handler",
    default_bindings_module: "::weir_sdk::__bindings",
});

/// The `incremental-window-handler` world's exports.
pub mod incremental {
    wit_bindgen::generate!({
        path: "../wit",
        world: "weir:window/incremental-window-handler",
        with: {
            "weir:function/types@0.1.0": crate::__bindings::weir::function::types,
            "weir:function/state@0.1.0": crate::__bindings::weir::function::state,
            "weir:function/emit@0.1.0": crate::__bindings::weir::function::emit,
            "weir:function/log@0.1.0": crate::__bindings::weir::function::log,
            "weir:function/trace@0.1.0": crate::__bindings::weir::function::trace,
        },
        pub_export_macro: true,
        export_macro_name: "__export_incremental",
        default_bindings_module: "::weir_sdk::__bindings::incremental",
    });
}

/// The `buffered-window-handler` world's exports.
pub mod buffered {
    wit_bindgen::generate!({
        path: "../wit",
        world: "weir:window/buffered-window-handler",
        with: {
            "weir:function/types@0.1.0": crate::__bindings::weir::function::types,
            "weir:function/state@0.1.0": crate::__bindings::weir::function::state,
            "weir:function/emit@0.1.0": crate::__bindings::weir::function::emit,
            "weir:function/log@0.1.0": crate::__bindings::weir::function::log,
            "weir:function/trace@0.1.0": crate::__bindings::weir::function::trace,
            "weir:window/types@0.1.0": crate::__bindings::incremental::weir::window::types,
        },
        pub_export_macro: true,
        export_macro_name: "__export_buffered",
        default_bindings_module: "::weir_sdk::__bindings::buffered",
    });
}

pub use incremental::weir::window::types::Firing as GuestFiring;

use weir::function::log::Level as WitLevel;

use crate::window::{BufferedWindow, Firing, IncrementalWindow, decode, encode};

fn sdk_event(event: Event) -> crate::Event {
    crate::Event {
        subject: event.subject,
        key: event.key,
        payload: event.payload,
        headers: event.headers,
        event_time_ms: event.event_time_ms,
        sequence: event.sequence,
    }
}

fn wit_error(error: crate::Error) -> Error {
    match error {
        crate::Error::Retry(reason) => Error::Retry(reason),
        crate::Error::Reject(reason) => Error::Reject(reason),
    }
}

fn sdk_firing(firing: GuestFiring) -> Firing {
    Firing {
        key: firing.key,
        start_ms: firing.window.start_ms,
        end_ms: firing.window.end_ms,
        number: firing.number,
    }
}

/// Runs `handler` on an event the host passed in, converting to and from the SDK types.
pub fn dispatch(
    handler: fn(crate::Event) -> Result<(), crate::Error>,
    event: Event,
) -> Result<(), Error> {
    handler(sdk_event(event)).map_err(wit_error)
}

/// `fold` of an incremental window function `W`.
pub fn fold<W: IncrementalWindow>(
    accumulator: Option<Vec<u8>>,
    event: Event,
) -> Result<Vec<u8>, Error> {
    let mut accumulator: W::Accumulator = match accumulator {
        Some(bytes) => decode(&bytes).map_err(wit_error)?,
        None => Default::default(),
    };
    W::fold(&mut accumulator, &sdk_event(event)).map_err(wit_error)?;
    encode(&accumulator).map_err(wit_error)
}

/// `merge` of an incremental window function `W`.
pub fn merge<W: IncrementalWindow>(earlier: Vec<u8>, later: Vec<u8>) -> Result<Vec<u8>, Error> {
    let earlier = decode(&earlier).map_err(wit_error)?;
    let later = decode(&later).map_err(wit_error)?;
    encode(&W::merge(earlier, later)).map_err(wit_error)
}

/// `fire` of an incremental window function `W`.
pub fn fire<W: IncrementalWindow>(firing: GuestFiring, accumulator: Vec<u8>) -> Result<(), Error> {
    let accumulator = match accumulator.is_empty() {
        true => Default::default(),
        false => decode(&accumulator).map_err(wit_error)?,
    };
    W::fire(&sdk_firing(firing), accumulator).map_err(wit_error)
}

/// `on-window` of a buffered window function `W`.
pub fn on_window<W: BufferedWindow>(firing: GuestFiring, events: Vec<Event>) -> Result<(), Error> {
    let events = events.into_iter().map(sdk_event).collect();
    W::on_window(&sdk_firing(firing), events).map_err(wit_error)
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
