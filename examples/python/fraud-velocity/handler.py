"""fraud-velocity: alerts when a card is used more than THRESHOLD times within
WINDOW_MS of event time. The same function as examples/fraud-velocity (Rust).

The binding keys events by /card and takes event time from /ts. Per card it
keeps, as JSON state: `count` (every transaction seen), `max_ts` (the latest
event time seen) and `recent` (the sorted event times later than
max_ts - WINDOW_MS). An event at t alerts when more than THRESHOLD of the
kept times fall in (t - WINDOW_MS, t].
"""

from bisect import bisect_right, insort_right

from weir_sdk import Event, emit, handler, state

THRESHOLD = 5
WINDOW_MS = 60_000
ALERT_SUBJECT = "alerts.velocity"


@handler
def handle(event: Event) -> None:
    event.json()  # the binding extracted card and time; only the JSON itself is checked
    t = event.event_time_ms
    count = (state.get_json("count") or 0) + 1
    max_ts = state.get_json("max_ts")
    max_ts = t if max_ts is None else max(max_ts, t)
    recent = state.get_json("recent") or []
    insort_right(recent, t)
    del recent[: bisect_right(recent, max_ts - WINDOW_MS)]
    in_window = bisect_right(recent, t) - bisect_right(recent, t - WINDOW_MS)
    state.set_json("count", count)
    state.set_json("max_ts", max_ts)
    state.set_json("recent", recent)
    if in_window > THRESHOLD:
        emit.publish_json(
            ALERT_SUBJECT,
            {
                "card": event.key,
                "sequence": event.sequence,
                "event_time_ms": t,
                "in_window": in_window,
            },
        )
