"""Sync protocol messages: what travels inside the encrypted frames.

Every message is the canonical CBOR encoding of an array whose first element is
the message type. Decoding is strict: wrong shapes, unknown types, trailing
bytes and non-canonical encodings are a
:class:`~p2psync.errors.RemoteProtocolError`. The full wire
description is in ``docs/protocol.md``.

====  =========  ===============================================================
type  name       fields
====  =========  ===============================================================
1     Have       heads: [[author(32), seq, head(32), frozen(bool)], ...]
2     Entries    batch (uint), [wire entry (bstr), ...]
3     Ack        batch (uint)
4     Caught     heads digest (16 bytes)
5     Ping       nonce (uint)
6     Pong       nonce (uint)
7     Bye        reason (text)
8     Rules      [signed rule object (bstr), ...]
9     Join       invite id (8 bytes), proof (32 bytes)
10    RulesHeld  digest of the rule objects held for the pair (16 bytes), on demand (bool)
11    Stuck      reason (text): we refused entries you sent, not your fault; why
12    Want       [entry id (32), ...]: send these entries again, with the payloads you may
13    Resent     count (uint): what I hold of your last Want has gone (count entries)
====  =========  ===============================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from p2psync.core import canonical
from p2psync.errors import RemoteProtocolError

#: Largest decoded message; an Entries batch stays well below it.
MAX_MESSAGE_BYTES = 2 << 20
#: Most authors a store holds logs of (store/writer.py refuses entries of more).
#: Sites are authors, so real deployments have tens or hundreds; the limit keeps a
#: peer from flooding us with throwaway keys, and a Have (~790 KB at most) well
#: inside one message.
MAX_AUTHORS = 10_000
MAX_BATCH_ENTRIES = 10_000
#: Longest reason text: of a Bye, or of a rejected rule (core/rules.py).
MAX_REASON_CHARS = 500
DIGEST_BYTES = 16
MAX_RULE_OBJECTS = 1000
#: Most entry IDs one Want names (32 KiB of IDs); a side asks again once answered.
MAX_WANT_IDS = 1024


@dataclass(frozen=True, slots=True)
class Head:
    """What one side holds of one author's log."""

    seq: int
    head: bytes
    frozen: bool = False


Heads = Mapping[bytes, Head]


@dataclass(frozen=True, slots=True)
class Have:
    heads: dict[bytes, Head]


@dataclass(frozen=True, slots=True)
class Entries:
    batch: int
    wires: list[bytes]


@dataclass(frozen=True, slots=True)
class Ack:
    batch: int


@dataclass(frozen=True, slots=True)
class Caught:
    digest: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


@dataclass(frozen=True, slots=True)
class Bye:
    reason: str


@dataclass(frozen=True, slots=True)
class Stuck:
    """We are quiet and lack entries you hold and sent: we refused them (or hold
    them behind one we refused), for a reason that is not your fault. The session
    stays up."""

    reason: str


@dataclass(frozen=True, slots=True)
class Want:
    """Entries we hold without payloads the rules now let you send us: send them
    again, with every payload you hold and may send (ascending, unique IDs of
    entries you hold)."""

    ids: list[bytes]


@dataclass(frozen=True, slots=True)
class Resent:
    """Every entry of your last Want that we hold has been sent (``count``); the
    others we do not hold."""

    count: int


@dataclass(frozen=True, slots=True)
class Rules:
    objects: list[bytes]


@dataclass(frozen=True, slots=True)
class Join:
    invite: bytes
    proof: bytes


@dataclass(frozen=True, slots=True)
class RulesHeld:
    digest: bytes
    on_demand: bool = False  # the sender syncs on demand: on-demand rules count


Message = (
    Have
    | Entries
    | Ack
    | Caught
    | Ping
    | Pong
    | Bye
    | Rules
    | Join
    | RulesHeld
    | Stuck
    | Want
    | Resent
)


def heads_digest(heads: Heads) -> bytes:
    """A short digest of a set of heads: equal digests mean equal holdings."""
    hasher = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"p2psync-heads")
    for author in sorted(heads):
        head = heads[author]
        hasher.update(author + head.seq.to_bytes(8, "big") + head.head)
    return hasher.digest()


def rules_digest(objects: Iterable[bytes]) -> bytes:
    """Digest of a set of signed rule objects (order does not matter)."""
    hasher = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"p2psync-rules")
    for identifier in sorted(hashlib.blake2b(o, digest_size=32).digest() for o in objects):
        hasher.update(identifier)
    return hasher.digest()


def lag(ours: Mapping[bytes, int], theirs: Mapping[bytes, int]) -> tuple[int, int]:
    """``(behind, ahead)``: entries they hold that we lack, and the reverse."""
    behind = sum(max(0, seq - ours.get(author, 0)) for author, seq in theirs.items())
    ahead = sum(max(0, seq - theirs.get(author, 0)) for author, seq in ours.items())
    return behind, ahead


def encode(message: Message) -> bytes:
    body: list[Any]
    if isinstance(message, Have):
        body = [1, [[a, h.seq, h.head, h.frozen] for a, h in sorted(message.heads.items())]]
    elif isinstance(message, Entries):
        body = [2, message.batch, message.wires]
    elif isinstance(message, Ack):
        body = [3, message.batch]
    elif isinstance(message, Caught):
        body = [4, message.digest]
    elif isinstance(message, Ping):
        body = [5, message.nonce]
    elif isinstance(message, Pong):
        body = [6, message.nonce]
    elif isinstance(message, Bye):
        body = [7, message.reason[:MAX_REASON_CHARS]]
    elif isinstance(message, Rules):
        body = [8, message.objects]
    elif isinstance(message, Join):
        body = [9, message.invite, message.proof]
    elif isinstance(message, Stuck):
        body = [11, message.reason[:MAX_REASON_CHARS]]
    elif isinstance(message, Want):
        body = [12, message.ids]
    elif isinstance(message, Resent):
        body = [13, message.count]
    else:
        body = [10, message.digest, message.on_demand]
    return canonical.encode(body)


