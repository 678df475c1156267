"""Relay envelopes and receipts (core/envelope.py, core/receipt.py): round trips,
the sealed box as libsodium has it, padding buckets, caps, and every tampering
refused with a typed error."""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
import nacl.bindings
import pytest

from p2psync.core import canonical
from p2psync.core.envelope import (
    ENVELOPE_PREFIX,
    MAX_ENVELOPE_BYTES,
    MAX_PAYLOAD_BY_CLASS,
    MAX_SEALED_BY_CLASS,
    MAX_SEALED_BYTES,
    SEAL_OVERHEAD,
    EnvelopeClass,
    OuterHeader,
    bucket,
    decode_header,
    open_envelope,
    read_header,
    seal,
    seal_envelope,
)
from p2psync.core.identity import Identity
from p2psync.core.messages import MAX_REASON_CHARS, Head
from p2psync.core.receipt import (
    MAX_REFUSED,
    decode_receipt,
    receipt_of,
    sign_receipt,
)
from p2psync.errors import (
    EnvelopeError,
    EnvelopeMismatchError,
    EnvelopeSealError,
    EnvelopeSignatureError,
    RemoteProtocolError,
    UsageError,
)

pytestmark = pytest.mark.pure

A = Identity(bytes([0x01]) * 32)
B = Identity(bytes([0x02]) * 32)
C = Identity(bytes([0x03]) * 32)
ESK = bytes([0x33]) * 32
T = 1_700_000_000_000
DATA = EnvelopeClass.DATA


def wire_of(payload: bytes = b"hello", cls: EnvelopeClass = DATA, seq: int = 1) -> bytes:
    return seal_envelope(A, B.public_key, seq, cls, T, payload, ESK)


def x25519(identity: Identity) -> bytes:
    key: bytes = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(identity.public_key)
    return key


def split(wire: bytes) -> tuple[dict[int, Any], bytes]:
    header, sealed = canonical.decode(wire, what="test", max_depth=2)
    return header, sealed


def craft(
    body: dict[int, Any],
    *,
    signer: Identity = A,
    to: Identity = B,
    header: dict[int, Any] | None = None,
    padding: bytes | None = None,
) -> bytes:
    """An envelope built by hand: any body, signed by anyone, sealed to anyone."""
    encoded = canonical.encode(body)
    signed = canonical.encode([encoded, signer.sign(ENVELOPE_PREFIX + encoded)])
    content = len(signed).to_bytes(4, "big") + signed
    if padding is None:
        padding = bytes(bucket(len(content) + SEAL_OVERHEAD) - SEAL_OVERHEAD - len(content))
    sealed = seal(content + padding, x25519(to), ESK)
    if header is None:
        header = {0: 1, **{k: body[k] for k in range(1, 6)}}
    return canonical.encode([{**header, 6: len(sealed)}, sealed])


def body_of(**changes: Any) -> dict[int, Any]:
    body = {0: 1, 1: A.public_key, 2: B.public_key, 3: 1, 4: 1, 5: T, 6: b"hello"}
    body.update({int(k[1:]): v for k, v in changes.items()})
    return body


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("cls", list(EnvelopeClass))
def test_every_class_round_trips(cls: EnvelopeClass) -> None:
    wire = seal_envelope(A, B.public_key, 7, cls, T, b"payload " * 10, ESK)
    header = read_header(wire)
    assert header == OuterHeader(A.public_key, B.public_key, 7, cls, T, 1024)
    assert decode_header(header.encode()) == header
    envelope = open_envelope(B, wire, depositor=A.public_key)
    assert (envelope.sender, envelope.recipient, envelope.seq, envelope.cls) == (
        A.public_key,
        B.public_key,
        7,
        cls,
    )
    assert (envelope.expiry_ms, envelope.payload) == (T, b"payload " * 10)
    assert open_envelope(B, wire) == envelope


def test_the_largest_payload_of_each_class_fits_its_largest_bucket() -> None:
    for cls in EnvelopeClass:
        payload = bytes(MAX_PAYLOAD_BY_CLASS[cls])
        wire = seal_envelope(A, B.public_key, 1, cls, T, payload, ESK)
        assert read_header(wire).sealed_size == MAX_SEALED_BY_CLASS[cls]
        assert len(wire) <= MAX_ENVELOPE_BYTES
        assert open_envelope(B, wire).payload == payload


