// fraud-velocity: alerts when a card is used more than THRESHOLD times within
// WINDOW_MS of event time. The same function as examples/fraud-velocity (Rust).
//
// The binding keys events by /card and takes event time from /ts. Per card it
// keeps, as JSON state: `count` (every transaction seen), `max_ts` (the latest
// event time seen) and `recent` (the sorted event times later than
// max_ts - WINDOW_MS). An event at t alerts when more than THRESHOLD of the
// kept times fall in (t - WINDOW_MS, t].
import { type Event, emit, handler, state } from '@weir/sdk';

export const THRESHOLD = 5;
export const WINDOW_MS = 60_000;
export const ALERT_SUBJECT = 'alerts.velocity';

export interface Alert {
  card: string;
  /** The stream sequence of the transaction that crossed the threshold. */
  sequence: number;
  event_time_ms: number;
  /** Transactions of the card in (event_time_ms - WINDOW_MS, event_time_ms]. */
  in_window: number;
}

/** The index of the first element of sorted `xs` greater than `x`. */
function upperBound(xs: number[], x: number): number {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (xs[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export const handle = handler((event: Event) => {
  event.json(); // the binding extracted card and time; only the JSON itself is checked
  const t = event.eventTimeMs;
  const count = (state.getJson<number>('count') ?? 0) + 1;
  const maxTs = Math.max(state.getJson<number>('max_ts') ?? t, t);
  const recent = state.getJson<number[]>('recent') ?? [];
  recent.splice(upperBound(recent, t), 0, t);
  recent.splice(0, upperBound(recent, maxTs - WINDOW_MS));
  const inWindow = upperBound(recent, t) - upperBound(recent, t - WINDOW_MS);
  state.setJson('count', count);
  state.setJson('max_ts', maxTs);
  state.setJson('recent', recent);
  if (inWindow > THRESHOLD) {
    const alert: Alert = { card: event.key, sequence: event.sequence, event_time_ms: t, in_window: inWindow };
    emit.publishJson(ALERT_SUBJECT, alert);
  }
});
