import { expect, it } from 'vitest';
import { Reject } from '@weir/sdk';
import { Harness, event } from '@weir/sdk/testing';
import { type Count, OUTPUT_SUBJECT, handle } from './handler.js';

it('counts each key and publishes the count', () => {
  const h = new Harness();
  for (const [sequence, key] of [[1, 'a'], [2, 'b'], [3, 'a']] as const) {
    expect(h.call(handle, event('in', key, '{"n": 1}', { sequence }))).toBeUndefined();
  }
  expect(h.jsonState('a', 'count')).toBe(2);
  expect(h.emitted[2].subject).toBe(OUTPUT_SUBJECT);
  expect(h.emitted[2].json<Count>()).toEqual({ key: 'a', count: 2, sequence: 3 });
});

it('rejects an event that is not JSON and changes nothing', () => {
  const h = new Harness().withJsonState('a', 'count', 5);
  expect(h.call(handle, event('in', 'a', '{oops'))).toBeInstanceOf(Reject);
  expect(h.jsonState('a', 'count')).toBe(5);
  expect(h.emitted).toEqual([]);
});