def test_the_seal_is_libsodiums_sealed_box() -> None:
    _, sealed = split(wire_of())
    plaintext = nacl.bindings.crypto_box_seal_open(sealed, x25519(B), B.x25519_private)
    size = int.from_bytes(plaintext[:4], "big")
    body, signature = canonical.decode(plaintext[4 : 4 + size], what="t", max_depth=1)
    assert canonical.decode(body, what="t", max_depth=1) == body_of()
    assert signature == A.sign(b"p2psync/v1/envelope\x00" + body)
    assert plaintext[4 + size :] == bytes(len(plaintext) - 4 - size)
    assert sealed[:32] == nacl.bindings.crypto_scalarmult_base(ESK)
    # and libsodium's own seal (random ephemeral key) is opened by open_envelope
    header, _ = split(wire_of())
    resealed = nacl.bindings.crypto_box_seal(plaintext, x25519(B))
    assert open_envelope(B, canonical.encode([header, resealed])).payload == b"hello"


def test_sealing_is_deterministic_given_the_ephemeral_secret() -> None:
    assert wire_of() == wire_of()
    other = seal_envelope(A, B.public_key, 1, DATA, T, b"hello", bytes([0x34]) * 32)
    assert other != wire_of() and len(other) == len(wire_of())
    # epk || crypto_box(plaintext, BLAKE2b-192(epk || rpk), rpk, esk), by hand
    sealed = split(other)[1]
    plaintext = nacl.bindings.crypto_box_seal_open(sealed, x25519(B), B.x25519_private)
    epk = nacl.bindings.crypto_scalarmult_base(bytes([0x34]) * 32)
    nonce = hashlib.blake2b(epk + x25519(B), digest_size=24).digest()
    boxed = nacl.bindings.crypto_box(plaintext, nonce, x25519(B), bytes([0x34]) * 32)
    assert sealed == epk + boxed


# ---------------------------------------------------------------- padding and caps


def test_buckets() -> None:
    assert [bucket(n) for n in (0, 1024, 1025, 2048, 40_000, 65_536, 65_537)] == [
        1024,
        1024,
        2048,
        2048,
        65_536,
        65_536,
        131_072,
    ]
    assert bucket(MAX_SEALED_BYTES) == MAX_SEALED_BYTES
    assert bucket(3 * 65_536 + 1) == 4 * 65_536


def test_payloads_in_one_bucket_have_one_sealed_size() -> None:
    small, large = wire_of(b"x"), wire_of(b"x" * 700)
    assert len(small) == len(large)
    assert read_header(small).sealed_size == read_header(large).sealed_size == 1024
    assert read_header(wire_of(b"x" * 1000)).sealed_size == 2048
    assert len(wire_of(b"x" * 5000)) == len(wire_of(b"x" * 7000))


def test_oversize_payloads_are_refused_on_sealing() -> None:
    for cls in EnvelopeClass:
        with pytest.raises(UsageError):
            seal_envelope(A, B.public_key, 1, cls, T, bytes(MAX_PAYLOAD_BY_CLASS[cls] + 1), ESK)


@pytest.mark.parametrize(
    "args",
    [
        (A.public_key, 1, T),  # to ourselves
        (B.public_key[:31], 1, T),
        (B.public_key, 0, T),  # sequence numbers start at 1
        (B.public_key, 1 << 64, T),
        (B.public_key, 1, -1),
    ],
)
def test_bad_arguments_are_the_callers(args: tuple[bytes, int, int]) -> None:
    recipient, seq, expiry = args
    with pytest.raises(UsageError):
        seal_envelope(A, recipient, seq, DATA, expiry, b"", ESK)
    with pytest.raises(UsageError):
        seal_envelope(A, B.public_key, 1, DATA, T, b"", ESK[:31])


def test_oversize_wire_and_class_sizes_are_refused_from_the_header() -> None:
    with pytest.raises(EnvelopeError, match="at most"):
        read_header(bytes(MAX_ENVELOPE_BYTES + 1))
    header, sealed = split(wire_of(cls=EnvelopeClass.INTRODUCTION))
    big = sealed + bytes(32 * 1024 - len(sealed))
    with pytest.raises(EnvelopeError, match="bucket"):
        read_header(canonical.encode([{**header, 6: len(big)}, big]))
    odd = sealed + b"\0"  # not a bucket
    with pytest.raises(EnvelopeError, match="bucket"):
        read_header(canonical.encode([{**header, 6: len(odd)}, odd]))
    with pytest.raises(EnvelopeError, match="sealed size"):
        read_header(canonical.encode([{**header, 6: 2048}, sealed]))


