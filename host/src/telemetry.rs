//! Logging: `tracing` events to stderr, filtered by `WEIR_LOG` (or
//! `RUST_LOG`), `info` by default.

use tracing_subscriber::EnvFilter;

/// Installs the process-wide subscriber; a second call is a no-op.
pub fn init_logging() {
    let filter = std::env::var("WEIR_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}
