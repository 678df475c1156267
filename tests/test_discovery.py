"""Discovery adverts: what we publish, and what we accept from others (no
network here: mDNS itself is exercised inside namespaces, tests/test_lan.py)."""

from __future__ import annotations

import os

from p2psync.core.identity import Identity
from p2psync.net.discovery import PROTOCOL_VERSION, Discovery, parse_advert


def test_our_advert_carries_id_version_and_name_only() -> None:
    identity = Identity(os.urandom(32))
    discovery = Discovery(identity, "Head office", 7717, ["127.0.0.1"], print, print)
    info = discovery._service_info()
    assert info.name == f"{identity.short_id}._p2psync._tcp.local."
    assert info.port == 7717 and info.parsed_addresses() == ["127.0.0.1"]
    assert set(info.properties) == {b"id", b"v", b"name"}
    assert parse_advert(info.properties) == (identity.public_key, "Head office")


def test_long_names_are_cut_to_fit_a_txt_string() -> None:
    discovery = Discovery(Identity(os.urandom(32)), "é" * 100, 1, ["127.0.0.1"], print, print)
    assert len(discovery._service_info().properties[b"name"] or b"") <= 63


def test_foreign_and_malformed_adverts_are_ignored() -> None:
    good_id = Identity(os.urandom(32)).device_id.encode()
    samples: list[dict[bytes, bytes | None]] = [
        {},
        {b"id": good_id},  # no version
        {b"id": good_id, b"v": b"2"},  # another protocol version
        {b"id": b"not-an-id", b"v": PROTOCOL_VERSION.encode()},
        {b"id": good_id[:-1] + b"A", b"v": b"1"},  # a typo: check characters fail
        {b"id": b"\xff\xfe", b"v": b"1"},  # not UTF-8
        {b"\xff": b"x", b"v": b"1"},
        {b"id": None, b"v": b"1"},
    ]
    for properties in samples:
        assert parse_advert(properties) is None
    accepted = parse_advert({b"id": good_id, b"v": b"1", b"name": b"\x1b[31mred"})
    assert accepted is not None and accepted[1] == "[31mred"  # control characters dropped
