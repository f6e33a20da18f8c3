//! Event-time windows as a protocol with no I/O: which window an event
//! belongs to, the watermark, when a window fires (on time, or again as an
//! update after late data), what is too late, and when a window's contents
//! can go. The core keeps only bookkeeping — pane and session bounds,
//! timers, how often each window fired — never the events or accumulators
//! themselves: the driver keeps those in window-scoped state, adds each
//! event where [`WindowCore::place`] says, and hands a firing the parts it
//! names. The core is serializable so that it is committed with the batch
//! whose events moved it.
//!
//! Rules held here, and nowhere else:
//! - the watermark is the highest event time seen minus the allowed
//!   out-of-orderness, never goes back, and after `idle_timeout_ms` with no
//!   event it moves on with processing time;
//! - a window fires once when the watermark reaches its end, and once more
//!   (an update, with the next firing number) after each batch that added
//!   late events to it, until the watermark passes its end plus the allowed
//!   lateness; an event whose every window is past that is too late;
//! - sliding windows are made of panes of gcd(size, slide): an event is
//!   added to one pane, whatever the overlap;
//! - sessions merge when an event bridges them, and never split.

pub mod merges;
mod panes;
mod sessions;
#[cfg(any(test, feature = "test-rng"))]
pub mod test_rng;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The shape of a function's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
// Named apart from the circuit breaker's (count or time) window kind.
#[cfg_attr(feature = "schema", schema(as = EventTimeWindowKind))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowKind {
    /// Back-to-back windows of `size_ms`: [0, size), [size, 2·size), ...
    Tumbling { size_ms: i64 },
    /// Windows of `size_ms` starting every `slide_ms`.
    Sliding { size_ms: i64, slide_ms: i64 },
    /// A key's events less than `gap_ms` apart, in one window that ends
    /// `gap_ms` after its last event.
    Session { gap_ms: i64 },
}

/// How a function's windows are made and closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "schema", schema(as = EventTimeWindow))]
#[serde(deny_unknown_fields)]
pub struct WindowSettings {
    pub kind: WindowKind,
    /// How far behind the highest event time seen an event may arrive and
    /// still be on time.
    #[serde(default)]
    pub out_of_orderness_ms: i64,
    /// How long after a window fired a late event still updates it.
    #[serde(default)]
    pub allowed_lateness_ms: i64,
    /// With no event for this long, the watermark moves on with processing
    /// time, so that an idle stream still closes its windows.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: i64,
    /// Where events too late for every window go, with headers saying how
    /// late; without it they are dead-lettered. (The host checks it is a
    /// subject it may publish to.)
    #[serde(default)]
    pub late_subject: Option<String>,
}

fn default_idle_timeout_ms() -> i64 {
    60_000
}

/// Longest window, gap, bound or timeout: a year.
const MAX_SPAN_MS: i64 = 366 * 24 * 3600 * 1000;

impl WindowSettings {
    /// What is wrong with these settings, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        let span = |ms: i64| (1..=MAX_SPAN_MS).contains(&ms);
        let bound = |ms: i64| (0..=MAX_SPAN_MS).contains(&ms);
        match self.kind {
            WindowKind::Tumbling { size_ms } if !span(size_ms) => {
                return Some("window size_ms must be between 1 ms and a year");
            }
            WindowKind::Sliding { size_ms, slide_ms }
                if !span(size_ms) || !span(slide_ms) || slide_ms > size_ms =>
            {
                return Some("sliding windows need 1 ms <= slide_ms <= size_ms <= a year");
            }
            WindowKind::Sliding { size_ms, slide_ms }
                if size_ms / gcd(size_ms, slide_ms) > MAX_PANES_PER_WINDOW =>
            {
                return Some(
                    "a sliding window may span at most 10,000 panes of gcd(size_ms, slide_ms)",
                );
            }
            WindowKind::Session { gap_ms } if !span(gap_ms) => {
                return Some("session gap_ms must be between 1 ms and a year");
            }
            _ => {}
        }
        if !bound(self.out_of_orderness_ms) || !bound(self.allowed_lateness_ms) {
            return Some(
                "out_of_orderness_ms and allowed_lateness_ms must be between 0 and a year",
            );
        }
        if !span(self.idle_timeout_ms) {
            return Some("idle_timeout_ms must be between 1 ms and a year");
        }
        None
    }
}

impl WindowSettings {
    /// Why windows kept under these settings cannot go on under `next`, if
    /// they cannot: another kind reads the open windows wrongly, and a
    /// longer lateness would open windows already expired again, as new
    /// windows with only part of their events.
    pub fn change_problem(&self, next: &WindowSettings) -> Option<String> {
        if next.kind != self.kind {
            return Some(format!(
                "the window kind changed from {:?} to {:?}; windows already open cannot be read as the new kind: bind the new kind as a new function",
                self.kind, next.kind
            ));
        }
        if next.allowed_lateness_ms > self.allowed_lateness_ms {
            return Some(format!(
                "allowed_lateness_ms rose from {} to {}; windows expired under the old lateness would open again without their events: lateness can only be lowered, or bind the new lateness as a new function",
                self.allowed_lateness_ms, next.allowed_lateness_ms
            ));
        }
        None
    }
}

