"""Receipts: the recipient's signed word on which envelopes it applied or refused.

A receipt is "the next Have" of the relay (DESIGN §7): the recipient of data
envelopes signs which of the sender's sequence numbers it applied and which it
refused (with a reason), and its heads; it travels back sealed to the sender as
an envelope of class receipt. It is signed on its own (not only by its
envelope), so the sender can keep it as proof in its delivery ledger::

    signed = CBOR [body, Ed25519(signer, "p2psync/v1/receipt" 00 || body)]
    body   = CBOR {0: 1, 1: signer, 2: peer, 3: [seq, ...], 4: [[seq, reason], ...],
                   5: [[author, seq, head, frozen], ...], 6: ms}

``signer`` is the recipient of the acknowledged envelopes, ``peer`` their
sender; applied and refused sequence numbers are ascending and disjoint; heads
are rows as in the sync message ``Have`` (``core/messages.py``), ascending by
author. Full description in ``docs/relay.md`` ("Receipts"). Malformed receipts
raise :class:`~p2psync.errors.EnvelopeError`, a bad signature
:class:`~p2psync.errors.EnvelopeSignatureError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2psync.core import canonical
from p2psync.core.envelope import MAX_PAYLOAD_BY_CLASS, Envelope, EnvelopeClass
from p2psync.core.identity import KEY_BYTES, SIGNATURE_BYTES, Identity, short_id, verify
from p2psync.core.messages import MAX_REASON_CHARS, Head, heads_of_rows
from p2psync.errors import (
    DecodeError,
    EnvelopeError,
    EnvelopeMismatchError,
    EnvelopeSignatureError,
    UsageError,
)

RECEIPT_PREFIX = b"p2psync/v1/receipt\x00"
VERSION = 1
#: Most applied sequence numbers one receipt lists.
MAX_APPLIED = 4096
#: Most refused envelopes one receipt lists (each with a reason of up to
#: MAX_REASON_CHARS characters): with MAX_AUTHORS heads, a receipt stays inside
#: the largest receipt payload.
MAX_REFUSED = 64
MAX_RECEIPT_BYTES = MAX_PAYLOAD_BY_CLASS[EnvelopeClass.RECEIPT]
_MAX_UINT = (1 << 63) - 1  # seqs and times fit signed 64-bit SQL integers
_MAX_MS = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Receipt:
    """A verified receipt."""

    signer: bytes
    peer: bytes
    applied: tuple[int, ...]
    refused: tuple[tuple[int, str], ...]
    heads: dict[bytes, Head]
    at_ms: int
    signed: bytes = field(repr=False)


def sign_receipt(
    identity: Identity,
    peer: bytes,
    applied: Iterable[int],
    refused: Mapping[int, str],
    heads: Mapping[bytes, Head],
    at_ms: int,
) -> bytes:
    """Sign a receipt for ``peer``'s envelopes; reasons are cut to MAX_REASON_CHARS.
    Arguments out of range (or more than the caps) are a :class:`UsageError`."""
    body = {
        0: VERSION,
        1: identity.public_key,
        2: peer,
        3: sorted(set(applied)),
        4: [[seq, refused[seq][:MAX_REASON_CHARS]] for seq in sorted(refused)],
        5: [[a, h.seq, h.head, h.frozen] for a, h in sorted(heads.items())],
        6: at_ms,
    }
    try:
        _fields(body)
    except EnvelopeError as exc:
        raise UsageError(f"cannot sign this receipt: {exc}") from exc
    encoded = canonical.encode(body)
    signed = canonical.encode([encoded, identity.sign(RECEIPT_PREFIX + encoded)])
    if len(signed) > MAX_RECEIPT_BYTES:
        raise UsageError(f"a receipt is at most {MAX_RECEIPT_BYTES} bytes")
    return signed


def decode_receipt(signed: bytes) -> Receipt:
    """Strictly decode and verify a signed receipt."""
    if type(signed) is not bytes or len(signed) > MAX_RECEIPT_BYTES:
        raise EnvelopeError(f"a receipt is at most {MAX_RECEIPT_BYTES} bytes")
    try:
        body_bytes, signature = canonical.decode_signed(
            signed, what="a receipt", signature_bytes=SIGNATURE_BYTES
        )
        body = canonical.decode(body_bytes, what="receipt body", max_depth=3)
    except DecodeError as exc:
        raise EnvelopeError(str(exc)) from exc
    signer, peer, applied, refused, heads, at_ms = _fields(body)
    if not verify(signer, RECEIPT_PREFIX + body_bytes, signature):
        raise EnvelopeSignatureError(
            f"the receipt's signature by {short_id(signer)} does not verify"
        )
    return Receipt(signer, peer, applied, refused, heads, at_ms, signed)


def receipt_of(envelope: Envelope) -> Receipt:
    """The receipt an opened envelope of class receipt carries, signed by the
    envelope's sender about the envelope recipient's envelopes."""
    if envelope.cls is not EnvelopeClass.RECEIPT:
        raise EnvelopeMismatchError(f"a {envelope.cls.name.lower()} envelope holds no receipt")
    receipt = decode_receipt(envelope.payload)
    if receipt.signer != envelope.sender or receipt.peer != envelope.recipient:
        raise EnvelopeMismatchError("the receipt names other parties than its envelope")
    return receipt


def _fields(
    body: object,
) -> tuple[bytes, bytes, tuple[int, ...], tuple[tuple[int, str], ...], dict[bytes, Head], int]:
    if (
        type(body) is not dict
        or not all(type(key) is int for key in body)
        or set(body) != set(range(7))
    ):
        raise EnvelopeError("a receipt body is a map with the keys 0-6")
    if type(body[0]) is not int or body[0] != VERSION:
        raise EnvelopeError(f"unknown receipt version {body[0]!r}")
    signer, peer = body[1], body[2]
    for key in (signer, peer):
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise EnvelopeError("a receipt's signer and peer are 32-byte keys")
    if signer == peer:
        raise EnvelopeError("a receipt's signer and peer differ")
    applied = _seqs(body[3], MAX_APPLIED, "applied")
    refused = _refused(body[4])
    if set(applied) & {seq for seq, _ in refused}:
        raise EnvelopeError("a receipt lists an envelope as both applied and refused")
    at_ms = body[6]
    if type(at_ms) is not int or not 0 <= at_ms <= _MAX_MS:
        raise EnvelopeError("a receipt's time is 0 to 2**63 - 1 ms")
    return signer, peer, applied, refused, _heads(body[5]), at_ms


def _seqs(value: object, cap: int, what: str) -> tuple[int, ...]:
    if type(value) is not list or len(value) > cap:
        raise EnvelopeError(f"a receipt lists at most {cap} {what} envelopes")
    previous = 0
    for seq in value:
        if type(seq) is not int or not previous < seq <= _MAX_UINT:
            raise EnvelopeError(f"{what} sequence numbers are ascending, from 1")
        previous = seq
    return tuple(value)


def _refused(value: object) -> tuple[tuple[int, str], ...]:
    if type(value) is not list or len(value) > MAX_REFUSED:
        raise EnvelopeError(f"a receipt lists at most {MAX_REFUSED} refused envelopes")
    rows: list[Any] = value
    for row in rows:
        if type(row) is not list or len(row) != 2:
            raise EnvelopeError("a refused envelope is [seq, reason]")
        if type(row[1]) is not str or len(row[1]) > MAX_REASON_CHARS:
            raise EnvelopeError(
                f"a refusal reason is text of at most {MAX_REASON_CHARS} characters"
            )
    seqs = _seqs([row[0] for row in rows], MAX_REFUSED, "refused")
    return tuple(zip(seqs, (row[1] for row in rows), strict=True))


def _heads(value: object) -> dict[bytes, Head]:
    return heads_of_rows(value, EnvelopeError, "a receipt")
