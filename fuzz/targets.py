"""Fuzz targets: one function per decoder a peer, a relay or a file can reach.

Each target takes the fuzzer's bytes and hands them to the real decoder (never a
copy of its logic). A decoder may refuse its input only with a typed error: the
class its module documents for that input (``TARGETS[name].expected``, always a
:class:`~p2psync.errors.P2PSyncError`). Anything else escaping (``IndexError``,
``KeyError``, ``RecursionError``, a ``P2PSyncError`` of the wrong branch, a hang)
is a crash: :func:`run_one` lets it through for the fuzzer to report.

Where a decoder checks a signature, a seal or an AEAD tag that random bytes never
pass, the target has a second *mode* (the first input byte picks it) that signs,
seals or encrypts the fuzzed bytes with fixed keys (:data:`ALICE`, :data:`BOB`,
:data:`RELAY`) before decoding, so the fuzzer reaches what lies behind the check.
Everything is deterministic: the same input always takes the same path.

No atheris here: ``fuzz/run.py`` drives these under atheris, ``fuzz/corpus.py``
writes their seeds, and a test can call :func:`run_one` directly.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from p2psync import errors, pairing
from p2psync.core import (
    bundle,
    canonical,
    entry,
    envelope,
    frames,
    messages,
    policy,
    receipt,
    relaywire,
    rules,
)
from p2psync.core.handshake import PROLOGUE, Handshake, x25519_public
from p2psync.core.identity import Identity
from p2psync.core.noise import HandshakeState, KeyPair
from p2psync.net import adverts

#: Fixed keys (never secret: they exist only to reach code behind a signature check).
ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(32, 64)))
RELAY = Identity(bytes(range(64, 96)))
FRAME_KEY = hashlib.blake2b(b"p2psync fuzz frame key", digest_size=32).digest()
EPHEMERAL_A = hashlib.blake2b(b"p2psync fuzz ephemeral a", digest_size=32).digest()
EPHEMERAL_B = hashlib.blake2b(b"p2psync fuzz ephemeral b", digest_size=32).digest()
SEAL_SECRET = hashlib.blake2b(b"p2psync fuzz seal", digest_size=32).digest()
EXPIRY_MS = 1_900_000_000_000


@dataclass(frozen=True)
class Target:
    """A decoder under fuzzing: ``run`` feeds it; ``expected`` is what it may raise."""

    run: Callable[[bytes], object]
    expected: type[errors.P2PSyncError]
    doc: str


def split2(data: bytes) -> tuple[bytes, bytes]:
    """Two byte strings from one input: a 2-byte big-endian length, then the first."""
    n = int.from_bytes(data[:2], "big")
    return data[2 : 2 + n], data[2 + n :]


def join2(first: bytes, second: bytes) -> bytes:
    """The inverse of :func:`split2` (for seeds)."""
    return len(first).to_bytes(2, "big") + first + second


def signed_pair(identity: Identity, prefix: bytes, body: bytes) -> bytes:
    """``[body, signature]`` as every signed object carries it, signed with ``prefix``."""
    return canonical.encode([body, identity.sign(prefix + body)])


# ---------------------------------------------------------------- frames


def fuzz_frames(data: bytes) -> None:
    """A byte stream into :class:`FrameReader` (mode byte: limit and chunk size), each
    frame through one :class:`Opener` keyed with :data:`FRAME_KEY`, in order."""
    if not data:
        return
    mode, stream = data[0], data[1:]
    limit = frames.MAX_HANDSHAKE_FRAME if mode & 0x80 else frames.MAX_FRAME
    chunk = (mode & 0x7F) + 1
    reader = frames.FrameReader(limit)
    opener = frames.Opener(FRAME_KEY)
    for start in range(0, len(stream), chunk):
        reader.feed(stream[start : start + chunk])
        while (got := reader.next_frame()) is not None:
            header, body = got
            if not mode & 0x80:
                opener.open(header, body)
    reader.take_rest()


# ---------------------------------------------------------------- handshake


def _initiator() -> Handshake:
    return Handshake(
        ALICE, initiator=True, ephemeral=EPHEMERAL_A, name="Alice", expect=BOB.public_key
    )


def _responder() -> Handshake:
    return Handshake(
        BOB, initiator=False, ephemeral=EPHEMERAL_B, name="Bob", trust=lambda key: True
    )


def _noise(identity: Identity, *, initiator: bool, ephemeral: bytes) -> HandshakeState:
    return HandshakeState(
        "XX",
        initiator,
        prologue=PROLOGUE,
        s=KeyPair.from_private(identity.x25519_private),
        e=KeyPair.from_private(ephemeral),
    )


def fuzz_handshake(data: bytes) -> None:
    """Handshake messages and the identity payload. Mode (first byte % 4):
    0 the responder reads message 1; 1 the initiator reads message 2 (after its
    fixed message 1); 2 the initiator reads a message 2 that a Noise machine with
    Bob's keys encrypted around the fuzzed *payload*; 3 the responder reads a
    message 3 carrying a fuzzed payload from a Noise machine with Alice's keys."""
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        _responder().receive(rest)
    elif mode == 1:
        ours = _initiator()
        ours.start()
        ours.receive(rest)
    elif mode == 2:
        ours = _initiator()
        theirs = _noise(BOB, initiator=False, ephemeral=EPHEMERAL_B)
        first = ours.start()
        assert first is not None
        theirs.read_message(first)
        ours.receive(theirs.write_message(rest))
    else:
        responder = _responder()
        theirs = _noise(ALICE, initiator=True, ephemeral=EPHEMERAL_A)
        second = responder.receive(theirs.write_message())
        assert second is not None
        theirs.read_message(second)
        responder.receive(theirs.write_message(rest))


