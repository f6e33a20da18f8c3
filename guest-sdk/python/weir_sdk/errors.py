"""How a handler says it did not finish an event.

`Retry` is a passing failure: the host backs off and delivers the event
again (and dead-letters it after the binding's last attempt). `Reject` means
the event can never succeed: the host dead-letters it now, with the reason.
Either way none of the call's state writes or outputs are applied.
"""

from __future__ import annotations

import inspect


class HandlerError(Exception):
    """A handler's failure with a reason the host records."""

    kind = "retry"

    def __init__(self, reason: str) -> None:
        # The WIT reason is a string: anything else would trap when lowered.
        text = str(reason)
        super().__init__(text)
        self.reason = text


class Retry(HandlerError):
    """Deliver this event again after a back-off."""

    kind = "retry"


class Reject(HandlerError):
    """This event can never succeed: dead-letter it now with the reason."""

    kind = "reject"


def returned_failure(result: object) -> "HandlerError | None":
    """What the host is told for what a handler returned: a coroutine (an
    `async def` handler) would never run, so it is rejected, not taken for
    success."""
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()
        return Reject("a handler is synchronous: it returned an awaitable (async def?)")
    return None


def failure_of(error: BaseException) -> HandlerError:
    """What the host is told for an exception a handler raised.

    `Retry` and `Reject` pass as they are. Any other exception is a bug the
    host cannot tell from a passing failure, so it is retried like a trap
    would be, with the exception named in the reason the dead letter keeps.
    """
    if isinstance(error, HandlerError):
        return error
    return Retry(f"uncaught {type(error).__name__}: {error}")
