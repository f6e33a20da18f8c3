//! Windowed functions on the batch protocol: each event is placed by the
//! window core ([`crate::windows`]) and folded into its window part (or
//! buffered there); after the batch's events the watermark advances, due
//! windows fire, and what no window reads again is deleted.
//!
//! Everything lives in the function's state and rides on the batch's one
//! commit: the parts as entries of their key (names starting with
//! [`HOST_ENTRY_PREFIX`], which the guest cannot touch), and the core's
//! bookkeeping (watermark, open windows, firing numbers) under
//! [`BOOK_KEY`]. Firing outputs join the batch's outbox under message ids
//! made of (function, window, firing number, position, key), so a firing
//! published again after a crash is the same record
//! ([`super::window_records`]). An event that fails
//! leaves the bookkeeping as it found it ([`crate::windows::Undo`]).

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::batch::{RunResult, WindowWork};
use super::lanes::{Ran, lane_for};
use super::window_parts::{buffer, buffered_events};
use crate::outcome::{Failure, FailureKind};
use crate::sandbox::{
    Event, GuestFiring, Handled, Invocation, InvocationDiagnostics, PendingOutput, WindowFold,
    World,
};
use crate::state::{BatchView, HOST_ENTRY_PREFIX};
use crate::traces::EventTrace;
use crate::windows::merges::PaneMerges;
use crate::windows::{Advance, Firing, Placement, WindowCore, WindowSettings};

/// The key the function's window bookkeeping is stored under. Event keys
/// of a windowed function may not start with U+0001.
pub(super) const BOOK_KEY: &str = "\u{1}windows";
const BOOK_ENTRY: &str = "\u{1}book";
/// Outbox ids of windowed commits start above every stream sequence.
const ALONE_ID_BASE: u64 = 1 << 62;
/// Most bytes the bookkeeping may take; past it the function stops with
/// a message instead of writing what the database would refuse.
const MAX_BOOK_BYTES: usize = 256 << 20;

use super::window_records::window_headers as wh;

/// The state entry holding the contents of the part starting at `start`.
fn part_entry(start: i64) -> String {
    format!("{HOST_ENTRY_PREFIX}w{start}")
}

/// What is committed of a function's windows.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WindowBook {
    core: WindowCore,
    /// Window-work commits so far: the next one's outbox id.
    commits: u64,
    /// How the parts are kept: `incremental` accumulators or `buffered`
    /// events. A version of the other world could not read them. (Empty
    /// in bookkeeping written before it was recorded: taken as this
    /// version's.)
    #[serde(default)]
    parts: String,
    /// Events that will be delivered again (deferred, or to be retried),
    /// by stream sequence: the watermark waits for them.
    #[serde(default)]
    held: BTreeMap<u64, Hold>,
}

/// An event the watermark waits for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Hold {
    /// The watermark stays at or below this: the event's time, or the
    /// watermark when it was handed back if that was higher already.
    at_ms: i64,
    /// Processing time after which it no longer holds (in case it never
    /// comes back to this function).
    until_ms: i64,
}

/// How a world keeps its window parts.
fn parts_format(world: World) -> &'static str {
    match world {
        World::BufferedWindow => "buffered",
        _ => "incremental",
    }
}

/// The window side of one batch: the bookkeeping as committed, changed by
/// the events placed and the windows fired.
pub(super) struct WindowRun {
    settings: WindowSettings,
    world: World,
    /// Processing time of the batch.
    now_ms: i64,
    book: Option<WindowBook>,
    /// Why the bookkeeping cannot be used; every event waits.
    broken: Option<String>,
    /// An event was placed, or a hold set or let go: the bookkeeping
    /// must be written.
    changed: bool,
    /// Each record's event time, by record index.
    times: Vec<Option<i64>>,
    /// How long a hold lasts.
    hold_for_ms: i64,
    /// The windows fired, and how each call went.
    pub fired: Vec<(Firing, Invocation)>,
    /// What earlier firings merged of sliding windows' panes, as of the
    /// committed state (see `FunctionWorker::take_pane_merges`).
    pub merges: Option<PaneMerges<Bytes>>,
    /// The trace of each firing to run, in order (none: tracing is off).
    pub firing_traces: Vec<Option<EventTrace>>,
}

