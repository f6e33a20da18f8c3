//! Guest log lines after an invocation: rate-limited per function, written
//! to the host's log with function, version, key and trace id, and published
//! as JSON [`LogRecord`]s to `<prefix>.<function>` (kept by the `WEIR_LOGS`
//! stream), where `weir fn logs` reads them.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::GuestLogConfig;
use crate::ratelimit::TokenBucket;
use crate::sandbox::{InvocationDiagnostics, LogLevel};

/// The stream that keeps guest log lines.
pub const LOG_STREAM: &str = "WEIR_LOGS";

/// How often a function's dropped-line count is reported.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(1);

/// One guest log line as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub level: String,
    /// `log`, `stdout`, `stderr`, or `weir` for the host's own notes.
    pub source: String,
    pub function: String,
    pub version: String,
    pub key: String,
    /// The input's stream sequence.
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub message: String,
}

/// The subject of `function`'s log lines.
pub fn log_subject(prefix: &str, function: &str) -> String {
    format!("{prefix}.{function}")
}

/// Where one invocation's lines are from.
#[derive(Debug, Clone, Copy)]
pub struct LineOrigin<'a> {
    pub key: &'a str,
    pub sequence: u64,
    pub trace_id: Option<&'a str>,
    pub time: SystemTime,
}

/// The log output of one function.
pub struct GuestLogSink {
    function: Arc<str>,
    version: String,
    subject: String,
    client: async_nats::Client,
    bucket: TokenBucket,
    /// Lines dropped since the last report.
    unreported: u64,
    last_report: Instant,
    published: metrics::Counter,
    dropped: metrics::Counter,
}

impl std::fmt::Debug for GuestLogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLogSink")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl GuestLogSink {
    /// A sink for `function`'s lines, published to `subject`
    /// ([`crate::config::FunctionSpec::record_subject`]).
    pub fn new(
        config: &GuestLogConfig,
        subject: String,
        function: Arc<str>,
        version: String,
        client: async_nats::Client,
    ) -> Self {
        let rate = f64::from(config.lines_per_second.max(1));
        let labels = [
            ("function", function.to_string()),
            ("version", version.clone()),
        ];
        Self {
            subject,
            published: metrics::counter!("weir_guest_log_lines_total", &labels),
            dropped: metrics::counter!("weir_guest_log_lines_dropped_total", &labels),
            function,
            version,
            client,
            bucket: TokenBucket::new(rate, rate * 2.0, Instant::now()),
            unreported: 0,
            last_report: Instant::now(),
        }
    }

    /// Writes out the lines one invocation left, as far as the rate allows.
    pub async fn write(&mut self, origin: LineOrigin<'_>, diagnostics: &InvocationDiagnostics) {
        self.count_dropped(u64::from(diagnostics.dropped_logs));
        let now = Instant::now();
        for line in &diagnostics.logs {
            if !self.bucket.take(now) {
                self.count_dropped(1);
                continue;
            }
            let (function, version, key) = (&*self.function, self.version.as_str(), origin.key);
            let trace_id = origin.trace_id.unwrap_or("");
            let (source, message) = (line.source.as_str(), &line.message);
            match line.level {
                LogLevel::Trace => {
                    tracing::trace!(target: "weir::guest", function, version, key, trace_id, source, "{message}")
                }
                LogLevel::Debug => {
                    tracing::debug!(target: "weir::guest", function, version, key, trace_id, source, "{message}")
                }
                LogLevel::Info => {
                    tracing::info!(target: "weir::guest", function, version, key, trace_id, source, "{message}")
                }
                LogLevel::Warn => {
                    tracing::warn!(target: "weir::guest", function, version, key, trace_id, source, "{message}")
                }
                LogLevel::Error => {
                    tracing::error!(target: "weir::guest", function, version, key, trace_id, source, "{message}")
                }
            }
            self.publish(LogRecord {
                time_ms: millis(origin.time),
                level: line.level.as_str().to_string(),
                source: source.to_string(),
                function: function.to_string(),
                version: version.to_string(),
                key: key.to_string(),
                sequence: origin.sequence,
                trace_id: origin.trace_id.map(str::to_string),
                message: message.clone(),
            })
            .await;
            self.published.increment(1);
        }
        self.report_dropped(origin).await;
    }

    fn count_dropped(&mut self, lines: u64) {
        self.unreported += lines;
        self.dropped.increment(lines);
    }

    /// Says, at most once per [`DROP_REPORT_EVERY`], how many lines were
    /// dropped, so a reader of the subject knows lines are missing.
    async fn report_dropped(&mut self, origin: LineOrigin<'_>) {
        if self.unreported == 0 || self.last_report.elapsed() < DROP_REPORT_EVERY {
            return;
        }
        let dropped = std::mem::take(&mut self.unreported);
        self.last_report = Instant::now();
        tracing::warn!(function = %self.function, dropped, "guest log lines dropped: over the per-function rate or per-invocation limit");
        self.publish(LogRecord {
            time_ms: millis(origin.time),
            level: LogLevel::Warn.as_str().to_string(),
            source: "weir".to_string(),
            function: self.function.to_string(),
            version: self.version.clone(),
            key: origin.key.to_string(),
            sequence: origin.sequence,
            trace_id: None,
            message: format!("{dropped} log lines dropped (rate or per-invocation limit)"),
        })
        .await;
    }

    async fn publish(&self, record: LogRecord) {
        let Ok(payload) = serde_json::to_vec(&record) else {
            return;
        };
        // Core NATS: a line lost while NATS is away is not worth holding
        // events for; the host's own log still has it.
        if let Err(error) = self
            .client
            .publish(self.subject.clone(), payload.into())
            .await
        {
            tracing::debug!(%error, "publishing a guest log line failed");
        }
    }
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_as_json() {
        let record = LogRecord {
            time_ms: 1_700_000_000_000,
            level: "info".into(),
            source: "log".into(),
            function: "f".into(),
            version: "abc".into(),
            key: "k".into(),
            sequence: 7,
            trace_id: None,
            message: "hello".into(),
        };
        let json = serde_json::to_string(&record).expect("serializes");
        assert!(!json.contains("trace_id"));
        assert_eq!(
            serde_json::from_str::<LogRecord>(&json).expect("parses"),
            record
        );
        assert_eq!(log_subject("weir.logs", "f"), "weir.logs.f");
    }
}
