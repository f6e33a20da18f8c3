//! `user-sessions`: a user's clicks, grouped into sessions that end after
//! 30 minutes without a click — session windows, buffered: the function
//! gets the session's clicks when it closes.
//!
//! Bind it with `key = { json_pointer = "/user" }`, `event_time =
//! { json_pointer = "/ts" }` and `window.kind = { session = { gap_ms =
//! 1800000 } }`. Input `{"user": "u1", "ts": ..., "page": "/cart"}`;
//! each closed session publishes a [`Session`] to [`SESSION_SUBJECT`].

use serde::{Deserialize, Serialize};
use weir_sdk::window::{BufferedWindow, Firing};
use weir_sdk::{Error, Event, emit};

/// Where sessions go.
pub const SESSION_SUBJECT: &str = "sessions.closed";

#[derive(Deserialize)]
struct Click {
    page: String,
}

/// The record published per session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub user: String,
    pub start_ms: i64,
    /// 30 minutes after the last click.
    pub end_ms: i64,
    /// The pages, in the order clicked.
    pub pages: Vec<String>,
    pub firing: u32,
}

pub struct UserSessions;

impl BufferedWindow for UserSessions {
    fn on_window(firing: &Firing, clicks: Vec<Event>) -> Result<(), Error> {
        // A click that does not parse is reported, not allowed to cost the
        // whole session.
        let mut pages = Vec::with_capacity(clicks.len());
        for click in &clicks {
            match click.json::<Click>() {
                Ok(click) => pages.push(click.page),
                Err(error) => weir_sdk::log::warn(&format!(
                    "click {} of {} skipped: {error}",
                    click.sequence, firing.key
                )),
            }
        }
        emit::publish_json(
            SESSION_SUBJECT,
            &Session {
                user: firing.key.clone(),
                start_ms: firing.start_ms,
                end_ms: firing.end_ms,
                pages,
                firing: firing.number,
            },
        )
    }
}

weir_sdk::buffered_window!(UserSessions);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use weir_sdk::testing::{Buffered, WindowHarness, WindowKind, WindowSettings, event};

    const MINUTE: i64 = 60_000;

    fn click(ts: i64, page: &str) -> Event {
        let payload = format!(r#"{{"user":"u1","page":"{page}"}}"#);
        event("clicks", "u1", payload).with_time(ts)
    }

    #[test]
    fn a_late_click_that_bridges_two_sessions_merges_them() {
        let settings = WindowSettings {
            kind: WindowKind::Session {
                gap_ms: 30 * MINUTE,
            },
            out_of_orderness_ms: 30 * MINUTE,
            allowed_lateness_ms: 0,
            idle_timeout_ms: MINUTE,
            late_subject: None,
        };
        let mut h = WindowHarness::<Buffered<UserSessions>>::buffered(settings);
        h.event(click(0, "/")).expect("buffers");
        h.event(click(50 * MINUTE, "/cart")).expect("buffers");
        // Out of order, within the bound: 25 minutes bridges the two.
        h.event(click(25 * MINUTE, "/shoes")).expect("buffers");
        h.advance_watermark_to(200 * MINUTE);
        let sessions: Vec<Session> = h.emitted().iter().map(|e| e.json()).collect();
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        assert_eq!(sessions[0].pages, vec!["/", "/shoes", "/cart"]);
        assert_eq!((sessions[0].start_ms, sessions[0].end_ms), (0, 80 * MINUTE));
    }

    #[test]
    fn an_idle_stream_still_closes_the_session() {
        let settings = WindowSettings {
            kind: WindowKind::Session {
                gap_ms: 30 * MINUTE,
            },
            out_of_orderness_ms: 0,
            allowed_lateness_ms: 0,
            idle_timeout_ms: MINUTE,
            late_subject: None,
        };
        let mut h = WindowHarness::<Buffered<UserSessions>>::buffered(settings);
        h.set_processing_time(0);
        h.event(click(0, "/")).expect("buffers");
        assert!(h.idle_until(30 * MINUTE).is_empty(), "not yet");
        assert_eq!(h.idle_until(32 * MINUTE), vec![Ok(())]);
        assert_eq!(h.emitted().len(), 1);
    }
}
