"""The component side: binds the SDK to the WIT imports and exports the
`weir:function/event-handler` world as componentize-py expects (a
`WitWorld` class in the app module).

Imported only by the entry module that `weir_sdk.build` generates, where
componentize-py provides `wit_world`; never imported under test.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from componentize_py_types import Err  # type: ignore[import-not-found]
from wit_world.imports import emit, log, state, trace, types  # type: ignore[import-not-found]

from . import _host, registered_handler
from .errors import failure_of, returned_failure
from .event import Event

_LEVELS = {
    "trace": log.Level.TRACE,
    "debug": log.Level.DEBUG,
    "info": log.Level.INFO,
    "warn": log.Level.WARN,
    "error": log.Level.ERROR,
}


class _WitHost:
    def state_get(self, name: str) -> Optional[bytes]:
        return state.get(name)

    def state_set(self, name: str, value: bytes) -> None:
        state.set(name, value)

    def state_delete(self, name: str) -> None:
        state.delete(name)

    def publish(self, subject: str, payload: bytes, headers: Sequence[Tuple[str, str]]) -> None:
        emit.publish(subject, payload, list(headers))

    def log(self, level: str, message: str) -> None:
        log.log(_LEVELS[level], message)

    def enter_span(self, name: str) -> int:
        return trace.enter_span(name)

    def set_attribute(self, span: int, key: str, value: str) -> None:
        trace.set_attribute(span, key, value)

    def exit_span(self, span: int) -> None:
        trace.exit_span(span)


_host.install(_WitHost())


class WitWorld:
    def handle(self, event: "types.Event") -> None:
        handle = registered_handler()
        try:
            returned = handle(
                Event(
                    subject=event.subject,
                    key=event.key,
                    payload=event.payload,
                    headers=list(event.headers),
                    event_time_ms=event.event_time_ms,
                    sequence=event.sequence,
                )
            )
            refused = returned_failure(returned)
            if refused is not None:
                raise refused
        except Exception as e:  # every failure reaches the host as retry or reject
            failure = failure_of(e)
            if failure.kind == "reject":
                raise Err(types.Error_Reject(failure.reason)) from None
            raise Err(types.Error_Retry(failure.reason)) from None
