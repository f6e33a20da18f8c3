// fraud-velocity's unit tests, natively under Vitest (no Wasm).
import { describe, expect, it } from 'vitest';
import { Reject } from '@weir/sdk';
import { Harness, event } from '@weir/sdk/testing';
import { ALERT_SUBJECT, type Alert, THRESHOLD, WINDOW_MS, handle } from './handler.js';

function txn(h: Harness, card: string, ts: number, sequence: number) {
  const payload = JSON.stringify({ card, amount_cents: 1250, ts });
  return h.call(handle, event('payments', card, payload, { eventTimeMs: ts, sequence }));
}

function alerts(h: Harness): Alert[] {
  for (const out of h.emitted) expect(out.subject).toBe(ALERT_SUBJECT);
  return h.emitted.map((out) => out.json<Alert>());
}

describe('fraud-velocity', () => {
  it('does not alert on five in a minute, and alerts on the sixth', () => {
    const h = new Harness();
    [0, 10_000, 20_000, 30_000, 40_000].forEach((ts, i) => expect(txn(h, 'c1', 1_000_000 + ts, i + 1)).toBeUndefined());
    expect(h.emitted).toEqual([]);
    expect(txn(h, 'c1', 1_059_999, 6)).toBeUndefined();
    expect(alerts(h)).toEqual([{ card: 'c1', sequence: 6, event_time_ms: 1_059_999, in_window: THRESHOLD + 1 }]);
    expect(h.emitted[0].headers).toEqual([['content-type', 'application/json']]);
  });

  it('excludes the window start', () => {
    const h = new Harness();
    [0, 10_000, 20_000, 30_000, 40_000, WINDOW_MS].forEach((ts, i) => txn(h, 'c1', ts, i));
    expect(h.emitted).toEqual([]);
    expect(h.jsonState('c1', 'recent')).toEqual([10_000, 20_000, 30_000, 40_000, 60_000]);
  });

  it('alerts on every transaction over the threshold, and keeps cards apart', () => {
    const h = new Harness();
    for (let i = 0; i < 8; i++) {
      txn(h, 'c1', i * 1_000, i);
      txn(h, 'c2', i * 20_000, 100 + i);
    }
    expect(alerts(h).map((a) => [a.card, a.in_window])).toEqual([['c1', 6], ['c1', 7], ['c1', 8]]);
    expect(h.jsonState('c1', 'count')).toBe(8);
    expect(h.jsonState('c2', 'count')).toBe(8);
    expect(h.jsonState('c2', 'recent')).toEqual([100_000, 120_000, 140_000]);
  });

  it('counts out-of-order times against their own window', () => {
    const h = new Harness();
    [10_000, 60_000, 20_000, 50_000, 30_000, 40_000].forEach((ts, i) => txn(h, 'c1', ts, i));
    expect(h.emitted).toEqual([]);
    expect(h.jsonState('c1', 'max_ts')).toBe(60_000);
    txn(h, 'c1', 65_000, 7);
    expect(alerts(h).map((a) => a.in_window)).toEqual([7]);
    // Far too late: counted, but dropped at once and alone in its window.
    txn(h, 'c1', 1_000, 8);
    expect(h.jsonState('c1', 'count')).toBe(8);
    expect(h.jsonState<number[]>('c1', 'recent')?.length).toBe(7);
    expect(h.emitted.length).toBe(1);
  });

  it('leaves state and outputs untouched for a rejected event', () => {
    const h = new Harness();
    for (let i = 0; i < 3; i++) txn(h, 'c1', i * 1_000, i);
    const before = ['count', 'max_ts', 'recent'].map((name) => h.state('c1', name));
    const failure = h.call(handle, event('payments', 'c1', '{"card": "c1", ', { eventTimeMs: 5_000 }));
    expect(failure).toBeInstanceOf(Reject);
    expect(['count', 'max_ts', 'recent'].map((name) => h.state('c1', name))).toEqual(before);
    expect(h.emitted).toEqual([]);
  });

  it('rejects corrupt state and keeps it', () => {
    const h = new Harness().withState('c1', 'recent', '[1, 2,');
    const failure = txn(h, 'c1', 5_000, 1);
    expect(failure).toBeInstanceOf(Reject);
    expect(failure?.reason).toContain('"recent"');
    expect(new TextDecoder().decode(h.state('c1', 'recent'))).toBe('[1, 2,');
    expect(h.state('c1', 'count')).toBeUndefined();
  });
});
