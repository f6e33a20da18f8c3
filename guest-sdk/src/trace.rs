//! Spans of the handler's own work, nested under the host's span of the
//! invocation in the same trace (Jaeger shows them under `invoke <function>`).
//!
//! ```ignore
//! let span = weir_sdk::trace::span("score");
//! span.set_attribute("rules", "12");
//! // ... work ...
//! drop(span); // or let it go out of scope
//! ```
//!
//! When the event is not traced, the host hands out an inert handle: opening
//! a span is one host call and its setters and close are skipped. Natively, the test harness records them (see
//! `Harness::spans`).

/// An open span; it closes when dropped, together with any span opened
/// inside it that is still open.
#[derive(Debug)]
#[must_use = "a span closes when dropped; bind it to a variable"]
pub struct Span {
    handle: u32,
}

/// Opens a span named `name` inside the innermost span still open.
pub fn span(name: &str) -> Span {
    #[cfg(target_arch = "wasm32")]
    let handle = crate::__bindings::weir::function::trace::enter_span(name);
    #[cfg(not(target_arch = "wasm32"))]
    let handle = crate::testing::imports::trace::enter_span(name);
    Span { handle }
}

impl Span {
    /// Sets an attribute on this span.
    pub fn set_attribute(&self, key: &str, value: &str) {
        if self.handle == 0 {
            return;
        }
        #[cfg(target_arch = "wasm32")]
        crate::__bindings::weir::function::trace::set_attribute(self.handle, key, value);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::imports::trace::set_attribute(self.handle, key, value);
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.handle == 0 {
            return;
        }
        #[cfg(target_arch = "wasm32")]
        crate::__bindings::weir::function::trace::exit_span(self.handle);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::imports::trace::exit_span(self.handle);
    }
}
