"""Discovery adverts: what we publish, and what we accept from others (no
network here: mDNS itself is exercised inside namespaces, tests/test_lan.py)."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import trio
import trio.testing
from zeroconf import (
    DNSAddress,
    DNSPointer,
    DNSService,
    DNSText,
    RecordUpdate,
    ServiceInfo,
    const,
    current_time_millis,
)

from p2psync.core.identity import Identity
from p2psync.net import discovery as discovery_mod
from p2psync.net.discovery import (
    MAX_ADDRESSES,
    MAX_FAILURES,
    MAX_INSTANCES,
    MAX_PENDING,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Discovery,
    advert_name,
    heard_adverts,
    parse_advert,
)

pytestmark = pytest.mark.trio_memory


@pytest.mark.pure
def test_our_advert_carries_id_version_and_name_only() -> None:
    identity = Identity(os.urandom(32))
    discovery = Discovery(identity, "Head office", 7717, ["127.0.0.1"], print, print)
    info = discovery._service_info()
    assert info.name == f"{identity.short_id}._p2psync._tcp.local."
    assert info.port == 7717 and info.parsed_addresses() == ["127.0.0.1"]
    assert set(info.properties) == {b"id", b"v", b"name"}
    assert parse_advert(info.properties) == (identity.public_key, "Head office")


@pytest.mark.pure
def test_long_names_are_cut_to_fit_a_txt_string() -> None:
    discovery = Discovery(Identity(os.urandom(32)), "é" * 100, 1, ["127.0.0.1"], print, print)
    assert len(discovery._service_info().properties[b"name"] or b"") <= 63


@pytest.mark.pure
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


class HostileLan:
    """Stands in for the LAN's answers to our lookups: whatever adverts a host on
    it (possibly hostile) chooses to publish. Lookups may be made to block."""

    def __init__(self) -> None:
        self.adverts: dict[str, ServiceInfo] = {}
        self.block = threading.Event()
        self.block.set()
        self.prompt: set[str] = set()  # names answered even while blocked

    def publish(self, instance: str, identity: Identity, *addresses: str) -> None:
        self.adverts[instance] = ServiceInfo(
            SERVICE_TYPE,
            instance,
            addresses=[socket.inet_aton(a) for a in addresses],
            port=7717,
            properties={"id": identity.device_id, "v": PROTOCOL_VERSION, "name": "x"},
        )

    def get_service_info(self, type_: str, name: str, timeout: int) -> ServiceInfo | None:
        if name not in self.prompt:
            self.block.wait(5)
        return self.adverts.get(name)


def _discovery(wanted: set[bytes] | None = None) -> tuple[Discovery, list[bytes]]:
    lost: list[bytes] = []
    keep = wanted or set()
    return (
        Discovery(
            Identity(os.urandom(32)),
            "me",
            1,
            ["127.0.0.1"],
            lambda found: None,
            lost.append,
            wanted=lambda key: key in keep,
            priority=lambda instance: instance in {advert_name(k) for k in keep},
        ),
        lost,
    )


def _instance(n: int) -> str:
    return f"A{n}.{SERVICE_TYPE}"


async def test_a_spoofed_advert_adds_its_address_without_hiding_the_real_one() -> None:
    discovery, _ = _discovery()
    lan, peer = HostileLan(), Identity(os.urandom(32))
    lan.publish(_instance(1), peer, "10.0.0.2")
    lan.publish(_instance(2), peer, "10.0.0.66")  # same ID, the attacker's address
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    await discovery._resolve(lan, _instance(2))  # type: ignore[arg-type]
    assert discovery.addresses(peer.public_key) == ("10.0.0.66:7717", "10.0.0.2:7717")
    discovery.discard(peer.public_key, "10.0.0.66:7717")  # the handshake there failed
    assert discovery.addresses(peer.public_key) == ("10.0.0.2:7717",)


async def test_an_address_that_keeps_failing_is_dropped() -> None:
    discovery, _ = _discovery()
    lan, peer = HostileLan(), Identity(os.urandom(32))
    lan.publish(_instance(1), peer, "10.0.0.2", "10.0.0.3")
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    key = peer.public_key
    for _ in range(MAX_FAILURES - 1):
        discovery.failed(key, "10.0.0.3:7717")
        discovery.failed(key, "10.0.0.2:7717")
    discovery.succeeded(key, "10.0.0.2:7717")  # a success resets the count
    discovery.failed(key, "10.0.0.3:7717")
    discovery.failed(key, "10.0.0.2:7717")
    assert discovery.addresses(key) == ("10.0.0.2:7717",)


async def test_a_full_table_evicts_the_stalest_stranger_never_a_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery_mod, "MAX_TABLE", 3)
    peer = Identity(os.urandom(32))
    discovery, lost = _discovery({peer.public_key})
    lan = HostileLan()
    lan.publish(_instance(0), peer, "10.0.0.2")
    await discovery._resolve(lan, _instance(0))  # type: ignore[arg-type]
    strangers = [Identity(os.urandom(32)) for _ in range(5)]
    for n, stranger in enumerate(strangers, start=1):
        lan.publish(_instance(n), stranger, f"10.0.1.{n}")
        await discovery._resolve(lan, _instance(n))  # type: ignore[arg-type]
        discovery.table[stranger.public_key].last_seen += n  # seen in this order
    assert set(discovery.table) == {
        peer.public_key, strangers[3].public_key, strangers[4].public_key
    }
    assert lost == [s.public_key for s in strangers[:3]]


async def test_a_flood_of_adverts_is_dropped_not_queued() -> None:
    discovery, _ = _discovery()
    lan = HostileLan()
    lan.block.clear()  # every lookup hangs, as a host that never answers would make it
    async with trio.open_nursery() as nursery:
        for n in range(MAX_PENDING + 50):
            nursery.start_soon(discovery._resolve, lan, _instance(n))
        await trio.testing.wait_all_tasks_blocked()
        assert len(discovery._resolving) == MAX_PENDING
        lan.block.set()
    assert discovery._resolving == set()


async def test_a_spoof_with_many_addresses_cannot_push_the_real_one_out() -> None:
    discovery, _ = _discovery()
    lan, peer = HostileLan(), Identity(os.urandom(32))
    lan.publish(_instance(1), peer, "10.0.0.2")
    lan.publish(_instance(2), peer, *[f"10.0.0.{66 + i}" for i in range(MAX_ADDRESSES)])
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    await discovery._resolve(lan, _instance(2))  # type: ignore[arg-type]
    offered = discovery.addresses(peer.public_key)
    assert "10.0.0.2:7717" in offered and len(offered) == MAX_ADDRESSES


async def test_a_spoof_that_withdraws_takes_only_its_own_addresses() -> None:
    discovery, lost = _discovery()
    lan, peer = HostileLan(), Identity(os.urandom(32))
    lan.publish(_instance(1), peer, "10.0.0.2")
    lan.publish(_instance(2), peer, "10.0.0.66")
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    await discovery._resolve(lan, _instance(2))  # type: ignore[arg-type]
    discovery._lost(_instance(2))  # the attacker says goodbye for its own advert
    assert discovery.addresses(peer.public_key) == ("10.0.0.2:7717",) and not lost
    discovery._lost(_instance(1))
    assert lost == [peer.public_key] and peer.public_key not in discovery.table


async def test_a_proven_advert_comes_first() -> None:
    discovery, _ = _discovery()
    lan, peer = HostileLan(), Identity(os.urandom(32))
    lan.publish(_instance(1), peer, "10.0.0.2")
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    discovery.succeeded(peer.public_key, "10.0.0.2:7717")  # a handshake there proved it
    lan.publish(_instance(2), peer, "10.0.0.66")
    await discovery._resolve(lan, _instance(2))  # type: ignore[arg-type]
    assert discovery.addresses(peer.public_key)[0] == "10.0.0.2:7717"


async def test_a_peer_advert_is_resolved_even_during_a_flood() -> None:
    """zeroconf reports an advert once: dropping a peer's would lose it for good."""
    peer = Identity(os.urandom(32))
    discovery, _ = _discovery({peer.public_key})
    lan = HostileLan()
    lan.publish(advert_name(peer.public_key), peer, "10.0.0.2")
    lan.prompt.add(advert_name(peer.public_key))
    lan.block.clear()  # the flood's lookups hang, as a host that never answers makes them
    async with trio.open_nursery() as nursery:
        for n in range(MAX_PENDING):
            nursery.start_soon(discovery._resolve, lan, _instance(n))
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(2):  # not queued behind the flood's lookups either
            await discovery._resolve(lan, advert_name(peer.public_key))  # type: ignore[arg-type]
        assert discovery.addresses(peer.public_key) == ("10.0.0.2:7717",)
        lan.block.set()


