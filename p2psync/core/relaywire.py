"""The relay protocol: messages between an agent and a relay node (sans-IO).

A relay session is Noise XX with the prologue ``b"p2psync-relay/1"`` (never
confused with a sync session, whose prologue is ``b"p2psync/1"``), then sealed
frames each holding one message: the canonical CBOR encoding of an array whose
first element is the message type. Decoding is strict as in
``core/messages.py``; anything off is a :class:`~p2psync.errors.RemoteProtocolError`.
The full description is in ``docs/relay.md`` ("Relay sessions").

====  ===========  ================================================  ===========
type  name         fields                                            sent by
====  ===========  ================================================  ===========
1     Hello        token: null or [token id (8), proof (32)]         agent, first
2     Welcome      relay time (ms), max sealed size, ttl default,    relay
                   ttl max (ms)
3     Bye          reason (text)                                     either
4     Policy       rid, signed mailbox policy (bstr)                 agent
5     Deposit      rid, envelope (bstr, wire form)                   agent
6     Fetch        rid, after (position), limit                      agent
7     Delete       rid, [[sender (32), seq], ...]                    agent
8     Retract      rid, recipient (32), [seq, ...]                   agent
9     TakeNotices  rid                                               agent
10    Ping         nonce                                             either
11    Pong         nonce                                             either
12    Arrived      position                                          relay, unasked
13    Stored       rid, until (ms)                                   relay
14    Duplicate    rid, until (ms)                                   relay
15    Refused      rid, code, detail (text)                          relay
16    Envelopes    rid, [[position, until, envelope], ...], more     relay
17    Done         rid, count                                        relay
18    Notices      rid, [[recipient (32), seq, until], ...]          relay
20    Connect      rid, peer (32)                                    agent
21    Invitation   rid, peer (32), key (32), expires (ms)[, address] relay
22    Invited      peer (32), key (32), expires (ms)                 relay, unasked
23    Join         key (32)                                          agent, first
24    Spliced      peer (32)                                         relay
====  ===========  ================================================  ===========

Types 20-24 are the live splice; 25-39 are reserved. A relay answers an unknown
type with ``Bye``. ``rid`` is the agent's request number: every request
gets exactly one answer carrying its rid, in the order the requests were sent,
so an agent may pipeline requests.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2psync.core import canonical
from p2psync.core.envelope import MAX_ENVELOPE_BYTES, MAX_SEALED_BYTES
from p2psync.core.mailbox import MAX_FETCH
from p2psync.core.messages import MAX_REASON_CHARS
from p2psync.errors import RemoteProtocolError

PROLOGUE = b"p2psync-relay/1"
#: Largest message: one envelope of the largest size with room for its framing.
MAX_MESSAGE_BYTES = MAX_ENVELOPE_BYTES + 4096
#: Most (sender, seq) pairs one Delete names, seqs one Retract names, notices one
#: Notices answer carries.
MAX_NAMES = MAX_FETCH
_MAX_INT = (1 << 63) - 1
TOKEN_ID_BYTES = 8
TOKEN_PROOF_BYTES = 32
KEY_BYTES = 32
SPLICE_KEY_BYTES = 32


class RefusalCode(enum.IntEnum):
    """Why the relay refused a request (``Refused.code``)."""

    NOT_ALLOWED = 1  # data/receipt from a sender not on the recipient's policy
    TOO_BIG = 2  # the envelope is larger than the relay stores
    EXPIRED = 3  # the envelope's expiry has passed
    FULL = 4  # a quota would be exceeded (the detail names it, with use and limit)
    MALFORMED = 5  # the envelope's header is malformed, or not the session's sender
    NOT_NEWER = 6  # a mailbox policy whose version is not above the one in force
    BUSY = 7  # the relay cannot take it now (storage failed); try again later
    UNAVAILABLE = 8  # no splice: the peer is unknown, not allowing it, or not here


@dataclass(frozen=True, slots=True)
class Hello:
    token: tuple[bytes, bytes] | None  # (token id, proof) or None (allow-listed)


@dataclass(frozen=True, slots=True)
class Welcome:
    now_ms: int
    max_sealed: int
    ttl_default_ms: int
    ttl_max_ms: int


@dataclass(frozen=True, slots=True)
class Bye:
    reason: str


@dataclass(frozen=True, slots=True)
class Policy:
    rid: int
    signed: bytes


@dataclass(frozen=True, slots=True)
class Deposit:
    rid: int
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Fetch:
    rid: int
    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class Delete:
    rid: int
    keys: tuple[tuple[bytes, int], ...]


@dataclass(frozen=True, slots=True)
class Retract:
    rid: int
    recipient: bytes
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TakeNotices:
    rid: int


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


@dataclass(frozen=True, slots=True)
class Arrived:
    position: int


@dataclass(frozen=True, slots=True)
class Stored:
    rid: int
    until_ms: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    rid: int
    until_ms: int


@dataclass(frozen=True, slots=True)
class Refused:
    rid: int
    code: RefusalCode
    detail: str


@dataclass(frozen=True, slots=True)
class Held:
    """One envelope as a fetch serves it."""

    position: int
    until_ms: int
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Envelopes:
    rid: int
    held: tuple[Held, ...]
    more: bool  # the relay holds more after the last one served


@dataclass(frozen=True, slots=True)
class Done:
    rid: int
    count: int


@dataclass(frozen=True, slots=True)
class Notice:
    recipient: bytes
    seq: int
    until_ms: int


@dataclass(frozen=True, slots=True)
class Notices:
    rid: int
    notices: tuple[Notice, ...]


@dataclass(frozen=True, slots=True)
class Connect:
    """Ask for a live splice with ``peer``."""

    rid: int
    peer: bytes


@dataclass(frozen=True, slots=True)
class Invitation:
    """The answer to :class:`Connect`: present ``key`` in a fresh connection's
    :class:`Join` before ``expires_ms``; this side runs the handshake inside as
    the initiator. ``address`` (``host:port``, optional): join at that node of
    the relay, not at the one asked (the peer's session is there; several relay
    nodes share one identity, so the handshake expects the same key)."""

    rid: int
    peer: bytes
    key: bytes
    expires_ms: int
    address: str = ""


@dataclass(frozen=True, slots=True)
class Invited:
    """Unasked: ``peer`` asked for a splice with this device (the responder)."""

    peer: bytes
    key: bytes
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Join:
    """The first message of a splice connection, instead of ``Hello``."""

    key: bytes


@dataclass(frozen=True, slots=True)
class Spliced:
    """Both sides joined: after this frame the connection carries ``peer``'s bytes."""

    peer: bytes


