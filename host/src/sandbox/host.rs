//! What a guest can reach: the store data of an instance ([`InvocationState`])
//! and its implementation of the `state`, `emit`, `log` and `trace` imports.
//!
//! State reads and writes go to the batch's [`BatchView`], scoped to the key
//! of the event being handled. Publishes are checked against the function's
//! declared output subjects and collected; the dispatcher publishes them
//! after the batch commits. Log lines, stdout/stderr and guest spans are
//! collected in [`Diagnostics`] and handed to the dispatcher per invocation.
//!
//! Nothing a guest passes may reach Postgres or a publish in a form they
//! refuse or misread: a state entry name holding U+0000 (Postgres `TEXT`
//! rejects it) is a state-limit violation, a subject with whitespace or
//! control characters or a header with a line break or U+0000 is denied,
//! and `Nats-*` headers, which JetStream acts on when it stores a message,
//! are dropped from outputs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::Resource;
use wasmtime::{ResourceLimiter, Result as WasmResult};
use wasmtime_wasi::p2::{DynPollable, Pollable};
use wasmtime_wasi::{HostMonotonicClock, ResourceTable, WasiCtx, WasiCtxView, WasiView};

use super::bindings::weir::function::{emit, log, state, trace, types};
use super::diagnostics::{Diagnostics, LogLevel, LogSource};
use crate::config::Limits;
use crate::output::{is_publishable_subject, is_valid_header, subject_matches};
use crate::state::{BatchView, HOST_ENTRY_PREFIX};

/// Longest subject a guest may publish to.
const MAX_SUBJECT_BYTES: usize = 512;
/// Longest state entry name.
const MAX_ENTRY_NAME_BYTES: usize = 256;

/// An output published by the event being handled, before it gets its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingOutput {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
}

/// A limit or capability the guest ran into; it turns a trap into a typed
/// failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    MemoryLimit { desired: usize, limit: usize },
    Denied(String),
    OutputLimit(String),
    StateLimit(String),
}

/// The data of one instance's store.
pub struct InvocationState {
    wasi: WasiCtx,
    table: ResourceTable,
    function: Arc<str>,
    allowed_outputs: Arc<[String]>,
    limits: Limits,
    max_record_bytes: usize,
    /// When the invocation in progress must end; bounds guest sleeps.
    pub(crate) deadline_at: Instant,
    /// Set when the guest waited on a clock until its deadline cut the
    /// wait short: the call has overrun, whatever it returns.
    overran: Arc<AtomicBool>,
    /// Payload and header bytes published by the invocation in progress.
    output_bytes: usize,
    clock: GuestClock,
    /// The state of the batch being run; swapped in and out per batch.
    pub(crate) view: BatchView,
    /// The outputs of the event being handled.
    pub(crate) outputs: Vec<PendingOutput>,
    pub(crate) violation: Option<Violation>,
    pub(crate) diagnostics: Diagnostics,
    /// A window function's state names starting with
    /// [`HOST_ENTRY_PREFIX`] are the host's (window contents).
    pub(crate) host_entries: bool,
}