async def test_spoofed_adverts_filling_the_slots_do_not_lock_out_the_real_one() -> None:
    peer = Identity(os.urandom(32))
    discovery, _ = _discovery({peer.public_key})
    lan = HostileLan()
    for n in range(MAX_INSTANCES):  # the attacker claims the peer's (public) ID first
        lan.publish(_instance(n), peer, f"10.0.0.{66 + n}")
        await discovery._resolve(lan, _instance(n))  # type: ignore[arg-type]
    for n in range(MAX_INSTANCES):  # every spoofed address fails and is dropped
        for _ in range(MAX_FAILURES):
            discovery.failed(peer.public_key, f"10.0.0.{66 + n}:7717")
    assert discovery.addresses(peer.public_key) == ()
    real = advert_name(peer.public_key)  # the real agent advertises (or re-advertises)
    lan.publish(real, peer, "10.0.0.2")
    await discovery._resolve(lan, real)  # type: ignore[arg-type]
    assert discovery.addresses(peer.public_key) == ("10.0.0.2:7717",)


async def test_a_peers_own_advert_name_claiming_another_id_is_ignored() -> None:
    peer, other = Identity(os.urandom(32)), Identity(os.urandom(32))
    discovery, lost = _discovery({peer.public_key})
    lan = HostileLan()
    real = advert_name(peer.public_key)
    lan.publish(real, peer, "10.0.0.2")
    await discovery._resolve(lan, real)  # type: ignore[arg-type]
    lan.publish(real, other, "10.0.0.66")  # a host answers for that name with another id
    await discovery._resolve(lan, real)  # type: ignore[arg-type]
    assert discovery.addresses(peer.public_key) == ("10.0.0.2:7717",), lost


