"""Canonical CBOR: the one encoder for everything p2psync signs or hashes.

Canonical means RFC 7049 section 3.9 ("canonical CBOR"), as produced by
``cbor2.dumps(obj, canonical=True)``: shortest integer and length heads,
definite lengths only, map keys sorted length-first then bytewise, floats in
the shortest of half/single/double precision that keeps the value exactly.

Strict decoding refuses anything that is not the canonical encoding of its own
value: trailing bytes, duplicate map keys, indefinite lengths, over-long heads,
unsorted keys and tags all fail the re-encoding comparison or the decoder.

Record values use a small data model so that every implementation can carry
them: ``None``, ``bool``, integers in the CBOR major-type 0/1 range, finite
floats, text, byte strings, arrays and maps with text keys, nested at most
:data:`MAX_VALUE_DEPTH` deep.
"""

from __future__ import annotations

import math
from typing import Any, TypeAlias

import cbor2

from p2psync.errors import (
    DecodeError,
    InvalidRecord,
    NestingError,
    NonCanonicalError,
    RemoteProtocolError,
)

Value: TypeAlias = bool | int | float | str | bytes | list["Value"] | dict[str, "Value"] | None

#: Containers a record value may nest (a flat map is depth 1).
MAX_VALUE_DEPTH = 32

_INT_MIN = -(1 << 64)
_INT_MAX = (1 << 64) - 1


def encode(obj: Any) -> bytes:
    """Return the canonical CBOR encoding of ``obj``."""
    return cbor2.dumps(obj, canonical=True)


def decode(data: bytes, *, what: str, max_depth: int) -> Any:
    """Decode ``data`` and insist it is the canonical encoding of its value.

    ``what`` names the thing for error messages; ``max_depth`` bounds nesting
    before anything deep is built.
    """
    obj = loads_strict(data, what=what, max_depth=max_depth)
    if cbor2.dumps(obj, canonical=True) != data:
        raise NonCanonicalError(f"{what} is not canonical CBOR")
    return obj


def decode_ordered(data: bytes, *, what: str, max_depth: int) -> Any:
    """Like :func:`decode`, for structures whose map keys the caller checks itself.

    The comparison uses the plain encoder, which keeps the decoded key order:
    valid only where the caller then checks that every map's keys are in
    canonical order and that no floats occur (both true for entry bodies and
    envelopes). About twice as fast as :func:`decode`.
    """
    obj = loads_strict(data, what=what, max_depth=max_depth)
    if cbor2.dumps(obj) != data:
        raise NonCanonicalError(f"{what} is not canonical CBOR")
    return obj


def _refuse_tag(*_args: Any) -> Any:
    raise cbor2.CBORDecodeError("CBOR tags are not allowed")


# cbor2 acts on these tags itself (shared references, bignums, fractions, sets,
# dates, ...) before anything of ours runs; some of them cost time or memory out
# of all proportion to their size. Mapping every one of them (and tag_hook, for
# the rest) to a refusal makes the decoder stop at the first tag it meets.
# The list is what cbor2 6 handles; tests/test_canonical.py checks it is complete.
_CBOR2_TAGS = (
    0,
    1,
    2,
    3,
    4,
    5,
    25,
    28,
    29,
    30,
    35,
    36,
    37,
    52,
    54,
    100,
    256,
    258,
    260,
    261,
    1004,
    43000,
    55799,
)
_NO_TAGS = {tag: _refuse_tag for tag in (*range(300), *_CBOR2_TAGS)}


def loads_strict(data: bytes, *, what: str, max_depth: int) -> Any:
    """Decode one CBOR item, refusing tags, duplicate keys, indefinite lengths and
    deep nesting. Does *not* check canonical form or trailing bytes: callers
    compare a re-encoding (see :func:`decode`) or check the length."""
    try:
        return cbor2.loads(
            data,
            allow_duplicate_keys=False,
            allow_indefinite=False,
            max_depth=max_depth,
            semantic_decoders=_NO_TAGS,
            tag_hook=_refuse_tag,
        )
    except cbor2.CBORDecodeError as exc:
        if "nesting depth" in str(exc):
            raise NestingError(f"{what} nests deeper than {max_depth} levels") from exc
        raise DecodeError(f"{what} is not valid CBOR: {exc}") from exc
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise DecodeError(f"{what} is not valid CBOR: {exc}") from exc