impl InvocationState {
    pub(crate) fn new(
        function: Arc<str>,
        allowed_outputs: Arc<[String]>,
        limits: Limits,
        max_record_bytes: usize,
    ) -> Self {
        let diagnostics = Diagnostics::default();
        let clock = GuestClock::default();
        // The default context grants nothing: no preopened directories, no
        // environment, no arguments, every socket address denied and name
        // lookup off. Only stdout and stderr are captured, as log lines.
        let wasi = WasiCtx::builder()
            .stdout(diagnostics.stdout.clone())
            .stderr(diagnostics.stderr.clone())
            .monotonic_clock(clock)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            function,
            allowed_outputs,
            limits,
            max_record_bytes,
            deadline_at: Instant::now(),
            overran: Arc::new(AtomicBool::new(false)),
            output_bytes: 0,
            clock,
            view: BatchView::default(),
            outputs: Vec::new(),
            violation: None,
            diagnostics,
            host_entries: false,
        }
    }

    /// Why the guest may not use state entry `name`, if it may not.
    fn name_problem(&self, name: &str) -> Option<String> {
        if self.host_entries && name.starts_with(HOST_ENTRY_PREFIX) {
            return Some(format!(
                "state entry name {} starts with U+0001, which a window function's host keeps for window contents",
                quoted(name)
            ));
        }
        entry_name_problem(name)
    }

    fn deny(&mut self, message: String) -> wasmtime::Error {
        self.violate(Violation::Denied(message))
    }

    /// Records why the call is being stopped and returns the trap for it.
    fn violate(&mut self, violation: Violation) -> wasmtime::Error {
        let error = match &violation {
            Violation::MemoryLimit { desired, limit } => {
                wasmtime::format_err!("memory limit: wanted {desired} bytes, the limit is {limit}")
            }
            Violation::Denied(message)
            | Violation::OutputLimit(message)
            | Violation::StateLimit(message) => wasmtime::format_err!("{message}"),
        };
        self.violation = Some(violation);
        error
    }

    /// Starts the per-invocation accounting of a new call.
    pub(crate) fn begin_invocation(&mut self, deadline: Duration, traced: bool) {
        self.deadline_at = Instant::now() + deadline;
        self.overran.store(false, Ordering::Relaxed);
        self.output_bytes = 0;
        self.outputs.clear();
        self.violation = None;
        self.diagnostics
            .begin(traced, self.limits.log_lines as usize);
    }

    /// A pollable that is ready after `wait`, or at the invocation's
    /// deadline if that comes first: the epoch deadline cannot interrupt a
    /// guest waiting inside the host, so an unbounded wait would hold the
    /// worker forever. A wait that is cut short marks the call as overrun
    /// (a timeout, see [`Self::overran`]) only if the guest actually waits
    /// on it; a long timer never waited for costs nothing.
    pub(crate) fn bounded_sleep(&mut self, wait: Duration) -> WasmResult<Resource<DynPollable>> {
        let now = Instant::now();
        let fits = now
            .checked_add(wait)
            .is_some_and(|until| until <= self.deadline_at);
        let until = if fits { now + wait } else { self.deadline_at };
        let sleep = BoundedSleep {
            wake: tokio::time::Instant::now() + until.saturating_duration_since(now),
            cut: (!fits).then(|| self.overran.clone()),
        };
        let sleep = self.table.push(sleep)?;
        wasmtime_wasi::p2::subscribe(&mut self.table, sleep)
    }

    /// Whether the call waited until its deadline cut the wait short.
    pub(crate) fn overran(&self) -> bool {
        self.overran.load(Ordering::Relaxed)
    }

    /// A sleep until the guest clock reads `when` (nanoseconds).
    pub(crate) fn bounded_sleep_until(&mut self, when: u64) -> WasmResult<Resource<DynPollable>> {
        let wait = Duration::from_nanos(when.saturating_sub(self.clock.now()));
        self.bounded_sleep(wait)
    }
}

/// The guest's monotonic clock: nanoseconds since the instance started.
/// The host keeps a copy to turn `subscribe-instant` into a wait.
#[derive(Debug, Clone, Copy)]
struct GuestClock(Instant);

impl Default for GuestClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A sleep the host has bounded by the invocation's deadline.
struct BoundedSleep {
    wake: tokio::time::Instant,
    /// Set on waking when the deadline cut the wait short.
    cut: Option<Arc<AtomicBool>>,
}

#[async_trait::async_trait]
impl Pollable for BoundedSleep {
    async fn ready(&mut self) {
        tokio::time::sleep_until(self.wake).await;
        if let Some(overran) = &self.cut {
            overran.store(true, Ordering::Relaxed);
        }
    }
}

