"""One input record as the handler sees it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from .errors import Reject


@dataclass
class Event:
    """An event read from JetStream, with the key and time the binding extracted.

    `sequence` is the record's stream sequence: unique per stream and stable
    across redelivery, so it identifies the event.
    """

    subject: str
    key: str
    payload: bytes
    headers: List[Tuple[str, str]] = field(default_factory=list)
    event_time_ms: int = 0
    sequence: int = 0

    def text(self) -> str:
        """The payload as UTF-8; an event that is not is rejected."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(f"payload is not UTF-8: {e}") from None

    def json(self) -> Any:
        """The payload decoded from JSON; an event that does not decode is rejected."""
        try:
            return json.loads(self.payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise Reject(f"payload is not valid JSON: {e}") from None

    def header(self, name: str) -> Optional[str]:
        """The first header called `name`, in any case."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)