# ---------------------------------------------------------------- sync and relay messages


def fuzz_messages(data: bytes) -> None:
    """A sync message (``core/messages.py``)."""
    messages.decode(data)


def fuzz_relaywire(data: bytes) -> None:
    """A relay protocol message (``core/relaywire.py``), as relay and agent read them."""
    relaywire.decode(data)


# ---------------------------------------------------------------- entries


def entry_around(blob: bytes) -> bytes:
    """The wire form of an entry by Alice whose payload list is ``blob``: its signed
    body commits to each payload's digest (all in collection ``vouchers``), so the
    payloads' own checks run. ``blob`` is taken for a list of byte strings when it
    decodes as one (1-16 of them), else for one payload."""
    try:
        payloads = canonical.loads_strict(blob, what="fuzz", max_depth=1)
    except errors.DecodeError:
        payloads = None
    if type(payloads) is not list or not 0 < len(payloads) <= 16:
        payloads, blob = [blob], canonical.encode([blob])
    digests = [
        hashlib.blake2b(p, digest_size=entry.ID_BYTES).digest() if type(p) is bytes else bytes(32)
        for p in payloads
    ]
    body = canonical.encode(
        {0: 1, 1: ALICE.public_key, 2: 1, 3: None, 4: 0, 5: [["vouchers", d] for d in digests]}
    )
    return entry.wire_form(signed_pair(ALICE, entry.SIGN_PREFIX, body), blob)


def fuzz_entry(data: bytes) -> None:
    """An entry: mode (first byte % 4) 0 the wire form (``decode_wire``, then its
    signature check); 1 the stored form (``decode_stored``: signed part and payload
    list, split by :func:`split2`); 2 ``stored_collections`` of a signed part; 3 the
    fuzzed bytes as the payload list (or one payload) of an entry whose body commits
    to them (:func:`entry_around`)."""
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        entry.decode_wire(rest).signature_valid()
    elif mode == 1:
        signed, payloads = split2(rest)
        entry.decode_stored(signed, payloads).signature_valid()
    elif mode == 2:
        entry.stored_collections(rest)
    else:
        entry.decode_wire(entry_around(rest))


