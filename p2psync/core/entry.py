"""Entries: the signed, hash-chained units of an author's change log.

The byte layouts are specified in ``docs/entry-format.md``; in short::

    body     = {0: 1, 1: author, 2: seq, 3: prev|null, 4: hlc, 5: [[collection, digest], ...]}
    signed   = [body (bstr), signature (bstr)]       signature = Ed25519(PREFIX || body)
    entry ID = BLAKE2b-256(signed)
    payload  = [salt, kind, key, value|null, [base entry IDs]]   digest = BLAKE2b-256(payload)
    wire     = [signed (bstr), [payload (bstr) | null, ...]]

The body commits to each op by its collection and the digest of its payload, so
a receiver that may not see a collection gets ``null`` in place of that payload
and still verifies the chain. The random salt in each payload keeps a withheld
op from being guessed by hashing candidate values.

Everything here is pure: no clock (the HLC is passed in), no randomness (salts
are passed in), no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import cbor2

from p2psync.core import canonical
from p2psync.core.canonical import Value
from p2psync.core.hlc import MAX_HLC
from p2psync.core.identity import KEY_BYTES, SIGNATURE_BYTES, Identity, verify
from p2psync.errors import DecodeError, InvalidRecord, NonCanonicalError, OversizeError

FORMAT_VERSION = 1
#: Domain-separation prefix of every entry signature.
SIGN_PREFIX = b"p2psync/v1/entry\x00"
ID_BYTES = 32
SALT_BYTES = 16
#: Largest wire form of one entry (signed part plus every payload).
MAX_ENTRY_BYTES = 1 << 20
#: Most ops one entry may hold.
MAX_OPS = 10_000
#: Most bases one op may name.
MAX_BASES = 64
MAX_COLLECTION_CHARS = 128
MAX_KEY_CHARS = 1024
MAX_SEQ = (1 << 63) - 1

_BODY_KEYS = [0, 1, 2, 3, 4, 5]
_BODY_KEY_TYPES = (int,) * 6
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_GLOB = re.compile(r"[*?\[\]]")


class OpKind(IntEnum):
    PUT = 0
    DELETE = 1


_KINDS = (OpKind.PUT, OpKind.DELETE)


class Op(NamedTuple):
    """One put or delete of one record, with the versions it supersedes (its bases).

    A NamedTuple rather than a frozen dataclass: it is built once per op on the
    ingest hot path, where a frozen dataclass costs four times as much.
    """

    collection: str
    key: str
    kind: OpKind
    value: Value
    bases: tuple[bytes, ...]
    payload: bytes
    digest: bytes


class Entry(NamedTuple):
    """A decoded, structurally valid entry. Its signature is checked separately."""

    id: bytes
    author: bytes
    seq: int
    prev: bytes | None
    hlc: int
    collections: tuple[str, ...]
    digests: tuple[bytes, ...]
    body: bytes
    signature: bytes
    signed: bytes
    ops: tuple[Op | None, ...]
    #: canonical CBOR array of the payloads held (``null`` where withheld)
    payloads_blob: bytes

    @property
    def payloads(self) -> tuple[bytes | None, ...]:
        return tuple(None if op is None else op.payload for op in self.ops)

    def wire(self) -> bytes:
        """The transfer form: signed part plus every payload we hold."""
        return wire_form(self.signed, self.payloads_blob)

    def signature_valid(self) -> bool:
        return verify(self.author, SIGN_PREFIX + self.body, self.signature)


def wire_form(signed: bytes, payloads_blob: bytes) -> bytes:
    """``[signed, payloads]`` from the two stored parts, without decoding them."""
    return b"\x82" + canonical.encode(signed) + payloads_blob


def payload_digest(payload: bytes) -> bytes:
    """The digest an entry's body names for an op's payload."""
    return hashlib.blake2b(payload, digest_size=ID_BYTES).digest()


def entry_id(signed: bytes) -> bytes:
    return hashlib.blake2b(signed, digest_size=ID_BYTES).digest()


# ---------------------------------------------------------------- local writes


def _encodable(text: str) -> bool:
    """False for strings holding lone surrogates (not valid Unicode text)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_collection(name: object) -> str:
    """Return ``name`` if it is a valid collection name, else raise InvalidRecord."""
    if (
        type(name) is not str
        or not 0 < len(name) <= MAX_COLLECTION_CHARS
        or _CONTROL.search(name)
        or _GLOB.search(name)
        or not _encodable(name)
    ):
        raise InvalidRecord(
            f"invalid collection name {_shown(name)}: use 1-{MAX_COLLECTION_CHARS} characters, "
            "no control characters and none of * ? [ ]"
        )
    return name


