//! What a guest leaves behind besides its result: log lines (from the `log`
//! import and from stdout/stderr) and its own spans (from the `trace`
//! import), collected per invocation under fixed bounds so that a flooding
//! guest costs the host a bounded amount of memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest log line kept; longer ones are cut.
pub const MAX_LOG_LINE_BYTES: usize = 2048;
/// Bytes of stdout (and, separately, stderr) kept per invocation.
pub const MAX_CAPTURED_OUTPUT_BYTES: usize = 16 * 1024;
/// Guest spans kept per invocation; past it `enter-span` returns 0.
pub const MAX_GUEST_SPANS: usize = 64;
/// Attributes kept per guest span.
pub const MAX_SPAN_ATTRIBUTES: usize = 16;
/// Longest span name, attribute key or attribute value kept.
pub const MAX_SPAN_TEXT_BYTES: usize = 256;

/// How much a guest log line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// Which channel a guest log line came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// The `weir:function/log` import.
    Log,
    Stdout,
    Stderr,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One guest log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLogLine {
    pub level: LogLevel,
    pub source: LogSource,
    pub message: String,
}

/// One span the guest opened.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestSpan {
    pub name: String,
    /// Index in the invocation's span list of the span it was opened inside;
    /// `None` for a span directly under the invocation.
    pub parent: Option<usize>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, String)>,
}

/// Everything one invocation left behind.
#[derive(Debug, Default)]
pub struct InvocationDiagnostics {
    pub logs: Vec<GuestLogLine>,
    /// Lines past the function's `limits.log_lines` (or output bytes past
    /// [`MAX_CAPTURED_OUTPUT_BYTES`], counted as one line each stream).
    pub dropped_logs: u32,
    pub spans: Vec<GuestSpan>,
    /// `panicked at <place>: <message>` if the guest's stderr has a panic
    /// report (found before any line limit applies).
    pub panic: Option<String>,
}

/// The per-instance collector; reset for every invocation.
#[derive(Default)]
pub(crate) struct Diagnostics {
    /// Whether the event being handled is traced: spans are recorded only then.
    pub(crate) traced: bool,
    spans: Vec<GuestSpan>,
    /// Indexes in `spans` of the open spans, innermost last.
    open: Vec<usize>,
    logs: Vec<GuestLogLine>,
    panic: Option<String>,
    max_lines: usize,
    dropped_logs: u32,
    pub(crate) stdout: CapturedOutput,
    pub(crate) stderr: CapturedOutput,
}

impl Diagnostics {
    /// Starts collecting for a new invocation that may keep `max_lines`.
    pub(crate) fn begin(&mut self, traced: bool, max_lines: usize) {
        self.traced = traced;
        self.max_lines = max_lines;
        self.spans.clear();
        self.open.clear();
        self.logs.clear();
        self.dropped_logs = 0;
    }

    /// Ends the invocation: closes spans left open and turns captured
    /// stdout/stderr into lines.
    pub(crate) fn finish(&mut self) -> InvocationDiagnostics {
        let now = SystemTime::now();
        for index in self.open.drain(..) {
            self.spans[index].end = now;
        }
        for (source, level) in [
            (LogSource::Stdout, LogLevel::Info),
            (LogSource::Stderr, LogLevel::Warn),
        ] {
            let captured = match source {
                LogSource::Stderr => &self.stderr,
                _ => &self.stdout,
            };
            let (bytes, truncated) = captured.take();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if source == LogSource::Stderr {
                self.panic = panic_report(&text);
            }
            for line in text.lines().filter(|line| !line.trim().is_empty()) {
                self.push_log(level, source, line);
            }
            if truncated {
                self.dropped_logs += 1;
            }
        }
        InvocationDiagnostics {
            logs: std::mem::take(&mut self.logs),
            dropped_logs: std::mem::take(&mut self.dropped_logs),
            spans: std::mem::take(&mut self.spans),
            panic: self.panic.take(),
        }
    }

