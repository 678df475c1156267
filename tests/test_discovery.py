"""The bridge between zeroconf and the table of adverts: what we publish, what
reaches the table, and lookups in a flood (no network here: the table itself is
tests/test_adverts.py, mDNS itself runs inside namespaces, tests/test_lan.py)."""

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
from p2psync.net.adverts import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    AdvertTable,
    Found,
    advert_name,
    parse_advert,
)
from p2psync.net.discovery import MAX_PENDING, Discovery, heard_adverts


def _bridge(identity: Identity, name: str, port: int) -> Discovery:
    table = AdvertTable(identity.public_key)
    return Discovery(identity, name, port, ["127.0.0.1"], table, print, print)

pytestmark = pytest.mark.trio_memory


@pytest.mark.pure
def test_our_advert_carries_id_version_and_name_only() -> None:
    identity = Identity(os.urandom(32))
    discovery = _bridge(identity, "Head office", 7717)
    info = discovery._service_info()
    assert info.name == f"{identity.short_id}._p2psync._tcp.local."
    assert info.port == 7717 and info.parsed_addresses() == ["127.0.0.1"]
    assert set(info.properties) == {b"id", b"v", b"name"}
    assert parse_advert(info.properties) == (identity.public_key, "Head office")


@pytest.mark.pure
def test_long_names_are_cut_to_fit_a_txt_string() -> None:
    discovery = _bridge(Identity(os.urandom(32)), "é" * 100, 1)
    assert len(discovery._service_info().properties[b"name"] or b"") <= 63


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


def _discovery(
    wanted: set[bytes] | None = None,
) -> tuple[Discovery, list[Found], list[bytes]]:
    found: list[Found] = []
    lost: list[bytes] = []
    keep = wanted or set()
    identity = Identity(os.urandom(32))
    table = AdvertTable(identity.public_key, wanted=lambda key: key in keep)
    discovery = Discovery(
        identity,
        "me",
        1,
        ["127.0.0.1"],
        table,
        found.append,
        lost.append,
        priority=lambda instance: instance in {advert_name(k) for k in keep},
    )
    return discovery, found, lost


def _instance(n: int) -> str:
    return f"A{n}.{SERVICE_TYPE}"


async def test_a_flood_of_adverts_is_dropped_not_queued() -> None:
    discovery, _, _ = _discovery()
    lan = HostileLan()
    lan.block.clear()  # every lookup hangs, as a host that never answers would make it
    async with trio.open_nursery() as nursery:
        for n in range(MAX_PENDING + 50):
            nursery.start_soon(discovery._resolve, lan, _instance(n))
        await trio.testing.wait_all_tasks_blocked()
        assert len(discovery._resolving) == MAX_PENDING
        lan.block.set()
    assert discovery._resolving == set()


async def test_a_peer_advert_is_resolved_even_during_a_flood() -> None:
    """zeroconf reports an advert once: dropping a peer's would lose it for good."""
    peer = Identity(os.urandom(32))
    discovery, _, _ = _discovery({peer.public_key})
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
        assert discovery.table.addresses(peer.public_key) == ("10.0.0.2:7717",)
        lan.block.set()


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


async def test_what_a_lookup_resolves_reaches_the_table_and_is_reported() -> None:
    discovery, found, lost = _discovery()
    lan, peer = HostileLan(), Identity(os.urandom(32))
    lan.publish(_instance(1), peer, "10.0.0.2", "10.0.0.3")
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    assert [f.key for f in found] == [peer.public_key]
    assert discovery.table.addresses(peer.public_key) == ("10.0.0.2:7717", "10.0.0.3:7717")
    discovery._report(discovery.table.withdrawn(_instance(1)))  # its goodbye
    assert lost == [peer.public_key] and discovery.table.agents == {}


async def test_foreign_adverts_and_our_own_never_reach_the_table() -> None:
    discovery, found, _ = _discovery()
    lan = HostileLan()
    lan.adverts[_instance(1)] = ServiceInfo(
        SERVICE_TYPE,
        _instance(1),
        addresses=[socket.inet_aton("10.0.0.2")],
        port=7717,
        properties={"v": "9", "id": "nonsense"},
    )
    lan.publish(_instance(2), discovery.identity, "10.0.0.3")  # our own advert, heard back
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    await discovery._resolve(lan, _instance(2))  # type: ignore[arg-type]
    await discovery._resolve(lan, _instance(3))  # type: ignore[arg-type] # nobody answers
    assert found == [] and discovery.table.agents == {}


async def test_an_advert_heard_again_marks_its_agent_seen() -> None:
    discovery, _, _ = _discovery()
    lan, peer = HostileLan(), Identity(os.urandom(32))
    lan.publish(_instance(1), peer, "10.0.0.2")
    await discovery._resolve(lan, _instance(1))  # type: ignore[arg-type]
    entry = discovery.table.agents[peer.public_key]
    entry.last_seen = 1
    discovery.heard({_instance(1)})
    assert entry.last_seen > 1
