"""enrich's unit tests, natively under pytest (no Wasm)."""

import json

import pytest

from weir_sdk import Reject
from weir_sdk.testing import Harness, event

from handler import OUTPUT_SUBJECT, U64_MAX, handle


def run(payload):
    h = Harness()
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return h, h.call(handle, event("orders.new", "o-1", data))


def test_valid_order_gets_exact_totals_and_keeps_its_fields():
    order = {
        "order_id": "o-1",
        "customer": {"id": 7, "tier": "gold"},
        "items": [
            {"sku": "a", "qty": 2, "price_cents": 1999},
            {"sku": "b", "qty": 3, "price_cents": 250, "note": "gift"},
            {"sku": "c", "qty": 0, "price_cents": 100000},
        ],
    }
    h, failure = run(order)
    assert failure is None
    [out] = h.emitted
    assert out.subject == OUTPUT_SUBJECT
    assert out.json() == {**order, "total_cents": 2 * 1999 + 3 * 250, "item_count": 5}
    [span] = h.spans
    assert (span.name, span.attributes, span.closed) == ("totals", {"item_count": "5"}, True)
    assert h.logs == [("debug", "order o-1: 5 items, 4748 cents")]


def test_empty_items_give_zero_totals():
    h, failure = run({"order_id": "o-2", "items": []})
    assert failure is None
    out = h.emitted[0].json()
    assert (out["total_cents"], out["item_count"]) == (0, 0)


def test_malformed_json_is_rejected_with_no_output():
    h, failure = run(b'{"order_id": "o-1", "items": [')
    assert isinstance(failure, Reject) and failure.reason.startswith("payload is not valid JSON")
    assert h.emitted == []


def test_missing_items_is_rejected():
    h, failure = run({"order_id": "o-1"})
    assert isinstance(failure, Reject) and failure.reason == "items is missing"
    assert h.emitted == []


@pytest.mark.parametrize(
    "order",
    [
        [1, 2],
        {"items": []},
        {"order_id": 5, "items": []},
        {"order_id": "o", "items": {}},
        {"order_id": "o", "items": [{"sku": "a", "qty": -1, "price_cents": 1}]},
        {"order_id": "o", "items": [{"sku": "a", "qty": 1}]},
        {"order_id": "o", "items": [{"sku": "a", "qty": True, "price_cents": 1}]},
        {"order_id": "o", "items": [{"sku": "a", "qty": 1.5, "price_cents": 1}]},
    ],
)
def test_ill_typed_fields_are_rejected(order):
    h, failure = run(order)
    assert isinstance(failure, Reject), (order, failure)
    assert h.emitted == []


def test_overflowing_total_is_rejected():
    h, failure = run({"order_id": "o", "items": [{"sku": "a", "qty": 2, "price_cents": U64_MAX // 2 + 1}]})
    assert isinstance(failure, Reject) and failure.reason == "order total overflows u64"
    assert h.emitted == []