    pub(crate) fn push_log(&mut self, level: LogLevel, source: LogSource, message: &str) {
        if self.logs.len() >= self.max_lines {
            self.dropped_logs += 1;
            return;
        }
        self.logs.push(GuestLogLine {
            level,
            source,
            message: escape_controls(&cut(message, MAX_LOG_LINE_BYTES)),
        });
    }

    /// Opens a span; 0 when not traced or past the limit.
    pub(crate) fn enter_span(&mut self, name: &str) -> u32 {
        if !self.traced || self.spans.len() >= MAX_GUEST_SPANS {
            return 0;
        }
        let now = SystemTime::now();
        self.spans.push(GuestSpan {
            name: cut(name, MAX_SPAN_TEXT_BYTES),
            parent: self.open.last().copied(),
            start: now,
            end: now,
            attributes: Vec::new(),
        });
        let index = self.spans.len() - 1;
        self.open.push(index);
        // Handles are index + 1; the limit keeps them far below u32::MAX.
        u32::try_from(index + 1).unwrap_or(0)
    }

    pub(crate) fn set_attribute(&mut self, handle: u32, key: &str, value: &str) {
        let Some(index) = self.open_index(handle) else {
            return;
        };
        let span = &mut self.spans[index];
        if span.attributes.len() < MAX_SPAN_ATTRIBUTES {
            span.attributes.push((
                cut(key, MAX_SPAN_TEXT_BYTES),
                cut(value, MAX_SPAN_TEXT_BYTES),
            ));
        }
    }

    pub(crate) fn exit_span(&mut self, handle: u32) {
        let Some(index) = self.open_index(handle) else {
            return;
        };
        let now = SystemTime::now();
        if let Some(depth) = self.open.iter().position(|open| *open == index) {
            for closed in self.open.drain(depth..) {
                self.spans[closed].end = now;
            }
        }
    }

    /// The span index of `handle` if that span is still open.
    fn open_index(&self, handle: u32) -> Option<usize> {
        let index = (handle as usize).checked_sub(1)?;
        self.open.contains(&index).then_some(index)
    }
}