#: Requests the mailbox service answers (``Connect``, also a request, the node does).
Request = Policy | Deposit | Fetch | Delete | Retract | TakeNotices
Answer = Stored | Duplicate | Refused | Envelopes | Done | Notices | Invitation
Splice = Connect | Invited | Join | Spliced
Message = Hello | Welcome | Bye | Ping | Pong | Arrived | Request | Answer | Splice


def encode(message: Message) -> bytes:
    return canonical.encode(_body(message))


def _body(message: Message) -> list[Any]:
    match message:
        case Hello(token=None):
            return [1, None]
        case Hello(token=(ident, proof)):
            return [1, [ident, proof]]
        case Welcome():
            return [
                2,
                message.now_ms,
                message.max_sealed,
                message.ttl_default_ms,
                message.ttl_max_ms,
            ]
        case Bye():
            return [3, message.reason[:MAX_REASON_CHARS]]
        case Policy():
            return [4, message.rid, message.signed]
        case Deposit():
            return [5, message.rid, message.envelope]
        case Fetch():
            return [6, message.rid, message.after, message.limit]
        case Delete():
            return [7, message.rid, [[s, q] for s, q in message.keys]]
        case Retract():
            return [8, message.rid, message.recipient, list(message.seqs)]
        case TakeNotices():
            return [9, message.rid]
        case Ping():
            return [10, message.nonce]
        case Pong():
            return [11, message.nonce]
        case Arrived():
            return [12, message.position]
        case Stored():
            return [13, message.rid, message.until_ms]
        case Duplicate():
            return [14, message.rid, message.until_ms]
        case Refused():
            return [15, message.rid, int(message.code), message.detail[:MAX_REASON_CHARS]]
        case Envelopes():
            rows = [[h.position, h.until_ms, h.envelope] for h in message.held]
            return [16, message.rid, rows, message.more]
        case Done():
            return [17, message.rid, message.count]
        case Notices():
            return [18, message.rid, [[n.recipient, n.seq, n.until_ms] for n in message.notices]]
        case Connect():
            return [20, message.rid, message.peer]
        case Invitation():
            fields = [21, message.rid, message.peer, message.key, message.expires_ms]
            return [*fields, message.address] if message.address else fields
        case Invited():
            return [22, message.peer, message.key, message.expires_ms]
        case Join():
            return [23, message.key]
        case Spliced():
            return [24, message.peer]
    raise TypeError(f"not a relay message: {message!r}")


