//! Run handlers natively, in-process, with no host (non-wasm targets only).
//!
//! A [`Harness`] holds keyed state and records what handlers emit, log and trace.
//! While [`Harness::call`] runs a handler, `state`, `emit`, `log` and `trace` act on
//! that harness
//! through a thread-local; like the host, it keeps a call's writes and records only if
//! the handler returns `Ok`.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::log::Level;
use crate::{Error, Event};

mod windows;
pub use weir_window_core::{WindowKind, WindowSettings};
pub use windows::{Buffered, Incremental, Parts, Placed, WindowHarness};

/// An event on `subject` for `key` carrying `payload`, with time 0, sequence 0 and no
/// headers; adjust it with [`Event::with_time`], [`Event::with_header`] and
/// [`Event::with_sequence`].
pub fn event(subject: &str, key: &str, payload: impl Into<Vec<u8>>) -> Event {
    Event {
        subject: subject.to_owned(),
        key: key.to_owned(),
        payload: payload.into(),
        ..Event::default()
    }
}

/// One record a handler published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    pub subject: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Emitted {
    /// The payload decoded from JSON. Panics if it does not decode.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "record emitted to {:?} is not valid JSON for {}: {e}",
                self.subject,
                std::any::type_name::<T>()
            )
        })
    }
}

/// A span a handler opened, as the harness recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedSpan {
    pub name: String,
    /// The position in [`Harness::spans`] of the span it was opened inside.
    pub parent: Option<usize>,
    pub attributes: Vec<(String, String)>,
    /// Whether the handler closed it before returning.
    pub closed: bool,
}

/// A stand-in host: keyed state, plus the records, log lines and spans handlers
/// produced.
#[derive(Debug, Default)]
pub struct Harness {
    /// key -> entry name -> value
    state: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    emitted: Vec<Emitted>,
    logs: Vec<(Level, String)>,
    spans: Vec<RecordedSpan>,
}

impl Harness {
    /// A harness with no state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value` under `name` for `key` before any call.
    pub fn with_state(mut self, key: &str, name: &str, value: &[u8]) -> Self {
        self.state
            .entry(key.to_owned())
            .or_default()
            .insert(name.to_owned(), value.to_vec());
        self
    }

    /// Stores `value` as JSON under `name` for `key` before any call.
    pub fn with_json_state<T: Serialize + ?Sized>(self, key: &str, name: &str, value: &T) -> Self {
        let bytes = serde_json::to_vec(value)
            .unwrap_or_else(|e| panic!("cannot encode state entry {name:?} as JSON: {e}"));
        self.with_state(key, name, &bytes)
    }

    /// Runs `handler` on `event` as the host would: state is scoped to `event.key`, and
    /// the call's state writes and emitted records are kept only if it returns `Ok`.
    /// Log lines are kept either way.
    pub fn call(
        &mut self,
        handler: impl FnOnce(Event) -> Result<(), Error>,
        event: Event,
    ) -> Result<(), Error> {
        let key = event.key.clone();
        self.call_as(&key, || handler(event))
    }

    /// Runs `call` as one host call scoped to `key`: its state writes and emitted
    /// records are kept only if it returns `Ok`; log lines and spans either way.
    pub fn call_as<T>(
        &mut self,
        key: &str,
        call: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let context = Call {
            state: self.state.get(key).cloned().unwrap_or_default(),
            emitted: Vec::new(),
            logs: Vec::new(),
            spans: Vec::new(),
            open: Vec::new(),
        };
        if CURRENT.with_borrow(Option::is_some) {
            panic!("Harness::call cannot be nested inside another handler call");
        }
        CURRENT.set(Some(context));
        let _clear = ClearOnDrop; // also clears the context if the handler panics
        let result = call();
        let call = CURRENT
            .take()
            .expect("the call context is set for the whole handler call");

        self.logs.extend(call.logs);
        let offset = self.spans.len();
        self.spans
            .extend(call.spans.into_iter().map(|span| RecordedSpan {
                parent: span.parent.map(|p| p + offset),
                ..span
            }));
        if result.is_ok() {
            if call.state.is_empty() {
                self.state.remove(key);
            } else {
                self.state.insert(key.to_owned(), call.state);
            }
            self.emitted.extend(call.emitted);
        }
        result
    }

    /// The value stored under `name` for `key`, if any.
    pub fn state(&self, key: &str, name: &str) -> Option<Vec<u8>> {
        self.state.get(key)?.get(name).cloned()
    }