def _shown(value: object) -> str:
    """``value`` quoted for a message, at most 80 characters of it."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid record key, else raise InvalidRecord."""
    if (
        type(key) is not str
        or not 0 < len(key) <= MAX_KEY_CHARS
        or _CONTROL.search(key)
        or not _encodable(key)
    ):
        raise InvalidRecord(
            f"invalid record key {_shown(key)}: use 1-{MAX_KEY_CHARS} characters, "
            "no control characters"
        )
    return key


def make_op(
    kind: OpKind,
    collection: str,
    key: str,
    value: Value,
    bases: Sequence[bytes],
    salt: bytes,
) -> Op:
    """Build one op from local input, validating it."""
    check_collection(collection)
    check_key(key)
    if kind is OpKind.DELETE:
        value = None
    else:
        canonical.check_value(value)
    if len(salt) != SALT_BYTES:
        raise ValueError("salt must be 16 bytes")
    ordered = tuple(sorted(set(bases)))
    if len(ordered) > MAX_BASES:
        raise InvalidRecord(f"a record may be resolved over at most {MAX_BASES} versions")
    payload = canonical.encode([salt, int(kind), key, value, list(ordered)])
    digest = hashlib.blake2b(payload, digest_size=ID_BYTES).digest()
    return Op(collection, key, kind, value, ordered, payload, digest)


def sign_entry(
    identity: Identity, seq: int, prev: bytes | None, hlc: int, ops: Sequence[Op]
) -> Entry:
    """Build and sign the entry holding ``ops`` as one transaction."""
    if not ops:
        raise InvalidRecord("an entry needs at least one op")
    if len(ops) > MAX_OPS:
        raise InvalidRecord(f"a transaction may hold at most {MAX_OPS} changes")
    records = {(op.collection, op.key) for op in ops}
    if len(records) != len(ops):
        raise InvalidRecord("a transaction may change each record only once")
    body = canonical.encode(
        {
            0: FORMAT_VERSION,
            1: identity.public_key,
            2: seq,
            3: prev,
            4: hlc,
            5: [[op.collection, op.digest] for op in ops],
        }
    )
    signature = identity.sign(SIGN_PREFIX + body)
    signed = canonical.encode([body, signature])
    entry = Entry(
        id=entry_id(signed),
        author=identity.public_key,
        seq=seq,
        prev=prev,
        hlc=hlc,
        collections=tuple(op.collection for op in ops),
        digests=tuple(op.digest for op in ops),
        body=body,
        signature=signature,
        signed=signed,
        ops=tuple(ops),
        payloads_blob=canonical.encode([op.payload for op in ops]),
    )
    size = len(wire_form(signed, entry.payloads_blob))
    if size > MAX_ENTRY_BYTES:
        raise InvalidRecord(
            f"transaction is {size} bytes; one entry may be at most {MAX_ENTRY_BYTES} bytes"
        )
    return entry


# ---------------------------------------------------------------- decoding


def decode_wire(data: bytes) -> Entry:
    """Decode and validate the wire form of an entry (signature not checked).

    The two outer layers are fixed-shape (an array of two byte strings) and are
    parsed by hand, with the same strictness as the canonical decoder.
    """
    if len(data) > MAX_ENTRY_BYTES:
        raise OversizeError(f"entry is {len(data)} bytes; the limit is {MAX_ENTRY_BYTES}")
    if len(data) < 2 or data[0] != 0x82:
        raise DecodeError("entry is not a [signed, payloads] pair")
    start, end = _bstr_span(data, 1, "entry")
    payloads_blob = data[end:]
    return _decode(data[start:end], _payload_list(payloads_blob), payloads_blob)


