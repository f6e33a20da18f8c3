//! A buffered window function's parts: the events of each part of a
//! key's window, appended as they come and kept as one state entry (a
//! length-prefixed encoding of each event), handed over in event-time
//! order when the window fires.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::outcome::{Failure, FailureKind};
use crate::sandbox::Event;
use crate::state::BatchView;

/// Most bytes one buffered window part may hold: past it an event is
/// refused (an incremental window keeps any number of events).
const MAX_BUFFERED_PART_BYTES: usize = 64 << 20;

/// Appends `event` to the buffered part `part` of its key, after moving
/// into it the events of the parts it `absorbed` (sessions it bridged).
/// A part past [`MAX_BUFFERED_PART_BYTES`] takes no more.
pub(super) fn buffer(
    view: &mut BatchView,
    event: &Event,
    part: &str,
    absorbed: &[String],
) -> Result<(), Failure> {
    view.begin_event(&event.key);
    let mut contents = BytesMut::new();
    if absorbed.is_empty() {
        if let Some(held) = view.get(part) {
            contents.extend_from_slice(&held);
        }
    } else {
        for old in absorbed {
            if let Some(held) = view.get(old) {
                contents.extend_from_slice(&held);
            }
            view.delete(old.clone());
        }
    }
    encode_event(event, &mut contents);
    if contents.len() > MAX_BUFFERED_PART_BYTES {
        view.finish_event(false);
        return Err(Failure::new(
            FailureKind::StateLimit,
            format!(
                "the window's buffered events would take {} bytes, past {MAX_BUFFERED_PART_BYTES}: use an incremental window for windows this large",
                contents.len()
            ),
        ));
    }
    view.set(part.to_string(), contents.freeze());
    view.finish_event(true);
    Ok(())
}

/// The events of `parts` of `key`, in event-time order (stream order
/// among equal times).
pub(super) fn buffered_events(
    view: &mut BatchView,
    key: &str,
    parts: &[String],
) -> Result<Vec<Event>, String> {
    view.begin_event(key);
    let mut events = Vec::new();
    for part in parts {
        let Some(mut held) = view.get(part) else {
            continue;
        };
        while held.has_remaining() {
            events.push(decode_event(&mut held).ok_or_else(|| {
                format!("the buffered contents of window part {part:?} are unreadable")
            })?);
        }
    }
    view.finish_event(false);
    events.sort_by_key(|e| (e.event_time_ms, e.sequence));
    Ok(events)
}

fn put_bytes(into: &mut BytesMut, bytes: &[u8]) {
    into.put_u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    into.put_slice(bytes);
}

fn encode_event(event: &Event, into: &mut BytesMut) {
    put_bytes(into, event.subject.as_bytes());
    put_bytes(into, event.key.as_bytes());
    put_bytes(into, &event.payload);
    into.put_u32(u32::try_from(event.headers.len()).unwrap_or(u32::MAX));
    for (name, value) in &event.headers {
        put_bytes(into, name.as_bytes());
        put_bytes(into, value.as_bytes());
    }
    into.put_i64(event.event_time_ms);
    into.put_u64(event.sequence);
}

fn take_bytes(from: &mut Bytes) -> Option<Bytes> {
    if from.remaining() < 4 {
        return None;
    }
    let len = from.get_u32() as usize;
    (from.remaining() >= len).then(|| from.split_to(len))
}

fn take_text(from: &mut Bytes) -> Option<String> {
    String::from_utf8(take_bytes(from)?.to_vec()).ok()
}

fn decode_event(from: &mut Bytes) -> Option<Event> {
    let subject = take_text(from)?;
    let key = take_text(from)?;
    let payload = take_bytes(from)?.to_vec();
    if from.remaining() < 4 {
        return None;
    }
    let count = from.get_u32();
    let mut headers = Vec::new();
    for _ in 0..count {
        headers.push((take_text(from)?, take_text(from)?));
    }
    if from.remaining() < 16 {
        return None;
    }
    Some(Event {
        subject,
        key,
        payload,
        headers,
        event_time_ms: from.get_i64(),
        sequence: from.get_u64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, time: i64) -> Event {
        Event {
            subject: "s.a".into(),
            key: "k".into(),
            payload: vec![sequence as u8; 3],
            headers: vec![("h".into(), "v".into())],
            event_time_ms: time,
            sequence,
        }
    }

    #[test]
    fn buffered_parts_hand_back_their_events_in_time_order_and_merge() {
        let mut view = BatchView::default();
        buffer(&mut view, &event(1, 30), "\u{1}w0", &[]).expect("buffers");
        buffer(&mut view, &event(2, 10), "\u{1}w0", &[]).expect("buffers");
        buffer(&mut view, &event(3, 50), "\u{1}w40", &[]).expect("buffers");
        // An event that bridges both sessions takes their events along.
        buffer(
            &mut view,
            &event(4, 10),
            "\u{1}w0",
            &["\u{1}w0".to_string(), "\u{1}w40".to_string()],
        )
        .expect("buffers");
        let events = buffered_events(&mut view, "k", &["\u{1}w0".to_string()]).expect("reads");
        let order: Vec<u64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
        assert_eq!(
            (
                &events[0].payload,
                &events[0].headers,
                events[0].event_time_ms
            ),
            (&event(2, 10).payload, &event(2, 10).headers, 10)
        );
        view.begin_event("k");
        assert_eq!(view.get("\u{1}w40"), None);
    }

    #[test]
    fn unreadable_buffered_contents_are_an_error_not_a_panic() {
        let mut view = BatchView::default();
        view.begin_event("k");
        view.set("\u{1}w0".into(), Bytes::from_static(&[0, 0, 0, 9, 1]));
        view.finish_event(true);
        assert!(buffered_events(&mut view, "k", &["\u{1}w0".to_string()]).is_err());
    }
}
