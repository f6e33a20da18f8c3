// enrich: a stateless function that adds totals to an order. The same function
// as examples/enrich (Rust).
//
// Input: a JSON object {"order_id": string, "items": [{"sku", "qty", "price_cents"}], ...}.
// Output, on orders.enriched: the same object with every original field plus
// total_cents (sum of qty * price_cents) and item_count (sum of qty). Anything
// else is rejected, so the host dead-letters it with the reason.
//
// Totals are BigInt, since a u64 total exceeds 2^53 where a number would round;
// inputs must be below 2^53, where JSON.parse reads them exactly (a larger
// price_cents is rejected rather than rounded).
import { type Event, Reject, emit, handler, log, trace } from '@weir/sdk';

export const OUTPUT_SUBJECT = 'orders.enriched';
const U32_MAX = 2 ** 32 - 1;
const U64_MAX = 2n ** 64n - 1n;
const SHAPE = 'items is not a list of {sku: string, qty: u32, price_cents: u64}';

type Order = Record<string, unknown>;

export const handle = handler((event: Event) => {
  const order = event.json<unknown>();
  if (typeof order !== 'object' || order === null || Array.isArray(order)) {
    throw new Reject('order is not a JSON object');
  }
  const { totalCents, itemCount } = trace.inSpan('totals', (span) => {
    const sums = totals(order as Order);
    span.setAttribute('item_count', sums.itemCount.toString());
    return sums;
  });
  log.debug(`order ${event.key}: ${itemCount} items, ${totalCents} cents`);
  emit.publish(OUTPUT_SUBJECT, withTotals(order as Order, totalCents, itemCount), [
    ['content-type', 'application/json'],
  ]);
});

/** `order` as JSON with the totals set. JSON.stringify cannot write a BigInt,
 * so their exact digits are appended to the rest of the object. */
function withTotals(order: Order, totalCents: bigint, itemCount: bigint): string {
  const { total_cents: _total, item_count: _count, ...rest } = order;
  const head = JSON.stringify(rest).slice(0, -1);
  const comma = head === '{' ? '' : ',';
  return `${head}${comma}"total_cents":${totalCents},"item_count":${itemCount}}`;
}

/** A whole number in [0, largest] that JSON.parse read exactly (below 2^53). */
function isUint(value: unknown, largest: number): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0 && (value as number) <= largest;
}

/** The totals of a valid order. */
export function totals(order: Order): { totalCents: bigint; itemCount: bigint } {
  if (!('order_id' in order)) throw new Reject('order_id is missing');
  if (typeof order.order_id !== 'string') throw new Reject('order_id is not a string');
  if (!('items' in order)) throw new Reject('items is missing');
  const items = order.items;
  if (!Array.isArray(items)) throw new Reject(SHAPE);
  let totalCents = 0n;
  let itemCount = 0n;
  for (const item of items) {
    if (
      typeof item !== 'object' || item === null ||
      typeof item.sku !== 'string' ||
      !isUint(item.qty, U32_MAX) ||
      !isUint(item.price_cents, Number.MAX_SAFE_INTEGER)
    ) {
      throw new Reject(SHAPE);
    }
    totalCents += BigInt(item.qty) * BigInt(item.price_cents);
    itemCount += BigInt(item.qty);
  }
  if (totalCents > U64_MAX) throw new Reject('order total overflows u64');
  return { totalCents, itemCount };
}
