"""Run a handler natively, as the host would, under pytest or any runner.

    from weir_sdk.testing import Harness, event

    def test_counts():
        h = Harness().with_json_state("k1", "seen", 41)
        h.call(handle, event("orders.new", "k1", b'{"id": 1}', event_time_ms=1_000))
        assert h.json_state("k1", "seen") == 42
        assert h.emitted[0].json()["id"] == 1

A call's state is scoped to the event's key, and its state writes and
emitted records are kept only if the handler returns normally; log lines
and spans are kept either way. `call` returns None or the `Retry` /
`Reject` the host would have been told (an uncaught exception is a
`Retry` naming it, as in a component).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import _host
from .errors import HandlerError, Reject, failure_of, returned_failure
from .event import Event

#: The host's limit on a state entry's name, in UTF-8 bytes.
MAX_STATE_NAME_BYTES = 256


def event(
    subject: str,
    key: str,
    payload: Union[bytes, str],
    *,
    event_time_ms: int = 0,
    sequence: int = 0,
    headers: Sequence[Tuple[str, str]] = (),
) -> Event:
    """An event as the host would pass it."""
    data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    return Event(subject, key, data, list(headers), event_time_ms, sequence)


@dataclass
class Emitted:
    """A record a successful call published."""

    subject: str
    payload: bytes
    headers: List[Tuple[str, str]]

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class RecordedSpan:
    name: str
    parent: Optional[int]
    attributes: Dict[str, str] = field(default_factory=dict)
    closed: bool = False


class HarnessMisuse(RuntimeError):
    """A test used the harness wrongly; raised out of the call, not reported as its failure."""


class _StateLimit(Exception):
    """A state write the host would refuse; the call fails as the host's would."""


@dataclass
class _Call:
    state: Dict[str, bytes]
    emitted: List[Emitted] = field(default_factory=list)
    spans: List[RecordedSpan] = field(default_factory=list)
    open: List[int] = field(default_factory=list)
    logs: List[Tuple[str, str]] = field(default_factory=list)
    refused: Optional[str] = None
    #: How many log lines there were at the refused write.
    logs_at_refusal: int = 0

    # The Host protocol.
    def state_get(self, name: str) -> Optional[bytes]:
        return self.state.get(name)

    def state_set(self, name: str, value: bytes) -> None:
        problem = _name_problem(name)
        if problem:
            if self.refused is None:
                self.refused, self.logs_at_refusal = problem, len(self.logs)
            raise _StateLimit(problem)
        self.state[name] = bytes(value)

    def state_delete(self, name: str) -> None:
        self.state.pop(name, None)

    def publish(self, subject: str, payload: bytes, headers: Sequence[Tuple[str, str]]) -> None:
        self.emitted.append(Emitted(subject, bytes(payload), list(headers)))

    def log(self, level: str, message: str) -> None:
        self.logs.append((level, message))

    def enter_span(self, name: str) -> int:
        parent = self.open[-1] if self.open else None
        self.spans.append(RecordedSpan(name, parent))
        self.open.append(len(self.spans) - 1)
        return len(self.spans)  # handles start at 1; 0 is the inert handle

    def set_attribute(self, span: int, key: str, value: str) -> None:
        if span - 1 in self.open:
            self.spans[span - 1].attributes[key] = value

    def exit_span(self, span: int) -> None:
        if span - 1 in self.open:
            cut = self.open.index(span - 1)
            for index in self.open[cut:]:
                self.spans[index].closed = True
            del self.open[cut:]


def _name_problem(name: str) -> Optional[str]:
    if "\0" in name:
        return f"state name {name!r} holds U+0000"
    if len(name.encode("utf-8")) > MAX_STATE_NAME_BYTES:
        return f"state name is longer than {MAX_STATE_NAME_BYTES} bytes"
    return None


class Harness:
    """In-memory state per key, the records successful calls emitted, and
    every log line and span."""

    def __init__(self) -> None:
        self._state: Dict[str, Dict[str, bytes]] = {}
        self.emitted: List[Emitted] = []
        self.logs: List[Tuple[str, str]] = []
        self.spans: List[RecordedSpan] = []

    def with_state(self, key: str, name: str, value: bytes) -> "Harness":
        self._state.setdefault(key, {})[name] = bytes(value)
        return self

    def with_json_state(self, key: str, name: str, value: Any) -> "Harness":
        return self.with_state(key, name, json.dumps(value).encode("utf-8"))

    def call(self, handle: Callable[[Event], object], ev: Event) -> Optional[HandlerError]:
        """Runs `handle(ev)` as one host call scoped to `ev.key`."""
        return self.call_as(ev.key, lambda: handle(ev))

    def call_as(self, key: str, run: Callable[[], object]) -> Optional[HandlerError]:
        """Runs `run` as one host call scoped to `key`."""
        context = _Call(state=dict(self._state.get(key, {})))
        previous = _host.install(context)
        if previous is not None:
            _host.install(previous)
            raise HarnessMisuse("Harness.call cannot be nested inside another handler call")
        failure: Optional[HandlerError] = None
        try:
            failure = returned_failure(run())
        except HarnessMisuse:
            raise
        except _StateLimit as e:
            failure = Reject(f"state limit: {e}")
        except Exception as e:
            failure = failure_of(e)
        finally:
            _host.install(None)
        if context.refused is not None:
            # The host ends the call at the refused write (a trap the guest
            # cannot catch): whatever the handler did after it does not count.
            failure = Reject(f"state limit: {context.refused}")
            del context.logs[context.logs_at_refusal :]
        self.logs.extend(context.logs)
        offset = len(self.spans)
        for span in context.spans:
            if span.parent is not None:
                span.parent += offset
            self.spans.append(span)
        if failure is None:
            if context.state:
                self._state[key] = context.state
            else:
                self._state.pop(key, None)
            self.emitted.extend(context.emitted)
        return failure

    def state(self, key: str, name: str) -> Optional[bytes]:
        return self._state.get(key, {}).get(name)

    def json_state(self, key: str, name: str) -> Any:
        raw = self.state(key, name)
        return None if raw is None else json.loads(raw)

    def take_emitted(self) -> List[Emitted]:
        taken, self.emitted = self.emitted, []
        return taken
