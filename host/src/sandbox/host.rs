//! What a guest can reach: the store data of an instance ([`InvocationState`])
//! and its implementation of the `state`, `emit`, `log` and `trace` imports.
//!
//! State reads and writes go to the batch's [`BatchView`], scoped to the key
//! of the event being handled. Publishes are checked against the function's
//! declared output subjects and collected; the dispatcher publishes them
//! after the batch commits. Log lines, stdout/stderr and guest spans are
//! collected in [`Diagnostics`] and handed to the dispatcher per invocation.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime::{ResourceLimiter, Result as WasmResult};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};

use super::bindings::weir::function::{emit, log, state, trace, types};
use super::diagnostics::{Diagnostics, LogLevel, LogSource};
use crate::output::{is_publishable_subject, is_valid_header, subject_matches};
use crate::state::BatchView;

/// Largest value a guest may store under one state entry name.
pub const MAX_STATE_VALUE_BYTES: usize = 1 << 20;

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
}

/// The data of one instance's store.
pub struct InvocationState {
    wasi: WasiCtx,
    table: ResourceTable,
    function: Arc<str>,
    allowed_outputs: Arc<[String]>,
    memory_limit: usize,
    /// The state of the batch being run; swapped in and out per batch.
    pub(crate) view: BatchView,
    /// The outputs of the event being handled.
    pub(crate) outputs: Vec<PendingOutput>,
    pub(crate) violation: Option<Violation>,
    pub(crate) diagnostics: Diagnostics,
}

impl InvocationState {
    pub(crate) fn new(
        function: Arc<str>,
        allowed_outputs: Arc<[String]>,
        memory_limit: usize,
    ) -> Self {
        let diagnostics = Diagnostics::default();
        // The default context grants nothing: no preopened directories, no
        // environment, no arguments, every socket address denied and name
        // lookup off. Only stdout and stderr are captured, as log lines.
        let wasi = WasiCtx::builder()
            .stdout(diagnostics.stdout.clone())
            .stderr(diagnostics.stderr.clone())
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            function,
            allowed_outputs,
            memory_limit,
            view: BatchView::default(),
            outputs: Vec::new(),
            violation: None,
            diagnostics,
        }
    }

    fn deny(&mut self, message: String) -> wasmtime::Error {
        let error = wasmtime::format_err!("{message}");
        self.violation = Some(Violation::Denied(message));
        error
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
        if desired > self.memory_limit {
            self.violation = Some(Violation::MemoryLimit {
                desired,
                limit: self.memory_limit,
            });
            wasmtime::bail!(
                "memory limit: wanted {desired} bytes, the limit is {}",
                self.memory_limit
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WasmResult<bool> {
        // Tables hold function references; 100k entries is far past what
        // compiled code needs and keeps a table bomb small.
        Ok(desired <= 100_000)
    }
}

impl types::Host for InvocationState {}

impl state::Host for InvocationState {
    fn get(&mut self, name: String) -> Option<Vec<u8>> {
        self.view.get(&name).map(|value| value.to_vec())
    }

    fn set(&mut self, name: String, value: Vec<u8>) -> WasmResult<()> {
        if value.len() > MAX_STATE_VALUE_BYTES {
            return Err(self.deny(format!(
                "state value `{name}` is {} bytes; the limit is {MAX_STATE_VALUE_BYTES}",
                value.len()
            )));
        }
        self.view.set(name, Bytes::from(value));
        Ok(())
    }

    fn delete(&mut self, name: String) {
        self.view.delete(name);
    }
}

impl emit::Host for InvocationState {
    fn publish(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> WasmResult<()> {
        if !is_publishable_subject(&subject) {
            return Err(self.deny(format!("`{subject}` is not a valid subject to publish to")));
        }
        if !self
            .allowed_outputs
            .iter()
            .any(|pattern| subject_matches(pattern, &subject))
        {
            return Err(self.deny(format!(
                "function `{}` may not publish to `{subject}`: it is not among its declared outputs",
                self.function
            )));
        }
        if let Some((name, _)) = headers.iter().find(|(n, v)| !is_valid_header(n, v)) {
            return Err(self.deny(format!(
                "header `{}` is not a valid NATS header (names: printable ASCII without `:`; values: no line breaks)",
                crate::output::header_text(name)
            )));
        }
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