impl WindowRun {
    /// The window side of a batch whose records have event times `times`;
    /// an event handed back holds the watermark for up to `hold_for_ms`.
    pub fn new(
        settings: WindowSettings,
        world: World,
        times: Vec<Option<i64>>,
        hold_for_ms: i64,
        merges: Option<PaneMerges<Bytes>>,
    ) -> Self {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            settings,
            world,
            now_ms,
            book: None,
            broken: None,
            changed: false,
            times,
            hold_for_ms,
            fired: Vec::new(),
            merges,
            firing_traces: Vec::new(),
        }
    }

    /// Reads the committed bookkeeping from `view` (which must hold
    /// [`BOOK_KEY`]), or starts it.
    pub fn open_book(&mut self, view: &mut BatchView) {
        view.begin_event(BOOK_KEY);
        let stored = view.get(BOOK_ENTRY);
        let parts = parts_format(self.world);
        let book = match stored {
            None => Ok(WindowBook {
                core: WindowCore::new(self.settings.clone()),
                commits: 0,
                parts: parts.to_string(),
                held: BTreeMap::new(),
            }),
            Some(bytes) => serde_json::from_slice::<WindowBook>(&bytes)
                .map_err(|e| format!("the stored window bookkeeping is unreadable: {e}"))
                .and_then(|mut book| match book.parts == parts || book.parts.is_empty() {
                    true => {
                        book.parts = parts.to_string();
                        Ok(book)
                    }
                    false => Err(format!(
                        "the open windows hold {} parts and this version is a {parts} window function; a version cannot switch between the incremental and buffered worlds: bind it as a new function",
                        book.parts
                    )),
                })
                .and_then(|mut book| book.core.retune(&self.settings).map(|()| book)),
        };
        view.finish_event(false);
        match book {
            Ok(mut book) => {
                // Lapsed holds go only after this batch's events (one may
                // be the event a hold waits for): see `settle_holds`.
                book.cap();
                self.book = Some(book);
            }
            Err(reason) => self.broken = Some(reason),
        }
    }

    /// Why the function cannot run its windows, if it cannot.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Moves the watermark on to now and takes what is due.
    pub fn advance(&mut self) -> Advance {
        match &mut self.book {
            Some(book) => book.core.advance(self.now_ms),
            None => Advance::default(),
        }
    }
}

impl WindowBook {
    /// Holds the watermark for the event at `sequence` (event time
    /// `time`) until processing time `until_ms`: at its time, or where the
    /// watermark is if that is later already (its fate then stays what it
    /// is now). A hold already set keeps its level and is extended.
    fn hold(&mut self, sequence: u64, time: i64, until_ms: i64) {
        let at_ms = time.max(self.core.watermark_ms());
        let hold = self
            .held
            .entry(sequence)
            .or_insert(Hold { at_ms, until_ms });
        hold.until_ms = until_ms;
    }

    /// Holds the watermark below the events that will come again.
    fn cap(&mut self) {
        let cap = self.held.values().map(|hold| hold.at_ms).min();
        self.core.cap_watermark(cap);
    }
}

impl Ran {
    /// Holds the watermark for the records that became deferrals or
    /// retries since the last call: when they come back they find the
    /// windows as they would have, not too late because others moved on.
    fn hold_handed_back(&mut self) {
        let naks = self.batch.take_new_naks();
        let Some(windows) = self.windows.as_mut() else {
            return;
        };
        let Some(book) = windows.book.as_mut() else {
            return;
        };
        if naks.is_empty() {
            return;
        }
        let until_ms = windows.now_ms.saturating_add(windows.hold_for_ms);
        for index in naks {
            let Some(time) = windows.times.get(index).copied().flatten() else {
                continue;
            };
            book.hold(self.batch.records()[index].sequence, time, until_ms);
            windows.changed = true;
        }
        book.cap();
    }

    /// Settles the holds once the batch's events ran, before the
    /// watermark advances: every event of the batch that will come again
    /// holds it (whatever path handed it back), every decided one lets go,
    /// and holds past their lapse go.
    pub(super) fn settle_holds(&mut self) {
        self.hold_handed_back();
        let Some(windows) = self.windows.as_mut() else {
            return;
        };
        let Some(book) = windows.book.as_mut() else {
            return;
        };
        let until_ms = windows.now_ms.saturating_add(windows.hold_for_ms);
        for (index, record) in self.batch.records().iter().enumerate() {
            let comes_back = matches!(
                self.batch.decision(index),
                crate::ack::AckDecision::Nak { .. }
            );
            let time = windows.times.get(index).copied().flatten();
            match (comes_back, time) {
                (true, Some(time)) => {
                    book.hold(record.sequence, time, until_ms);
                    windows.changed = true;
                }
                (false, _) => {
                    if book.held.remove(&record.sequence).is_some() {
                        windows.changed = true;
                    }
                }
                (true, None) => {}
            }
        }
        let before = book.held.len();
        book.held.retain(|_, hold| hold.until_ms > windows.now_ms);
        windows.changed |= book.held.len() != before;
        book.cap();
    }

