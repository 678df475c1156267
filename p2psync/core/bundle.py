"""Bundles and bundle files: what a data envelope carries, and envelopes as a file.

A **bundle** is the payload of a data envelope (``core/envelope.py``, class 1),
DESIGN §7: the sender's heads, the digest of the rule objects it holds about the
pair (and, when the recipient may lack some, the objects), and entries the
recipient lacks and may see, in causal order. Full description in
``docs/relay.md`` ("Bundles")::

    bundle = CBOR {0: 1, 1: heads, 2: rules digest (bstr 16), 3: [rule object, ...],
                   4: [entry, ...]}
           | CBOR {0: 2, 1: heads, 2: ..., 3: ..., 4: ..., 5: [entry ID (32), ...]}
    heads  = [[author (32), seq, head (32), frozen (bool)], ...]   ascending by author

Version 2 adds ``wants`` (key 5, 1 to :data:`MAX_WANT_IDS` entry IDs, ascending):
entries the sender holds without a payload that it asks the recipient to send
again, as a live session's ``Want`` does. It is sent only in a bundle of its own
(no entries, no rule objects), so that a peer too old to read it refuses that
bundle alone and loses nothing.

Entries are wire forms as a sync message ``Entries`` carries them (payloads of
collections the rules do not let go withheld); rule objects are signed rule
objects as ``Rules`` carries them. The bundle is read only from inside an opened
envelope, whose signature covers it; the entries and rule objects are verified
by the normal paths (ingest, pairing) when applied.

An **introduction** is the payload of an introduction envelope (class 2): a
pairing request to a site that may not know us yet, our name and the signed rule
objects of what we propose::

    introduction = CBOR {0: 1, 1: name (text), 2: [rule object, ...]}

A **bundle file** is sealed envelopes handed over by hand (``p2psync bundle
export/import``)::

    file = "p2psync bundle file\\n" (20 bytes) || CBOR {0: 1, 1: [envelope (bstr), ...]}

Decoding is strict (canonical CBOR, exact keys, caps, ascending heads): every
refusal is a :class:`~p2psync.errors.BundleError` (an ``EnvelopeError``). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2psync.core import canonical
from p2psync.core.entry import MAX_ENTRY_BYTES
from p2psync.core.envelope import MAX_ENVELOPE_BYTES, MAX_PAYLOAD_BY_CLASS, EnvelopeClass
from p2psync.core.handshake import MAX_NAME_CHARS
from p2psync.core.messages import (
    DIGEST_BYTES,
    MAX_REASON_CHARS,
    MAX_RULE_OBJECTS,
    MAX_WANT_IDS,
    Head,
    heads_of_rows,
)
from p2psync.core.rules import MAX_RULE_BYTES
from p2psync.errors import BundleError, DecodeError, UsageError

VERSION = 1
#: The bundle version that carries ``wants`` (key 5).
WANTS_VERSION = 2
ENTRY_ID_BYTES = 32
#: Largest bundle: the largest data payload.
MAX_BUNDLE_BYTES = MAX_PAYLOAD_BY_CLASS[EnvelopeClass.DATA]
#: Most entries one bundle carries (the smallest entry is over 128 bytes: the size
#: cap binds first).
MAX_BUNDLE_ENTRIES = 32_768
_MAX_INT = (1 << 63) - 1

FILE_MAGIC = b"p2psync bundle file\n"
FILE_VERSION = 1
#: The bundle version that carries ``wants`` (key 5).
WANTS_VERSION = 2
ENTRY_ID_BYTES = 32
#: Most envelopes one bundle file holds, and its largest size.
MAX_FILE_ENVELOPES = 65_536
MAX_FILE_BYTES = 1 << 32


@dataclass(frozen=True, slots=True)
class Bundle:
    """A decoded bundle."""

    heads: dict[bytes, Head]
    rules_digest: bytes
    rule_objects: tuple[bytes, ...] = ()
    entries: tuple[bytes, ...] = field(default=(), repr=False)
    #: entry IDs the sender asks the recipient to send again (version 2)
    wants: tuple[bytes, ...] = field(default=(), repr=False)


def encode_bundle(bundle: Bundle) -> bytes:
    """The canonical encoding; a bundle out of range is a :class:`UsageError`."""
    body = _body(bundle, bundle.entries)
    try:
        _fields(body)
    except BundleError as exc:
        raise UsageError(f"cannot encode this bundle: {exc}") from exc
    encoded = canonical.encode(body)
    if len(encoded) > MAX_BUNDLE_BYTES:
        raise UsageError(f"a bundle is at most {MAX_BUNDLE_BYTES} bytes")
    return encoded


def _body(bundle: Bundle, entries: Sequence[bytes]) -> dict[int, Any]:
    body: dict[int, Any] = {
        0: WANTS_VERSION if bundle.wants else VERSION,
        1: [[a, h.seq, h.head, h.frozen] for a, h in sorted(bundle.heads.items())],
        2: bundle.rules_digest,
        3: list(bundle.rule_objects),
        4: list(entries),
    }
    if bundle.wants:
        body[5] = list(bundle.wants)
    return body


def base_size(bundle: Bundle) -> int:
    """The encoded size of ``bundle`` without its entries (with an empty list)."""
    return len(canonical.encode(_body(bundle, ())))


def head_bytes(length: int) -> int:
    """Bytes of the CBOR head of a byte string (or list) of ``length``."""
    return 1 if length < 24 else 2 if length < 256 else 3 if length < 65536 else 5


def packed_size(base: int, count: int, entry_bytes: int) -> int:
    """Encoded size of a bundle of :func:`base_size` ``base`` with ``count`` entries
    whose wire forms and heads take ``entry_bytes`` (sum of ``len + head_bytes``)."""
    return base - 1 + head_bytes(count) + entry_bytes


def decode_bundle(payload: bytes) -> Bundle:
    """Strictly decode a bundle (the payload of an opened data envelope)."""
    if type(payload) is not bytes or len(payload) > MAX_BUNDLE_BYTES:
        raise BundleError(f"a bundle is at most {MAX_BUNDLE_BYTES} bytes")
    try:
        body = canonical.decode(payload, what="bundle", max_depth=3)
    except DecodeError as exc:
        raise BundleError(str(exc)) from exc
    return _fields(body)


def _fields(body: object) -> Bundle:
    if type(body) is not dict or not all(type(key) is int for key in body) or 0 not in body:
        raise BundleError("a bundle is a map with the keys 0-4 (version 2: 0-5)")
    version = body[0]
    if type(version) is not int or version not in (VERSION, WANTS_VERSION):
        raise BundleError(f"unknown bundle version {version!r}")
    keys = 5 if version == VERSION else 6
    if set(body) != set(range(keys)):
        raise BundleError(f"a version {version} bundle is a map with the keys 0-{keys - 1}")
    digest = body[2]
    if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
        raise BundleError(f"a bundle's rules digest is {DIGEST_BYTES} bytes")
    objects = _strings(body[3], MAX_RULE_OBJECTS, MAX_RULE_BYTES, "rule objects")
    entries = _strings(body[4], MAX_BUNDLE_ENTRIES, MAX_ENTRY_BYTES, "entries")
    wants = _wants(body[5]) if version == WANTS_VERSION else ()
    if wants and (objects or entries):
        raise BundleError("a bundle with wants carries no entries and no rule objects")
    return Bundle(_heads(body[1]), digest, objects, entries, wants)


def _wants(value: object) -> tuple[bytes, ...]:
    if type(value) is not list or not 0 < len(value) <= MAX_WANT_IDS:
        raise BundleError(f"a bundle's wants name 1-{MAX_WANT_IDS} entries")
    previous = b""
    for entry in value:
        if type(entry) is not bytes or len(entry) != ENTRY_ID_BYTES or entry <= previous:
            raise BundleError(
                f"a bundle's wants are entry IDs ({ENTRY_ID_BYTES} bytes), ascending, "
                "without repeats"
            )
        previous = entry
    return tuple(value)


def _strings(value: object, count: int, size: int, what: str) -> tuple[bytes, ...]:
    if type(value) is not list or len(value) > count:
        raise BundleError(f"a bundle carries at most {count} {what}")
    for item in value:
        if type(item) is not bytes or not 0 < len(item) <= size:
            raise BundleError(f"a bundle's {what} are byte strings of 1 to {size} bytes")
    return tuple(value)


def _heads(value: object) -> dict[bytes, Head]:
    return heads_of_rows(value, BundleError, "a bundle")


def heads_of(heads: Mapping[bytes, Head]) -> dict[bytes, Head]:
    """Heads as a bundle names them (every head hash 32 bytes: a seq of 0 names zeros)."""
    zeros = bytes(32)
    return {a: h if len(h.head) == 32 else Head(h.seq, zeros, h.frozen) for a, h in heads.items()}


# ---------------------------------------------------------------- bundle files


def encode_file(envelopes: Sequence[bytes]) -> bytes:
    """A bundle file holding ``envelopes`` (wire forms), in order."""
    if len(envelopes) > MAX_FILE_ENVELOPES:
        raise UsageError(f"a bundle file holds at most {MAX_FILE_ENVELOPES} envelopes")
    return FILE_MAGIC + canonical.encode({0: FILE_VERSION, 1: list(envelopes)})


def decode_file(data: bytes) -> list[bytes]:
    """The envelopes of a bundle file (each still to be opened)."""
    if type(data) is not bytes or not data.startswith(FILE_MAGIC):
        raise BundleError("this is not a p2psync bundle file")
    if len(data) > MAX_FILE_BYTES:
        raise BundleError(f"a bundle file is at most {MAX_FILE_BYTES} bytes")
    try:
        body = canonical.decode(data[len(FILE_MAGIC) :], what="bundle file", max_depth=2)
    except DecodeError as exc:
        raise BundleError(f"the bundle file is damaged: {exc}") from exc
    if type(body) is not dict or set(body) != {0, 1} or not all(type(k) is int for k in body):
        raise BundleError("the bundle file is damaged: its body is not {0: version, 1: envelopes}")
    if type(body[0]) is not int or body[0] != FILE_VERSION:
        raise BundleError(f"unknown bundle file version {body[0]!r}; upgrade p2psync")
    envelopes = body[1]
    if type(envelopes) is not list or len(envelopes) > MAX_FILE_ENVELOPES:
        raise BundleError(f"a bundle file holds at most {MAX_FILE_ENVELOPES} envelopes")
    for wire in envelopes:
        if type(wire) is not bytes or not 0 < len(wire) <= MAX_ENVELOPE_BYTES:
            raise BundleError("the bundle file is damaged: an envelope is not a byte string")
    return list(envelopes)


MAX_INTRODUCTION_BYTES = MAX_PAYLOAD_BY_CLASS[EnvelopeClass.INTRODUCTION]


#: A join request's parts: the invite ID (as in the code) and the proof
#: (:func:`p2psync.pairing.relay_join_proof`).
JOIN_INVITE_BYTES = 8
JOIN_PROOF_BYTES = 32


@dataclass(frozen=True, slots=True)
class Introduction:
    """A pairing request or answer through the relay: rule objects, and, from a
    site joining with an invite code that names the relay, its join request."""

    name: str
    rule_objects: tuple[bytes, ...]
    #: (invite ID, proof): this site presents the inviter's invite code
    join: tuple[bytes, bytes] | None = None
    #: (invite ID, reason): this site, the inviter, refuses the recipient's join
    refused: tuple[bytes, str] | None = None


def encode_introduction(intro: Introduction) -> bytes:
    body: dict[int, object] = {0: VERSION, 1: intro.name, 2: list(intro.rule_objects)}
    if intro.join is not None:
        body[3] = list(intro.join)
    if intro.refused is not None:
        body[4] = [intro.refused[0], intro.refused[1][:MAX_REASON_CHARS]]
    data = canonical.encode(body)
    if len(data) > MAX_INTRODUCTION_BYTES:
        raise UsageError(f"an introduction is at most {MAX_INTRODUCTION_BYTES} bytes")
    return data


def decode_introduction(payload: bytes) -> Introduction:
    """Strictly decode an introduction (the payload of an opened class-2 envelope)."""
    if type(payload) is not bytes or len(payload) > MAX_INTRODUCTION_BYTES:
        raise BundleError(f"an introduction is at most {MAX_INTRODUCTION_BYTES} bytes")
    try:
        body = canonical.decode(payload, what="introduction", max_depth=2)
    except DecodeError as exc:
        raise BundleError(str(exc)) from exc
    if type(body) is not dict or not {0, 1, 2} <= set(body) <= {0, 1, 2, 3, 4}:
        raise BundleError(
            "an introduction is a map with the keys 0-2 (and 3: a join, 4: a refusal)"
        )
    if type(body[0]) is not int or body[0] != VERSION:
        raise BundleError(f"unknown introduction version {body[0]!r}")
    name = body[1]
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise BundleError(f"an introduction's name is 1-{MAX_NAME_CHARS} printable characters")
    objects = _strings(body[2], MAX_RULE_OBJECTS, MAX_RULE_BYTES, "rule objects")
    join = None
    if 3 in body:
        parts = body[3]
        if (
            type(parts) is not list
            or len(parts) != 2
            or type(parts[0]) is not bytes
            or len(parts[0]) != JOIN_INVITE_BYTES
            or type(parts[1]) is not bytes
            or len(parts[1]) != JOIN_PROOF_BYTES
        ):
            raise BundleError("an introduction's join is [invite ID (8 bytes), proof (32)]")
        join = (parts[0], parts[1])
    refused = None
    if 4 in body:
        parts = body[4]
        if (
            type(parts) is not list
            or len(parts) != 2
            or type(parts[0]) is not bytes
            or len(parts[0]) != JOIN_INVITE_BYTES
            or type(parts[1]) is not str
            or not 0 < len(parts[1]) <= MAX_REASON_CHARS
        ):
            raise BundleError(
                f"an introduction's refusal is [invite ID (8 bytes), reason "
                f"(1-{MAX_REASON_CHARS} characters)]"
            )
        refused = (parts[0], parts[1])
    if not objects and join is None and refused is None:
        raise BundleError(
            "an introduction carries a join, a refusal or at least one rule object"
        )
    return Introduction(name, objects, join, refused)
