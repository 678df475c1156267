"""The table of LAN adverts, pure: no sockets, no zeroconf, no event loop; time is
passed in. What a hostile host on the LAN can and cannot do to the addresses we
dial (the bridge to zeroconf is tests/test_discovery.py; mDNS itself runs inside
namespaces, tests/test_lan.py)."""

from __future__ import annotations

import os

import pytest

from p2psync.core.identity import Identity
from p2psync.net.adverts import (
    MAX_ADDRESSES,
    MAX_FAILURES,
    MAX_INSTANCES,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    AdvertTable,
    AgentDiscovered,
    AgentLost,
    Event,
    advert_name,
    parse_advert,
)

T0 = 1_700_000_000_000  # ms since the epoch

pytestmark = pytest.mark.pure


def _instance(n: int) -> str:
    return f"A{n}.{SERVICE_TYPE}"


def _table(wanted: set[bytes] | None = None, capacity: int = 1000) -> AdvertTable:
    keep = wanted or set()
    return AdvertTable(
        Identity(os.urandom(32)).public_key, wanted=lambda key: key in keep, capacity=capacity
    )


def _at(ip: str) -> list[str]:
    return [f"{ip}:7717"]


def _lost(events: list[Event]) -> list[bytes]:
    return [e.key for e in events if isinstance(e, AgentLost)]


def test_foreign_and_malformed_adverts_are_ignored() -> None:
    good_id = Identity(os.urandom(32)).device_id.encode()
    typo = good_id[:-1] + (b"B" if good_id.endswith(b"A") else b"A")
    samples: list[dict[bytes, bytes | None]] = [
        {},
        {b"id": good_id},  # no version
        {b"id": good_id, b"v": b"2"},  # another protocol version
        {b"id": b"not-an-id", b"v": PROTOCOL_VERSION.encode()},
        {b"id": typo, b"v": b"1"},  # a typo: check characters fail
        {b"id": b"\xff\xfe", b"v": b"1"},  # not UTF-8
        {b"\xff": b"x", b"v": b"1"},
        {b"id": None, b"v": b"1"},
    ]
    for properties in samples:
        assert parse_advert(properties) is None
    accepted = parse_advert({b"id": good_id, b"v": b"1", b"name": b"\x1b[31mred"})
    assert accepted is not None and accepted[1] == "[31mred"  # control characters dropped


def test_an_advert_is_reported_once_taken_in_and_ours_is_not_listed() -> None:
    table, peer = _table(), Identity(os.urandom(32)).public_key
    [event] = table.advertised(_instance(1), peer, "Branch", _at("10.0.0.2"), T0)
    assert isinstance(event, AgentDiscovered) and event.found.key == peer
    assert event.found.name == "Branch" and event.found.first_seen == T0
    assert table.advertised(_instance(2), table.me, "me", _at("10.0.0.9"), T0) == []
    assert table.advertised(_instance(3), peer, "no address", [], T0) == []
    assert set(table.agents) == {peer}


def test_a_spoofed_advert_adds_its_address_without_hiding_the_real_one() -> None:
    table, peer = _table(), Identity(os.urandom(32)).public_key
    table.advertised(_instance(1), peer, "x", _at("10.0.0.2"), T0)
    table.advertised(_instance(2), peer, "x", _at("10.0.0.66"), T0)  # the attacker's
    assert table.addresses(peer) == ("10.0.0.66:7717", "10.0.0.2:7717")
    table.discard(peer, "10.0.0.66:7717")  # the handshake there failed
    assert table.addresses(peer) == ("10.0.0.2:7717",)


def test_an_address_that_keeps_failing_is_dropped() -> None:
    table, key = _table(), Identity(os.urandom(32)).public_key
    table.advertised(_instance(1), key, "x", ["10.0.0.2:7717", "10.0.0.3:7717"], T0)
    for _ in range(MAX_FAILURES - 1):
        table.failed(key, "10.0.0.3:7717")
        table.failed(key, "10.0.0.2:7717")
    table.succeeded(key, "10.0.0.2:7717", T0)  # a success resets the count
    table.failed(key, "10.0.0.3:7717")
    table.failed(key, "10.0.0.2:7717")
    assert table.addresses(key) == ("10.0.0.2:7717",)


def test_readvertising_gives_a_dropped_address_a_fresh_chance() -> None:
    table, key = _table(), Identity(os.urandom(32)).public_key
    table.advertised(_instance(1), key, "x", _at("10.0.0.2"), T0)
    for _ in range(MAX_FAILURES):
        table.failed(key, "10.0.0.2:7717")
    assert table.addresses(key) == ()
    table.advertised(_instance(1), key, "x", _at("10.0.0.2"), T0 + 1)
    table.failed(key, "10.0.0.2:7717")
    assert table.addresses(key) == ("10.0.0.2:7717",)


def test_a_full_table_evicts_the_stalest_stranger_never_a_peer() -> None:
    peer = Identity(os.urandom(32)).public_key
    table = _table({peer}, capacity=3)
    table.advertised(_instance(0), peer, "peer", _at("10.0.0.2"), T0)
    strangers = [Identity(os.urandom(32)).public_key for _ in range(5)]
    lost = []
    for n, stranger in enumerate(strangers, start=1):  # seen in this order
        lost += _lost(table.advertised(_instance(n), stranger, "s", _at(f"10.0.1.{n}"), T0 + n))
    assert set(table.agents) == {peer, strangers[3], strangers[4]}
    assert lost == strangers[:3]


