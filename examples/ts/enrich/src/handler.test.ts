// enrich's unit tests, natively under Vitest (no Wasm).
import { describe, expect, it } from 'vitest';
import { Reject } from '@weir/sdk';
import { Harness, event } from '@weir/sdk/testing';
import { OUTPUT_SUBJECT, handle } from './handler.js';

function run(order: unknown) {
  const h = new Harness();
  const payload = typeof order === 'string' ? order : JSON.stringify(order);
  return { h, failure: h.call(handle, event('orders.new', 'o-1', payload)) };
}

describe('enrich', () => {
  it('gives a valid order exact totals and keeps its fields', () => {
    const order = {
      order_id: 'o-1',
      customer: { id: 7, tier: 'gold' },
      items: [
        { sku: 'a', qty: 2, price_cents: 1999 },
        { sku: 'b', qty: 3, price_cents: 250, note: 'gift' },
        { sku: 'c', qty: 0, price_cents: 100000 },
      ],
    };
    const { h, failure } = run(order);
    expect(failure).toBeUndefined();
    expect(h.emitted.length).toBe(1);
    expect(h.emitted[0].subject).toBe(OUTPUT_SUBJECT);
    expect(h.emitted[0].json()).toEqual({ ...order, total_cents: 2 * 1999 + 3 * 250, item_count: 5 });
    expect(h.spans).toEqual([{ name: 'totals', parent: undefined, attributes: { item_count: '5' }, closed: true }]);
    expect(h.logs).toEqual([['debug', 'order o-1: 5 items, 4748 cents']]);
  });

  it('gives empty items zero totals, and replaces totals the input had', () => {
    const { h } = run({ order_id: 'o-2', items: [], total_cents: 99 });
    expect(h.emitted[0].json()).toEqual({ order_id: 'o-2', items: [], total_cents: 0, item_count: 0 });
  });

  it('writes totals beyond 2^53 exactly', () => {
    const { h, failure } = run({ order_id: 'o', items: [{ sku: 'a', qty: 1024, price_cents: Number.MAX_SAFE_INTEGER }] });
    expect(failure).toBeUndefined();
    expect(h.emitted[0].text()).toContain(`"total_cents":${1024n * BigInt(Number.MAX_SAFE_INTEGER)}`);
  });

  it('rejects malformed JSON with no output', () => {
    const { h, failure } = run('{"order_id": "o-1", "items": [');
    expect(failure).toBeInstanceOf(Reject);
    expect(failure?.reason).toMatch(/^payload is not valid JSON/);
    expect(h.emitted).toEqual([]);
  });

  it('rejects missing items', () => {
    const { h, failure } = run({ order_id: 'o-1' });
    expect(failure?.reason).toBe('items is missing');
    expect(h.emitted).toEqual([]);
  });

  it.each([
    [[1, 2]],
    [{ items: [] }],
    [{ order_id: 5, items: [] }],
    [{ order_id: 'o', items: {} }],
    [{ order_id: 'o', items: [{ sku: 'a', qty: -1, price_cents: 1 }] }],
    [{ order_id: 'o', items: [{ sku: 'a', qty: 1 }] }],
    [{ order_id: 'o', items: [{ sku: 'a', qty: 1.5, price_cents: 1 }] }],
    [{ order_id: 'o', items: [{ sku: 'a', qty: 1, price_cents: 2 ** 60 }] }],
  ])('rejects ill-typed fields: %j', (order) => {
    const { h, failure } = run(order);
    expect(failure).toBeInstanceOf(Reject);
    expect(h.emitted).toEqual([]);
  });

  it('rejects an overflowing total', () => {
    const { h, failure } = run({
      order_id: 'o',
      items: [{ sku: 'a', qty: 2 ** 32 - 1, price_cents: Number.MAX_SAFE_INTEGER }],
    });
    expect(failure?.reason).toBe('order total overflows u64');
    expect(h.emitted).toEqual([]);
  });
});
