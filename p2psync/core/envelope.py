"""Relay envelopes: a signed body sealed to its recipient, behind a header the relay reads.

The full byte layout is in ``docs/relay.md`` ("Envelopes"); in short::

    wire     = CBOR [header, sealed]
    header   = CBOR {0: 1, 1: sender, 2: recipient, 3: seq, 4: class, 5: expiry ms, 6: len(sealed)}
    sealed   = epk(32) || crypto_box(plaintext, BLAKE2b-192(epk || rpk), rpk, esk)
    plaintext= u32be(n) || signed (n bytes) || zeros, padded to a bucket - 48
    signed   = CBOR [body, Ed25519(sender, "p2psync/v1/envelope" 00 || body)]
    body     = CBOR {0: 1, 1: sender, 2: recipient, 3: seq, 4: class, 5: expiry ms, 6: payload}

``rpk`` is the X25519 form of the recipient's Ed25519 key; the seal is
libsodium's sealed box, built here from an ephemeral secret ``esk`` the caller
passes in (so sealing is deterministic; ``crypto_box_seal_open`` opens it).
Sealed sizes are buckets (:func:`bucket`), so the relay learns padded sizes only.

The relay checks :func:`read_header` (no keys needed); the recipient checks
everything in :func:`open_envelope`, in the order the spec gives. Every refusal
is an :class:`~p2psync.errors.EnvelopeError`; foreign exceptions (cbor2, nacl)
never leave this module. Expiry, duplicate sequence numbers and mailbox policy
are the caller's to judge (time and state are not here).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import nacl.bindings
import nacl.exceptions

from p2psync.core import canonical
from p2psync.core.identity import KEY_BYTES, SIGNATURE_BYTES, Identity, short_id, verify
from p2psync.errors import (
    DecodeError,
    EnvelopeError,
    EnvelopeMismatchError,
    EnvelopeSealError,
    EnvelopeSignatureError,
    UsageError,
)

ENVELOPE_PREFIX = b"p2psync/v1/envelope\x00"
VERSION = 1

#: What a sealed box adds to its plaintext: the ephemeral public key and the MAC.
SEAL_OVERHEAD = 32 + 16
#: The length prefix in front of the signed body inside the seal.
LENGTH_BYTES = 4
#: An upper bound on everything a sealed envelope holds besides its payload
#: (seal, length prefix, CBOR heads, keys, numbers, signature: 225 bytes at most).
ENVELOPE_OVERHEAD = 256
#: Smallest sealed size; sizes double up to :data:`BUCKET_STEP`, then grow by it.
MIN_SEALED_BYTES = 1024
BUCKET_STEP = 64 * 1024
#: Largest sealed part of any envelope (a bucket).
MAX_SEALED_BYTES = 4 * 1024 * 1024
#: Largest outer header (its encoding is 101 bytes at most).
MAX_HEADER_BYTES = 128
#: Largest wire form of an envelope: header, sealed part and the array around them.
MAX_ENVELOPE_BYTES = MAX_SEALED_BYTES + MAX_HEADER_BYTES
_MAX_SEQ = (1 << 63) - 1  # what signed 64-bit SQL integers hold
_MAX_MS = (1 << 63) - 1


class EnvelopeClass(Enum):
    """What an envelope carries (its number is on the wire)."""

    DATA = 1  # a bundle, from a sender on the recipient's mailbox policy
    INTRODUCTION = 2  # a pairing request or invite join, from any admitted sender
    RECEIPT = 3  # a signed receipt (core/receipt.py), back to a data sender


#: Largest sealed part per class (each a bucket); the relay can check it on the header.
MAX_SEALED_BY_CLASS = {
    EnvelopeClass.DATA: MAX_SEALED_BYTES,
    EnvelopeClass.INTRODUCTION: 16 * 1024,
    EnvelopeClass.RECEIPT: 1024 * 1024,
}
#: Largest payload per class: whatever fits the class's largest bucket.
MAX_PAYLOAD_BY_CLASS = {cls: size - ENVELOPE_OVERHEAD for cls, size in MAX_SEALED_BY_CLASS.items()}


def bucket(size: int) -> int:
    """The sealed size an envelope whose unpadded sealed size is ``size`` gets:
    the smallest of 1, 2, 4, ..., 64 KiB, then of the multiples of 64 KiB, that
    is at least ``size``."""
    if size <= BUCKET_STEP:
        padded = MIN_SEALED_BYTES
        while padded < size:
            padded *= 2
        return padded
    return -(-size // BUCKET_STEP) * BUCKET_STEP


def is_bucket(size: int) -> bool:
    return MIN_SEALED_BYTES <= size <= MAX_SEALED_BYTES and bucket(size) == size


@dataclass(frozen=True, slots=True)
class OuterHeader:
    """What the relay sees of an envelope."""

    sender: bytes
    recipient: bytes
    seq: int
    cls: EnvelopeClass
    expiry_ms: int
    sealed_size: int

    def encode(self) -> bytes:
        return canonical.encode(self._map())

    def _map(self) -> dict[int, Any]:
        return {
            0: VERSION,
            1: self.sender,
            2: self.recipient,
            3: self.seq,
            4: self.cls.value,
            5: self.expiry_ms,
            6: self.sealed_size,
        }


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, verified envelope."""

    sender: bytes
    recipient: bytes
    seq: int
    cls: EnvelopeClass
    expiry_ms: int
    payload: bytes = field(repr=False)
    #: The signed inner part ``[body, signature]``: verifiable by anyone, kept as proof.
    signed: bytes = field(repr=False)


