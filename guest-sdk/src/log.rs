//! Log lines. The host attributes each line to the function, its version and the key.
//!
//! Natively, lines are recorded by the test harness (see `Harness::logs`); outside a
//! harness they go to stderr.

/// How much a log line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Writes `message` at `level`.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::__bindings::weir::function::log::log(level.into(), message);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::imports::log(level, message);
}

/// Writes `message` at [`Level::Trace`].
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Writes `message` at [`Level::Debug`].
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Writes `message` at [`Level::Info`].
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Writes `message` at [`Level::Warn`].
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Writes `message` at [`Level::Error`].
pub fn error(message: &str) {
    log(Level::Error, message);
}