def decode(data: bytes) -> Message:
    """Strictly decode one relay message; raise :class:`RemoteProtocolError`."""
    body = canonical.message_body(data, what="relay message", max_bytes=MAX_MESSAGE_BYTES)
    decoder = _DECODERS.get(body[0])
    if decoder is None:
        raise RemoteProtocolError(f"unknown relay message type {body[0]}")
    try:
        return decoder(body[1:])
    except (ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"malformed relay message of type {body[0]}: {exc}") from exc


def _int(value: object, low: int = 0, high: int = _MAX_INT) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"expected an integer from {low} to {high}")
    return value


def _bytes(value: object, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise ValueError(f"expected {size} bytes")
    return value


def _blob(value: object) -> bytes:
    if type(value) is not bytes or not value:
        raise ValueError("expected a non-empty byte string")
    return value


def _text(value: object) -> str:
    if type(value) is not str or len(value) > MAX_REASON_CHARS:
        raise ValueError(f"expected text of at most {MAX_REASON_CHARS} characters")
    return value


#: The longest node address an Invitation carries (``host:port``).
MAX_ADDRESS_CHARS = 255


def _address(value: object) -> str:
    if (
        type(value) is not str
        or not 0 < len(value) <= MAX_ADDRESS_CHARS
        or not value.isprintable()
        or ":" not in value
    ):
        raise ValueError("expected a node address host:port")
    return value


def _list(value: object, cap: int) -> list[Any]:
    if type(value) is not list or len(value) > cap:
        raise ValueError(f"expected a list of at most {cap} items")
    return value


def _fields(fields: list[Any], count: int) -> list[Any]:
    if len(fields) != count:
        raise ValueError(f"expected {count} fields")
    return fields


def _hello(fields: list[Any]) -> Hello:
    (token,) = _fields(fields, 1)
    if token is None:
        return Hello(None)
    pair = _list(token, 2)
    if len(pair) != 2:
        raise ValueError("a token is [id, proof]")
    return Hello((_bytes(pair[0], TOKEN_ID_BYTES), _bytes(pair[1], TOKEN_PROOF_BYTES)))


def _welcome(fields: list[Any]) -> Welcome:
    now, sealed, ttl_default, ttl_max = _fields(fields, 4)
    return Welcome(
        _int(now), _int(sealed, 1, MAX_SEALED_BYTES), _int(ttl_default, 1), _int(ttl_max, 1)
    )


def _delete(fields: list[Any]) -> Delete:
    rid, rows = _fields(fields, 2)
    keys = []
    for row in _list(rows, MAX_NAMES):
        pair = _list(row, 2)
        if len(pair) != 2:
            raise ValueError("a key is [sender, seq]")
        keys.append((_bytes(pair[0], KEY_BYTES), _int(pair[1], 1)))
    return Delete(_int(rid), tuple(keys))


def _retract(fields: list[Any]) -> Retract:
    rid, recipient, seqs = _fields(fields, 3)
    return Retract(
        _int(rid), _bytes(recipient, KEY_BYTES), tuple(_int(s, 1) for s in _list(seqs, MAX_NAMES))
    )


def _refused(fields: list[Any]) -> Refused:
    rid, code, detail = _fields(fields, 3)
    try:
        reason = RefusalCode(_int(code))
    except ValueError as exc:
        raise ValueError(f"unknown refusal code {code}") from exc
    return Refused(_int(rid), reason, _text(detail))


def _envelopes(fields: list[Any]) -> Envelopes:
    rid, rows, more = _fields(fields, 3)
    held = []
    previous = 0
    for row in _list(rows, MAX_FETCH):
        triple = _list(row, 3)
        if len(triple) != 3:
            raise ValueError("an envelope served is [position, until, envelope]")
        position = _int(triple[0], 1)
        if position <= previous:
            raise ValueError("envelopes are served in increasing position order")
        previous = position
        held.append(Held(position, _int(triple[1]), _blob(triple[2])))
    if type(more) is not bool:
        raise ValueError("more is a boolean")
    return Envelopes(_int(rid), tuple(held), more)


def _notices(fields: list[Any]) -> Notices:
    rid, rows = _fields(fields, 2)
    notices = []
    for row in _list(rows, MAX_NAMES):
        triple = _list(row, 3)
        if len(triple) != 3:
            raise ValueError("a notice is [recipient, seq, until]")
        notices.append(Notice(_bytes(triple[0], KEY_BYTES), _int(triple[1], 1), _int(triple[2])))
    return Notices(_int(rid), tuple(notices))


def _one(fields: list[Any]) -> Any:
    (value,) = _fields(fields, 1)
    return value


_DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    1: _hello,
    2: _welcome,
    3: lambda f: Bye(_text(_one(f))),
    4: lambda f: Policy(_int(_fields(f, 2)[0]), _blob(f[1])),
    5: lambda f: Deposit(_int(_fields(f, 2)[0]), _blob(f[1])),
    6: lambda f: Fetch(_int(_fields(f, 3)[0]), _int(f[1]), _int(f[2], 1, MAX_FETCH)),
    7: _delete,
    8: _retract,
    9: lambda f: TakeNotices(_int(_one(f))),
    10: lambda f: Ping(_int(_one(f))),
    11: lambda f: Pong(_int(_one(f))),
    12: lambda f: Arrived(_int(_one(f), 1)),
    13: lambda f: Stored(_int(_fields(f, 2)[0]), _int(f[1])),
    14: lambda f: Duplicate(_int(_fields(f, 2)[0]), _int(f[1])),
    15: _refused,
    16: _envelopes,
    17: lambda f: Done(_int(_fields(f, 2)[0]), _int(f[1])),
    18: _notices,
    20: lambda f: Connect(_int(_fields(f, 2)[0]), _bytes(f[1], KEY_BYTES)),
    21: lambda f: Invitation(
        _int(_fields(f, 4 if len(f) < 5 else 5)[0]), _bytes(f[1], KEY_BYTES),
        _bytes(f[2], SPLICE_KEY_BYTES), _int(f[3]), _address(f[4]) if len(f) == 5 else "",
    ),
    22: lambda f: Invited(
        _bytes(_fields(f, 3)[0], KEY_BYTES), _bytes(f[1], SPLICE_KEY_BYTES), _int(f[2])
    ),
    23: lambda f: Join(_bytes(_one(f), SPLICE_KEY_BYTES)),
    24: lambda f: Spliced(_bytes(_one(f), KEY_BYTES)),
}

