"""The Python SDK and its harness behave as the host does."""

import pytest

from weir_sdk import Event, Reject, Retry, emit, handler, log, state, trace
from weir_sdk.testing import MAX_STATE_NAME_BYTES, Harness, event


def counting(ev: Event) -> None:
    state.set_json("n", (state.get_json("n") or 0) + 1)
    emit.publish("out", ev.payload, [("k", ev.key)])
    if ev.payload == b"fail":
        raise Retry("asked to fail")


def test_a_failed_call_discards_its_writes_and_emits_but_keeps_its_logs():
    def noisy(ev: Event) -> None:
        log.info("before")
        with trace.span("work"):
            counting(ev)

    h = Harness()
    assert h.call(noisy, event("in", "k", b"ok")) is None
    failure = h.call(noisy, event("in", "k", b"fail"))
    assert isinstance(failure, Retry) and failure.reason == "asked to fail"
    assert h.json_state("k", "n") == 1
    assert [e.payload for e in h.emitted] == [b"ok"]
    assert h.logs == [("info", "before"), ("info", "before")]
    assert [(s.name, s.closed) for s in h.spans] == [("work", True), ("work", True)]


def test_state_is_scoped_to_the_key():
    h = Harness()
    h.call(counting, event("in", "a", b"1"))
    h.call(counting, event("in", "a", b"2"))
    h.call(counting, event("in", "b", b"3"))
    assert (h.json_state("a", "n"), h.json_state("b", "n")) == (2, 1)


def test_an_uncaught_exception_is_retried_and_named():
    def buggy(ev: Event) -> None:
        state.set("x", b"1")
        {}["missing"]

    h = Harness()
    failure = h.call(buggy, event("in", "k", b""))
    assert isinstance(failure, Retry) and failure.reason == "uncaught KeyError: 'missing'"
    assert h.state("k", "x") is None


def test_state_names_the_host_refuses_fail_the_call_even_if_caught():
    def sneaky(ev: Event) -> None:
        state.set("ok", b"1")
        try:
            state.set("a" * (MAX_STATE_NAME_BYTES + 1), b"1")
        except Exception:
            pass

    h = Harness()
    failure = h.call(sneaky, event("in", "k", b""))
    assert isinstance(failure, Reject) and "longer than 256 bytes" in failure.reason
    assert h.state("k", "ok") is None
    assert isinstance(h.call(lambda ev: state.set("a\0b", b""), event("in", "k", b"")), Reject)


def test_deletes_and_corrupt_json_state():
    h = Harness().with_state("k", "bad", b"{").with_state("k", "gone", b"1")
    assert h.call(lambda ev: state.delete("gone"), event("in", "k", b"")) is None
    assert h.state("k", "gone") is None
    failure = h.call(lambda ev: state.get_json("bad"), event("in", "k", b""))
    assert isinstance(failure, Reject) and "'bad'" in failure.reason


def test_events_decode_and_find_headers_in_any_case():
    ev = event("in", "k", b'{"a": 1}', headers=[("Content-Type", "x")], event_time_ms=5, sequence=9)
    assert (ev.json(), ev.header("content-type"), ev.header("other")) == ({"a": 1}, "x", None)
    with pytest.raises(Reject, match="not valid JSON"):
        event("in", "k", b"{").json()
    with pytest.raises(Reject, match="not UTF-8"):
        event("in", "k", b"\xff").text()


def test_spans_nest_and_a_parent_closes_its_children():
    def spans(ev: Event) -> None:
        outer = trace.span("outer")
        inner = trace.span("inner")
        inner.set_attribute("n", 3)
        outer.end()
        inner.set_attribute("late", "ignored")

    h = Harness()
    h.call(spans, event("in", "k", b""))
    assert [(s.name, s.parent, s.closed, s.attributes) for s in h.spans] == [
        ("outer", None, True, {}),
        ("inner", 0, True, {"n": "3"}),
    ]


def test_outside_a_call_the_sdk_says_why():
    with pytest.raises(RuntimeError, match="only during a handler call"):
        state.get("x")


def test_calls_do_not_nest():
    h = Harness()
    with pytest.raises(RuntimeError, match="cannot be nested"):
        h.call(lambda ev: h.call(counting, ev), event("in", "k", b""))


def test_publish_json_and_bad_json_values():
    h = Harness()
    assert h.call(lambda ev: emit.publish_json("out", {"b": [1, 2]}), event("in", "k", b"")) is None
    assert (h.emitted[0].payload, h.emitted[0].headers) == (b'{"b":[1,2]}', [("content-type", "application/json")])
    failure = h.call(lambda ev: emit.publish_json("out", {"x": object()}), event("in", "k", b""))
    assert isinstance(failure, Reject) and "cannot encode" in failure.reason


def test_one_handler_per_component():
    import weir_sdk

    saved = weir_sdk._handler
    try:
        weir_sdk._handler = None
        first = handler(counting)
        assert first is counting and handler(counting) is counting
        with pytest.raises(RuntimeError, match="one handler"):
            handler(lambda ev: None)
    finally:
        weir_sdk._handler = saved


def test_a_refused_state_name_fails_the_call_whatever_the_handler_raises_after():
    def retrying(ev: Event) -> None:
        try:
            state.set("a\0b", b"")
        except Exception:
            log.info("after the refusal")
            raise Retry("db")

    h = Harness()
    failure = h.call(retrying, event("in", "k", b""))
    assert isinstance(failure, Reject) and "state limit" in failure.reason
    assert h.logs == []


def test_an_async_handler_is_rejected_not_taken_for_success():
    async def handle(ev: Event) -> None:
        state.set("x", b"1")

    h = Harness()
    failure = h.call(handle, event("in", "k", b""))
    assert isinstance(failure, Reject) and "synchronous" in failure.reason
    assert h.state("k", "x") is None


def test_json_is_compact_utf8_and_refuses_nan():
    h = Harness()
    assert h.call(lambda ev: emit.publish_json("out", {"name": "Zoë ☃"}), event("in", "k", b"")) is None
    assert h.emitted[0].payload == '{"name":"Zoë ☃"}'.encode()
    failure = h.call(lambda ev: state.set_json("x", float("nan")), event("in", "k", b""))
    assert isinstance(failure, Reject) and "cannot encode" in failure.reason


def test_reasons_are_strings():
    def odd(ev: Event) -> None:
        raise Reject(42)  # type: ignore[arg-type]

    failure = Harness().call(odd, event("in", "k", b""))
    assert isinstance(failure, Reject) and failure.reason == "42"
