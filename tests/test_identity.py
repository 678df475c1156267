"""Device IDs: round trip, forgiving input, every single typo refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync import home as home_mod
from p2psync.core.handshake import shown_name
from p2psync.core.identity import Identity, device_id, parse_device_id, short_id, verify
from p2psync.errors import InvalidDeviceID, UsageError

pytestmark = pytest.mark.pure

B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@given(st.binary(min_size=32, max_size=32))
def test_device_id_round_trip(key: bytes) -> None:
    text = device_id(key)
    assert parse_device_id(text) == key
    assert len(text) == 63 and text.count("-") == 7
    assert short_id(key) == text[:7]


def test_parsing_forgives_case_spacing_and_confusable_digits() -> None:
    key = os.urandom(32)
    text = device_id(key)
    assert parse_device_id(text.lower()) == key
    assert parse_device_id(" " + text.replace("-", " ") + "\n") == key
    assert parse_device_id(text.replace("-", "")) == key
    confusable = text.replace("O", "0").replace("I", "1").replace("B", "8")
    assert parse_device_id(confusable) == key


def test_every_single_character_typo_is_refused() -> None:
    for _ in range(5):
        raw = device_id(os.urandom(32)).replace("-", "")
        for position in range(len(raw)):
            for char in B32:
                if char == raw[position]:
                    continue
                typo = raw[:position] + char + raw[position + 1 :]
                with pytest.raises(InvalidDeviceID, match="invalid device ID"):
                    parse_device_id(typo)


def test_adjacent_swaps_are_mostly_refused() -> None:
    raw = device_id(os.urandom(32)).replace("-", "")
    accepted = 0
    for position in range(len(raw) - 1):
        swapped = raw[:position] + raw[position + 1] + raw[position] + raw[position + 2 :]
        if swapped == raw:
            continue
        try:
            parse_device_id(swapped)
            accepted += 1
        except InvalidDeviceID:
            pass
    assert accepted == 0


@pytest.mark.parametrize(
    "text",
    ["", "hello", "A" * 56, device_id(bytes(32))[:-1], device_id(bytes(32)) + "A", "!" * 56],
)
def test_malformed_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidDeviceID):
        parse_device_id(text)


def test_signatures() -> None:
    identity = Identity(os.urandom(32))
    signature = identity.sign(b"message")
    assert verify(identity.public_key, b"message", signature)
    assert not verify(identity.public_key, b"messagE", signature)
    assert not verify(identity.public_key, b"message", signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not verify(identity.public_key, b"message", b"short")
    assert Identity(identity.seed).public_key == identity.public_key


def test_a_site_name_peers_would_refuse_is_refused_at_init(tmp_path: Path) -> None:
    """Every handshake carries the name; one with a tab or an invisible joiner would
    make every peer refuse it, so init refuses it (and an older home's is cleaned)."""
    for bad in ("Head\toffice", "a\u200db", "x" * 65, "   "):
        with pytest.raises(UsageError, match="printable"):
            home_mod.init(tmp_path / "h", bad)
    assert shown_name("Head\toffice\u200d") == "Head office "
    assert shown_name("Branch 1") == "Branch 1"