REQUESTS = (Policy, Deposit, Fetch, Delete, Retract, TakeNotices)
ANSWERS = (Stored, Duplicate, Refused, Envelopes, Done, Notices, Invitation)

TOKEN_PREFIX = b"p2psync/v1/relay-token\x00"


def token_proof(secret: bytes, handshake_hash: bytes) -> bytes:
    """What ``Hello`` carries for an admission token: bound to this session's
    handshake hash, so an overheard proof is worthless in any other session."""
    return hashlib.blake2b(
        TOKEN_PREFIX + handshake_hash, key=secret, digest_size=TOKEN_PROOF_BYTES
    ).digest()


TOKEN_TEXT_PREFIX = "rt1-"
TOKEN_SECRET_BYTES = 32
_TOKEN_CHECK_BYTES = 2


def token_text(ident: bytes, secret: bytes) -> str:
    """An admission token as an operator hands it over: ``rt1-`` and the base32 of
    its id (8 bytes), secret (32 bytes) and a 2-byte check (BLAKE2b of both)."""
    if len(ident) != TOKEN_ID_BYTES or len(secret) != TOKEN_SECRET_BYTES:
        raise ValueError("a token is an 8-byte id and a 32-byte secret")
    payload = ident + secret
    check = hashlib.blake2b(payload, digest_size=_TOKEN_CHECK_BYTES).digest()
    return TOKEN_TEXT_PREFIX + base64.b32encode(payload + check).decode().rstrip("=").lower()


def parse_token(text: str) -> tuple[bytes, bytes]:
    """``(id, secret)`` of a token's text; ValueError with a one-sentence reason."""
    text = text.strip().lower()  # a phone or a mail program may capitalise it
    if not text.startswith(TOKEN_TEXT_PREFIX):
        raise ValueError(f"a relay token starts with {TOKEN_TEXT_PREFIX!r}")
    body = text[len(TOKEN_TEXT_PREFIX) :].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except (ValueError, binascii.Error) as exc:
        raise ValueError("a relay token is rt1- and base32 text") from exc
    if len(raw) != TOKEN_ID_BYTES + TOKEN_SECRET_BYTES + _TOKEN_CHECK_BYTES:
        raise ValueError("the relay token is cut short or too long: copy it whole")
    payload, check = raw[:-_TOKEN_CHECK_BYTES], raw[-_TOKEN_CHECK_BYTES:]
    if hashlib.blake2b(payload, digest_size=_TOKEN_CHECK_BYTES).digest() != check:
        raise ValueError("the relay token has a typo (its check characters do not match)")
    return payload[:TOKEN_ID_BYTES], payload[TOKEN_ID_BYTES:]
