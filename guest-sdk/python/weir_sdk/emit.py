"""Output records, to the subjects the function's binding declares.

The host publishes a call's records only if the handler returns normally;
publishing to an undeclared subject fails the invocation.
"""

from __future__ import annotations

import json
from typing import Any, Sequence, Tuple, Union

from . import _host
from .errors import Reject

JSON_HEADERS = (("content-type", "application/json"),)


def publish(
    subject: str, payload: Union[bytes, str], headers: Sequence[Tuple[str, str]] = ()
) -> None:
    """Publishes `payload` (bytes, or text sent as UTF-8) with `headers` to `subject`."""
    data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    _host.current().publish(subject, data, [(str(k), str(v)) for k, v in headers])


def publish_json(subject: str, value: Any) -> None:
    """Publishes `value` as compact JSON, with `content-type: application/json`."""
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise Reject(f"cannot encode the record for {subject!r} as JSON: {e}") from None
    publish(subject, encoded.encode("utf-8"), JSON_HEADERS)