    /// Places record `index`'s event in its window and stores it there
    /// (folded by the guest, or buffered). A failed event leaves the
    /// bookkeeping as it was.
    pub(super) fn place_in_window(
        &mut self,
        index: usize,
        lane: usize,
        event: &Event,
        traced: bool,
    ) -> RunResult {
        self.hold_handed_back();
        let Some(windows) = self.windows.as_mut() else {
            return RunResult::HostFailed;
        };
        let (Some(book), world, now_ms) = (&mut windows.book, windows.world, windows.now_ms) else {
            return RunResult::HostFailed;
        };
        if event.key.starts_with(HOST_ENTRY_PREFIX) {
            return RunResult::Invoked(Err(Failure::new(
                FailureKind::BadEvent,
                "the key starts with U+0001, which a window function's host keeps for itself",
            )));
        }
        let undo = book.core.undo_point(&event.key);
        let (part, absorbed) = match book.core.place(&event.key, event.event_time_ms, now_ms) {
            Placement::Pane { pane } => {
                // What was merged from the pane no longer holds.
                if let Some(merges) = windows.merges.as_mut() {
                    merges.changed(&event.key, pane);
                }
                (part_entry(pane), Vec::new())
            }
            Placement::Session { window, absorbed } => (
                part_entry(window.start_ms),
                absorbed.iter().map(|w| part_entry(w.start_ms)).collect(),
            ),
            Placement::OutOfRange => {
                book.core.undo(undo);
                return RunResult::Invoked(Err(Failure::new(
                    FailureKind::BadEvent,
                    format!(
                        "event time {} ms is outside the years 1 to 9999, which windows take",
                        event.event_time_ms
                    ),
                )));
            }
            Placement::TooLate {
                behind_watermark_ms,
                watermark_ms,
            } => {
                book.core.undo(undo);
                let late = self.late(index, event, behind_watermark_ms, watermark_ms);
                return late;
            }
        };
        let result = match world {
            World::BufferedWindow => match buffer(&mut self.view, event, &part, &absorbed) {
                Ok(()) => RunResult::Invoked(Ok((true, 0, 0))),
                Err(failure) => RunResult::Invoked(Err(failure)),
            },
            _ => {
                let into = WindowFold {
                    part: &part,
                    absorbed: &absorbed,
                };
                self.run_guarded(index, lane, |live| live.fold(event, into, traced))
            }
        };
        let Some(windows) = self.windows.as_mut() else {
            return RunResult::HostFailed;
        };
        match (&result, &mut windows.book) {
            (RunResult::Invoked(Ok(_)), _) => windows.changed = true,
            (_, Some(book)) => book.core.undo(undo),
            (_, None) => {}
        }
        result
    }

    /// An event too late for every window: a record on the late subject
    /// (its payload and headers, and how late it was), or without one a
    /// dead letter saying the same.
    fn late(
        &mut self,
        index: usize,
        event: &Event,
        behind_watermark_ms: i64,
        watermark_ms: i64,
    ) -> RunResult {
        let reason = format!(
            "{behind_watermark_ms} ms behind the watermark ({watermark_ms}), past the allowed lateness of every window it falls in"
        );
        let subject = self
            .windows
            .as_ref()
            .and_then(|w| w.settings.late_subject.clone());
        let Some(subject) = subject else {
            return RunResult::Invoked(Err(Failure::new(FailureKind::TooLate, reason)));
        };
        let mut headers = event.headers.clone();
        headers.extend([
            (wh::LATE_BEHIND.to_string(), behind_watermark_ms.to_string()),
            (wh::LATE_WATERMARK.to_string(), watermark_ms.to_string()),
            (wh::LATE_REASON.to_string(), reason),
        ]);
        let output = PendingOutput {
            subject,
            payload: Bytes::from(event.payload.clone()),
            headers,
        };
        let bytes = output.payload.len() + output.subject.len();
        self.invocations[index] = Some(Invocation {
            result: Ok(Handled {
                outputs: vec![output],
                wrote: false,
            }),
            started: SystemTime::now(),
            took: std::time::Duration::ZERO,
            diagnostics: InvocationDiagnostics::default(),
        });
        RunResult::Invoked(Ok((false, 1, bytes)))
    }

