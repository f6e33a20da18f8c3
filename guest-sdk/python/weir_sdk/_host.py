"""The slot through which the SDK reaches its host.

Inside a component the slot holds the WIT imports (`weir_sdk._component`);
under test it holds the in-memory host of a `weir_sdk.testing.Harness` call.
Outside either, every state, emit, log and trace call fails and says why.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Tuple


class Host(Protocol):
    """What a handler call can reach: the WIT imports of `weir:function`."""

    def state_get(self, name: str) -> Optional[bytes]: ...

    def state_set(self, name: str, value: bytes) -> None: ...

    def state_delete(self, name: str) -> None: ...

    def publish(self, subject: str, payload: bytes, headers: Sequence[Tuple[str, str]]) -> None: ...

    def log(self, level: str, message: str) -> None: ...

    def enter_span(self, name: str) -> int: ...

    def set_attribute(self, span: int, key: str, value: str) -> None: ...

    def exit_span(self, span: int) -> None: ...


_current: Optional[Host] = None


def install(host: Optional[Host]) -> Optional[Host]:
    """Puts `host` in the slot and returns what was there."""
    global _current
    previous, _current = _current, host
    return previous


def current() -> Host:
    if _current is None:
        raise RuntimeError(
            "weir_sdk: state, emit, log and trace work only during a handler call: "
            "in a deployed component, or inside weir_sdk.testing.Harness.call"
        )
    return _current