/// The event times windows take: the years 1 to 9999. Outside them an
/// event is refused (the driver dead-letters it), so no window arithmetic
/// can overflow and no absurd time drags the watermark to the end of time.
pub const EVENT_TIME_RANGE_MS: std::ops::RangeInclusive<i64> =
    -62_135_596_800_000..=253_402_300_799_999;

/// Most panes one sliding window may span: each firing reads them all.
const MAX_PANES_PER_WINDOW: i64 = 10_000;

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a.abs() } else { gcd(b, a % b) }
}

/// A half-open interval of event time, [start_ms, end_ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// Where an event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Add it to the key's pane starting at `pane` (tumbling and sliding).
    Pane { pane: i64 },
    /// Add it to the key's session `window`, first merging into it the
    /// contents of the sessions `absorbed` (kept by their starts), which it
    /// replaces: a firing of any of them is superseded by this session's.
    Session {
        window: Window,
        absorbed: Vec<Window>,
    },
    /// An event time outside [`EVENT_TIME_RANGE_MS`].
    OutOfRange,
    /// Past every window's allowed lateness: to the late-data subject.
    TooLate {
        /// How far behind the watermark its event time is.
        behind_watermark_ms: i64,
        /// The watermark it was judged against.
        watermark_ms: i64,
    },
}

/// What one key's windows have due at a watermark: (window, the parts
/// that make it, firing number) in start order, then the parts no window
/// will read again.
type Due = (Vec<(Window, Vec<i64>, u32)>, Vec<i64>);

/// A window to hand to the function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    pub key: String,
    pub window: Window,
    /// The parts whose contents make the window: pane starts, or the
    /// session's start.
    pub parts: Vec<i64>,
    /// 0 for the first firing; each update after late data counts on.
    pub firing: u32,
}

impl Firing {
    /// Whether this firing updates an earlier one after late data.
    pub fn is_update(&self) -> bool {
        self.firing > 0
    }
}

/// What a watermark advance gives: windows to fire, in order, then parts
/// whose contents no window will read again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advance {
    pub firings: Vec<Firing>,
    /// (key, part start) of contents to delete.
    pub expired: Vec<(String, i64)>,
}

/// The bookkeeping one [`WindowCore::place`] may change: put back with
/// [`WindowCore::undo`] when the event it placed fails after all.
#[derive(Debug)]
pub struct Undo {
    key: String,
    windows: Option<KeyWindows>,
    max_event_ms: Option<i64>,
    watermark_ms: i64,
    last_arrival_ms: Option<i64>,
}

/// One function's window bookkeeping, for all its keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowCore {
    settings: WindowSettings,
    /// Highest event time seen.
    max_event_ms: Option<i64>,
    watermark_ms: i64,
    /// Processing time of the last event placed.
    last_arrival_ms: Option<i64>,
    /// The watermark does not advance past this while set: events that
    /// will come again (deferred, retried) keep the fate they had.
    #[serde(default)]
    cap_ms: Option<i64>,
    /// The watermark windows were last due at (none: the watermark, as in
    /// bookkeeping written before it was kept, which was always due).
    #[serde(default)]
    due_through_ms: Option<i64>,
    /// Written as `key_windows` since windows not yet due have no marks:
    /// a host from before reads no `keys` and refuses the bookkeeping
    /// (it would never fire those windows) instead of losing them. Read
    /// from `keys` too, as that host wrote it.
    #[serde(rename = "key_windows", alias = "keys")]
    keys: BTreeMap<String, KeyWindows>,
}

/// One key's windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum KeyWindows {
    Panes(panes::KeyPanes),
    Sessions(sessions::KeySessions),
}

impl WindowCore {
    pub fn new(settings: WindowSettings) -> Self {
        Self {
            settings,
            max_event_ms: None,
            watermark_ms: i64::MIN,
            last_arrival_ms: None,
            cap_ms: None,
            due_through_ms: Some(i64::MIN),
            keys: BTreeMap::new(),
        }
    }

    /// Holds the watermark at or below `cap` (none: no hold), and moves
    /// it up to what the events seen allow under the new cap.
    pub fn cap_watermark(&mut self, cap: Option<i64>) {
        self.cap_ms = cap;
        if let Some(max) = self.max_event_ms {
            let target = max.saturating_sub(self.settings.out_of_orderness_ms);
            self.raise_watermark(target);
        }
    }

    /// Raises the watermark towards `target`, never back and never past
    /// the cap.
    fn raise_watermark(&mut self, target: i64) {
        self.due_through();
        let target = self.cap_ms.map_or(target, |cap| target.min(cap));
        self.watermark_ms = self.watermark_ms.max(target);
    }

    /// The watermark windows were last due at. Bookkeeping written before
    /// it was kept was always committed right after windows were due, so
    /// its watermark is the one, taken before anything moves it.
    fn due_through(&mut self) -> i64 {
        *self.due_through_ms.get_or_insert(self.watermark_ms)
    }

    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    pub fn settings(&self) -> &WindowSettings {
        &self.settings
    }