def decode_stored(signed: bytes, payloads_blob: bytes) -> Entry:
    """Decode an entry from the two columns the store keeps (a damaged row may
    read back as another SQLite type: a DecodeError, like any other damage)."""
    if type(signed) is not bytes or type(payloads_blob) is not bytes:
        raise DecodeError("stored entry columns are not byte strings")
    return _decode(signed, _payload_list(payloads_blob), payloads_blob)


def stored_collections(signed: bytes) -> tuple[str, ...]:
    """The collections a stored entry's ops change, read from its signed body alone
    (no payload is decoded; the entry was verified when it was stored)."""
    return tuple(collection for collection, _ in stored_refs(signed))


def stored_prev(signed: bytes) -> bytes | None:
    """The ``prev`` a stored entry's signed body names (no payload is decoded)."""
    prev = _stored_body(signed).get(3)
    if prev is not None and (type(prev) is not bytes or len(prev) != ID_BYTES):
        raise DecodeError("predecessor is not a 32-byte entry ID")
    return prev


def _stored_body(signed: bytes) -> dict[Any, Any]:
    if len(signed) < 2 or signed[0] != 0x82:
        raise DecodeError("signed entry is not a [body, signature] pair")
    start, end = _bstr_span(signed, 1, "signed entry")
    body = canonical.loads_strict(signed[start:end], what="entry body", max_depth=3)
    if type(body) is not dict:
        raise DecodeError("entry body is not a map")
    return body


def stored_refs(signed: bytes) -> tuple[tuple[str, bytes], ...]:
    """The ``(collection, digest)`` of each op of a stored entry, read from its
    signed body alone (no payload is decoded)."""
    refs = _stored_body(signed).get(5)
    if type(refs) is not list:
        raise DecodeError("entry body has no op list")
    found = []
    for ref in refs:
        if (
            type(ref) is not list
            or len(ref) != 2
            or type(ref[0]) is not str
            or type(ref[1]) is not bytes
        ):
            raise DecodeError("entry body has an op reference that is not [collection, digest]")
        found.append((ref[0], ref[1]))
    return tuple(found)


def _payload_list(blob: bytes) -> list[Any]:
    """The payload array: byte strings, or null where withheld."""
    if len(blob) > 2 and blob[0] == 0x81:  # fast path: one op with its payload
        try:
            start, end = _bstr_span(blob, 1, "entry payloads")
        except DecodeError:
            pass
        else:
            if end == len(blob):
                return [blob[start:end]]
    payloads = canonical.decode_ordered(blob, what="entry payloads", max_depth=1)
    if type(payloads) is not list:
        raise DecodeError("entry payloads are not a list")
    return payloads


def payload_list(blob: bytes) -> list[bytes | None]:
    """The stored payloads array of an entry: each payload, or ``None`` where withheld."""
    return _payload_list(blob)


def _head_size(value: int) -> int:
    """Bytes of the canonical CBOR head carrying ``value`` (an integer or a length)."""
    if value < 24:
        return 1
    if value < 0x100:
        return 2
    if value < 0x10000:
        return 3
    return 5 if value < 0x100000000 else 9