@pytest.mark.pure
def test_the_records_of_a_response_name_the_adverts_heard() -> None:
    """zeroconf reports an advert once; every response carrying its records (an
    announcement, an answer to anyone's query) says the agent is still there."""
    ptr, srv, txt, a = const._TYPE_PTR, const._TYPE_SRV, const._TYPE_TXT, const._TYPE_A
    unique = const._CLASS_IN_UNIQUE
    one, two, gone = _instance(1), _instance(2), _instance(3)
    again = DNSPointer(SERVICE_TYPE, ptr, const._CLASS_IN, 4500, one)
    records = [
        RecordUpdate(again, again),  # heard again: already in the cache
        RecordUpdate(DNSService(two, srv, unique, 120, 0, 0, 7717, "h2.local."), None),
        RecordUpdate(DNSText(two, txt, unique, 4500, b"\x04v=1"), None),
        RecordUpdate(DNSAddress("h2.local.", a, unique, 120, socket.inet_aton("10.0.0.2")), None),
        RecordUpdate(DNSPointer(SERVICE_TYPE, ptr, const._CLASS_IN, 0, gone), again),  # goodbye
        RecordUpdate(DNSPointer("_http._tcp.local.", ptr, const._CLASS_IN, 4500, "w._http._tcp.")),
    ]
    assert heard_adverts(records, current_time_millis()) == {one, two}


async def test_an_agent_heard_again_or_connected_is_seen_again() -> None:
    discovery, _ = _discovery()
    lan, peer = HostileLan(), Identity(os.urandom(32))
    lan.publish(_instance(1), peer, "10.0.0.2")
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    found = discovery.table[peer.public_key]
    found.first_seen = found.last_seen = 1
    discovery.heard({_instance(1), _instance(9)})  # its advert, and one we do not know
    assert found.last_seen > 1 and found.first_seen == 1
    found.last_seen = 1
    discovery.seen(peer.public_key)  # a connection with it
    assert found.last_seen > 1
    found.last_seen = 1
    discovery.succeeded(peer.public_key, "10.0.0.2:7717")  # a handshake at its address
    assert found.last_seen > 1
    discovery.seen(Identity(os.urandom(32)).public_key)  # not in the table: nothing to do
