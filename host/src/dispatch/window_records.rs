//! The records a window firing publishes: each output of the guest's
//! `fire` (or `on-window`) with the window in its headers, or a dead
//! letter saying why the firing failed, under message ids made of
//! (function, window, firing number, position, key) so that a firing
//! published again after a crash is the same record.

use bytes::Bytes;

use crate::output::{OutputRecord, dead_letter_headers as dlq, header_text};
use crate::sandbox::Invocation;
use crate::windows::{Firing, Window};

/// Header names on the records of a firing and on late events.
pub mod window_headers {
    pub const WINDOW_START: &str = "Weir-Window-Start-Ms";
    pub const WINDOW_END: &str = "Weir-Window-End-Ms";
    pub const WINDOW_KEY: &str = "Weir-Window-Key";
    /// 0 for the first firing, then 1, 2, ... for updates after late data.
    pub const FIRING: &str = "Weir-Window-Firing";
    pub const LATE_BEHIND: &str = "Weir-Late-Behind-Watermark-Ms";
    pub const LATE_WATERMARK: &str = "Weir-Late-Watermark-Ms";
    pub const LATE_REASON: &str = "Weir-Late-Reason";
}
use window_headers as wh;

/// The message id of output `index` of a firing: the key last, after the
/// fixed number of fields, so that no two firings share one, and escaped
/// (an id is a header value: no line breaks or control characters).
fn firing_msg_id(scope: &str, firing: &Firing, index: &str) -> String {
    let Window { start_ms, end_ms } = firing.window;
    format!(
        "weir:{scope}:w:{start_ms}:{end_ms}:{}:{index}:{}",
        firing.firing,
        escape_key(&firing.key)
    )
}

/// `key` fit for a header value, and still telling keys apart: `\` as
/// `\\` and each control character as `\u{..}`; everything else as it is.
pub fn escape_key(key: &str) -> std::borrow::Cow<'_, str> {
    if !key.contains(|c: char| c == '\\' || c.is_control()) {
        return std::borrow::Cow::Borrowed(key);
    }
    let mut escaped = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            c if c.is_control() => escaped.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => escaped.push(c),
        }
    }
    std::borrow::Cow::Owned(escaped)
}

/// The records of the windows fired: each firing's outputs with its
/// window in headers, or a dead letter saying why it failed; each with
/// the position of its firing in `fired`.
pub(super) fn firing_records(
    fired: &mut [(Firing, Invocation)],
    scope: &str,
    function: &str,
    dead_letter_subject: &str,
) -> Vec<(usize, OutputRecord)> {
    let mut records = Vec::new();
    for (which, (firing, invocation)) in fired.iter_mut().enumerate() {
        let window_headers = [
            // Escaped, not cleaned: two keys never read the same.
            (
                wh::WINDOW_KEY.to_string(),
                escape_key(&firing.key).into_owned(),
            ),
            (
                wh::WINDOW_START.to_string(),
                firing.window.start_ms.to_string(),
            ),
            (wh::WINDOW_END.to_string(), firing.window.end_ms.to_string()),
            (wh::FIRING.to_string(), firing.firing.to_string()),
        ];
        match &mut invocation.result {
            Ok(handled) => {
                for (index, output) in std::mem::take(&mut handled.outputs).into_iter().enumerate()
                {
                    let mut headers: Vec<(String, String)> = output
                        .headers
                        .into_iter()
                        .filter(|(name, _)| !super::is_broker_header(name))
                        .collect();
                    headers.extend(window_headers.iter().cloned());
                    let record = OutputRecord {
                        msg_id: firing_msg_id(scope, firing, &index.to_string()),
                        subject: output.subject,
                        payload: output.payload,
                        headers,
                    };
                    records.push((which, record));
                }
            }
            Err(failure) => {
                let mut headers = vec![
                    (dlq::FUNCTION.to_string(), function.to_string()),
                    (dlq::KIND.to_string(), failure.kind.as_str().to_string()),
                    (dlq::REASON.to_string(), header_text(&failure.message)),
                ];
                headers.extend(window_headers.iter().cloned());
                let record = OutputRecord {
                    msg_id: firing_msg_id(scope, firing, "dlq"),
                    subject: dead_letter_subject.to_string(),
                    payload: Bytes::new(),
                    headers,
                };
                records.push((which, record));
            }
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::outcome::{Failure, FailureKind};
    use crate::sandbox::InvocationDiagnostics;

    #[test]
    fn the_window_key_header_escapes_only_controls_and_backslashes() {
        let key = "Zürich \"Nord\"\n\\";
        let firing = Firing {
            key: key.into(),
            window: Window {
                start_ms: 0,
                end_ms: 10,
            },
            parts: vec![0],
            firing: 0,
        };
        let failed = Invocation {
            result: Err(Failure::new(FailureKind::GuestReject, "no".to_string())),
            started: SystemTime::now(),
            took: std::time::Duration::ZERO,
            diagnostics: InvocationDiagnostics::default(),
        };
        let records = firing_records(&mut [(firing, failed)], "f", "f", "dlq");
        let header = |name: &str| {
            records[0]
                .1
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header(wh::WINDOW_KEY).as_deref(),
            Some("Zürich \"Nord\"\\u{a}\\\\"),
            "as docs/windows.md says"
        );
    }

    #[test]
    fn firing_ids_differ_per_window_firing_and_key() {
        let firing = |key: &str, start: i64, number: u32| Firing {
            key: key.into(),
            window: Window {
                start_ms: start,
                end_ms: start + 10,
            },
            parts: vec![start],
            firing: number,
        };
        let ids = [
            firing_msg_id("f", &firing("a", 0, 0), "0"),
            firing_msg_id("f", &firing("a", 0, 1), "0"),
            firing_msg_id("f", &firing("a", 10, 0), "0"),
            firing_msg_id("f", &firing("a:0", 0, 0), "0"),
            firing_msg_id("f", &firing("a", 0, 0), "1"),
            firing_msg_id("f", &firing("a\nb", 0, 0), "0"),
            firing_msg_id("f", &firing("a\\nb", 0, 0), "0"),
        ];
        assert!(
            ids.iter().all(|id| !id.contains(['\r', '\n'])),
            "ids are header values: {ids:?}"
        );
        assert_eq!(
            escape_key("Zürich"),
            "Zürich",
            "only controls and \\ are escaped"
        );
        assert_eq!(escape_key("a\nb\\"), "a\\u{a}b\\\\");
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    }
}
