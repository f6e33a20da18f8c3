"""fraud-velocity's unit tests, natively under pytest (no Wasm)."""

from weir_sdk import Reject
from weir_sdk.testing import Harness, event

from handler import ALERT_SUBJECT, THRESHOLD, WINDOW_MS, handle


def txn(h: Harness, card: str, ts: int, seq: int):
    payload = f'{{"card":"{card}","amount_cents":1250,"ts":{ts}}}'
    return h.call(handle, event("payments", card, payload, event_time_ms=ts, sequence=seq))


def alerts(h: Harness):
    assert all(out.subject == ALERT_SUBJECT for out in h.emitted)
    return [out.json() for out in h.emitted]


def test_five_in_a_minute_do_not_alert_and_the_sixth_does():
    h = Harness()
    for i, ts in enumerate([0, 10_000, 20_000, 30_000, 40_000]):
        assert txn(h, "c1", 1_000_000 + ts, i + 1) is None
    assert h.emitted == []
    assert txn(h, "c1", 1_059_999, 6) is None
    assert alerts(h) == [
        {"card": "c1", "sequence": 6, "event_time_ms": 1_059_999, "in_window": THRESHOLD + 1}
    ]
    assert h.emitted[0].headers == [("content-type", "application/json")]


def test_the_window_excludes_its_start():
    h = Harness()
    for i, ts in enumerate([0, 10_000, 20_000, 30_000, 40_000, WINDOW_MS]):
        assert txn(h, "c1", ts, i) is None
    assert h.emitted == []
    assert h.json_state("c1", "recent") == [10_000, 20_000, 30_000, 40_000, 60_000]


def test_every_transaction_over_the_threshold_alerts_and_cards_are_separate():
    h = Harness()
    for i in range(8):
        txn(h, "c1", i * 1_000, i)
        txn(h, "c2", i * 20_000, 100 + i)
    assert [(a["card"], a["in_window"]) for a in alerts(h)] == [("c1", 6), ("c1", 7), ("c1", 8)]
    assert h.json_state("c1", "count") == 8
    assert h.json_state("c2", "count") == 8
    assert h.json_state("c2", "recent") == [100_000, 120_000, 140_000]


def test_out_of_order_times_count_against_their_own_window():
    h = Harness()
    for i, ts in enumerate([10_000, 60_000, 20_000, 50_000, 30_000, 40_000]):
        txn(h, "c1", ts, i)
    assert h.emitted == []
    assert h.json_state("c1", "max_ts") == 60_000
    txn(h, "c1", 65_000, 7)
    assert [a["in_window"] for a in alerts(h)] == [7]
    # Far too late: counted, but dropped at once and alone in its window.
    txn(h, "c1", 1_000, 8)
    assert h.json_state("c1", "count") == 8
    assert len(h.json_state("c1", "recent")) == 7
    assert len(h.emitted) == 1


def test_a_rejected_event_leaves_state_and_outputs_untouched():
    h = Harness()
    for i in range(3):
        txn(h, "c1", i * 1_000, i)
    before = [h.state("c1", name) for name in ("count", "max_ts", "recent")]
    failure = h.call(handle, event("payments", "c1", '{"card": "c1", ', event_time_ms=5_000))
    assert isinstance(failure, Reject), failure
    assert [h.state("c1", name) for name in ("count", "max_ts", "recent")] == before
    assert h.emitted == []


def test_corrupt_state_is_rejected_and_kept():
    h = Harness().with_state("c1", "recent", b"[1, 2,")
    failure = txn(h, "c1", 5_000, 1)
    assert isinstance(failure, Reject) and "'recent'" in failure.reason, failure
    assert h.state("c1", "recent") == b"[1, 2,"
    assert h.state("c1", "count") is None
