"""LAN discovery over mDNS / DNS-SD: python-zeroconf's threaded API bridged into
trio, around the pure table of adverts (``adverts.py``).

Each agent advertises ``<short ID>._p2psync._tcp.local.`` with its port and a TXT
record holding exactly ``id`` (the full device ID), ``v`` (protocol version) and
``name`` (display name) — no collection or data names. It browses the same type;
what it resolves goes into the :class:`AdvertTable`, withdrawals and goodbyes
come out of it. Lookups run in a few threads of their own; in a flood of
adverts the excess is dropped, not queued, except our peers' own names.
Malformed or foreign adverts are ignored. Nothing here needs the Internet: mDNS
is link-local multicast.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
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
from p2psync.core.identity import Identity, short_id
from p2psync.errors import P2PSyncError, UsageError
from p2psync.net.adverts import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    AdvertTable,
    AgentDiscovered,
    Event,
    Found,
    advert_name,
    parse_advert,
)

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
MAX_NAME_BYTES = 63
MAX_PENDING = 64  # adverts waiting to be resolved; more are dropped until some finish


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


class Discovery:
    """Advertise this agent and feed ``table`` the adverts seen, until cancelled;
    ``on_found`` and ``on_lost`` hear what changed in the table."""

    def __init__(
        self,
        identity: Identity,
        name: str,
        port: int,
        interfaces: Sequence[str] | None,
        table: AdvertTable,
        on_found: Callable[[Found], None],
        on_lost: Callable[[bytes], None],
        priority: Callable[[str], bool] = lambda instance: False,
    ) -> None:
        self.identity = identity
        self.name = name
        self.port = port
        self.interfaces = list(interfaces) if interfaces else None
        self.table = table
        self.on_found = on_found
        self.on_lost = on_lost
        self.priority = priority  # adverts resolved even in a flood (our peers' names)
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
                        self._report(self.table.withdrawn(name))
                    else:
                        nursery.start_soon(self._resolve, zc, name)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await trio.to_thread.run_sync(lambda: _close(zc, browser, info))

    def heard(self, instances: Iterable[str]) -> None:
        """Records of these adverts were heard again: their agents are still there."""
        self.table.heard(instances, now_ms())

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
        addresses = [f"{ip}:{info.port}" for ip in info.parsed_addresses(IPVersion.V4Only)]
        self._report(self.table.advertised(instance, key, name, addresses, now_ms()))

    def _report(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, AgentDiscovered):
                self.on_found(event.found)
            else:
                self.on_lost(event.key)


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
