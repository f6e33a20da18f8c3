//! One key's tumbling or sliding windows, kept as panes: slices of event
//! time gcd(size, slide) long. An event is added to exactly one pane, and a
//! window is the panes it spans, so the cost of an event does not grow with
//! the overlap size / slide. Tumbling windows are sliding windows whose
//! slide is their size (one pane per window).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Due, Placement, Window, WindowKind, WindowSettings, gcd};

/// Panes holding events, and the marks of the windows that need them, by
/// start. A window that has not been due yet needs no mark: [`KeyPanes::due`]
/// finds it from the panes. Only windows that fired and may still take late
/// data, and windows already due that late data made non-empty, have one,
/// so the bookkeeping a function commits each batch grows with its panes,
/// not with panes × size / slide.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct KeyPanes {
    panes: BTreeSet<i64>,
    windows: BTreeMap<i64, Marks>,
}

/// How often a window fired, and whether late data awaits an update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Marks {
    firings: u32,
    late: bool,
}

/// (size, slide, pane) of tumbling or sliding windows.
fn geometry(kind: WindowKind) -> (i64, i64, i64) {
    let (size, slide) = match kind {
        WindowKind::Tumbling { size_ms } => (size_ms, size_ms),
        WindowKind::Sliding { size_ms, slide_ms } => (size_ms, slide_ms),
        // Sessions are kept by `sessions`; a session key never reaches here.
        WindowKind::Session { gap_ms } => (gap_ms, gap_ms),
    };
    (size, slide, gcd(size, slide))
}

/// The starts of the windows that hold pane `pane`, latest first.
fn windows_of(pane: i64, size: i64, slide: i64) -> impl Iterator<Item = i64> {
    let latest = pane.div_euclid(slide) * slide;
    (0..)
        .map(move |n: i64| latest - n * slide)
        .take_while(move |start| start.saturating_add(size) > pane)
}

/// The start of the earliest window that holds `pane`.
fn earliest_holding(pane: i64, size: i64, slide: i64) -> i64 {
    ((pane - size).div_euclid(slide) + 1) * slide
}

impl KeyPanes {
    pub fn is_empty(&self) -> bool {
        self.panes.is_empty() && self.windows.is_empty()
    }

    /// The pane an event at `event_ms` goes to, or why it is too late for
    /// every window that would hold it. `due_through` is the watermark of
    /// the last [`KeyPanes::due`]: windows ending after it have not been
    /// due yet.
    pub fn place(
        &mut self,
        settings: &WindowSettings,
        event_ms: i64,
        watermark: i64,
        due_through: i64,
    ) -> Placement {
        let (size, slide, pane_ms) = geometry(settings.kind);
        let pane = event_ms.div_euclid(pane_ms) * pane_ms;
        let lateness = settings.allowed_lateness_ms;
        // The latest window over the pane ends last: if it is past its
        // lateness, every one is.
        let latest_end = (pane.div_euclid(slide) * slide).saturating_add(size);
        if latest_end.saturating_add(lateness) <= watermark {
            return Placement::TooLate {
                behind_watermark_ms: watermark.saturating_sub(event_ms),
                watermark_ms: watermark,
            };
        }
        // The common case, whatever the overlap: no window over the pane
        // has been due, so none needs a mark.
        if earliest_holding(pane, size, slide).saturating_add(size) > due_through {
            self.panes.insert(pane);
            return Placement::Pane { pane };
        }
        for start in windows_of(pane, size, slide) {
            let end = start.saturating_add(size);
            if end > due_through || end.saturating_add(lateness) <= watermark {
                continue;
            }
            // Due already: an update if it fired, its first firing if it
            // was empty then.
            self.windows.entry(start).or_default().late = true;
        }
        self.panes.insert(pane);
        Placement::Pane { pane }
    }

    /// The starts of the windows ending in (`after`, `through`] that hold
    /// a pane, in order: each costs one pane lookup, and a stretch with no
    /// pane is skipped in one step.
    fn newly_due(&self, size: i64, slide: i64, after: i64, through: i64) -> Vec<i64> {
        let mut starts = Vec::new();
        let Some(&first) = self.panes.first() else {
            return starts;
        };
        let mut start = earliest_holding(first, size, slide);
        if start.saturating_add(size) <= after {
            start = ((after - size).div_euclid(slide) + 1) * slide;
        }
        while start.saturating_add(size) <= through {
            let Some(&pane) = self.panes.range(start..).next() else {
                break;
            };
            if pane >= start.saturating_add(size) {
                start = earliest_holding(pane, size, slide);
                continue;
            }
            starts.push(start);
            start += slide;
        }
        starts
    }

    /// The windows due at `watermark` — (window, its panes, firing number)
    /// in start order — and the panes no window will read again.
    /// `due_through` is the watermark of the previous call.
    pub fn due(&mut self, settings: &WindowSettings, watermark: i64, due_through: i64) -> Due {
        let (size, slide, _) = geometry(settings.kind);
        let lateness = settings.allowed_lateness_ms;
        let mut starts: BTreeSet<i64> = self
            .newly_due(size, slide, due_through, watermark)
            .into_iter()
            .collect();
        starts.extend(
            self.windows
                .iter()
                // In start order, and so in end order.
                .take_while(|(start, _)| start.saturating_add(size) <= watermark)
                .filter(|(_, marks)| marks.firings == 0 || marks.late)
                .map(|(start, _)| *start),
        );
        let mut firings = Vec::new();
        for start in starts {
            let end = start.saturating_add(size);
            let marks = self.windows.get(&start).copied().unwrap_or_default();
            if marks.firings > 0 && !marks.late {
                continue;
            }
            let parts: Vec<i64> = self.panes.range(start..end).copied().collect();
            let mut fired = marks.firings;
            if !parts.is_empty() {
                let window = Window {
                    start_ms: start,
                    end_ms: end,
                };
                firings.push((window, parts, marks.firings));
                fired += 1;
            }
            // A window that fired keeps its marks while late data may
            // still update it.
            if fired > 0 && end.saturating_add(lateness) > watermark {
                let marks = Marks {
                    firings: fired,
                    late: false,
                };
                self.windows.insert(start, marks);
            } else {
                self.windows.remove(&start);
            }
        }
        self.windows
            .retain(|&start, _| start.saturating_add(size).saturating_add(lateness) > watermark);
        let live = |pane: i64| {
            let last_end = (pane.div_euclid(slide) * slide).saturating_add(size);
            last_end.saturating_add(lateness) > watermark
        };
        // Panes die in start order: those no window reads are a prefix.
        let expired: Vec<i64> = self
            .panes
            .iter()
            .copied()
            .take_while(|&p| !live(p))
            .collect();
        for pane in &expired {
            self.panes.remove(pane);
        }
        (firings, expired)
    }
}