def _bstr_span(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """``(start, end)`` of the canonical CBOR byte string whose head is at ``pos``."""
    if pos >= len(data):
        raise DecodeError(f"{what} is truncated")
    initial = data[pos]
    # fast paths for the common sizes, 24-255 and 256-65535 bytes
    if initial == 0x58 and pos + 2 <= len(data):
        end = pos + 2 + data[pos + 1]
        if data[pos + 1] >= 24 and end <= len(data):
            return pos + 2, end
    elif initial == 0x59 and pos + 3 <= len(data):
        length = (data[pos + 1] << 8) | data[pos + 2]
        end = pos + 3 + length
        if length >= 0x100 and end <= len(data):
            return pos + 3, end
    if initial >> 5 != 2:
        raise DecodeError(f"{what}: expected a byte string")
    info = initial & 0x1F
    if info < 24:
        length, start = info, pos + 1
    elif 24 <= info <= 26:
        width = 1 << (info - 24)
        length = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        start = pos + 1 + width
        if length < (24 if width == 1 else 1 << (4 * width)):
            raise NonCanonicalError(f"{what}: byte string length is not minimally encoded")
    else:
        raise DecodeError(f"{what}: byte string length is invalid or too large")
    end = start + length
    if end > len(data):
        raise DecodeError(f"{what} is truncated")
    return start, end


def _decode(signed: bytes, payloads: list[Any], payloads_blob: bytes) -> Entry:
    # signed = [body (bstr), signature (64-byte bstr)]
    if len(signed) < 2 or signed[0] != 0x82:
        raise DecodeError("signed entry is not a [body, signature] pair")
    start, end = _bstr_span(signed, 1, "signed entry")
    if len(signed) != end + 2 + SIGNATURE_BYTES or signed[end : end + 2] != b"\x58\x40":
        raise DecodeError("signed entry is not a [body, 64-byte signature] pair")
    body = signed[start:end]
    signature = signed[end + 2 :]
    fields = canonical.loads_strict(body, what="entry body", max_depth=3)
    if (
        type(fields) is not dict
        or list(fields) != _BODY_KEYS
        or tuple(map(type, fields)) != _BODY_KEY_TYPES  # false/true/simple(n) equal 0/1/n
    ):
        raise DecodeError("entry body must have exactly the integer keys 0-5 in order")
    version, author, seq, prev, hlc, refs = (
        fields[0],
        fields[1],
        fields[2],
        fields[3],
        fields[4],
        fields[5],
    )
    if version != FORMAT_VERSION or type(version) is not int:
        raise DecodeError(f"unknown entry format version {version!r}")
    if type(author) is not bytes or len(author) != KEY_BYTES:
        raise DecodeError("author is not a 32-byte key")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise DecodeError(f"invalid sequence number {seq!r}")
    if seq == 1:
        if prev is not None:
            raise DecodeError("the first entry of a log must not name a predecessor")
    elif type(prev) is not bytes or len(prev) != ID_BYTES:
        raise DecodeError("predecessor is not a 32-byte entry ID")
    if type(hlc) is not int or not 0 <= hlc <= MAX_HLC:
        raise DecodeError("invalid clock value")
    if type(refs) is not list or not 0 < len(refs) <= MAX_OPS:
        raise DecodeError(f"an entry holds 1-{MAX_OPS} ops")
    if len(payloads) != len(refs):
        raise DecodeError("payload list does not match the op list")
    collections: list[str] = []
    digests: list[bytes] = []
    ops: list[Op | None] = []
    seen: set[tuple[str, str]] = set()
    # Canonical check without re-encoding: the decoder refuses tags and indefinite
    # lengths, every key and value has been checked to be of its exact type (int,
    # bytes, text, null, array), so the input is at least as long as the canonical
    # encoding of what was decoded, and equally long only if it *is* that encoding
    # (key order is checked above). So the body is canonical iff its length is this.
    size = 42 + _head_size(seq) + (1 if prev is None else 34) + _head_size(hlc)
    size += _head_size(len(refs))
    for ref, payload in zip(refs, payloads, strict=True):
        if type(ref) is not list or len(ref) != 2:
            raise DecodeError("op reference is not a [collection, digest] pair")
        collection, digest = ref
        if type(digest) is not bytes or len(digest) != ID_BYTES:
            raise DecodeError("op digest is not 32 bytes")
        _check_received_collection(collection)
        length = len(collection) if collection.isascii() else len(collection.encode())
        size += 35 + _head_size(length) + length
        collections.append(collection)
        digests.append(digest)
        if payload is None:
            ops.append(None)
            continue
        if type(payload) is not bytes:
            raise DecodeError("op payload is neither bytes nor null")
        op = _decode_payload(collection, digest, payload)
        record = (collection, op.key)
        if record in seen:
            raise DecodeError("an entry changes one record twice")
        seen.add(record)
        ops.append(op)
    if size != len(body):
        raise NonCanonicalError("entry body is not canonical CBOR")
    return Entry(
        id=entry_id(signed),
        author=author,
        seq=seq,
        prev=prev,
        hlc=hlc,
        collections=tuple(collections),
        digests=tuple(digests),
        body=body,
        signature=signature,
        signed=signed,
        ops=tuple(ops),
        payloads_blob=payloads_blob,
    )


_valid_collections: set[str] = set()


def _check_received_collection(name: object) -> None:
    if name in _valid_collections:
        return
    try:
        check_collection(name)
    except InvalidRecord as exc:
        raise DecodeError(str(exc)) from None
    if len(_valid_collections) < 4096:
        _valid_collections.add(name)  # type: ignore[arg-type]


def _decode_payload(collection: str, digest: bytes, payload: bytes) -> Op:
    if hashlib.blake2b(payload, digest_size=ID_BYTES).digest() != digest:
        raise DecodeError("op payload does not match its digest")
    fields = canonical.loads_strict(
        payload, what="op payload", max_depth=canonical.MAX_VALUE_DEPTH + 1
    )
    if type(fields) is not list or len(fields) != 5:
        raise DecodeError("op payload is not [salt, kind, key, value, bases]")
    salt, kind, key, value, bases = fields
    if type(salt) is not bytes or len(salt) != SALT_BYTES:
        raise DecodeError("op salt is not 16 bytes")
    if type(kind) is not int or kind not in (0, 1):
        raise DecodeError(f"unknown op kind {kind!r}")
    if (
        type(key) is not str
        or not 0 < len(key) <= MAX_KEY_CHARS
        or (not key.isprintable() and _CONTROL.search(key))
    ):
        raise DecodeError("invalid record key")
    if kind == 1 and value is not None:
        raise DecodeError("a delete carries no value")
    if type(bases) is not list or len(bases) > MAX_BASES:
        raise DecodeError("op bases are not a short list")
    previous = b""
    for base in bases:
        if type(base) is not bytes or len(base) != ID_BYTES or base <= previous:
            raise DecodeError("op bases must be sorted, distinct 32-byte entry IDs")
        previous = base
    # Canonical check: the plain encoder reproduces the input exactly when every
    # head is minimal; map key order is checked while walking the value, and only
    # floats need the canonical encoder (which picks their shortest width).
    kind_of_value = type(value)
    if kind_of_value is str or kind_of_value is bytes or kind_of_value is bool or value is None:
        has_float = False
    else:
        has_float = canonical.check_value(value, what="value", received=True)
    encoded = cbor2.dumps(fields, canonical=True) if has_float else cbor2.dumps(fields)
    if encoded != payload:
        raise NonCanonicalError("op payload is not canonical CBOR")
    return Op(collection, key, _KINDS[kind], value, tuple(bases), payload, digest)


# ---------------------------------------------------------------- filtering


def withhold(wire: bytes, may_send: Callable[[str], bool]) -> bytes:
    """``wire`` with the payloads of ops in collections ``may_send`` refuses
    replaced by ``null`` (§3.4 of ``docs/entry-format.md``): the signed part goes
    whole, so the receiver still verifies the chain.

    The entry comes from our own store, where it was verified: reading its op list
    is enough here."""
    signed, payloads = cbor2.loads(wire)
    collections = [ref[0] for ref in cbor2.loads(cbor2.loads(signed)[0])[5]]
    if all(may_send(c) for c in collections):
        return wire
    kept = [p if may_send(c) else None for c, p in zip(collections, payloads, strict=True)]
    return wire_form(signed, canonical.encode(kept))