def check_value(value: Any, *, what: str = "value", received: bool = False) -> bool:
    """Check that ``value`` fits the record data model; True when it holds floats.

    Raises :class:`InvalidRecord` for local callers, or :class:`DecodeError` /
    :class:`NestingError` when ``received`` (the value came from elsewhere).
    Received maps must also list their keys in canonical order.
    """
    return _check(value, 0, what, received)


def _check(item: Any, depth: int, what: str, received: bool) -> bool:
    kind = type(item)
    if kind is str:
        if not received:  # decoded text is always valid; local text may not be
            _check_text(item, what)
        return False
    if kind is bytes or kind is bool or item is None:
        return False
    if kind is int:
        if not _INT_MIN <= item <= _INT_MAX:
            _fail(f"{what} holds an integer outside the 64-bit range", received)
        return False
    if kind is float:
        if not math.isfinite(item):
            _fail(f"{what} holds a NaN or infinite number", received)
        return True
    if kind is not list and kind is not dict:
        _fail(f"{what} holds an unsupported type {kind.__name__}", received)
    if depth >= MAX_VALUE_DEPTH:
        message = f"{what} nests deeper than {MAX_VALUE_DEPTH} levels"
        if received:
            raise NestingError(message)
        raise InvalidRecord(message)
    has_float = False
    if kind is list:
        for child in item:
            child_kind = type(child)
            if child_kind is bytes or child_kind is bool or child is None:
                continue
            if child_kind is str and received:
                continue
            has_float = _check(child, depth + 1, what, received) or has_float
        return has_float
    previous: str | None = None
    previous_size = 0
    for key, child in item.items():
        if type(key) is not str:
            _fail(f"{what} has a map key that is not text", received)
        if not received:
            _check_text(key, what)
        else:
            # canonical order: shorter UTF-8 encoding first, then bytewise, which
            # for equal lengths is code point order
            size = len(key) if key.isascii() else len(key.encode())
            if previous is not None and (
                size < previous_size or (size == previous_size and key <= previous)
            ):
                raise NonCanonicalError(f"{what} has map keys out of canonical order")
            previous, previous_size = key, size
        child_kind = type(child)
        if child_kind is bytes or child_kind is bool or child is None:
            continue
        if child_kind is str and received:
            continue
        has_float = _check(child, depth + 1, what, received) or has_float
    return has_float


def _check_text(text: str, what: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidRecord(f"{what} holds text that is not valid Unicode") from None


def _fail(message: str, received: bool) -> None:
    if received:
        raise DecodeError(message)
    raise InvalidRecord(message)


def decode_signed(data: bytes, *, what: str, signature_bytes: int = 64) -> tuple[bytes, bytes]:
    """``(body, signature)`` of a signed object's canonical ``[body, signature]``
    (two byte strings, the signature of ``signature_bytes``); :class:`DecodeError`
    otherwise. The body is left for its own strict decoding."""
    pair = decode(data, what=what, max_depth=1)
    if (
        type(pair) is not list
        or len(pair) != 2
        or type(pair[0]) is not bytes
        or type(pair[1]) is not bytes
        or len(pair[1]) != signature_bytes
    ):
        raise DecodeError(f"{what} is [body, signature({signature_bytes})]")
    return pair[0], pair[1]


def message_body(data: bytes, *, what: str, max_bytes: int) -> list[Any]:
    """A peer's protocol message (a sync or relay message) as the array it is:
    at most ``max_bytes``, canonical CBOR of an array of byte/text strings, ints,
    bools and null whose first element is its type. Anything else is a
    :class:`RemoteProtocolError` saying what, in words naming ``what``."""
    if len(data) > max_bytes:
        raise RemoteProtocolError(f"{what} of {len(data)} bytes exceeds {max_bytes}")
    try:
        body = loads_strict(data, what=what, max_depth=3)
    except DecodeError as exc:
        raise RemoteProtocolError(f"undecodable {what}: {exc}") from exc
    if type(body) is not list or not body or type(body[0]) is not int:
        raise RemoteProtocolError(f"a {what} is an array starting with its type")
    # Arrays of byte/text strings, ints, bools and null only: the plain encoder
    # reproduces canonical input exactly.
    if cbor2.dumps(body) != data:
        raise RemoteProtocolError(f"{what} is not canonical CBOR")
    return body
