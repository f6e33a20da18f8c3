//! Rust bindings of the `event-handler` world, generated from `wit/`.
//!
//! `emit.publish` and `state.set` may trap: a guest that publishes to a
//! subject it did not declare, or stores a value over the limit, fails the
//! invocation instead of being silently ignored.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "event-handler",
    imports: {
        "weir:function/emit.publish": trappable,
        "weir:function/state.set": trappable,
    },
});