# ---------------------------------------------------------------- sealing


def seal_envelope(
    identity: Identity,
    recipient: bytes,
    seq: int,
    cls: EnvelopeClass,
    expiry_ms: int,
    payload: bytes,
    ephemeral_secret: bytes,
) -> bytes:
    """Sign, pad and seal one envelope to ``recipient``; return its wire form.

    ``ephemeral_secret`` is 32 random bytes from the caller, used once: the same
    inputs give the same bytes. Bad arguments are a :class:`UsageError`.
    """
    _check_names(identity.public_key, recipient, seq, expiry_ms, UsageError)
    if type(cls) is not EnvelopeClass:
        raise UsageError("an envelope class is an EnvelopeClass")
    if type(payload) is not bytes or len(payload) > MAX_PAYLOAD_BY_CLASS[cls]:
        raise UsageError(
            f"a {cls.name.lower()} payload is at most {MAX_PAYLOAD_BY_CLASS[cls]} bytes"
        )
    if type(ephemeral_secret) is not bytes or len(ephemeral_secret) != 32:
        raise UsageError("an ephemeral secret is 32 bytes")
    body = canonical.encode(
        {
            0: VERSION,
            1: identity.public_key,
            2: recipient,
            3: seq,
            4: cls.value,
            5: expiry_ms,
            6: payload,
        }
    )
    signed = canonical.encode([body, identity.sign(ENVELOPE_PREFIX + body)])
    content = len(signed).to_bytes(LENGTH_BYTES, "big") + signed
    sealed_size = bucket(len(content) + SEAL_OVERHEAD)
    plaintext = content + bytes(sealed_size - SEAL_OVERHEAD - len(content))
    try:
        recipient_x = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(recipient)
    except (nacl.exceptions.CryptoError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{short_id(recipient)} is not a usable public key") from exc
    sealed = seal(plaintext, recipient_x, ephemeral_secret)
    header = OuterHeader(identity.public_key, recipient, seq, cls, expiry_ms, len(sealed))
    return canonical.encode([header._map(), sealed])


def seal(plaintext: bytes, recipient_x: bytes, ephemeral_secret: bytes) -> bytes:
    """libsodium's ``crypto_box_seal``, with the ephemeral secret passed in:
    ``epk || crypto_box(plaintext, BLAKE2b-192(epk || rpk), rpk, esk)``."""
    epk = nacl.bindings.crypto_scalarmult_base(ephemeral_secret)
    nonce = hashlib.blake2b(epk + recipient_x, digest_size=24).digest()
    try:
        boxed: bytes = nacl.bindings.crypto_box(plaintext, nonce, recipient_x, ephemeral_secret)
    except (nacl.exceptions.CryptoError, ValueError, RuntimeError) as exc:
        raise UsageError("the ephemeral secret and recipient key do not make a box") from exc
    return epk + boxed


# ---------------------------------------------------------------- reading


def read_header(wire: bytes) -> OuterHeader:
    """Strictly decode an envelope's wire form and return its outer header: what
    the relay may check (caps, shape, size buckets) without any key."""
    return _split(wire)[0]


def split_wire(wire: bytes) -> tuple[OuterHeader, bytes]:
    """An envelope's outer header and sealed part, strictly checked (as
    :func:`read_header`): what a relay stores."""
    return _split(wire)


def join_wire(header: OuterHeader, sealed: bytes) -> bytes:
    """The wire form of an envelope from its outer header and sealed part: the
    inverse of :func:`split_wire` (canonical encoding makes it byte-exact)."""
    if len(sealed) != header.sealed_size:
        raise UsageError("the sealed part is not the size its header says")
    return canonical.encode([header._map(), sealed])


def _split(wire: bytes) -> tuple[OuterHeader, bytes]:
    if type(wire) is not bytes or len(wire) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"an envelope is at most {MAX_ENVELOPE_BYTES} bytes")
    pair = _decode(wire, "envelope", 2)
    if type(pair) is not list or len(pair) != 2 or type(pair[1]) is not bytes:
        raise EnvelopeError("an envelope is [header, sealed]")
    header_map, sealed = pair
    header = _header(header_map)
    if header.sealed_size != len(sealed):
        raise EnvelopeError("the header's sealed size is not the sealed part's")
    return header, sealed


