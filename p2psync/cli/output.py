"""JSON in and out of the CLI.

Record values are JSON on the command line. JSON has no byte strings, so a
byte string is shown as ``{"$base64": "..."}``, and such a one-key object
given as input becomes a byte string again.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import click

from p2psync.core import hlc
from p2psync.core.canonical import Value
from p2psync.errors import InvalidRecord
from p2psync.views.values import from_json, to_json

__all__ = ["from_json", "to_json"]  # (re-exported: the CLI's JSON in and out)

def parse_value(text: str, what: str = "value") -> Value:
    """Parse JSON text given by the user into a record value."""
    try:
        return from_json(json.loads(text))
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"{what} is not valid JSON: {exc.msg} at position {exc.pos}"
        ) from None
    except RecursionError:
        raise InvalidRecord(f"{what} nests too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InvalidRecord(f"{what} is not acceptable JSON: {exc}") from None


# Characters a terminal acts on or that reorder text (C1 controls, bidi overrides):
# records come from other sites, so they are escaped in everything we print.
#: DEL and C1 controls; bidi marks, embeddings and isolates (they reorder what is
#: shown); zero-width and invisible characters (they make two names look alike); the
#: Unicode line and paragraph separators (readers that split on them see a new line)
_UNSAFE = re.compile(
    "[\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff]"
)


def _escape(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def safe(text: str) -> str:
    """``text`` with control and reordering characters shown as ``\\uXXXX``."""
    text = "".join(c if c >= " " else f"\\u{ord(c):04x}" for c in text)
    return _escape(text)


def dumps(value: Any) -> str:
    """Compact JSON of a record value, safe to print."""
    return _escape(json.dumps(to_json(value), ensure_ascii=False, separators=(",", ":")))


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout (safe to print: see :func:`safe`)."""
    click.echo(_escape(json.dumps(to_json(document), indent=2, ensure_ascii=False)))


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """The count and its noun in agreement: ``1 entry``, ``2 entries``."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def describe_hlc(stamp: int) -> str:
    """ISO-8601 UTC time of a clock value, plus its counter when non-zero."""
    ms = hlc.wall_ms(stamp)
    text = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).isoformat(
        timespec="milliseconds"
    )
    counter = stamp & ((1 << hlc.LOGICAL_BITS) - 1)
    text = text.replace("+00:00", "Z")
    return f"{text}+{counter}" if counter else text


def describe_ms(ms: int) -> str:
    """ISO-8601 UTC time of a wall-clock instant in ms since the epoch."""
    return describe_hlc(hlc.from_wall(ms))


def short_time(ms: int) -> str:
    """A moment as a clerk reads it, in local time: ``9 Dec 14:02``."""
    moment = datetime.datetime.fromtimestamp(ms / 1000)
    return f"{moment.day} {moment:%b %H:%M}"


def count(number: int, noun: str, nouns: str | None = None) -> str:
    """Like :func:`plural`, with thousands separated: ``3,200 entries``."""
    return f"{number:,} {noun if number == 1 else nouns or noun + 's'}"
