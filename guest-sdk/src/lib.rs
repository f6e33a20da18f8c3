//! Write Weir stream functions in Rust.
//!
//! A function is one `#[weir_sdk::handler]` fn that takes an [`Event`] and returns
//! `Result<(), Error>`. It reads and writes the current key's entries through [`state`],
//! publishes records through [`emit`], writes log lines through [`log`] and opens
//! spans of its own work through [`trace`]. A function called per event-time window
//! instead implements [`window::IncrementalWindow`] or [`window::BufferedWindow`].
//!
//! Built for `wasm32-wasip2`, those modules call the host through the
//! `weir:function/event-handler` world. Built natively, they talk to the in-process
//! [`testing::Harness`] instead, so a handler is unit-tested with plain `cargo test`.

pub mod emit;
mod error;
mod event;
pub mod log;
pub mod state;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod trace;
pub mod window;

pub use error::Error;
pub use event::Event;
pub use weir_sdk_macro::handler;

/// The wit-bindgen bindings and the glue `#[weir_sdk::handler]` expands to. Not API.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
#[allow(unsafe_code, clippy::too_many_arguments)] // both from wit-bindgen's generated code
#[path = "wasm.rs"]
pub mod __bindings;