def decode_header(data: bytes) -> OuterHeader:
    """Strictly decode an outer header on its own (as :meth:`OuterHeader.encode` made it)."""
    if type(data) is not bytes or len(data) > MAX_HEADER_BYTES:
        raise EnvelopeError(f"an envelope header is at most {MAX_HEADER_BYTES} bytes")
    return _header(_decode(data, "envelope header", 1))


def _header(value: object) -> OuterHeader:
    fields = _map(value, "envelope header")
    cls = _class(fields[4])
    size = fields[6]
    if type(size) is not int or not is_bucket(size) or size > MAX_SEALED_BY_CLASS[cls]:
        raise EnvelopeError(f"sealed size {size!r} is not a {cls.name.lower()} bucket")
    _check_names(fields[1], fields[2], fields[3], fields[5], EnvelopeError)
    return OuterHeader(fields[1], fields[2], fields[3], cls, fields[5], size)


# ---------------------------------------------------------------- opening


def open_envelope(identity: Identity, wire: bytes, *, depositor: bytes | None = None) -> Envelope:
    """Check everything about an envelope addressed to ``identity`` and return it.

    ``depositor`` is the key of the session that deposited it, as the relay
    reports it; when given it must be the sender. Raises an
    :class:`~p2psync.errors.EnvelopeError` (subclasses say which check failed).
    """
    header, sealed = _split(wire)
    if header.recipient != identity.public_key:
        raise EnvelopeSealError(f"the envelope is addressed to {short_id(header.recipient)}")
    if depositor is not None and depositor != header.sender:
        raise EnvelopeMismatchError(
            f"the envelope names sender {short_id(header.sender)}, "
            f"deposited by {short_id(depositor) if len(depositor) == KEY_BYTES else '?'}"
        )
    plaintext = _unseal(identity, sealed)
    signed = _unpad(plaintext, len(sealed))
    try:
        body_bytes, signature = canonical.decode_signed(
            signed, what="an envelope's signed body", signature_bytes=SIGNATURE_BYTES
        )
    except DecodeError as exc:
        raise EnvelopeError(str(exc)) from exc
    fields = _map(_decode(body_bytes, "envelope body", 1), "envelope body")
    cls = _class(fields[4])
    _check_names(fields[1], fields[2], fields[3], fields[5], EnvelopeError)
    payload = fields[6]
    if type(payload) is not bytes or len(payload) > MAX_PAYLOAD_BY_CLASS[cls]:
        raise EnvelopeError(
            f"a {cls.name.lower()} payload is at most {MAX_PAYLOAD_BY_CLASS[cls]} bytes"
        )
    if not verify(fields[1], ENVELOPE_PREFIX + body_bytes, signature):
        raise EnvelopeSignatureError(
            f"the envelope's signature by {short_id(fields[1])} does not verify"
        )
    inner = OuterHeader(fields[1], fields[2], fields[3], cls, fields[5], len(sealed))
    if inner != header:
        differ = [
            name
            for name in ("sender", "recipient", "seq", "cls", "expiry_ms", "sealed_size")
            if getattr(inner, name) != getattr(header, name)
        ]
        raise EnvelopeMismatchError(
            f"the envelope's signed {', '.join(differ)} differ from its outer header "
            f"(signed by {short_id(inner.sender)})"
        )
    return Envelope(inner.sender, inner.recipient, inner.seq, cls, inner.expiry_ms, payload, signed)