impl WasiView for InvocationState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for InvocationState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WasmResult<bool> {
        let limit = self.limits.memory_bytes;
        if desired > limit {
            return Err(self.violate(Violation::MemoryLimit { desired, limit }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WasmResult<bool> {
        // Refusing the growth makes `table.grow` return -1, which a guest
        // can handle; compiled code rarely grows tables at all.
        Ok(desired <= self.limits.table_elements as usize)
    }
}

impl types::Host for InvocationState {}

/// Why `name` cannot name a state entry, if it cannot: it is too long, or it
/// holds U+0000, which a Postgres `TEXT` column refuses.
fn entry_name_problem(name: &str) -> Option<String> {
    if name.len() > MAX_ENTRY_NAME_BYTES {
        return Some(format!(
            "state entry names are at most {MAX_ENTRY_NAME_BYTES} bytes; this one has {}",
            name.len()
        ));
    }
    name.find('\0').map(|at| {
        format!(
            "state entry name {name:?} holds U+0000 (NUL) at byte {at}, which state cannot store"
        )
    })
}

/// `text` quoted with its control characters escaped, cut to a readable
/// length: guest-supplied text in a failure message.
fn quoted(text: &str) -> String {
    let shown: String = text.chars().take(256).collect();
    format!("{shown:?}")
}

/// Whether a guest header is one JetStream acts on when it stores the
/// message (`Nats-Expected-*`, `Nats-Rollup`, `Nats-TTL`, `Nats-Msg-Id`,
/// ...), in any letter case.
fn is_jetstream_header(name: &str) -> bool {
    name.as_bytes()
        .get(..5)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"Nats-"))
}

/// `headers` without the ones JetStream acts on. They are dropped rather
/// than refused because a function may copy its input's headers onto its
/// outputs (the `passthrough` example does), and an input may carry such a
/// header for its own publish, which must not steer the output's: an
/// expected sequence or stream would fail it, a rollup would purge the
/// output subject. Weir sets each output's `Nats-Msg-Id` itself.
fn without_jetstream_headers(mut headers: Vec<(String, String)>) -> Vec<(String, String)> {
    headers.retain(|(name, _)| !is_jetstream_header(name));
    headers
}

/// The state capability. Entry names that can never be stored (see
/// [`entry_name_problem`]) behave as names of entries that do not exist:
/// `set` is a state-limit violation, `get` finds nothing and `delete`
/// deletes nothing, so no such name ever reaches Postgres.
impl state::Host for InvocationState {
    fn get(&mut self, name: String) -> Option<Vec<u8>> {
        if self.name_problem(&name).is_some() {
            return None;
        }
        self.view.get(&name).map(|value| value.to_vec())
    }

    fn set(&mut self, name: String, value: Vec<u8>) -> WasmResult<()> {
        if let Some(problem) = self.name_problem(&name) {
            return Err(self.violate(Violation::StateLimit(problem)));
        }
        let limit = self.limits.state_value_bytes;
        if value.len() > limit {
            return Err(self.violate(Violation::StateLimit(format!(
                "state value `{}` is {} bytes; the limit is {limit}",
                crate::output::header_text(&name),
                value.len()
            ))));
        }
        let max_entries = self.limits.state_entries_per_key as usize;
        if self.view.get(&name).is_none() && self.view.entry_count() >= max_entries {
            return Err(self.violate(Violation::StateLimit(format!(
                "key `{}` already holds {max_entries} state entries, the limit",
                crate::output::header_text(self.view.current_key())
            ))));
        }
        self.view.set(name, Bytes::from(value));
        Ok(())
    }

