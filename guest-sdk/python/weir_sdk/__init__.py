"""Write Weir stream functions in Python.

    from weir_sdk import Event, Reject, emit, handler, state

    @handler
    def handle(event: Event) -> None:
        order = event.json()                      # bad JSON -> Reject
        seen = (state.get_json("seen") or 0) + 1  # state of event.key only
        state.set_json("seen", seen)
        emit.publish_json("orders.seen", order)

The module is built into a component for `weir:function/event-handler` with
`python -m weir_sdk.build <module>` (componentize-py), and tested natively
with `weir_sdk.testing.Harness` under pytest.
"""

from __future__ import annotations

from typing import Callable, Optional

from . import emit, log, state, trace
from .errors import HandlerError, Reject, Retry
from .event import Event

__all__ = [
    "Event",
    "HandlerError",
    "Reject",
    "Retry",
    "emit",
    "handler",
    "log",
    "state",
    "trace",
]

Handler = Callable[[Event], None]

_handler: Optional[Handler] = None


def handler(fn: Handler) -> Handler:
    """Declares `fn` as the function's handler: called once per event, it
    returns normally or raises `Retry` / `Reject`. A component has one."""
    global _handler
    if _handler is not None and _handler is not fn:
        raise RuntimeError(
            f"weir_sdk: a component has one handler; {_handler.__qualname__} "
            f"is already declared, so {fn.__qualname__} cannot be"
        )
    _handler = fn
    return fn


def registered_handler() -> Handler:
    """The handler `@handler` declared; raises if there is none."""
    if _handler is None:
        raise RuntimeError("weir_sdk: no function is declared with @weir_sdk.handler")
    return _handler
