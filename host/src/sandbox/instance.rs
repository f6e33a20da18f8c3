//! A warm instance of one function: a store and its instantiated component,
//! reused across events and batches, replaced after a trap.

use std::sync::Arc;

use std::time::{Duration, Instant, SystemTime};

use wasmtime::{Store, Trap};

use bytes::Bytes;

use super::bindings::buffered::BufferedWindowHandler;
use super::bindings::incremental::IncrementalWindowHandler;
use super::bindings::weir::function::types::Error as GuestError;
use super::diagnostics::InvocationDiagnostics;
use super::host::{PendingOutput, Violation};
use super::{
    EPOCH_TICK, Event, EventHandler, FunctionCode, GuestFiring, HandlerPre, InvocationState,
    SandboxError,
};
use crate::outcome::{Failure, FailureKind};
use crate::state::BatchView;
use crate::windows::merges::PaneMerges;

/// What an applied event produced.
#[derive(Debug)]
pub struct Handled {
    pub outputs: Vec<PendingOutput>,
    /// Whether it changed state.
    pub wrote: bool,
}

/// One invocation: its result, when it ran, and what it left behind.
#[derive(Debug)]
pub struct Invocation {
    pub result: Result<Handled, Failure>,
    pub started: SystemTime,
    pub took: Duration,
    pub diagnostics: InvocationDiagnostics,
}

/// An instantiated component, by the world it implements.
enum Handler {
    Event(EventHandler),
    Incremental(IncrementalWindowHandler),
    Buffered(BufferedWindowHandler),
}

/// Where a window event goes in an incremental function's state: the
/// accumulators of `absorbed` (state entries, in event-time order) are
/// merged and removed, the event is folded into the result, and that is
/// stored under `part`.
#[derive(Debug, Clone, Copy)]
pub struct WindowFold<'a> {
    pub part: &'a str,
    pub absorbed: &'a [String],
}

/// A guest call's result before it is classified.
type Called<T> = wasmtime::Result<Result<T, GuestError>>;

/// A live instance with its own store.
pub struct FunctionInstance {
    store: Store<InvocationState>,
    handler: Handler,
    deadline: Duration,
    deadline_ticks: u64,
    /// Set after a trap: the guest's memory may be inconsistent, so the
    /// instance must not run again.
    poisoned: bool,
}

impl std::fmt::Debug for FunctionInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionInstance")
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Limits and capabilities of one function's instances.
#[derive(Debug, Clone)]
pub struct InstanceSettings {
    pub function: Arc<str>,
    pub allowed_outputs: Arc<[String]>,
    pub deadline: Duration,
    pub limits: crate::config::Limits,
    /// Largest record NATS accepts, less room for the headers Weir adds.
    pub max_record_bytes: usize,
    /// The circuit breaker around these instances' calls.
    pub breaker: crate::breaker::BreakerConfig,
}