# ---------------------------------------------------------------- rule objects


def fuzz_rules(data: bytes) -> None:
    """A rule object: mode (first byte % 3) 0 as received; 1 and 2 the fuzzed bytes
    are the *body*, signed by Alice (1) or Bob (2), so decoding goes past the
    signature."""
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        rules.decode(rest)
    else:
        rules.decode(signed_pair(ALICE if mode == 1 else BOB, rules.RULE_PREFIX, rest))


# ---------------------------------------------------------------- invite codes


def invite_text(payload: bytes) -> str:
    """An invite code's text around ``payload`` (as ``pairing.create_invite`` makes it)."""
    check = hashlib.blake2b(payload, digest_size=2).digest()
    text = base64.b32encode(payload + check).decode("ascii").rstrip("=")
    return pairing.INVITE_PREFIX + "-".join(text[i : i + 8] for i in range(0, len(text), 8))


def fuzz_invite(data: bytes) -> None:
    """An invite code: mode 0 the fuzzed bytes as text (UTF-8, undecodable bytes as
    surrogates, as a command line can give them); mode 1 as the CBOR payload, with
    its check bytes and base32 text made for it."""
    if not data:
        return
    if data[0] & 1:
        pairing.parse_invite(invite_text(data[1:]))
    else:
        pairing.parse_invite(data[1:].decode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------- relay envelopes


def _sealed_wire(plaintext: bytes, cls: envelope.EnvelopeClass) -> bytes:
    """An envelope from Alice to Bob whose sealed part holds ``plaintext`` (padded
    with zeros to its bucket), under a header naming the sealed size."""
    size = envelope.bucket(len(plaintext) + envelope.SEAL_OVERHEAD)
    padded = plaintext + bytes(size - envelope.SEAL_OVERHEAD - len(plaintext))
    recipient_x = x25519_public(BOB.public_key)
    sealed = envelope.seal(padded, recipient_x, SEAL_SECRET)
    header = envelope.OuterHeader(ALICE.public_key, BOB.public_key, 1, cls, EXPIRY_MS, len(sealed))
    return envelope.join_wire(header, sealed)


def sealed_signed(signed: bytes, cls: envelope.EnvelopeClass) -> bytes:
    """An envelope from Alice to Bob around an inner ``signed`` part."""
    return _sealed_wire(len(signed).to_bytes(envelope.LENGTH_BYTES, "big") + signed, cls)


def fuzz_envelope(data: bytes) -> None:
    """A relay envelope. Mode (first byte % 5): 0 the wire form as a relay reads it
    (``split_wire``); 1 an outer header alone (``decode_header``); 2 the wire form
    opened by Bob (``open_envelope``); 3 the fuzzed bytes as the *plaintext* sealed to
    Bob (length prefix, signed part, padding); 4 the fuzzed bytes as the inner
    *body*, signed by Alice and sealed to Bob."""
    if not data:
        return
    mode, rest = data[0] % 5, data[1:]
    if mode == 0:
        envelope.split_wire(rest)
    elif mode == 1:
        envelope.decode_header(rest)
    elif mode == 2:
        envelope.open_envelope(BOB, rest, depositor=ALICE.public_key)
    elif mode == 3:
        envelope.open_envelope(BOB, _sealed_wire(rest, envelope.EnvelopeClass.DATA))
    else:
        signed = signed_pair(ALICE, envelope.ENVELOPE_PREFIX, rest)
        envelope.open_envelope(BOB, sealed_signed(signed, envelope.EnvelopeClass.DATA))


def fuzz_bundle(data: bytes) -> None:
    """What travels in envelopes or files: mode (first byte % 3) 0 a bundle (a data
    envelope's payload); 1 an introduction (a class-2 payload); 2 a bundle file."""
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        bundle.decode_bundle(rest)
    elif mode == 1:
        bundle.decode_introduction(rest)
    else:
        bundle.decode_file(rest)


def fuzz_receipt(data: bytes) -> None:
    """A signed receipt: mode 0 as received; 1 the fuzzed bytes as the body, signed
    by Alice (decoding goes past the signature)."""
    if not data:
        return
    if data[0] & 1:
        receipt.decode_receipt(signed_pair(ALICE, receipt.RECEIPT_PREFIX, data[1:]))
    else:
        receipt.decode_receipt(data[1:])


def fuzz_policy(data: bytes) -> None:
    """A signed mailbox policy (handed to the relay): mode 0 as received; 1 the fuzzed
    bytes as the body, signed by Alice."""
    if not data:
        return
    if data[0] & 1:
        policy.decode_policy(signed_pair(ALICE, policy.POLICY_PREFIX, data[1:]))
    else:
        policy.decode_policy(data[1:], owner=ALICE.public_key)


# ---------------------------------------------------------------- the rest


def fuzz_canonical(data: bytes) -> None:
    """The canonical CBOR decoder itself, in each of its entry points (mode: first
    byte % 4), and the record data model check on what it accepts."""
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        value = canonical.decode(rest, what="fuzz", max_depth=canonical.MAX_VALUE_DEPTH + 1)
        canonical.check_value(value, received=True)
    elif mode == 1:
        canonical.decode_ordered(rest, what="fuzz", max_depth=3)
    elif mode == 2:
        canonical.decode_signed(rest, what="fuzz")
    else:
        canonical.message_body(rest, what="fuzz", max_bytes=1 << 20)


def fuzz_advert(data: bytes) -> None:
    """An mDNS TXT record (``net/adverts.py``): the bytes split at NUL into
    ``key=value`` properties (a property without ``=`` has no value)."""
    properties: dict[bytes, bytes | None] = {}
    for item in data.split(b"\x00"):
        key, eq, value = item.partition(b"=")
        properties[key] = value if eq else None
    adverts.parse_advert(properties)


TARGETS: dict[str, Target] = {
    "frames": Target(fuzz_frames, errors.FrameError, fuzz_frames.__doc__ or ""),
    "handshake": Target(fuzz_handshake, errors.RemoteHandshakeError, fuzz_handshake.__doc__ or ""),
    "messages": Target(fuzz_messages, errors.RemoteProtocolError, fuzz_messages.__doc__ or ""),
    "entry": Target(fuzz_entry, errors.DecodeError, fuzz_entry.__doc__ or ""),
    "rules": Target(fuzz_rules, errors.RuleError, fuzz_rules.__doc__ or ""),
    "invite": Target(fuzz_invite, errors.UsageError, fuzz_invite.__doc__ or ""),
    "envelope": Target(fuzz_envelope, errors.EnvelopeError, fuzz_envelope.__doc__ or ""),
    "relaywire": Target(fuzz_relaywire, errors.RemoteProtocolError, fuzz_relaywire.__doc__ or ""),
    "bundle": Target(fuzz_bundle, errors.BundleError, fuzz_bundle.__doc__ or ""),
    "receipt": Target(fuzz_receipt, errors.EnvelopeError, fuzz_receipt.__doc__ or ""),
    "policy": Target(fuzz_policy, errors.PolicyError, fuzz_policy.__doc__ or ""),
    "canonical": Target(fuzz_canonical, errors.RemoteProtocolError, fuzz_canonical.__doc__ or ""),
    "advert": Target(fuzz_advert, errors.P2PSyncError, fuzz_advert.__doc__ or ""),
}


class WrongError(AssertionError):
    """A decoder refused its input with a typed error, but not the one it documents."""


def run_one(name: str, data: bytes) -> None:
    """Feed ``data`` to target ``name``; swallow only the error it may raise."""
    target = TARGETS[name]
    try:
        target.run(data)
    except target.expected:
        pass
    except errors.P2PSyncError as exc:
        raise WrongError(
            f"{name}: {type(exc).__name__} escaped; only {target.expected.__name__} may"
        ) from exc
