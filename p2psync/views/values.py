"""Record values as JSON, for the CLI and the HTTP API alike.

JSON has no byte strings, so a byte string is shown as ``{"$base64": "..."}``, and
such a one-key object given as input becomes a byte string again. NaN and
Infinity are refused (the value model has no such numbers)."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

from p2psync.core.canonical import Value
from p2psync.errors import InvalidRecord

_BYTES_KEY = "$base64"


def to_json(value: Any) -> Any:
    """A JSON-ready copy of a record value (bytes as ``{"$base64": ...}``)."""
    if isinstance(value, bytes):
        return {_BYTES_KEY: base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def from_json(value: Any) -> Value:
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES_KEY in value and isinstance(value[_BYTES_KEY], str):
            try:
                return base64.b64decode(value[_BYTES_KEY], validate=True)
            except binascii.Error as exc:
                raise InvalidRecord(f"invalid base64 in {_BYTES_KEY}: {exc}") from exc
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRecord("NaN and Infinity are not allowed in values")
    result: Value = value
    return result