def test_a_table_full_of_peers_ignores_strangers() -> None:
    peers = [Identity(os.urandom(32)).public_key for _ in range(2)]
    table = _table(set(peers), capacity=2)
    for n, peer in enumerate(peers):
        table.advertised(_instance(n), peer, "p", _at(f"10.0.0.{n + 2}"), T0)
    stranger = Identity(os.urandom(32)).public_key
    assert table.advertised(_instance(9), stranger, "s", _at("10.0.1.1"), T0) == []
    assert set(table.agents) == set(peers)


def test_a_spoof_with_many_addresses_cannot_push_the_real_one_out() -> None:
    table, peer = _table(), Identity(os.urandom(32)).public_key
    table.advertised(_instance(1), peer, "x", _at("10.0.0.2"), T0)
    many = [f"10.0.0.{66 + i}:7717" for i in range(MAX_ADDRESSES)]
    table.advertised(_instance(2), peer, "x", many, T0)
    offered = table.addresses(peer)
    assert "10.0.0.2:7717" in offered and len(offered) == MAX_ADDRESSES


def test_a_spoof_that_withdraws_takes_only_its_own_addresses() -> None:
    table, peer = _table(), Identity(os.urandom(32)).public_key
    table.advertised(_instance(1), peer, "x", _at("10.0.0.2"), T0)
    table.advertised(_instance(2), peer, "x", _at("10.0.0.66"), T0)
    assert table.withdrawn(_instance(2)) == []  # the attacker says goodbye for its own advert
    assert table.addresses(peer) == ("10.0.0.2:7717",)
    assert table.withdrawn(_instance(1)) == [AgentLost(peer)]
    assert peer not in table.agents
    assert table.withdrawn(_instance(1)) == []  # twice: nothing more


def test_a_proven_advert_comes_first() -> None:
    table, peer = _table(), Identity(os.urandom(32)).public_key
    table.advertised(_instance(1), peer, "x", _at("10.0.0.2"), T0)
    table.succeeded(peer, "10.0.0.2:7717", T0)  # a handshake there proved it
    table.advertised(_instance(2), peer, "x", _at("10.0.0.66"), T0)
    assert table.addresses(peer)[0] == "10.0.0.2:7717"


def test_spoofed_adverts_filling_the_slots_do_not_lock_out_the_real_one() -> None:
    peer = Identity(os.urandom(32)).public_key
    table = _table({peer})
    for n in range(MAX_INSTANCES):  # the attacker claims the peer's (public) ID first
        table.advertised(_instance(n), peer, "x", _at(f"10.0.0.{66 + n}"), T0)
    for n in range(MAX_INSTANCES):  # every spoofed address fails and is dropped
        for _ in range(MAX_FAILURES):
            table.failed(peer, f"10.0.0.{66 + n}:7717")
    assert table.addresses(peer) == ()
    real = advert_name(peer)  # the real agent advertises (or re-advertises)
    table.advertised(real, peer, "x", _at("10.0.0.2"), T0)
    assert table.addresses(peer) == ("10.0.0.2:7717",)


def test_every_slot_proven_keeps_out_even_the_agents_own_name() -> None:
    peer = Identity(os.urandom(32)).public_key
    table = _table({peer})
    for n in range(MAX_INSTANCES):
        table.advertised(_instance(n), peer, "x", _at(f"10.0.0.{10 + n}"), T0)
        table.succeeded(peer, f"10.0.0.{10 + n}:7717", T0)
    assert table.advertised(advert_name(peer), peer, "x", _at("10.0.0.2"), T0) == []
    assert "10.0.0.2:7717" not in table.addresses(peer)


def test_a_peers_own_advert_name_claiming_another_id_is_ignored() -> None:
    peer, other = Identity(os.urandom(32)).public_key, Identity(os.urandom(32)).public_key
    table = _table({peer})
    real = advert_name(peer)
    table.advertised(real, peer, "x", _at("10.0.0.2"), T0)
    # a host answers for that name with another id
    assert table.advertised(real, other, "x", _at("10.0.0.66"), T0) == []
    assert table.addresses(peer) == ("10.0.0.2:7717",) and other not in table.agents


def test_a_name_that_moves_to_another_id_leaves_the_first() -> None:
    first, second = Identity(os.urandom(32)).public_key, Identity(os.urandom(32)).public_key
    table = _table()
    table.advertised(_instance(1), first, "x", _at("10.0.0.2"), T0)
    events = table.advertised(_instance(1), second, "y", _at("10.0.0.3"), T0)
    assert _lost(events) == [first] and isinstance(events[-1], AgentDiscovered)
    assert set(table.agents) == {second}


def test_an_agent_heard_again_or_connected_is_seen_again() -> None:
    table, peer = _table(), Identity(os.urandom(32)).public_key
    table.advertised(_instance(1), peer, "x", _at("10.0.0.2"), T0)
    found = table.agents[peer]
    table.heard({_instance(1), _instance(9)}, T0 + 1)  # its advert, and one we do not know
    assert (found.first_seen, found.last_seen) == (T0, T0 + 1)
    table.seen(peer, T0 + 2)  # a connection with it
    assert found.last_seen == T0 + 2
    table.succeeded(peer, "10.0.0.2:7717", T0 + 3)  # a handshake at its address
    assert found.last_seen == T0 + 3
    table.seen(Identity(os.urandom(32)).public_key, T0 + 4)  # not in the table: nothing
    assert found.last_seen == T0 + 3
