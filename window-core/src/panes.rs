//! One key's tumbling or sliding windows, kept as panes: slices of event
//! time gcd(size, slide) long. An event is added to exactly one pane, and a
//! window is the panes it spans, so the cost of an event does not grow with
//! the overlap size / slide. Tumbling windows are sliding windows whose
//! slide is their size (one pane per window).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Due, Placement, Window, WindowKind, WindowSettings, gcd};

/// Panes holding events, and the windows that have them, by start.
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

impl KeyPanes {
    pub fn is_empty(&self) -> bool {
        self.panes.is_empty() && self.windows.is_empty()
    }

    /// The pane an event at `event_ms` goes to, or why it is too late for
    /// every window that would hold it.
    pub fn place(&mut self, settings: &WindowSettings, event_ms: i64, watermark: i64) -> Placement {
        let (size, slide, pane_ms) = geometry(settings.kind);
        let pane = event_ms.div_euclid(pane_ms) * pane_ms;
        let lateness = settings.allowed_lateness_ms;
        // The common case costs one lookup, whatever the overlap: a pane
        // that has its windows already, none of which has ended.
        let earliest_start = ((pane - size).div_euclid(slide) + 1) * slide;
        let earliest_end = earliest_start + size;
        if earliest_end > watermark && self.panes.contains(&pane) {
            return Placement::Pane { pane };
        }
        let mut accepted = false;
        for start in windows_of(pane, size, slide) {
            let end = start.saturating_add(size);
            if end.saturating_add(lateness) <= watermark {
                continue;
            }
            accepted = true;
            let marks = self.windows.entry(start).or_default();
            if marks.firings > 0 {
                marks.late = true;
            }
        }
        if !accepted {
            return Placement::TooLate {
                behind_watermark_ms: watermark.saturating_sub(event_ms),
                watermark_ms: watermark,
            };
        }
        self.panes.insert(pane);
        Placement::Pane { pane }
    }

    /// The windows due at `watermark` — (window, its panes, firing number)
    /// in start order — and the panes no window will read again.
    pub fn due(&mut self, settings: &WindowSettings, watermark: i64) -> Due {
        let (size, slide, _) = geometry(settings.kind);
        let lateness = settings.allowed_lateness_ms;
        let mut firings = Vec::new();
        for (&start, marks) in &mut self.windows {
            let end = start.saturating_add(size);
            if end > watermark {
                // Windows are in start order, and so in end order.
                break;
            }
            if marks.firings > 0 && !marks.late {
                continue;
            }
            let parts: Vec<i64> = self.panes.range(start..end).copied().collect();
            if !parts.is_empty() {
                firings.push((
                    Window {
                        start_ms: start,
                        end_ms: end,
                    },
                    parts,
                    marks.firings,
                ));
                marks.firings += 1;
            }
            marks.late = false;
        }
        self.windows
            .retain(|&start, _| start.saturating_add(size).saturating_add(lateness) > watermark);
        let live = |pane: i64| {
            let last_end = (pane.div_euclid(slide) * slide).saturating_add(size);
            last_end.saturating_add(lateness) > watermark
        };
        let expired: Vec<i64> = self.panes.iter().copied().filter(|&p| !live(p)).collect();
        for pane in &expired {
            self.panes.remove(pane);
        }
        (firings, expired)
    }
}