/// Control characters (line breaks, terminal escapes) written as escapes,
/// so a guest cannot forge host log lines or drive a reader's terminal.
fn escape_controls(text: &str) -> String {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.to_string();
    }
    text.chars()
        .map(|c| match c {
            '\t' => c.to_string(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// `panicked at <place>: <message>` from a Rust-style panic report.
fn panic_report(stderr: &str) -> Option<String> {
    let mut lines = stderr.lines();
    let header = lines.by_ref().find(|line| line.contains("panicked at"))?;
    let place = header
        .split_once("panicked at")
        .map_or("", |(_, place)| place.trim().trim_end_matches(':'));
    let message = lines.next().unwrap_or("").trim();
    Some(cut(
        &escape_controls(&format!("panicked at {place}: {message}")),
        MAX_LOG_LINE_BYTES,
    ))
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A guest's stdout or stderr: kept in memory up to
/// [`MAX_CAPTURED_OUTPUT_BYTES`] per invocation. Writes past the bound
/// succeed and are dropped, so a chatty guest never fails on a full pipe.
#[derive(Clone, Default)]
pub(crate) struct CapturedOutput {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

impl CapturedOutput {
    fn append(&self, bytes: &[u8]) {
        let mut captured = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_CAPTURED_OUTPUT_BYTES.saturating_sub(captured.bytes.len());
        if bytes.len() > room {
            captured.truncated = true;
        }
        captured
            .bytes
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The bytes written since the last call, and whether some were dropped.
    fn take(&self) -> (Vec<u8>, bool) {
        let mut captured = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let truncated = std::mem::take(&mut captured.truncated);
        (std::mem::take(&mut captured.bytes), truncated)
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: what does not fit is dropped, never refused.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_nest_close_with_their_parent_and_stop_at_the_limit() {
        let mut d = Diagnostics::default();
        d.begin(true, 10);
        let outer = d.enter_span("outer");
        let inner = d.enter_span("inner");
        d.set_attribute(inner, "k", "v");
        d.exit_span(outer); // closes inner too
        d.set_attribute(inner, "late", "x"); // closed: ignored
        d.exit_span(inner); // already closed: ignored
        let leaked = d.enter_span("leaked");
        let done = d.finish();
        assert_eq!((outer, inner, leaked), (1, 2, 3));
        let shape: Vec<_> = done
            .spans
            .iter()
            .map(|s| (s.name.as_str(), s.parent, s.attributes.len()))
            .collect();
        assert_eq!(
            shape,
            [
                ("outer", None, 0),
                ("inner", Some(0), 1),
                ("leaked", None, 0)
            ]
        );
        assert!(done.spans.iter().all(|s| s.end >= s.start));

        d.begin(true, 10);
        for _ in 0..MAX_GUEST_SPANS {
            assert_ne!(d.enter_span("s"), 0);
        }
        assert_eq!(d.enter_span("one too many"), 0);
        assert_eq!(d.finish().spans.len(), MAX_GUEST_SPANS);

        d.begin(false, 10);
        assert_eq!(d.enter_span("untraced"), 0);
        assert!(d.finish().spans.is_empty());
    }

    #[test]
    fn panics_are_found_past_the_line_limit_and_controls_are_escaped() {
        let mut d = Diagnostics::default();
        d.begin(false, 1);
        d.push_log(LogLevel::Info, LogSource::Log, "fills the one line allowed");
        d.stderr
            .append(b"thread '<unnamed>' panicked at src/lib.rs:9:5:\nboom\nnote: ...\n");
        let done = d.finish();
        assert_eq!(
            done.panic.as_deref(),
            Some("panicked at src/lib.rs:9:5: boom")
        );
        assert_eq!(done.logs.len(), 1);

        d.begin(false, 10);
        d.push_log(
            LogLevel::Info,
            LogSource::Log,
            "fake\n2026 INFO forged\u{1b}[31m",
        );
        let done = d.finish();
        assert_eq!(done.logs[0].message, "fake\\n2026 INFO forged\\u{1b}[31m");
        assert_eq!(done.panic, None);
    }

    #[test]
    fn log_lines_and_captured_output_are_bounded() {
        let mut d = Diagnostics::default();
        d.begin(false, 10);
        for i in 0..15 {
            d.push_log(LogLevel::Info, LogSource::Log, &format!("line {i}"));
        }
        let done = d.finish();
        assert_eq!(done.logs.len(), 10);
        assert_eq!(done.dropped_logs, 5);

        d.begin(false, 10);
        let mut stdout = d.stdout.clone();
        OutputStream::write(&mut stdout, Bytes::from_static(b"hello\nworld\n\n")).expect("write");
        d.stderr.append(&vec![b'x'; MAX_CAPTURED_OUTPUT_BYTES + 10]);
        d.push_log(
            LogLevel::Error,
            LogSource::Log,
            &"é".repeat(MAX_LOG_LINE_BYTES),
        );
        let done = d.finish();
        let lines: Vec<_> = done
            .logs
            .iter()
            .map(|l| (l.source, l.level, l.message.len()))
            .collect();
        assert_eq!(
            lines,
            [
                (
                    LogSource::Log,
                    LogLevel::Error,
                    MAX_LOG_LINE_BYTES + "…".len()
                ),
                (LogSource::Stdout, LogLevel::Info, 5),
                (LogSource::Stdout, LogLevel::Info, 5),
                (
                    LogSource::Stderr,
                    LogLevel::Warn,
                    MAX_LOG_LINE_BYTES + "…".len()
                ),
            ]
        );
        assert_eq!(done.dropped_logs, 1, "the truncated stderr");
        // The next invocation starts empty.
        d.begin(false, 10);
        assert!(d.finish().logs.is_empty());
    }
}
