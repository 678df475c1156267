"""LAN discovery over mDNS / DNS-SD, with python-zeroconf's threaded API bridged
into trio.

Each agent advertises ``<short ID>._p2psync._tcp.local.`` with its port and a TXT
record holding exactly ``id`` (the full device ID), ``v`` (protocol version) and
``name`` (display name) — no collection or data names. It browses the same type
and keeps a table of the agents it sees; withdrawals and goodbyes remove them.

What an advert claims is only a hint: an address is dialled *expecting* the
advertised identity, so an advert claiming someone else's ID fails the
handshake. Malformed or foreign adverts are ignored. Nothing here needs the
Internet: mDNS is link-local multicast.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ifaddr
import trio
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    RecordUpdate,
    RecordUpdateListener,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from p2psync.clock import now_ms
from p2psync.core.identity import Identity, parse_device_id, short_id
from p2psync.errors import InvalidDeviceID, P2PSyncError, UsageError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2psync._tcp.local."
PROTOCOL_VERSION = "1"
RESOLVE_TIMEOUT_MS = 3000
MAX_NAME_BYTES = 63
MAX_TABLE = 1000  # agents remembered from adverts
MAX_ADDRESSES = 8  # per advert, and offered per agent
MAX_INSTANCES = 4  # adverts (instance names) remembered per agent ID
MAX_PENDING = 64  # adverts waiting to be resolved; more are dropped until some finish
MAX_FAILURES = 3  # failed dials after which an advertised address is dropped


@dataclass
class Found:
    """An agent ID seen on the LAN, with the adverts claiming it.

    Several adverts may claim one ID (a restart under a new name, or a spoof);
    each keeps its own addresses, so none can push out another's, and a goodbye
    removes only its own. An advert at whose address a handshake proved the key
    comes first.
    """

    key: bytes
    name: str
    instances: dict[str, tuple[str, ...]]  # advert -> its addresses (host:port)
    first_seen: int = field(default_factory=now_ms)
    last_seen: int = field(default_factory=now_ms)  # heard, or connected with
    failures: dict[str, int] = field(default_factory=dict)  # address -> failed dials
    proven: set[str] = field(default_factory=set)  # adverts where the key was proven

    @property
    def addresses(self) -> tuple[str, ...]:
        """At most :data:`MAX_ADDRESSES`, taken in turn from each advert (proven
        ones, then the newest, first)."""
        order = sorted(
            self.instances, key=lambda i: (i not in self.proven, -list(self.instances).index(i))
        )
        lists = [self.instances[i] for i in order]
        merged: dict[str, None] = {}
        for rank in range(MAX_ADDRESSES):
            for addresses in lists:
                if rank < len(addresses):
                    merged.setdefault(addresses[rank])
        return tuple(merged)[:MAX_ADDRESSES]


def local_ipv4(interfaces: Sequence[str] | None) -> list[str]:
    """Addresses to advertise: the chosen interfaces, else every non-loopback IPv4."""
    if interfaces:
        return list(interfaces)
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                address = ipaddress.ip_address(ip.ip)
                if not address.is_loopback and not address.is_link_local:
                    found.append(ip.ip)
    return found


def check_interfaces(interfaces: Sequence[str]) -> None:
    """Refuse discovery interfaces zeroconf could not bind: :class:`UsageError` for
    what is not an IPv4 address, :class:`P2PSyncError` for one this machine lacks."""
    mine = [
        ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)
    ]
    choice = f"this machine has {', '.join(mine) or 'no IPv4 address'}"
    for text in interfaces:
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            raise UsageError(
                f"--discovery-interface takes an IPv4 address, not {text!r} ({choice})"
            ) from None
        if text not in mine:
            raise P2PSyncError(
                f"{text} is not an address of this machine; give one of its addresses with "
                f"--discovery-interface IP ({choice}), or use --no-discovery"
            )


def advert_name(key: bytes) -> str:
    """The instance name an agent advertises: its short device ID."""
    return f"{short_id(key)}.{SERVICE_TYPE}"


def heard_adverts(records: Iterable[RecordUpdate], now: float) -> set[str]:
    """The adverts (instance names) of which one mDNS response carries live records:
    its PTR, SRV or TXT records, whether new or already cached (a goodbye is not
    a sign of life)."""
    heard = set()
    suffix = "." + SERVICE_TYPE
    for update in records:
        record = update.new
        if record.is_expired(now):
            continue
        name = record.name.lower()
        if name == SERVICE_TYPE:  # a PTR to an advert (zeroconf exports no DNSPointer)
            alias = getattr(record, "alias", None)
            if isinstance(alias, str):
                heard.add(alias)
        elif name.endswith(suffix):  # its SRV or TXT (address records name the host)
            heard.add(record.name)
    return heard


class _HeardListener(RecordUpdateListener):
    """Every response heard, not only an advert's first: zeroconf's browser reports
    an advert once, and then only when its records change."""

    def __init__(self, on_heard: Callable[[set[str]], None]) -> None:
        self.on_heard = on_heard

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        heard = heard_adverts(records, now)  # in zeroconf's event loop
        if heard:
            self.on_heard(heard)


def parse_advert(properties: dict[bytes, bytes | None]) -> tuple[bytes, str] | None:
    """(identity key, name) from a TXT record, or None when it is not one of ours."""
    try:
        text = {k.decode("ascii"): (v or b"").decode("utf-8") for k, v in properties.items()}
    except (UnicodeDecodeError, AttributeError):
        return None
    if text.get("v") != PROTOCOL_VERSION or "id" not in text:
        return None
    try:
        key = parse_device_id(text["id"])
    except InvalidDeviceID:
        return None
    name = "".join(c for c in text.get("name", "") if c.isprintable())[:64]
    return key, name


class Discovery:
    """Advertise this agent and report the agents seen, until cancelled."""

    def __init__(
        self,
        identity: Identity,
        name: str,
        port: int,
        interfaces: Sequence[str] | None,
        on_found: Callable[[Found], None],
        on_lost: Callable[[bytes], None],
        wanted: Callable[[bytes], bool] = lambda key: False,
        priority: Callable[[str], bool] = lambda instance: False,
    ) -> None:
        self.identity = identity
        self.name = name
        self.port = port
        self.interfaces = list(interfaces) if interfaces else None
        self.on_found = on_found
        self.on_lost = on_lost
        self.wanted = wanted  # agents never evicted to make room (our peers)
        self.priority = priority  # adverts resolved even in a flood (our peers' names)
        self.table: dict[bytes, Found] = {}
        self._instances: dict[str, bytes] = {}
        self._resolving: set[str] = set()
        # resolving may wait seconds: its own few threads, not the store's
        self._resolvers = trio.CapacityLimiter(4)
        self._peer_resolvers = trio.CapacityLimiter(2)  # our peers' adverts jump the queue
        self.advertised: list[str] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            zc = await trio.to_thread.run_sync(
                lambda: Zeroconf(
                    interfaces=self.interfaces or InterfaceChoice.All,
                    ip_version=IPVersion.V4Only,
                )
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise P2PSyncError(
                    "cannot use mDNS: another program holds UDP port 5353 without sharing it; "
                    "let it share (avahi: disallow-other-stacks=no), or use --no-discovery"
                ) from exc
            where = ", ".join(self.interfaces or ["every interface"])
            raise P2PSyncError(
                f"cannot use mDNS on {where}: {exc.strerror or exc}; choose another interface "
                "with --discovery-interface IP, or use --no-discovery"
            ) from exc
        send, receive = trio.open_memory_channel[tuple[str, ServiceStateChange]](1024)
        token = trio.lowlevel.current_trio_token()

        def handler(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:  # runs in a zeroconf thread
            with contextlib.suppress(
                trio.RunFinishedError, trio.WouldBlock, trio.BrokenResourceError
            ):
                trio.from_thread.run_sync(send.send_nowait, (name, state_change), trio_token=token)

        def heard(instances: set[str]) -> None:  # in zeroconf's event loop: never blocks
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self.heard, instances)

        zc.add_listener(_HeardListener(heard), None)
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[handler])
        info = self._service_info()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._register, zc, info)
                async for name, change in receive:
                    if change is ServiceStateChange.Removed:
                        self._lost(name)
                    else:
                        nursery.start_soon(self._resolve, zc, name)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await trio.to_thread.run_sync(lambda: _close(zc, browser, info))

    def _service_info(self) -> ServiceInfo:
        self.advertised = local_ipv4(self.interfaces)
        short = short_id(self.identity.public_key)
        return ServiceInfo(
            SERVICE_TYPE,
            advert_name(self.identity.public_key),
            addresses=[socket.inet_aton(ip) for ip in self.advertised],
            port=self.port,
            properties={
                "id": self.identity.device_id,
                "v": PROTOCOL_VERSION,
                "name": self.name.encode()[:MAX_NAME_BYTES].decode("utf-8", "ignore"),
            },
            server=f"p2psync-{short.lower()}.local.",
        )

    async def _register(self, zc: Zeroconf, info: ServiceInfo) -> None:
        """Probe, then announce (~1.6 s in zeroconf's event loop); cancelled, they stop
        at once, so an agent stopped right after starting does not wait for them."""
        assert zc.loop is not None
        future = asyncio.run_coroutine_threadsafe(_announce(zc, info), zc.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:  # in zeroconf's thread, or in ours on cancel()
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            future.cancel()  # no-op once done
        try:
            future.result()
        except (NonUniqueNameException, OSError) as exc:
            log.warning("could not advertise this agent on the LAN: %s", exc)
            return
        log.info("advertised on the LAN as %s at %s", info.name, ", ".join(self.advertised))

    async def _resolve(self, zc: Zeroconf, instance: str) -> None:
        if instance in self._resolving:
            return
        priority = self.priority(instance)
        if len(self._resolving) >= MAX_PENDING and not priority:
            # a flood of adverts: drop, do not queue (zeroconf will not report it
            # again, so our peers' own names are let through whatever the flood)
            log.debug("too many adverts to resolve; dropped %r", instance)
            return
        self._resolving.add(instance)
        try:
            info: Any = await trio.to_thread.run_sync(
                lambda: zc.get_service_info(SERVICE_TYPE, instance, timeout=RESOLVE_TIMEOUT_MS),
                abandon_on_cancel=True,
                limiter=self._peer_resolvers if priority else self._resolvers,
            )
        except Exception as exc:  # whatever a LAN host sends, discovery carries on
            log.debug("cannot resolve %r: %r", instance, exc)
            return
        finally:
            self._resolving.discard(instance)
        if info is None or not info.port:
            return
        parsed = parse_advert(info.properties or {})
        if parsed is None:
            log.debug("ignoring a foreign or malformed advert %s", instance)
            return
        key, name = parsed
        if key == self.identity.public_key:
            return
        addresses = tuple(
            f"{ip}:{info.port}" for ip in info.parsed_addresses(IPVersion.V4Only)
        )[:MAX_ADDRESSES]
        if not addresses:
            return
        previous = self._instances.get(instance)
        if previous is not None and previous != key:  # the name now claims another ID
            held = self.table.get(previous)
            if (held is not None and instance in held.proven) or _same(
                instance, advert_name(previous)
            ):
                log.debug("ignoring %s: the name belongs to another agent", instance)
                return
            self._drop_instance(previous, instance)
        found = self.table.get(key)
        if found is None:
            if not self._make_room():
                log.debug("discovery table full; ignoring %s", instance)
                return
            found = self.table[key] = Found(key, name, {})
        elif instance not in found.instances and not self._room_for(found, instance):
            log.debug("ignoring %s: %d adverts already claim that ID", instance, MAX_INSTANCES)
            return
        found.instances.pop(instance, None)  # newest last
        found.instances[instance] = addresses
        found.name = name
        found.last_seen = now_ms()
        for address in addresses:  # re-advertised: a fresh chance
            found.failures.pop(address, None)
        self._instances[instance] = key
        self.on_found(found)

    def heard(self, instances: Iterable[str]) -> None:
        """Records of these adverts were heard again: their agents are still there."""
        for instance in instances:
            key = self._instances.get(instance)
            if key is not None:
                self.seen(key)

    def seen(self, key: bytes) -> None:
        """``key`` was heard or connected with just now (if the table holds it)."""
        found = self.table.get(key)
        if found is not None:
            found.last_seen = now_ms()

    def addresses(self, key: bytes) -> tuple[str, ...]:
        """Where the LAN says ``key`` is (unverified until a handshake proves it)."""
        found = self.table.get(key)
        return found.addresses if found is not None else ()

    def discard(self, key: bytes, address: str) -> None:
        """``address`` did not answer as ``key``: stop offering it (until re-advertised)."""
        found = self.table.get(key)
        if found is not None:
            for instance, addresses in found.instances.items():
                found.instances[instance] = tuple(a for a in addresses if a != address)
            found.failures.pop(address, None)

    def failed(self, key: bytes, address: str) -> None:
        """Dialling ``key`` at ``address`` failed; after a few failures in a row the
        address is dropped (until re-advertised)."""
        found = self.table.get(key)
        if found is None or address not in found.addresses:
            return
        found.failures[address] = found.failures.get(address, 0) + 1
        if found.failures[address] >= MAX_FAILURES:
            self.discard(key, address)

    def succeeded(self, key: bytes, address: str) -> None:
        """A handshake at ``address`` proved ``key``: its advert comes first from now on."""
        found = self.table.get(key)
        if found is not None:
            found.failures.pop(address, None)
            found.proven.update(i for i, a in found.instances.items() if address in a)
            found.last_seen = now_ms()

    def _room_for(self, found: Found, instance: str) -> bool:
        """Make room for another advert claiming ``found``'s ID: drop adverts left
        without addresses, then the oldest unproven one other than the agent's own
        name; the agent's own name always gets in unless every other is proven."""
        for other in [i for i, a in found.instances.items() if not a and i not in found.proven]:
            self._drop_advert(found, other)
        if len(found.instances) < MAX_INSTANCES:
            return True
        own = advert_name(found.key)
        victims = [
            i for i in found.instances if i not in found.proven and not _same(i, own)
        ]
        if not victims and _same(instance, own):
            victims = [i for i in found.instances if i not in found.proven]
        if not victims:
            return False
        self._drop_advert(found, victims[0])  # the oldest
        return True

    def _drop_advert(self, found: Found, instance: str) -> None:
        found.instances.pop(instance, None)
        found.proven.discard(instance)
        if self._instances.get(instance) == found.key:
            del self._instances[instance]

    def _make_room(self) -> bool:
        """Below :data:`MAX_TABLE` entries, evicting the least recently seen agent
        that is not wanted if need be; False when every entry is wanted."""
        if len(self.table) < MAX_TABLE:
            return True
        victims = [f for f in self.table.values() if not self.wanted(f.key)]
        if not victims:
            return False
        oldest = min(victims, key=lambda f: f.last_seen)
        del self.table[oldest.key]
        for instance in oldest.instances:
            self._instances.pop(instance, None)
        self.on_lost(oldest.key)
        return True

    def _lost(self, instance: str) -> None:
        """A goodbye or an expired advert: only that advert's addresses go."""
        key = self._instances.pop(instance, None)
        if key is not None:
            self._drop_instance(key, instance)

    def _drop_instance(self, key: bytes, instance: str) -> None:
        found = self.table.get(key)
        if found is None:
            return
        found.instances.pop(instance, None)
        found.proven.discard(instance)
        if not found.instances:
            del self.table[key]
            self.on_lost(key)


def _same(name: str, other: str) -> bool:
    return name.lower() == other.lower()  # DNS names ignore case


async def _announce(zc: Zeroconf, info: ServiceInfo) -> None:
    """Register ``info`` and wait for its announcements (in zeroconf's event loop)."""
    await (await zc.async_register_service(info, allow_name_change=True))


async def _withdraw(zc: Zeroconf, info: ServiceInfo) -> None:
    """Say goodbye (TTL 0, sent 3 times 125 ms apart) if ``info`` was announced: peers
    drop us at once. Run in zeroconf's event loop after a registration still in
    progress was cancelled (which stops its probes or announcements), so the
    registry tells whether anything was announced."""
    if zc.registry.async_get_info_name(info.key) is not None:
        await (await zc.async_unregister_service(info))


def _close(zc: Zeroconf, browser: ServiceBrowser, info: ServiceInfo) -> None:
    browser.cancel()
    assert zc.loop is not None
    try:
        asyncio.run_coroutine_threadsafe(_withdraw(zc, info), zc.loop).result(timeout=2)
    except Exception:
        log.debug("unregistering from mDNS failed", exc_info=True)
    zc.close()