    /// Hands each firing to the guest, in order, on its key's lane.
    /// `false` when the host could not provide an instance: nothing of the
    /// batch may be committed then.
    pub(super) fn fire(&mut self, firings: Vec<Firing>, canary_weight: u8) -> bool {
        let Some(world) = self.windows.as_ref().map(|w| w.world) else {
            return true;
        };
        let mut merges = self.windows.as_mut().and_then(|w| w.merges.take());
        let traced: Vec<bool> = self.windows.as_ref().map_or(Vec::new(), |w| {
            w.firing_traces
                .iter()
                .map(|t| t.as_ref().is_some_and(EventTrace::is_sampled))
                .collect()
        });
        for (index, firing) in firings.into_iter().enumerate() {
            let traced = traced.get(index).copied().unwrap_or(false);
            let lane = lane_for(&firing.key, canary_weight);
            let guest = GuestFiring {
                key: firing.key.clone(),
                window: crate::sandbox::Window {
                    start_ms: firing.window.start_ms,
                    end_ms: firing.window.end_ms,
                },
                number: firing.firing,
            };
            let parts: Vec<(i64, String)> =
                firing.parts.iter().map(|p| (*p, part_entry(*p))).collect();
            let invocation = match world {
                World::BufferedWindow => match buffered_events(
                    &mut self.view,
                    &firing.key,
                    &parts
                        .iter()
                        .map(|(_, entry)| entry.clone())
                        .collect::<Vec<_>>(),
                ) {
                    Ok(events) => {
                        self.run_one(lane, |live| live.on_window(&guest, &events, traced))
                    }
                    Err(reason) => Some(Invocation {
                        result: Err(Failure::new(FailureKind::Refused, reason)),
                        started: SystemTime::now(),
                        took: std::time::Duration::ZERO,
                        diagnostics: InvocationDiagnostics::default(),
                    }),
                },
                _ => self.run_one(lane, |live| {
                    live.fire(&guest, &parts, merges.as_mut(), traced)
                }),
            };
            let Some(invocation) = invocation else {
                return false;
            };
            if let Some(windows) = self.windows.as_mut() {
                windows.fired.push((firing, invocation));
            }
        }
        if let Some(windows) = self.windows.as_mut() {
            if let (Some(merges), Some(book)) = (merges.as_mut(), windows.book.as_ref()) {
                let settings = book.core.settings();
                merges.forget_ended(
                    book.core
                        .watermark_ms()
                        .saturating_sub(settings.allowed_lateness_ms),
                );
            }
            windows.merges = merges;
        }
        true
    }

    /// Ends the batch's window work: deletes the parts `expired` names,
    /// stores the bookkeeping if it changed, and says what the batch must
    /// commit and publish for it. `Err`: the bookkeeping grew past what
    /// may be stored.
    pub(super) fn close_windows(
        &mut self,
        expired: &[(String, i64)],
    ) -> Result<Option<WindowWork>, String> {
        let Some(windows) = self.windows.as_mut() else {
            return Ok(None);
        };
        let Some(book) = windows.book.as_mut() else {
            return Ok(None);
        };
        if !windows.changed && windows.fired.is_empty() && expired.is_empty() {
            return Ok(None);
        }
        for (key, part) in expired {
            self.view.begin_event(key);
            self.view.delete(part_entry(*part));
            self.view.finish_event(true);
        }
        book.commits += 1;
        let commit_id = ALONE_ID_BASE + book.commits;
        let stored = serde_json::to_vec(&*book)
            .map_err(|e| format!("cannot encode the window bookkeeping: {e}"))?;
        if stored.len() > MAX_BOOK_BYTES {
            return Err(format!(
                "the window bookkeeping of the open windows of all keys takes {} bytes, past the {MAX_BOOK_BYTES} this host stores: fewer keys, shorter windows or less lateness",
                stored.len()
            ));
        }
        self.view.begin_event(BOOK_KEY);
        self.view.set(BOOK_ENTRY.to_string(), Bytes::from(stored));
        self.view.finish_event(true);
        Ok(Some(WindowWork {
            commit_id,
            publishes: !windows.fired.is_empty(),
        }))
    }
}