    fn delete(&mut self, name: String) {
        if self.name_problem(&name).is_none() {
            self.view.delete(name);
        }
    }
}

impl InvocationState {
    /// Denies a publish to an invalid subject or one the function did not
    /// declare among its outputs.
    fn check_destination(&mut self, subject: &str) -> WasmResult<()> {
        if !is_publishable_subject(subject) || subject.len() > MAX_SUBJECT_BYTES {
            return Err(self.deny(format!(
                "{} is not a valid subject to publish to (tokens of printable characters without whitespace or wildcards, at most {MAX_SUBJECT_BYTES} bytes)",
                quoted(subject)
            )));
        }
        if !self
            .allowed_outputs
            .iter()
            .any(|pattern| subject_matches(pattern, subject))
        {
            return Err(self.deny(format!(
                "function `{}` may not publish to `{subject}`: it is not among its declared outputs",
                self.function
            )));
        }
        Ok(())
    }
}

impl emit::Host for InvocationState {
    fn publish(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> WasmResult<()> {
        self.check_destination(&subject)?;
        let headers = without_jetstream_headers(headers);
        if let Some((name, _)) = headers.iter().find(|(n, v)| !is_valid_header(n, v)) {
            return Err(self.deny(format!(
                "header {} is not a valid NATS header (names: printable ASCII without `:`; values: no line breaks or U+0000)",
                quoted(name)
            )));
        }
        let count_limit = self.limits.output_count as usize;
        if self.outputs.len() >= count_limit {
            return Err(self.violate(Violation::OutputLimit(format!(
                "the invocation published more than {count_limit} records"
            ))));
        }
        let size = payload.len()
            + headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>();
        // NATS refuses bigger messages outright; one that got committed
        // could never be published.
        if size + subject.len() > self.max_record_bytes {
            return Err(self.violate(Violation::OutputLimit(format!(
                "a record of {} bytes is larger than NATS accepts ({} bytes with Weir's headers)",
                size + subject.len(),
                self.max_record_bytes
            ))));
        }
        let bytes_limit = self.limits.output_bytes;
        if self.output_bytes + size > bytes_limit {
            return Err(self.violate(Violation::OutputLimit(format!(
                "the invocation published more than {bytes_limit} bytes"
            ))));
        }
        self.output_bytes += size;
        self.outputs.push(PendingOutput {
            subject,
            payload: Bytes::from(payload),
            headers,
        });
        Ok(())
    }
}

impl log::Host for InvocationState {
    fn log(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        self.diagnostics.push_log(level, LogSource::Log, &message);
    }
}

impl trace::Host for InvocationState {
    fn enter_span(&mut self, name: String) -> u32 {
        self.diagnostics.enter_span(&name)
    }

    fn set_attribute(&mut self, span: u32, key: String, value: String) {
        self.diagnostics.set_attribute(span, &key, &value);
    }