def _unseal(identity: Identity, sealed: bytes) -> bytes:
    try:
        public_x = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(identity.public_key)
        plaintext: bytes = nacl.bindings.crypto_box_seal_open(
            sealed, public_x, identity.x25519_private
        )
    except (nacl.exceptions.CryptoError, ValueError, RuntimeError, TypeError) as exc:
        raise EnvelopeSealError("the envelope's seal does not open with our key") from exc
    return plaintext


def _unpad(plaintext: bytes, sealed_size: int) -> bytes:
    """The signed body inside the padding; the padding is zeros, as little as the
    smallest bucket needs."""
    size = int.from_bytes(plaintext[:LENGTH_BYTES], "big")
    end = LENGTH_BYTES + size
    if len(plaintext) < end or bucket(end + SEAL_OVERHEAD) != sealed_size:
        raise EnvelopeError("the envelope's length prefix does not fit its bucket")
    if any(plaintext[end:]):
        raise EnvelopeError("the envelope's padding is not zeros")
    return plaintext[LENGTH_BYTES:end]


# ---------------------------------------------------------------- shared checks


def _decode(data: bytes, what: str, max_depth: int) -> Any:
    try:
        return canonical.decode(data, what=what, max_depth=max_depth)
    except DecodeError as exc:
        raise EnvelopeError(str(exc)) from exc


def _map(value: object, what: str) -> dict[int, Any]:
    if (
        type(value) is not dict
        or not all(type(key) is int for key in value)  # True == 1 in Python
        or set(value) != set(range(7))
    ):
        raise EnvelopeError(f"an {what} is a map with the keys 0-6")
    if type(value[0]) is not int or value[0] != VERSION:
        raise EnvelopeError(f"unknown {what} version {value[0]!r}")
    return value


def _class(value: object) -> EnvelopeClass:
    if type(value) is not int:
        raise EnvelopeError("an envelope class is a number")
    try:
        return EnvelopeClass(value)
    except ValueError as exc:
        raise EnvelopeError(f"unknown envelope class {value}") from exc


def _check_names(
    sender: object, recipient: object, seq: object, expiry_ms: object, error: type[Exception]
) -> None:
    for key in (sender, recipient):
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise error("an envelope's sender and recipient are 32-byte keys")
    if sender == recipient:
        raise error("an envelope's sender and recipient differ")
    if type(seq) is not int or not 1 <= seq <= _MAX_SEQ:
        raise error("an envelope's sequence number is 1 to 2**63 - 1")
    if type(expiry_ms) is not int or not 0 <= expiry_ms <= _MAX_MS:
        raise error("an envelope's expiry is 0 to 2**63 - 1 ms")
