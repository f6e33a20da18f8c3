"""Spans of the handler's own work, nested under the host's span of the
invocation in the same trace.

    with trace.span("score") as span:
        span.set_attribute("rules", "12")
        ...

When the event is not traced the host hands out an inert handle (0): the
setters and the close are then skipped.
"""

from __future__ import annotations

from types import TracebackType
from typing import Optional, Type

from . import _host


class Span:
    """An open span. Closing it closes every span opened inside it too."""

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self._open = handle != 0

    def set_attribute(self, key: str, value: str) -> None:
        if self._open:
            _host.current().set_attribute(self.handle, key, str(value))

    def end(self) -> None:
        if self._open:
            self._open = False
            _host.current().exit_span(self.handle)

    def __enter__(self) -> "Span":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.end()


def span(name: str) -> Span:
    """Opens a span named `name` inside the innermost span still open."""
    return Span(_host.current().enter_span(name))
