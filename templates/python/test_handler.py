from weir_sdk import Reject
from weir_sdk.testing import Harness, event

from handler import OUTPUT_SUBJECT, handle


def test_counts_each_key_and_publishes_the_count():
    h = Harness()
    for sequence, key in [(1, "a"), (2, "b"), (3, "a")]:
        assert h.call(handle, event("in", key, '{"n": 1}', sequence=sequence)) is None
    assert h.json_state("a", "count") == 2
    assert h.emitted[2].subject == OUTPUT_SUBJECT
    assert h.emitted[2].json() == {"key": "a", "count": 2, "sequence": 3}


def test_an_event_that_is_not_json_is_rejected_and_changes_nothing():
    h = Harness().with_json_state("a", "count", 5)
    assert isinstance(h.call(handle, event("in", "a", "{oops")), Reject)
    assert h.json_state("a", "count") == 5
    assert h.emitted == []
