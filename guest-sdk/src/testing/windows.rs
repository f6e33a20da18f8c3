//! Window functions run natively: the host's own window rules
//! (`weir-window-core`) decide where each event goes and when a window
//! fires, the window parts are kept in memory as the host keeps them in
//! state (incremental accumulators as JSON, buffered events), and every
//! call runs through [`Harness::call_as`], so a failed `fold` leaves no
//! trace and a firing's records are kept only if it succeeds.
//!
//! Unlike the host it keeps no holds for retried events (a failed `fold`
//! is returned to the test), does not bound buffered parts, and puts no
//! `Weir-Window-*` headers on what firings publish.
//!
//! The test controls time: events carry their event times, the
//! watermark moves with them (less the out-of-orderness bound) or is set
//! with [`WindowHarness::advance_watermark_to`], and processing time (for
//! idleness) with [`WindowHarness::idle_until`].

use std::collections::BTreeMap;
use std::marker::PhantomData;

use weir_window_core::{Advance, Placement, WindowCore, WindowSettings};

use super::{Emitted, Harness};
use crate::window::{BufferedWindow, Firing, IncrementalWindow, decode, encode};
use crate::{Error, Event};

/// Where [`WindowHarness::event`] put an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Folded (or buffered) into its window.
    InWindow,
    /// Past the allowed lateness of every window: the host sends it to the
    /// late subject. Kept in [`WindowHarness::late`].
    TooLate { behind_watermark_ms: i64 },
    /// An event time outside the years 1 to 9999: the host dead-letters it.
    OutOfRange,
}

/// How a window's parts are kept and handed over.
pub trait Parts {
    type Part: Clone;
    fn fold(part: Option<Self::Part>, event: &Event) -> Result<Self::Part, Error>;
    fn merge(earlier: Self::Part, later: Self::Part) -> Result<Self::Part, Error>;
    fn fire(firing: &Firing, parts: Vec<Self::Part>) -> Result<(), Error>;
}

/// The parts of an [`IncrementalWindow`]: accumulators, as JSON.
#[derive(Debug)]
pub struct Incremental<W>(PhantomData<W>);

impl<W: IncrementalWindow> Parts for Incremental<W> {
    type Part = Vec<u8>;

    fn fold(part: Option<Vec<u8>>, event: &Event) -> Result<Vec<u8>, Error> {
        let mut accumulator: W::Accumulator = match part {
            Some(bytes) => decode(&bytes)?,
            None => Default::default(),
        };
        W::fold(&mut accumulator, event)?;
        encode(&accumulator)
    }

    fn merge(earlier: Vec<u8>, later: Vec<u8>) -> Result<Vec<u8>, Error> {
        encode(&W::merge(decode(&earlier)?, decode(&later)?))
    }

    fn fire(firing: &Firing, parts: Vec<Vec<u8>>) -> Result<(), Error> {
        let mut merged: Option<Vec<u8>> = None;
        for part in parts {
            merged = Some(match merged {
                None => part,
                Some(earlier) => Self::merge(earlier, part)?,
            });
        }
        let accumulator = match merged {
            Some(bytes) => decode(&bytes)?,
            None => Default::default(),
        };
        W::fire(firing, accumulator)
    }
}

/// The parts of a [`BufferedWindow`]: its events.
#[derive(Debug)]
pub struct Buffered<W>(PhantomData<W>);

impl<W: BufferedWindow> Parts for Buffered<W> {
    type Part = Vec<Event>;

    fn fold(part: Option<Vec<Event>>, event: &Event) -> Result<Vec<Event>, Error> {
        let mut events = part.unwrap_or_default();
        events.push(event.clone());
        Ok(events)
    }

    fn merge(mut earlier: Vec<Event>, later: Vec<Event>) -> Result<Vec<Event>, Error> {
        earlier.extend(later);
        Ok(earlier)
    }

    fn fire(firing: &Firing, parts: Vec<Vec<Event>>) -> Result<(), Error> {
        let mut events: Vec<Event> = parts.into_iter().flatten().collect();
        events.sort_by_key(|e| (e.event_time_ms, e.sequence));
        W::on_window(firing, events)
    }
}

/// A window function under test, with the host's window rules.
#[derive(Debug)]
pub struct WindowHarness<P: Parts> {
    harness: Harness,
    core: WindowCore,
    parts: BTreeMap<(String, i64), P::Part>,
    late: Vec<Event>,
    /// Processing time, for idleness.
    now_ms: i64,
}

impl<W: IncrementalWindow> WindowHarness<Incremental<W>> {
    /// A harness for the incremental window function `W`.
    pub fn incremental(settings: WindowSettings) -> Self {
        Self::new(settings)
    }
}

impl<W: BufferedWindow> WindowHarness<Buffered<W>> {
    /// A harness for the buffered window function `W`.
    pub fn buffered(settings: WindowSettings) -> Self {
        Self::new(settings)
    }
}

