"""Entries: signing, strict decoding, withheld payloads, tamper evidence."""

from __future__ import annotations

import hashlib
import os

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync.core import canonical
from p2psync.core.entry import (
    MAX_ENTRY_BYTES,
    SIGN_PREFIX,
    OpKind,
    decode_stored,
    decode_wire,
    entry_id,
    make_op,
    sign_entry,
)
from p2psync.core.identity import Identity
from p2psync.errors import (
    DecodeError,
    InvalidRecord,
    NestingError,
    NonCanonicalError,
    OversizeError,
)
from tests.helpers import Author, flip_bit
from tests.test_canonical import values

pytestmark = pytest.mark.pure

keys = st.text(min_size=1, max_size=12).filter(lambda k: k.isprintable())


@given(
    st.lists(
        st.tuples(keys, values, st.booleans()), min_size=1, max_size=5, unique_by=lambda t: t[0]
    )
)
@settings(max_examples=60)
def test_round_trip(ops: list[tuple[str, canonical.Value, bool]]) -> None:
    author = Author()
    entry = author.write(
        *(author.op("col", key, value, delete=delete) for key, value, delete in ops)
    )
    decoded = decode_wire(entry.wire())
    assert decoded == entry
    assert decoded.signature_valid()
    assert decode_stored(entry.signed, entry.payloads_blob) == entry
    for op, (key, value, delete) in zip(decoded.ops, ops, strict=True):
        assert op is not None
        assert op.key == key
        assert op.kind is (OpKind.DELETE if delete else OpKind.PUT)
        assert op.value == (None if delete else value)


def test_layout() -> None:
    author = Author()
    entry = author.put("vouchers", "V-1", {"amount": 1})
    body = cbor2.loads(entry.body)
    assert list(body) == [0, 1, 2, 3, 4, 5]
    assert body[0] == 1 and body[1] == author.key and body[2] == 1 and body[3] is None
    assert body[5] == [["vouchers", entry.digests[0]]]
    assert cbor2.loads(entry.signed) == [entry.body, entry.signature]
    assert entry.id == entry_id(entry.signed)
    second = author.put("vouchers", "V-2", {"amount": 2})
    assert second.prev == entry.id and second.seq == 2
    assert author.identity.public_key == body[1]
    assert len(entry.signature) == 64
    assert SIGN_PREFIX == b"p2psync/v1/entry\x00"


def test_withheld_payload_still_verifies() -> None:
    author = Author()
    entry = author.write(author.op("public", "a", 1), author.op("secret", "b", {"salary": 9}))
    filtered = canonical.encode([entry.signed, [entry.ops[0].payload, None]])  # type: ignore[union-attr]
    decoded = decode_wire(filtered)
    assert decoded.id == entry.id
    assert decoded.signature_valid()
    assert decoded.ops[1] is None
    assert decoded.collections == ("public", "secret")


def test_payload_swapped_for_another_is_refused() -> None:
    author = Author()
    entry = author.put("c", "k", 1)
    other = author.put("c", "k", 2)
    forged = canonical.encode([entry.signed, [other.ops[0].payload]])  # type: ignore[union-attr]
    with pytest.raises(DecodeError, match="digest"):
        decode_wire(forged)


@given(st.data())
@settings(max_examples=200)
def test_any_bit_flip_in_wire_form_is_detected(data: st.DataObject) -> None:
    author = Author()
    author.put("c", "k0", {"x": 1})
    entry = author.put("c", "k1", {"x": "y" * 20})
    wire = entry.wire()
    bit = data.draw(st.integers(min_value=0, max_value=len(wire) * 8 - 1))
    tampered = flip_bit(wire, bit)
    try:
        decoded = decode_wire(tampered)
    except DecodeError:
        return
    # it decoded, so the flip is in the signed part: the signature must fail
    assert not decoded.signature_valid()


def test_trailing_bytes_refused() -> None:
    wire = Author().put("c", "k", 1).wire()
    with pytest.raises(DecodeError):
        decode_wire(wire + b"\x00")


def test_non_canonical_body_refused() -> None:
    author = Author()
    entry = author.put("c", "k", 1)
    fields = cbor2.loads(entry.body)
    reordered = cbor2.dumps(dict(reversed(list(fields.items()))))
    signature = author.identity.sign(SIGN_PREFIX + reordered)
    wire = canonical.encode([canonical.encode([reordered, signature]), list(entry.payloads)])
    with pytest.raises(DecodeError):
        decode_wire(wire)
    long_head = b"\x82\x59" + len(entry.signed).to_bytes(2, "big") + entry.signed
    if len(entry.signed) < 256:
        with pytest.raises(NonCanonicalError):
            decode_wire(long_head + entry.payloads_blob)