def test_an_oversize_payload_inside_is_refused() -> None:
    cls = EnvelopeClass.INTRODUCTION
    body = body_of(_4=cls.value, _6=bytes(MAX_PAYLOAD_BY_CLASS[cls] + 1))
    header = {0: 1, 1: A.public_key, 2: B.public_key, 3: 1, 4: 2, 5: T}
    # sealed in a bucket of the data class's sizes, with an introduction header
    wire = craft(body, header={**header, 4: 1})
    with pytest.raises(EnvelopeError, match="at most"):
        open_envelope(B, wire)


# ---------------------------------------------------------------- refusals


def test_another_recipient_is_refused() -> None:
    with pytest.raises(EnvelopeSealError, match="addressed to"):
        open_envelope(C, wire_of())
    # a header rewritten to name C: C cannot open what was sealed to B
    header, sealed = split(wire_of())
    with pytest.raises(EnvelopeSealError, match="does not open"):
        open_envelope(C, canonical.encode([{**header, 2: C.public_key}, sealed]))
    # B re-seals A's envelope to C: the signed recipient is still B
    forwarded = craft(
        body_of(), to=C, header={0: 1, 1: A.public_key, 2: C.public_key, 3: 1, 4: 1, 5: T}
    )
    with pytest.raises(EnvelopeMismatchError):
        open_envelope(C, forwarded)


def test_a_depositor_other_than_the_sender_is_refused() -> None:
    with pytest.raises(EnvelopeMismatchError, match="deposited by"):
        open_envelope(B, wire_of(), depositor=C.public_key)
    with pytest.raises(EnvelopeMismatchError):
        open_envelope(B, wire_of(), depositor=b"short")


def test_a_forged_signature_is_refused() -> None:
    with pytest.raises(EnvelopeSignatureError):
        open_envelope(B, craft(body_of(), signer=C))


@pytest.mark.parametrize(
    "changes",
    [{"_3": 2}, {"_4": 3}, {"_5": T + 1}, {"_1": C.public_key}],
    ids=["seq", "class", "expiry", "sender"],
)
def test_inner_names_must_be_the_headers(changes: dict[str, Any]) -> None:
    body = body_of(**changes)
    signer = C if "_1" in changes else A
    header = {0: 1, 1: A.public_key, 2: B.public_key, 3: 1, 4: 1, 5: T}
    with pytest.raises(EnvelopeMismatchError):
        open_envelope(B, craft(body, signer=signer, header=header))


def test_padding_must_be_zeros_and_minimal() -> None:
    good = craft(body_of())
    assert open_envelope(B, good).payload == b"hello"
    _, sealed = split(good)
    plaintext = nacl.bindings.crypto_box_seal_open(sealed, x25519(B), B.x25519_private)
    content = plaintext[: 4 + int.from_bytes(plaintext[:4], "big")]
    nonzero = bytes(len(plaintext) - len(content) - 1) + b"\x01"
    with pytest.raises(EnvelopeError, match="zeros"):
        open_envelope(B, craft(body_of(), padding=nonzero))
    with pytest.raises(EnvelopeError, match="bucket"):
        open_envelope(B, craft(body_of(), padding=bytes(2048 - SEAL_OVERHEAD - len(content))))


def test_non_canonical_encodings_are_refused() -> None:
    header, sealed = split(wire_of())
    reordered = dict(sorted(header.items(), reverse=True))
    wire = b"\x82" + cbor2.dumps(reordered) + cbor2.dumps(sealed)
    with pytest.raises(EnvelopeError, match="canonical"):
        read_header(wire)
    with pytest.raises(EnvelopeError):
        open_envelope(B, wire_of() + b"\0")
    with pytest.raises(EnvelopeError, match="keys"):
        open_envelope(B, craft({**body_of(), 7: b""}))
    bool_key = canonical.encode([{True if k == 1 else k: v for k, v in header.items()}, sealed])
    with pytest.raises(EnvelopeError, match="keys"):
        read_header(bool_key)


def flips(data: bytes) -> list[bytes]:
    """``data`` with each byte in turn changed (low bit flipped, then all bits)."""
    out = []
    for index in range(len(data)):
        for mask in (0x01, 0xFF):
            out.append(data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :])
    return out


def test_every_byte_changed_in_the_wire_is_refused() -> None:
    wire = wire_of(b"hi")
    header_end = len(canonical.encode(split(wire)[0])) + 1
    kinds: dict[str, int] = {}
    for index, tampered in enumerate(flips(wire)):
        with pytest.raises(EnvelopeError) as caught:
            open_envelope(B, tampered, depositor=A.public_key)
        kinds[type(caught.value).__name__] = kinds.get(type(caught.value).__name__, 0) + 1
        if index // 2 >= header_end + 5:  # inside the sealed part (after its bstr head)
            assert type(caught.value) is EnvelopeSealError
    assert set(kinds) == {
        "EnvelopeError",
        "EnvelopeSealError",
        "EnvelopeMismatchError",
    }, kinds


