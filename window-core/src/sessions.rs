//! One key's session windows: each ends `gap_ms` after its last event; an
//! event within a gap of a session joins it, and one that bridges two
//! sessions merges them (they never split). A session that fired and then
//! grows with late data fires again as an update that supersedes the
//! firings of every session it absorbed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Due, Placement, Window, WindowKind, WindowSettings};

/// Sessions by start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct KeySessions {
    sessions: BTreeMap<i64, Session>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    end: i64,
    /// Firings so far: the most of the sessions it absorbed.
    firings: u32,
    /// It grew since it last fired.
    late: bool,
}

fn gap(kind: WindowKind) -> i64 {
    match kind {
        WindowKind::Session { gap_ms } => gap_ms,
        // Tumbling and sliding keys are kept by `panes`.
        WindowKind::Tumbling { size_ms } | WindowKind::Sliding { size_ms, .. } => size_ms,
    }
}

impl KeySessions {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The session an event at `event_ms` makes or joins (merging the ones
    /// it bridges), or why it is too late.
    pub fn place(&mut self, settings: &WindowSettings, event_ms: i64, watermark: i64) -> Placement {
        let own_end = event_ms.saturating_add(gap(settings.kind));
        // Sessions are disjoint and in start order, so in end order too:
        // those it touches start before its own end and end after it.
        let absorbed: Vec<(i64, Session)> = self
            .sessions
            .range(..own_end)
            .rev()
            .take_while(|(_, session)| session.end > event_ms)
            .map(|(&start, &session)| (start, session))
            .collect();
        let start = absorbed.iter().map(|(s, _)| *s).fold(event_ms, i64::min);
        let end = absorbed.iter().map(|(_, s)| s.end).fold(own_end, i64::max);
        if end.saturating_add(settings.allowed_lateness_ms) <= watermark {
            return Placement::TooLate {
                behind_watermark_ms: watermark.saturating_sub(event_ms),
                watermark_ms: watermark,
            };
        }
        let firings = absorbed.iter().map(|(_, s)| s.firings).max().unwrap_or(0);
        for (old, _) in &absorbed {
            self.sessions.remove(old);
        }
        self.sessions.insert(
            start,
            Session {
                end,
                firings,
                late: firings > 0,
            },
        );
        let mut absorbed: Vec<Window> = absorbed
            .into_iter()
            .map(|(start, session)| Window {
                start_ms: start,
                end_ms: session.end,
            })
            .collect();
        absorbed.sort_unstable();
        Placement::Session {
            window: Window {
                start_ms: start,
                end_ms: end,
            },
            absorbed,
        }
    }

    /// The sessions due at `watermark` — (window, [its start], firing
    /// number) — and the sessions no firing will read again.
    pub fn due(&mut self, settings: &WindowSettings, watermark: i64) -> Due {
        let mut firings = Vec::new();
        for (&start, session) in &mut self.sessions {
            if session.end > watermark {
                break;
            }
            if session.firings == 0 || session.late {
                let window = Window {
                    start_ms: start,
                    end_ms: session.end,
                };
                firings.push((window, vec![start], session.firings));
                session.firings += 1;
                session.late = false;
            }
        }
        let lateness = settings.allowed_lateness_ms;
        let expired: Vec<i64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.end.saturating_add(lateness) <= watermark)
            .map(|(&start, _)| start)
            .collect();
        for start in &expired {
            self.sessions.remove(start);
        }
        (firings, expired)
    }
}