    /// The value stored under `name` for `key`, decoded from JSON. Panics if it does
    /// not decode.
    pub fn json_state<T: DeserializeOwned>(&self, key: &str, name: &str) -> Option<T> {
        let bytes = self.state(key, name)?;
        Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "state entry {name:?} of key {key:?} is not valid JSON for {}: {e}",
                std::any::type_name::<T>()
            )
        }))
    }

    /// Every record emitted by successful calls so far, in order.
    pub fn emitted(&self) -> &[Emitted] {
        &self.emitted
    }

    /// Takes the records emitted so far, leaving none.
    pub fn take_emitted(&mut self) -> Vec<Emitted> {
        std::mem::take(&mut self.emitted)
    }

    /// Every log line written so far, including by failed calls.
    pub fn logs(&self) -> &[(Level, String)] {
        &self.logs
    }

    /// Every span opened so far, including by failed calls, in the order opened.
    pub fn spans(&self) -> &[RecordedSpan] {
        &self.spans
    }
}

/// What one handler call has done so far.
struct Call {
    /// The current key's entries as the handler sees them, writes included.
    state: BTreeMap<String, Vec<u8>>,
    emitted: Vec<Emitted>,
    logs: Vec<(Level, String)>,
    spans: Vec<RecordedSpan>,
    /// Positions in `spans` of the spans still open, innermost last.
    open: Vec<usize>,
}

thread_local! {
    static CURRENT: RefCell<Option<Call>> = const { RefCell::new(None) };
}

struct ClearOnDrop;

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        CURRENT.set(None);
    }
}

fn with_call<R>(what: &str, f: impl FnOnce(&mut Call) -> R) -> R {
    CURRENT.with_borrow_mut(|current| match current {
        Some(call) => f(call),
        None => panic!(
            "weir_sdk::{what} was called outside a handler call: in a native build, \
             use weir_sdk::testing::Harness and run the handler with Harness::call"
        ),
    })
}

/// The native stand-ins for the host imports, mirroring the wit-bindgen functions.
pub(crate) mod imports {
    use super::{Emitted, Level, with_call};

    pub(crate) mod state {
        use super::with_call;

        pub(crate) fn get(name: &str) -> Option<Vec<u8>> {
            with_call("state::get", |call| call.state.get(name).cloned())
        }

        pub(crate) fn set(name: &str, value: &[u8]) {
            with_call("state::set", |call| {
                call.state.insert(name.to_owned(), value.to_vec())
            });
        }

        pub(crate) fn delete(name: &str) {
            with_call("state::delete", |call| call.state.remove(name));
        }
    }

    pub(crate) mod emit {
        use super::{Emitted, with_call};

        pub(crate) fn publish(subject: &str, payload: &[u8], headers: &[(String, String)]) {
            let record = Emitted {
                subject: subject.to_owned(),
                payload: payload.to_vec(),
                headers: headers.to_vec(),
            };
            with_call("emit::publish", |call| call.emitted.push(record));
        }
    }

    /// Spans get handles `position + 1`, so 0 stays the inert handle as on the host.
    pub(crate) mod trace {
        use super::super::RecordedSpan;
        use super::with_call;

        pub(crate) fn enter_span(name: &str) -> u32 {
            with_call("trace::span", |call| {
                let position = call.spans.len();
                call.spans.push(RecordedSpan {
                    name: name.to_owned(),
                    parent: call.open.last().copied(),
                    attributes: Vec::new(),
                    closed: false,
                });
                call.open.push(position);
                u32::try_from(position + 1).unwrap_or(0)
            })
        }

        pub(crate) fn set_attribute(handle: u32, key: &str, value: &str) {
            with_call("trace::Span::set_attribute", |call| {
                let position = (handle as usize).wrapping_sub(1);
                if call.open.contains(&position) {
                    call.spans[position]
                        .attributes
                        .push((key.to_owned(), value.to_owned()));
                }
            });
        }

        pub(crate) fn exit_span(handle: u32) {
            // A span dropped after its handler call ended has nothing to close.
            let _ = super::super::CURRENT.with_borrow_mut(|current| {
                let call = current.as_mut()?;
                let position = (handle as usize).checked_sub(1)?;
                let depth = call.open.iter().position(|p| *p == position)?;
                for closed in call.open.drain(depth..) {
                    call.spans[closed].closed = true;
                }
                Some(())
            });
        }
    }

    /// Records the line in the current call, or prints it to stderr outside one.
    pub(crate) fn log(level: Level, message: &str) {
        let recorded = super::CURRENT.with_borrow_mut(|current| match current {
            Some(call) => {
                call.logs.push((level, message.to_owned()));
                true
            }
            None => false,
        });
        if !recorded {
            eprintln!("[{level:?}] {message}");
        }
    }
}