    /// Takes new settings of the same window kind (a new version's
    /// binding): bounds, a lower lateness, idleness and the late subject
    /// apply from now on. A change [`WindowSettings::change_problem`]
    /// refuses is refused, with why.
    pub fn retune(&mut self, settings: &WindowSettings) -> Result<(), String> {
        if let Some(problem) = self.settings.change_problem(settings) {
            return Err(problem);
        }
        self.settings = settings.clone();
        Ok(())
    }

    /// Places an event of `key` at `event_ms` that arrived at processing
    /// time `arrival_ms`, and moves the watermark on past it.
    pub fn place(&mut self, key: &str, event_ms: i64, arrival_ms: i64) -> Placement {
        if !EVENT_TIME_RANGE_MS.contains(&event_ms) {
            return Placement::OutOfRange;
        }
        self.last_arrival_ms = Some(
            self.last_arrival_ms
                .map_or(arrival_ms, |l| l.max(arrival_ms)),
        );
        // The key is copied only for its first window, not per event.
        if !self.keys.contains_key(key) {
            let fresh = match self.settings.kind {
                WindowKind::Session { .. } => KeyWindows::Sessions(Default::default()),
                _ => KeyWindows::Panes(Default::default()),
            };
            self.keys.insert(key.to_string(), fresh);
        }
        let due_through = self.due_through();
        let (settings, watermark) = (&self.settings, self.watermark_ms);
        let placement = match self.keys.get_mut(key) {
            Some(KeyWindows::Panes(panes)) => {
                panes.place(settings, event_ms, watermark, due_through)
            }
            Some(KeyWindows::Sessions(sessions)) => sessions.place(settings, event_ms, watermark),
            None => unreachable!("the key's windows were made above"),
        };
        if matches!(placement, Placement::TooLate { .. }) {
            if self.keys.get(key).is_some_and(KeyWindows::is_empty) {
                self.keys.remove(key);
            }
            return placement;
        }
        self.max_event_ms = Some(self.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        let target = event_ms.saturating_sub(self.settings.out_of_orderness_ms);
        self.raise_watermark(target);
        placement
    }

    /// What placing an event of `key` may change, as it is now.
    pub fn undo_point(&self, key: &str) -> Undo {
        Undo {
            key: key.to_string(),
            windows: self.keys.get(key).cloned(),
            max_event_ms: self.max_event_ms,
            watermark_ms: self.watermark_ms,
            last_arrival_ms: self.last_arrival_ms,
        }
    }

    /// Puts back what an event placed since `undo` was taken changed: the
    /// event failed, and its contents were not stored.
    pub fn undo(&mut self, undo: Undo) {
        match undo.windows {
            Some(windows) => self.keys.insert(undo.key, windows),
            None => self.keys.remove(&undo.key),
        };
        self.max_event_ms = undo.max_event_ms;
        self.watermark_ms = undo.watermark_ms;
        self.last_arrival_ms = undo.last_arrival_ms;
    }

    /// Moves the watermark on for idleness at processing time `now_ms`,
    /// then fires what is due and expires what no window reads again.
    pub fn advance(&mut self, now_ms: i64) -> Advance {
        if let (Some(last), Some(max)) = (self.last_arrival_ms, self.max_event_ms) {
            let idle_for = now_ms.saturating_sub(last);
            if idle_for >= self.settings.idle_timeout_ms {
                let flowing = max
                    .saturating_sub(self.settings.out_of_orderness_ms)
                    .saturating_add(idle_for - self.settings.idle_timeout_ms);
                self.raise_watermark(flowing);
            }
        }
        self.fire_due()
    }

    /// Sets the watermark to `watermark_ms` (never back), then fires and
    /// expires as [`WindowCore::advance`] does: for tests and the native
    /// harness, which control event time.
    pub fn advance_watermark_to(&mut self, watermark_ms: i64) -> Advance {
        self.due_through();
        self.watermark_ms = self.watermark_ms.max(watermark_ms);
        self.fire_due()
    }

    fn fire_due(&mut self) -> Advance {
        let mut advance = Advance::default();
        let due_through = self.due_through();
        let watermark = self.watermark_ms;
        for (key, windows) in &mut self.keys {
            let (firings, expired) = match windows {
                KeyWindows::Panes(panes) => panes.due(&self.settings, watermark, due_through),
                KeyWindows::Sessions(sessions) => sessions.due(&self.settings, watermark),
            };
            advance
                .firings
                .extend(firings.into_iter().map(|(window, parts, firing)| Firing {
                    key: key.clone(),
                    window,
                    parts,
                    firing,
                }));
            advance
                .expired
                .extend(expired.into_iter().map(|part| (key.clone(), part)));
        }
        self.keys.retain(|_, windows| !windows.is_empty());
        self.due_through_ms = Some(watermark);
        advance
    }
}

impl KeyWindows {
    fn is_empty(&self) -> bool {
        match self {
            KeyWindows::Panes(panes) => panes.is_empty(),
            KeyWindows::Sessions(sessions) => sessions.is_empty(),
        }
    }
}