    fn exit_span(&mut self, span: u32) {
        self.diagnostics.exit_span(span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation() -> InvocationState {
        let outputs: Arc<[String]> = Arc::from(vec!["out.>".to_string()]);
        let mut data = InvocationState::new(Arc::from("f"), outputs, Limits::default(), 1 << 20);
        data.view.begin_event("k");
        data
    }

    fn denied(data: &InvocationState) -> String {
        match &data.violation {
            Some(Violation::Denied(message)) => message.clone(),
            other => panic!("expected a denial, found {other:?}"),
        }
    }

    #[test]
    fn a_window_functions_guest_cannot_touch_the_hosts_entries() {
        let mut data = invocation();
        data.host_entries = true;
        data.view.set("\u{1}w0".into(), Bytes::from_static(b"acc"));
        let name = "\u{1}w0".to_string();
        assert_eq!(state::Host::get(&mut data, name.clone()), None);
        assert!(state::Host::set(&mut data, name.clone(), b"x".to_vec()).is_err());
        match &data.violation {
            Some(Violation::StateLimit(message)) => {
                assert!(message.contains("U+0001"), "{message}");
            }
            other => panic!("expected a state-limit violation, found {other:?}"),
        }
        state::Host::delete(&mut data, name);
        assert_eq!(data.view.get("\u{1}w0"), Some(Bytes::from_static(b"acc")));
        // Its own entries still count against its limit; the host's do not.
        assert_eq!(data.view.entry_count(), 0);
        // A per-event function keeps every name it may store.
        let mut data = invocation();
        assert!(state::Host::set(&mut data, "\u{1}mine".into(), b"1".to_vec()).is_ok());
    }

    #[test]
    fn entry_names_holding_nul_are_never_stored() {
        let mut data = invocation();
        let name = "a\u{0}b".to_string();
        assert!(state::Host::set(&mut data, name.clone(), b"1".to_vec()).is_err());
        match &data.violation {
            Some(Violation::StateLimit(message)) => {
                assert!(message.contains("U+0000"), "{message}");
            }
            other => panic!("expected a state-limit violation, found {other:?}"),
        }
        assert_eq!(state::Host::get(&mut data, name.clone()), None);
        state::Host::delete(&mut data, name);
        assert!(
            !data.view.finish_event(true),
            "the ignored delete is no change"
        );
    }

    #[test]
    fn ordinary_entry_names_are_stored() {
        let mut data = invocation();
        state::Host::set(&mut data, "n\tm".into(), b"1".to_vec()).expect("set");
        assert_eq!(
            state::Host::get(&mut data, "n\tm".into()),
            Some(b"1".to_vec())
        );
        state::Host::delete(&mut data, "n\tm".into());
        assert_eq!(state::Host::get(&mut data, "n\tm".into()), None);
        assert_eq!(data.violation, None);
    }

    #[test]
    fn subjects_with_nul_whitespace_or_control_characters_are_denied() {
        for subject in ["out.a\u{0}b", "out.a b", "out.a\tb", "out.a\u{1b}"] {
            let mut data = invocation();
            let published = emit::Host::publish(&mut data, subject.into(), vec![], vec![]);
            assert!(published.is_err(), "{subject:?}");
            assert!(denied(&data).contains("not a valid subject"), "{subject:?}");
            assert!(data.outputs.is_empty());
        }
    }

    #[test]
    fn headers_with_nul_or_line_breaks_are_denied() {
        let headers = [
            ("h", "a\u{0}b"),
            ("h", "a\rb"),
            ("h", "a\nb"),
            ("a\u{0}b", "v"),
            ("", "v"),
        ];
        for (name, value) in headers {
            let mut data = invocation();
            let headers = vec![(name.to_string(), value.to_string())];
            let published = emit::Host::publish(&mut data, "out.x".into(), vec![], headers);
            assert!(published.is_err(), "{name:?}: {value:?}");
            assert!(denied(&data).contains("not a valid NATS header"));
            assert!(data.outputs.is_empty());
        }
    }

    #[test]
    fn jetstream_headers_are_dropped_from_outputs() {
        let mut data = invocation();
        let headers = [
            ("Nats-Expected-Last-Subject-Sequence", "1"),
            ("nats-expected-stream", "IN"),
            ("NATS-ROLLUP", "all"),
            ("Nats-TTL", "1s"),
            ("Nats-Msg-Id", "producer-id"),
            ("Nats-Bad", "a\r\nb"),
            ("Natsy", "kept"),
            ("traceparent", "kept"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()));
        emit::Host::publish(&mut data, "out.x".into(), b"p".to_vec(), headers.to_vec())
            .expect("published without them");
        let kept: Vec<&str> = data.outputs[0]
            .headers
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(kept, ["Natsy", "traceparent"]);
        assert_eq!(data.violation, None);
    }

    #[test]
    fn jetstream_header_names_are_matched_by_prefix_in_any_case() {
        assert!(is_jetstream_header("Nats-Rollup"));
        assert!(is_jetstream_header("nAtS-anything"));
        assert!(!is_jetstream_header("Nats"));
        assert!(!is_jetstream_header("X-Nats-Rollup"));
        assert!(!is_jetstream_header("Naé"));
    }
}