def test_every_byte_changed_in_the_header_alone_is_refused_or_another_header() -> None:
    """The header has no signature of its own: a change either breaks it (typed
    error) or names another envelope, which the recipient then refuses."""
    header = read_header(wire_of())
    encoded = header.encode()
    _, sealed = split(wire_of())
    for tampered in flips(encoded):
        try:
            other = decode_header(tampered)
        except EnvelopeError:
            continue
        assert other != header
        with pytest.raises(EnvelopeError):
            open_envelope(B, b"\x82" + tampered + canonical.encode(sealed))


def test_foreign_exceptions_never_escape_on_garbage() -> None:
    for data in (b"", b"\x82", b"\xff" * 40, b"\x82\xa0\x40", bytes(range(256))):
        with pytest.raises(EnvelopeError):
            read_header(data)
        with pytest.raises(EnvelopeError):
            open_envelope(B, data)
    assert issubclass(EnvelopeError, RemoteProtocolError)


# ---------------------------------------------------------------- receipts

HEADS = {
    bytes([0x0A]) * 32: Head(3, bytes([0xA3]) * 32),
    bytes([0x0B]) * 32: Head(1, bytes([0xB1]) * 32, frozen=True),
}


def receipt_bytes() -> bytes:
    return sign_receipt(B, A.public_key, [3, 1, 2], {4: "rule violation"}, HEADS, T)


def test_a_receipt_round_trips_inside_an_envelope() -> None:
    wire = seal_envelope(B, A.public_key, 1, EnvelopeClass.RECEIPT, T, receipt_bytes(), ESK)
    receipt = receipt_of(open_envelope(A, wire, depositor=B.public_key))
    assert (receipt.signer, receipt.peer) == (B.public_key, A.public_key)
    assert receipt.applied == (1, 2, 3)
    assert receipt.refused == ((4, "rule violation"),)
    assert receipt.heads == HEADS and receipt.at_ms == T
    assert decode_receipt(receipt.signed) == receipt


def test_a_receipt_must_come_from_its_envelopes_sender_in_a_receipt_envelope() -> None:
    data = seal_envelope(B, A.public_key, 1, DATA, T, receipt_bytes(), ESK)
    with pytest.raises(EnvelopeMismatchError):
        receipt_of(open_envelope(A, data))
    by_c = seal_envelope(C, A.public_key, 1, EnvelopeClass.RECEIPT, T, receipt_bytes(), ESK)
    with pytest.raises(EnvelopeMismatchError):
        receipt_of(open_envelope(A, by_c))


def test_receipt_caps_and_arguments() -> None:
    long = sign_receipt(B, A.public_key, [], {1: "x" * (MAX_REASON_CHARS + 9)}, {}, T)
    assert decode_receipt(long).refused[0][1] == "x" * MAX_REASON_CHARS
    with pytest.raises(UsageError):
        sign_receipt(B, A.public_key, [], {i: "r" for i in range(1, MAX_REFUSED + 2)}, {}, T)
    with pytest.raises(UsageError):
        sign_receipt(B, A.public_key, [1], {1: "both"}, {}, T)
    with pytest.raises(UsageError):
        sign_receipt(B, B.public_key, [1], {}, {}, T)
    with pytest.raises(UsageError):
        sign_receipt(B, A.public_key, [0], {}, {}, T)


def test_every_byte_changed_in_a_receipt_is_refused() -> None:
    signed = receipt_bytes()
    for tampered in flips(signed):
        with pytest.raises(EnvelopeError):
            decode_receipt(tampered)


def test_a_forged_receipt_signature_is_refused() -> None:
    body, _ = canonical.decode(receipt_bytes(), what="t", max_depth=1)
    forged = canonical.encode([body, C.sign(b"p2psync/v1/receipt\x00" + body)])
    with pytest.raises(EnvelopeSignatureError):
        decode_receipt(forged)


def test_the_caps_leave_room_for_the_largest_header() -> None:
    key = bytes(32)
    header = OuterHeader(key, b"\1" * 32, (1 << 64) - 1, DATA, (1 << 63) - 1, MAX_SEALED_BYTES)
    assert len(header.encode()) == 101
    assert 1 + 101 + 5 + MAX_SEALED_BYTES <= MAX_ENVELOPE_BYTES
