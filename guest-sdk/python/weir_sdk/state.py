"""Keyed state: entries of the current event's key only.

Writes are applied only if the handler returns normally; the host commits
them with the input position, so each event's effect is applied once.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from . import _host
from .errors import Reject


def get(name: str) -> Optional[bytes]:
    """The value stored under `name`, or None."""
    return _host.current().state_get(name)


def set(name: str, value: bytes) -> None:  # noqa: A001 - mirrors the WIT name
    """Stores `value` under `name`."""
    _host.current().state_set(name, bytes(value))


def delete(name: str) -> None:
    """Removes `name`; removing a missing entry is not an error."""
    _host.current().state_delete(name)


def get_json(name: str) -> Any:
    """The entry `name` decoded from JSON, or None. An entry that does not
    decode is rejected, naming the entry."""
    raw = get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise Reject(f"state entry {name!r} is not valid JSON: {e}") from None


def set_json(name: str, value: Any) -> None:
    """Stores `value` as compact JSON under `name`."""
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise Reject(f"cannot encode state entry {name!r} as JSON: {e}") from None
    set(name, encoded.encode("utf-8"))
