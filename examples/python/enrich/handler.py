"""enrich: a stateless function that adds totals to an order. The same
function as examples/enrich (Rust).

Input: a JSON object {"order_id": str, "items": [{"sku", "qty", "price_cents"}], ...}.
Output, on orders.enriched: the same object with every original field plus
total_cents (sum of qty * price_cents) and item_count (sum of qty). Anything
else is rejected, so the host dead-letters it with the reason.
"""

from typing import Any, Dict, Tuple

from weir_sdk import Event, Reject, emit, handler, log, trace

OUTPUT_SUBJECT = "orders.enriched"
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


@handler
def handle(event: Event) -> None:
    order = event.json()
    if not isinstance(order, dict):
        raise Reject("order is not a JSON object")
    with trace.span("totals") as span:
        total_cents, item_count = totals(order)
        span.set_attribute("item_count", str(item_count))
    log.debug(f"order {event.key}: {item_count} items, {total_cents} cents")
    order["total_cents"] = total_cents
    order["item_count"] = item_count
    emit.publish_json(OUTPUT_SUBJECT, order)


def is_uint(value: Any, largest: int) -> bool:
    # bool is an int in Python, but not a number in JSON.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= largest


def totals(order: Dict[str, Any]) -> Tuple[int, int]:
    """(total_cents, item_count) of a valid order."""
    if "order_id" not in order:
        raise Reject("order_id is missing")
    if not isinstance(order["order_id"], str):
        raise Reject("order_id is not a string")
    if "items" not in order:
        raise Reject("items is missing")
    items = order["items"]
    shape = "items is not a list of {sku: string, qty: u32, price_cents: u64}"
    if not isinstance(items, list):
        raise Reject(shape)
    total_cents = item_count = 0
    for item in items:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("sku"), str)
            and is_uint(item.get("qty"), U32_MAX)
            and is_uint(item.get("price_cents"), U64_MAX)
        ):
            raise Reject(shape)
        total_cents += item["qty"] * item["price_cents"]
        item_count += item["qty"]
    if total_cents > U64_MAX:
        raise Reject("order total overflows u64")
    return total_cents, item_count