impl<P: Parts> WindowHarness<P> {
    fn new(settings: WindowSettings) -> Self {
        if let Some(problem) = settings.problem() {
            panic!("invalid window settings: {problem}");
        }
        Self {
            harness: Harness::new(),
            core: WindowCore::new(settings),
            parts: BTreeMap::new(),
            late: Vec::new(),
            now_ms: 0,
        }
    }

    /// Hands `event` (with its event time) to the function as the host
    /// would: folded into its window, or too late, or out of range. An
    /// error from `fold` leaves the windows as they were.
    pub fn event(&mut self, event: Event) -> Result<Placed, Error> {
        if event.key.starts_with('\u{1}') {
            // The host dead-letters such an event as a bad event.
            return Err(Error::reject(
                "the key starts with U+0001, which a window function's host keeps for itself",
            ));
        }
        let key = event.key.clone();
        let undo = self.core.undo_point(&key);
        let (target, absorbed) = match self.core.place(&key, event.event_time_ms, self.now_ms) {
            Placement::Pane { pane } => (pane, Vec::new()),
            Placement::Session { window, absorbed } => (
                window.start_ms,
                absorbed.iter().map(|w| w.start_ms).collect(),
            ),
            Placement::OutOfRange => {
                self.core.undo(undo);
                return Ok(Placed::OutOfRange);
            }
            Placement::TooLate {
                behind_watermark_ms,
                ..
            } => {
                self.core.undo(undo);
                self.late.push(event);
                return Ok(Placed::TooLate {
                    behind_watermark_ms,
                });
            }
        };
        let parts = &self.parts;
        let emitted_before = self.harness.emitted.len();
        let folded = self.harness.call_as(&key, || {
            let mut part: Option<P::Part> = None;
            for start in &absorbed {
                if let Some(old) = parts.get(&(key.clone(), *start)).cloned() {
                    part = Some(match part {
                        None => old,
                        Some(earlier) => P::merge(earlier, old)?,
                    });
                }
            }
            if absorbed.is_empty() {
                part = parts.get(&(key.clone(), target)).cloned();
            }
            P::fold(part, &event)
        });
        // What `fold` publishes is dropped, as on the host.
        self.harness.emitted.truncate(emitted_before);
        match folded {
            Ok(part) => {
                for start in absorbed {
                    self.parts.remove(&(key.clone(), start));
                }
                self.parts.insert((key, target), part);
                Ok(Placed::InWindow)
            }
            Err(error) => {
                self.core.undo(undo);
                Err(error)
            }
        }
    }

    /// Fires what the watermark the events moved has made due (what the
    /// host does after each batch). Returns each firing's result in order:
    /// the host dead-letters a failed one.
    pub fn fire_due(&mut self) -> Vec<Result<(), Error>> {
        let advance = self.core.advance_watermark_to(i64::MIN);
        self.take(advance)
    }

    /// Sets the watermark (never back) and fires what is due.
    pub fn advance_watermark_to(&mut self, watermark_ms: i64) -> Vec<Result<(), Error>> {
        let advance = self.core.advance_watermark_to(watermark_ms);
        self.take(advance)
    }

    /// Sets processing time to `now_ms` with no event since the last one:
    /// past the idle timeout, the watermark moves on and windows fire.
    pub fn idle_until(&mut self, now_ms: i64) -> Vec<Result<(), Error>> {
        self.now_ms = self.now_ms.max(now_ms);
        let advance = self.core.advance(self.now_ms);
        self.take(advance)
    }

    /// Sets processing time for the events that follow.
    pub fn set_processing_time(&mut self, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    fn take(&mut self, advance: Advance) -> Vec<Result<(), Error>> {
        let mut results = Vec::with_capacity(advance.firings.len());
        for due in advance.firings {
            let parts: Vec<P::Part> = due
                .parts
                .iter()
                .filter_map(|start| self.parts.get(&(due.key.clone(), *start)).cloned())
                .collect();
            let firing = Firing {
                key: due.key.clone(),
                start_ms: due.window.start_ms,
                end_ms: due.window.end_ms,
                number: due.firing,
            };
            results.push(self.harness.call_as(&due.key, || P::fire(&firing, parts)));
        }
        for part in advance.expired {
            self.parts.remove(&part);
        }
        results
    }

    /// The watermark now.
    pub fn watermark_ms(&self) -> i64 {
        self.core.watermark_ms()
    }

    /// The events that came too late, in arrival order.
    pub fn late(&self) -> &[Event] {
        &self.late
    }

    /// Every record the firings published, in order (`fold` cannot
    /// publish: what it publishes is dropped, as on the host).
    pub fn emitted(&self) -> &[Emitted] {
        self.harness.emitted()
    }

    /// Takes the records published so far, leaving none.
    pub fn take_emitted(&mut self) -> Vec<Emitted> {
        self.harness.take_emitted()
    }

    /// The underlying harness: the key state, logs and spans of the calls.
    pub fn harness(&self) -> &Harness {
        &self.harness
    }
}
