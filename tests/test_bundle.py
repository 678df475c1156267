"""Bundles and bundle files (core/bundle.py): round trips, strictness, tampering;
and the ledger's state table (store/ledger.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync.core import canonical
from p2psync.core.bundle import (
    FILE_MAGIC,
    Bundle,
    base_size,
    decode_bundle,
    decode_file,
    encode_bundle,
    encode_file,
    head_bytes,
    packed_size,
)
from p2psync.core.envelope import EnvelopeClass, open_envelope, seal_envelope
from p2psync.core.identity import Identity
from p2psync.core.messages import Head
from p2psync.errors import BundleError, EnvelopeError, UsageError
from p2psync.store.ledger import IN_FLIGHT, MOVES, State, may_move
from tests.helpers import Author

pytestmark = pytest.mark.pure

A, B = Identity(bytes([1]) * 32), Identity(bytes([2]) * 32)

keys = st.binary(min_size=32, max_size=32)
heads = st.dictionaries(
    keys,
    st.builds(Head, st.integers(0, (1 << 63) - 1), keys, st.booleans()),
    max_size=5,
)
blobs = st.lists(st.binary(min_size=1, max_size=300), max_size=8)


@settings(max_examples=200, deadline=None)
@given(heads, st.binary(min_size=16, max_size=16), blobs, blobs)
def test_round_trip(
    h: dict[bytes, Head], digest: bytes, objects: list[bytes], entries: list[bytes]
) -> None:
    bundle = Bundle(h, digest, tuple(objects), tuple(entries))
    encoded = encode_bundle(bundle)
    assert decode_bundle(encoded) == bundle
    cost = sum(len(e) + head_bytes(len(e)) for e in entries)
    assert packed_size(base_size(bundle), len(entries), cost) == len(encoded)


def sample() -> Bundle:
    author = Author(A)
    wires = tuple(author.put("c", f"k{i}", {"i": i}).wire() for i in range(2))
    return Bundle({A.public_key: Head(2, bytes(32))}, bytes(16), (b"rule",), wires)


def test_every_byte_change_of_the_structure_is_refused_and_of_content_changes_content() -> None:
    """A bundle's own bytes are checked strictly; a change inside an entry or rule
    object is the entry's (or object's) to refuse when applied; inside a sealed
    envelope every change is refused (the next test)."""
    bundle = sample()
    encoded = encode_bundle(bundle)
    refused = content = 0
    for index in range(len(encoded)):
        for delta in (1, 0x80):
            changed = bytearray(encoded)
            changed[index] ^= delta
            try:
                got = decode_bundle(bytes(changed))
            except BundleError:
                refused += 1
                continue
            # only the content of a byte string can change this way, never its shape
            assert got != bundle
            assert len(got.entries) == 2 and len(got.rule_objects) == 1
            content += 1
    assert refused > 0 and content > 0


def test_every_byte_change_of_a_sealed_bundle_is_refused() -> None:
    bundle = sample()
    wire = seal_envelope(
        A, B.public_key, 1, EnvelopeClass.DATA, 0, encode_bundle(bundle), bytes([5]) * 32
    )
    assert decode_bundle(open_envelope(B, wire).payload) == bundle
    for index in range(len(wire)):
        changed = bytearray(wire)
        changed[index] ^= 0x01
        with pytest.raises(EnvelopeError):
            open_envelope(B, bytes(changed))


@pytest.mark.parametrize(
    "body",
    [
        {0: 2, 1: [], 2: bytes(16), 3: [], 4: []},  # unknown version
        {0: 1, 1: [], 2: bytes(15), 3: [], 4: []},  # digest size
        {0: 1, 1: [], 2: bytes(16), 3: [], 4: [b""]},  # empty entry
        {0: 1, 1: [], 2: bytes(16), 3: [], 4: ["text"]},
        {0: 1, 1: [], 2: bytes(16), 3: []},  # a key missing
        {0: 1, 1: [[bytes(32), 1, bytes(32), 0]], 2: bytes(16), 3: [], 4: []},  # frozen 0
        {
            0: 1,
            1: [[bytes([2]) * 32, 1, bytes(32), False], [bytes([1]) * 32, 1, bytes(32), False]],
            2: bytes(16),
            3: [],
            4: [],
        },  # heads out of order
        [1, 2, 3],
    ],
)
def test_malformed_bundles_are_refused(body: object) -> None:
    with pytest.raises(BundleError):
        decode_bundle(canonical.encode(body))
    with pytest.raises(BundleError):
        decode_bundle(b"\xa5" + os.urandom(10))


def test_bad_bundles_cannot_be_encoded() -> None:
    with pytest.raises(UsageError):
        encode_bundle(Bundle({}, bytes(3)))


def test_bundle_files_round_trip_and_refuse_damage() -> None:
    wires = [
        seal_envelope(A, B.public_key, seq, EnvelopeClass.DATA, 0, b"p", bytes([seq]) * 32)
        for seq in (1, 2)
    ]
    data = encode_file(wires)
    assert data.startswith(FILE_MAGIC) and decode_file(data) == wires
    for index in range(len(data)):
        changed = bytearray(data)
        changed[index] ^= 0x04
        try:
            envelopes = decode_file(bytes(changed))
        except BundleError:
            continue
        with pytest.raises(EnvelopeError):  # the change is inside an envelope
            for wire in envelopes:
                open_envelope(B, wire)
    for bad in (b"", b"PK\x03\x04", data[:-1], FILE_MAGIC + canonical.encode({0: 2, 1: []})):
        with pytest.raises(BundleError):
            decode_file(bad)


def test_ledger_states_move_only_forward() -> None:
    finals = {State.ACKNOWLEDGED, State.REFUSED, State.SUPERSEDED}
    for state in finals:
        assert not MOVES[state]
    assert MOVES[State.EXPIRED] == {State.ACKNOWLEDGED}  # a late signed receipt
    for state in IN_FLIGHT:
        assert State.QUEUED not in MOVES[state] and finals <= MOVES[state] | {State.SUPERSEDED}
    assert may_move(State.AT_RELAY, State.AT_RELAY)  # a re-deposit, a new until
    assert not may_move(State.HANDED_OVER, State.AT_RELAY)
    assert not may_move(State.ACKNOWLEDGED, State.EXPIRED)