impl FunctionInstance {
    /// Instantiates `code`; the start function runs under the same deadline
    /// as an invocation.
    pub fn new(code: &FunctionCode, settings: &InstanceSettings) -> Result<Self, SandboxError> {
        let mut state = InvocationState::new(
            settings.function.clone(),
            settings.allowed_outputs.clone(),
            settings.limits.clone(),
            settings.max_record_bytes,
        );
        // The start function runs under the invocation deadline, sleeps
        // included.
        state.deadline_at = Instant::now() + settings.deadline;
        state.host_entries = code.world().is_windowed();
        let mut store = Store::new(&code.engine, state);
        store.limiter(|state| state);
        store.epoch_deadline_trap();
        let deadline_ticks = (settings.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(deadline_ticks);
        let handler = match &code.pre {
            HandlerPre::Event(pre) => pre.instantiate(&mut store).map(Handler::Event),
            HandlerPre::Incremental(pre) => pre.instantiate(&mut store).map(Handler::Incremental),
            HandlerPre::Buffered(pre) => pre.instantiate(&mut store).map(Handler::Buffered),
        };
        let handler = handler.map_err(|e| {
            // No pool slot is the host's shortage, not the guest's fault.
            if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                .is_some()
            {
                SandboxError::NoSlot(format!("{e:#}"))
            } else {
                SandboxError::Instantiate {
                    digest: code.digest.clone(),
                    reason: format!("{e:#}"),
                }
            }
        })?;
        Ok(Self {
            store,
            handler,
            deadline: settings.deadline,
            deadline_ticks,
            poisoned: false,
        })
    }

    /// Whether a trap made this instance unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Gives the instance the state of the batch it is about to run.
    pub fn begin_batch(&mut self, view: BatchView) {
        self.store.data_mut().view = view;
    }

    /// Takes the batch's state back after the last event.
    pub fn end_batch(&mut self) -> BatchView {
        std::mem::take(&mut self.store.data_mut().view)
    }

    /// Runs the handler on `event`. On success the event's state writes join
    /// the batch view; on failure its writes and outputs are discarded. Guest
    /// spans are recorded only if `traced`.
    pub fn handle(&mut self, event: &Event, traced: bool) -> Invocation {
        self.invoke(&event.key, traced, |store, handler| match handler {
            Handler::Event(handler) => handler.call_handle(store, event),
            _ => Err(wasmtime::format_err!(
                "the component has no `handle` export"
            )),
        })
    }

    /// Folds `event` into its window part as `into` says (an incremental
    /// window function): merges the absorbed parts, folds, stores the
    /// accumulator. All or nothing, like [`Self::handle`]. What it
    /// publishes is dropped, as the WIT says: a window publishes when it
    /// fires.
    pub fn fold(&mut self, event: &Event, into: WindowFold<'_>, traced: bool) -> Invocation {
        let mut invocation = self.fold_call(event, into, traced);
        if let Ok(handled) = &mut invocation.result {
            handled.outputs.clear();
        }
        invocation
    }

    fn fold_call(&mut self, event: &Event, into: WindowFold<'_>, traced: bool) -> Invocation {
        self.invoke(&event.key, traced, |store, handler| {
            let Handler::Incremental(handler) = handler else {
                return Err(wasmtime::format_err!("the component has no `fold` export"));
            };
            let mut accumulator: Option<Vec<u8>> = None;
            for part in into.absorbed {
                let Some(content) = take_entry(store, part) else {
                    continue;
                };
                accumulator = match accumulator {
                    None => Some(content),
                    Some(earlier) => match handler.call_merge(&mut *store, &earlier, &content)? {
                        Ok(merged) => Some(merged),
                        Err(error) => return Ok(Err(error)),
                    },
                };
            }
            if into.absorbed.is_empty() {
                accumulator = store.data().view.get(into.part).map(|b| b.to_vec());
            }
            match handler.call_fold(&mut *store, accumulator.as_deref(), event)? {
                Ok(folded) => {
                    store
                        .data_mut()
                        .view
                        .set(into.part.to_string(), Bytes::from(folded));
                    Ok(Ok(()))
                }
                Err(error) => Ok(Err(error)),
            }
        })
    }

    /// Hands a window that fired to an incremental function: the
    /// accumulators of its parts — (part start, state entry of its key),
    /// in event-time order — merged into one, then `fire`. With `merges`
    /// (sliding windows), through what earlier firings merged of the
    /// key's panes; else one after the other. Its state writes and
    /// outputs count only if it succeeds.
    pub fn fire(
        &mut self,
        firing: &GuestFiring,
        parts: &[(i64, String)],
        merges: Option<&mut PaneMerges<Bytes>>,
        traced: bool,
    ) -> Invocation {
        self.invoke(&firing.key, traced, |store, handler| {
            let Handler::Incremental(handler) = handler else {
                return Err(wasmtime::format_err!("the component has no `fire` export"));
            };
            let contents: Vec<(i64, Bytes)> = parts
                .iter()
                .filter_map(|(start, entry)| Some((*start, store.data().view.get(entry)?)))
                .collect();
            let mut merge = |earlier: &Bytes, later: &Bytes| match handler.call_merge(
                &mut *store,
                earlier,
                later,
            ) {
                Ok(Ok(merged)) => Ok(Bytes::from(merged)),
                Ok(Err(error)) => Err(Ok(error)),
                Err(trap) => Err(Err(trap)),
            };
            let merged = match merges {
                Some(merges) => {
                    merges.window(&firing.key, firing.window.start_ms, &contents, merge)
                }
                None => contents
                    .iter()
                    .try_fold(None, |merged: Option<Bytes>, (_, later)| {
                        Ok(Some(match merged {
                            None => later.clone(),
                            Some(earlier) => merge(&earlier, later)?,
                        }))
                    }),
            };
            match merged {
                Ok(accumulator) => {
                    handler.call_fire(&mut *store, firing, &accumulator.unwrap_or_default())
                }
                Err(Ok(error)) => Ok(Err(error)),
                Err(Err(trap)) => Err(trap),
            }
        })
    }

    /// Hands a window that fired to a buffered function, with its events.
    pub fn on_window(
        &mut self,
        firing: &GuestFiring,
        events: &[Event],
        traced: bool,
    ) -> Invocation {
        self.invoke(&firing.key, traced, |store, handler| match handler {
            Handler::Buffered(handler) => handler.call_on_window(store, firing, events),
            _ => Err(wasmtime::format_err!(
                "the component has no `on-window` export"
            )),
        })
    }

    /// One invocation scoped to `key`: the guest calls in `call` run under
    /// one deadline; their state writes join the batch view and their
    /// outputs are kept only if it succeeds.
    fn invoke(
        &mut self,
        key: &str,
        traced: bool,
        call: impl FnOnce(&mut Store<InvocationState>, &Handler) -> Called<()>,
    ) -> Invocation {
        debug_assert!(!self.poisoned, "a poisoned instance was reused");
        {
            let deadline = self.deadline;
            let data = self.store.data_mut();
            data.view.begin_event(key);
            data.begin_invocation(deadline, traced);
        }
        self.store.set_epoch_deadline(self.deadline_ticks);
        let started = SystemTime::now();
        let clock = Instant::now();
        let result = call(&mut self.store, &self.handler);
        let took = clock.elapsed();
        let outcome = match result {
            Ok(Ok(())) => Ok(Ok(std::mem::take(&mut self.store.data_mut().outputs))),
            Ok(Err(GuestError::Retry(message))) => {
                Ok(Err(Failure::new(FailureKind::GuestRetry, message)))
            }
            Ok(Err(GuestError::Reject(message))) => {
                Ok(Err(Failure::new(FailureKind::GuestReject, message)))
            }
            Err(error) => {
                self.poisoned = true;
                Err(error)
            }
        };
        let diagnostics = self.store.data_mut().diagnostics.finish();
        let outcome = match outcome {
            // It returned, but only because its wait was cut at the deadline.
            Ok(_) if self.store.data().overran() => Err(Failure::new(
                FailureKind::Timeout,
                format!(
                    "the invocation waited past its deadline of {} ms",
                    self.deadline.as_millis()
                ),
            )),
            Ok(result) => result,
            Err(trap) => Err(self.classify_trap(&trap, &diagnostics)),
        };
        let data = self.store.data_mut();
        let wrote = data.view.finish_event(outcome.is_ok());
        data.outputs.clear();
        Invocation {
            result: outcome.map(|outputs| Handled { outputs, wrote }),
            started,
            took,
            diagnostics,
        }
    }

    fn classify_trap(
        &mut self,
        error: &wasmtime::Error,
        diagnostics: &InvocationDiagnostics,
    ) -> Failure {
        match self.store.data_mut().violation.take() {
            Some(Violation::Denied(message)) => return Failure::new(FailureKind::Denied, message),
            Some(Violation::OutputLimit(message)) => {
                return Failure::new(FailureKind::OutputLimit, message);
            }
            Some(Violation::StateLimit(message)) => {
                return Failure::new(FailureKind::StateLimit, message);
            }
            Some(Violation::MemoryLimit { desired, limit }) => {
                return Failure::new(
                    FailureKind::OutOfMemory,
                    format!("the guest asked for {desired} bytes of memory; the limit is {limit}"),
                );
            }
            None => {}
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Failure::new(
                FailureKind::Timeout,
                format!(
                    "the invocation ran past its deadline of {} ms",
                    self.deadline_ticks * EPOCH_TICK.as_millis() as u64
                ),
            ),
            Some(Trap::StackOverflow) => {
                Failure::new(FailureKind::StackOverflow, "the guest overflowed its stack")
            }
            Some(trap) => Failure::new(FailureKind::Trap, trap_message(trap, diagnostics)),
            None => Failure::new(FailureKind::Trap, format!("{error:#}")),
        }
    }
}

/// Reads and removes state entry `name` of the invocation's key.
fn take_entry(store: &mut Store<InvocationState>, name: &str) -> Option<Vec<u8>> {
    let view = &mut store.data_mut().view;
    let content = view.get(name)?;
    view.delete(name.to_string());
    Some(content.to_vec())
}

/// A trap's reason without the wasm backtrace, led by the guest's panic
/// message when its stderr has one (Rust and other runtimes print it
/// before trapping).
fn trap_message(trap: &Trap, diagnostics: &InvocationDiagnostics) -> String {
    match &diagnostics.panic {
        Some(panic) => format!("{panic} (wasm trap: {trap})"),
        None => format!("wasm trap: {trap}"),
    }
}
