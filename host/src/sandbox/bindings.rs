//! Rust bindings of the worlds Weir serves, generated from `wit/`: the
//! `event-handler` world, and the two window worlds of `weir:window`,
//! which import the same `weir:function` interfaces (one implementation,
//! one linker) and differ only in what they export.
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

/// The `incremental-window-handler` world: `fold`, `merge`, `fire`.
pub mod incremental {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "weir:window/incremental-window-handler",
        with: {
            "weir:function/types": super::weir::function::types,
            "weir:function/state": super::weir::function::state,
            "weir:function/emit": super::weir::function::emit,
            "weir:function/log": super::weir::function::log,
            "weir:function/trace": super::weir::function::trace,
        },
    });
}

/// The `buffered-window-handler` world: `on-window`.
pub mod buffered {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "weir:window/buffered-window-handler",
        with: {
            "weir:function/types": super::weir::function::types,
            "weir:function/state": super::weir::function::state,
            "weir:function/emit": super::weir::function::emit,
            "weir:function/log": super::weir::function::log,
            "weir:function/trace": super::weir::function::trace,
            "weir:window/types": super::incremental::weir::window::types,
        },
    });
}