def test_unknown_version_refused() -> None:
    author = Author()
    entry = author.put("c", "k", 1)
    fields = cbor2.loads(entry.body)
    fields[0] = 2
    body = canonical.encode(fields)
    signature = author.identity.sign(SIGN_PREFIX + body)
    wire = canonical.encode([canonical.encode([body, signature]), list(entry.payloads)])
    with pytest.raises(DecodeError, match="version"):
        decode_wire(wire)


def test_oversize_refused_before_decoding() -> None:
    with pytest.raises(OversizeError):
        decode_wire(b"\x82" + b"\x00" * MAX_ENTRY_BYTES)
    author = Author()
    with pytest.raises(InvalidRecord, match="at most"):
        author.put("c", "k", "x" * MAX_ENTRY_BYTES)


def test_deep_value_refused() -> None:
    author = Author()
    entry = author.put("c", "k", 1)
    deep = b"\x81" * 200 + b"\x00"
    payload = cbor2.dumps([os.urandom(16), 0, "k", cbor2.CBORTag(0, 0), []])
    payload = payload.replace(b"\xc0\x00", deep)
    digest = hashlib.blake2b(payload, digest_size=32).digest()
    fields = cbor2.loads(entry.body)
    fields[5] = [["c", digest]]
    body = canonical.encode(fields)
    signature = author.identity.sign(SIGN_PREFIX + body)
    wire = canonical.encode([canonical.encode([body, signature]), [payload]])
    with pytest.raises(NestingError):
        decode_wire(wire)


def test_local_limits() -> None:
    with pytest.raises(InvalidRecord, match="collection"):
        make_op(OpKind.PUT, "a*", "k", 1, (), os.urandom(16))
    with pytest.raises(InvalidRecord, match="collection"):
        make_op(OpKind.PUT, "", "k", 1, (), os.urandom(16))
    with pytest.raises(InvalidRecord, match="key"):
        make_op(OpKind.PUT, "c", "a\nb", 1, (), os.urandom(16))
    identity = Identity(os.urandom(32))
    op = make_op(OpKind.PUT, "c", "k", 1, (), os.urandom(16))
    with pytest.raises(InvalidRecord, match="once"):
        sign_entry(identity, 1, None, 1, [op, make_op(OpKind.PUT, "c", "k", 2, (), os.urandom(16))])
    with pytest.raises(InvalidRecord):
        sign_entry(identity, 1, None, 1, [])


def _signed_wire(author: Author, body: bytes, payloads: list[bytes | None]) -> bytes:
    signature = author.identity.sign(SIGN_PREFIX + body)
    return canonical.encode([canonical.encode([body, signature]), payloads])


@pytest.mark.parametrize(
    ("seq", "hlc", "tail"),
    [
        (b"\x18\x01", None, b""),  # seq 1 with a one-byte head
        (b"\x01", b"\x1b" + (5).to_bytes(8, "big"), b""),  # small clock in 8 bytes
        (b"\x01", None, b"\x00"),  # trailing byte inside the body
        (b"\xc2\x41\x01", None, b""),  # seq as a bignum tag
    ],
)
def test_signed_non_canonical_body_refused(seq: bytes, hlc: bytes | None, tail: bytes) -> None:
    """Bodies the author really signed, but not in canonical form."""
    author = Author()
    entry = author.put("c", "k", 1)
    clock = hlc if hlc is not None else canonical.encode(entry.hlc)
    body = (
        b"\xa6\x00\x01\x01\x58\x20"
        + author.key
        + b"\x02"
        + seq
        + b"\x03\xf6\x04"
        + clock
        + b"\x05"
        + canonical.encode([["c", entry.digests[0]]])
        + tail
    )
    good = (
        b"\xa6\x00\x01\x01\x58\x20"
        + author.key
        + b"\x02\x01\x03\xf6\x04"
        + canonical.encode(entry.hlc)
        + b"\x05"
        + canonical.encode([["c", entry.digests[0]]])
    )
    assert good == entry.body  # the hand-built layout is the canonical one
    with pytest.raises(DecodeError):
        decode_wire(_signed_wire(author, body, list(entry.payloads)))
