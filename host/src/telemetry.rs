//! Logging and metrics. Logs: `tracing` events to stderr, filtered by
//! `WEIR_LOG` (or `RUST_LOG`), `info` by default. Metrics: the `metrics`
//! facade with a Prometheus recorder, rendered at `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::Matcher;
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

/// The process-wide Prometheus recorder, installed on first use. `None` if
/// the embedding program installed another `metrics` recorder first.
pub fn metrics() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ];
            let sizes = [1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0];
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &sizes));
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => Some(handle),
                Err(error) => {
                    tracing::warn!(%error, "metrics are off: cannot install the Prometheus recorder");
                    None
                }
            }
        })
        .as_ref()
}