def decode(data: bytes) -> Message:
    """Strictly decode one message; raise :class:`RemoteProtocolError` on anything off."""
    body = canonical.message_body(data, what="message", max_bytes=MAX_MESSAGE_BYTES)
    decoder = _DECODERS.get(body[0])
    if decoder is None:
        raise RemoteProtocolError(f"unknown message type {body[0]}")
    try:
        return decoder(body)
    except (ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"malformed message of type {body[0]}: {exc}") from exc


def _uint(value: object) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise ValueError("expected an unsigned 64-bit integer")
    return value


def _bytes(value: object, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise ValueError(f"expected {size} bytes")
    return value


def _fields(body: list[Any], count: int) -> list[Any]:
    if len(body) != count + 1:
        raise ValueError(f"expected {count} fields")
    return body[1:]


def _have(body: list[Any]) -> Have:
    (rows,) = _fields(body, 1)
    if type(rows) is not list or len(rows) > MAX_AUTHORS:
        raise ValueError("heads must be a list")
    heads: dict[bytes, Head] = {}
    previous = b""
    for row in rows:
        if type(row) is not list or len(row) != 4:
            raise ValueError("a head is [author, seq, head, frozen]")
        author = _bytes(row[0], 32)
        if author <= previous:
            raise ValueError("heads must be sorted by author, without repeats")
        previous = author
        if type(row[3]) is not bool:
            raise ValueError("frozen must be a boolean")
        heads[author] = Head(_uint(row[1]), _bytes(row[2], 32), row[3])
    return Have(heads)


def _entries(body: list[Any]) -> Entries:
    batch, wires = _fields(body, 2)
    if type(wires) is not list or not 0 < len(wires) <= MAX_BATCH_ENTRIES:
        raise ValueError(f"a batch holds 1-{MAX_BATCH_ENTRIES} entries")
    for wire in wires:
        if type(wire) is not bytes:
            raise ValueError("entries are byte strings")
    return Entries(_uint(batch), wires)


def _text(body: list[Any]) -> str:
    (reason,) = _fields(body, 1)
    if type(reason) is not str or len(reason) > MAX_REASON_CHARS:
        raise ValueError("reason must be short text")
    return reason


def _reason(body: list[Any]) -> Bye:
    return Bye(_text(body))


def _rules(body: list[Any]) -> Rules:
    (objects,) = _fields(body, 1)
    if type(objects) is not list or len(objects) > MAX_RULE_OBJECTS:
        raise ValueError(f"at most {MAX_RULE_OBJECTS} rule objects")
    for obj in objects:
        if type(obj) is not bytes:
            raise ValueError("rule objects are byte strings")
    return Rules(objects)


def _rules_held(body: list[Any]) -> RulesHeld:
    digest, on_demand = _fields(body, 2)
    if type(on_demand) is not bool:
        raise ValueError("on_demand must be a boolean")
    return RulesHeld(_bytes(digest, DIGEST_BYTES), on_demand)


def _want(body: list[Any]) -> Want:
    (ids,) = _fields(body, 1)
    if type(ids) is not list or not 0 < len(ids) <= MAX_WANT_IDS:
        raise ValueError(f"a Want names 1-{MAX_WANT_IDS} entries")
    previous = b""
    for entry in ids:
        if _bytes(entry, 32) <= previous:
            raise ValueError("a Want's entry IDs are ascending, without repeats")
        previous = entry
    return Want(ids)


def _join(body: list[Any]) -> Join:
    invite, proof = _fields(body, 2)
    return Join(_bytes(invite, 8), _bytes(proof, 32))


_DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    1: _have,
    2: _entries,
    3: lambda body: Ack(_uint(_fields(body, 1)[0])),
    4: lambda body: Caught(_bytes(_fields(body, 1)[0], DIGEST_BYTES)),
    5: lambda body: Ping(_uint(_fields(body, 1)[0])),
    6: lambda body: Pong(_uint(_fields(body, 1)[0])),
    7: _reason,
    8: _rules,
    9: _join,
    10: _rules_held,
    11: lambda body: Stuck(_text(body)),
    12: _want,
    13: lambda body: Resent(_uint(_fields(body, 1)[0])),
}


def heads_of_rows(value: object, error: type[Exception], what: str) -> dict[bytes, Head]:
    """Heads as a receipt or a bundle names them: ``[[author (32), seq, head (32),
    frozen], ...]`` ascending by author, at most :data:`MAX_AUTHORS`, seqs up to
    2**63 - 1; anything else raises ``error`` (saying ``what`` holds them)."""
    if type(value) is not list or len(value) > MAX_AUTHORS:
        raise error(f"{what} names at most {MAX_AUTHORS} heads")
    heads: dict[bytes, Head] = {}
    previous = b""
    for row in value:
        if (
            type(row) is not list
            or len(row) != 4
            or type(row[0]) is not bytes
            or len(row[0]) != 32
            or type(row[1]) is not int
            or not 0 <= row[1] <= (1 << 63) - 1
            or type(row[2]) is not bytes
            or len(row[2]) != 32
            or type(row[3]) is not bool
        ):
            raise error("a head is [author(32), seq, head(32), frozen]")
        if row[0] <= previous:
            raise error(f"{what}'s heads are ascending by author, without repeats")
        previous = row[0]
        heads[row[0]] = Head(row[1], row[2], row[3])
    return heads
