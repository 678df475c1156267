"""The agent: listens, dials trusted peers, and keeps every connection in sync.

One trio nursery per agent holds:

* the TCP listener(s) and one task per inbound connection;
* one dialer per peer it should dial that has an address, stored or advertised
  on the LAN (``dialing.py``), with discovery (``net/discovery.py``) feeding the
  table of LAN adverts;
* the notification socket (commits by other processes, peer changes) plus a
  periodic check of ``PRAGMA data_version`` in case a datagram was lost;
* the control socket (status, sync requests).

A connection's failure is logged and ends that connection only. Inbound
handshakes in progress and connections with agents that have no rule in force
are capped, so a flood of strangers cannot starve the peers we sync with.

The agent wires its parts together: what it knows of its peers (``peers.py``),
the connections it keeps (``connections.py``), the dialers, the local sockets
(``sockets.py``, answered by ``control.py``) and the status (``status.py``) each
get the few objects they use, never the agent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2psync.agent.connections import Connection, Registry
from p2psync.agent.control import handle_control
from p2psync.agent.dialing import Dialing
from p2psync.agent.peers import Peers
from p2psync.agent.relaying import RelayLink, describe
from p2psync.agent.sockets import serve_control, serve_notifications
from p2psync.agent.status import agent_status
from p2psync.api import Database
from p2psync.clock import now_ms
from p2psync.core.identity import short_id
from p2psync.core.session import SessionConfig, SyncSession
from p2psync.errors import P2PSyncError
from p2psync.home import AGENT_FILE
from p2psync.net.address import cannot_listen, format_address, parse_address
from p2psync.net.adverts import AdvertTable, Found
from p2psync.net.agentsockets import CHANGED_PEERS
from p2psync.net.discovery import Discovery, check_interfaces, local_ipv4
from p2psync.net.halfopen import HalfOpen, busiest, source_of
from p2psync.net.link import PairLink
from p2psync.net.peernote import PeerNote, after_session
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from p2psync.net.transport import SecureStream, secure
from p2psync.store.peers import PeerState
from p2psync.store.rules import REQUEST_TTL_MS

log = logging.getLogger(__name__)


def _host(address: str) -> str:
    """The host of ``format_address``'s ``host:port`` or ``[host]:port``."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host

#: A service run in the agent's nursery: ``service(agent, task_status=...)`` reports
#: the URLs it serves at once started.
Service = Callable[..., Awaitable[Any]]

NOTE_EVERY = 10.0  # seconds between "last in sync" notes of a live connection
MAX_HANDSHAKES = 32  # inbound handshakes in progress at once (beyond: the oldest idle goes)
HANDSHAKES_PER_ADDRESS = 8  # of them from one source address
FIRST_MESSAGE_SECONDS = 2.0  # for the first handshake message (32 bytes) to come
MAX_UNPAIRED = 16  # connections open at once with agents that have no rule in force
UNPAIRED_PER_ADDRESS = 4  # of them from one source address (beyond: its oldest goes)
EXPIRY_EVERY = 3600.0  # seconds between sweeps of expired pairing requests
MAX_SIDE = 2  # connections one peer may have open beside its live one (pending or on demand)
MAX_ON_DEMAND = 1  # on-demand syncs one peer may run at once beside its live connection


@dataclass(frozen=True)
class AgentConfig:
    session: SessionConfig = field(default_factory=SessionConfig)
    discovery: bool = True
    discovery_interfaces: tuple[str, ...] = ()
    backoff_start: float = 0.5
    backoff_cap: float = 30.0
    dial_timeout: float = 5.0
    poll_interval: float = 2.0  # fallback check for commits we were not told about
    relay_grace: float = 2.0  # seconds between a change and the deposit it causes
    relay_tick: float = 60.0  # seconds between relay exchanges when nothing happens


class Agent:
    def __init__(
        self,
        db: Database,
        listen: list[tuple[str, int]],
        config: AgentConfig | None = None,
    ) -> None:
        self.db = db
        self.home: Path = db.path
        self.identity = db.identity
        self.name = db.name
        self.listen = listen
        self.config = config = config or AgentConfig()
        self.store = TrioStore(db.store)
        self.feed = ChangeFeed()
        self.rules_feed = ChangeFeed()
        self.discovery: Discovery | None = None
        self.adverts = AdvertTable(self.identity.public_key, wanted=self._ours)
        self.peers = Peers(db.store, self.identity.public_key, self.adverts)
        self.registry = Registry()
        self.addresses: list[str] = []
        self.urls: list[str] = []  # what the services (the HTTP API) serve at
        self.dialing = Dialing(
            self.peers,
            self.registry,
            self.adverts,
            self._outbound,
            identity=self.identity,
            name=self.name,
            backoff_start=config.backoff_start,
            backoff_cap=config.backoff_cap,
            dial_timeout=config.dial_timeout,
        )
        self._nursery: trio.Nursery | None = None
        self.half_open = HalfOpen(HANDSHAKES_PER_ADDRESS, MAX_HANDSHAKES)
        self._on_demand_locks: dict[bytes, trio.Lock] = {}
        self._paired_checked = -1e9
        self.started_ms = now_ms()
        self._splice_peers: frozenset[bytes] = frozenset()  # live rules a relay may carry
        self._splice_peers_read = False
        self.relay_link = RelayLink(
            db,
            self.feed,
            lambda: {p for p, c in self.registry.by_peer.items() if c.via is None},
            grace=config.relay_grace,
            tick=config.relay_tick,
            splicer=self,
            spliced=lambda: {p for p, c in self.registry.by_peer.items() if c.via is not None},
        )

    # ------------------------------------------------------------ running

    async def run(
        self,
        *,
        services: Sequence[Service] = (),
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the listen addresses once listening.
        ``services`` (the HTTP API) start in the agent's nursery after its own
        sockets, each given the agent; the URLs they report are in ``urls``."""
        if self.config.discovery:
            check_interfaces(self.config.discovery_interfaces)
        listeners = await self._open_listeners()
        self.addresses = [
            format_address(*listener.socket.getsockname()[:2]) for listener in listeners
        ]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._reload_peers()
            nursery.start_soon(trio.serve_listeners, self._inbound, listeners)
            await nursery.start(serve_notifications, self.home, self._notified)
            await nursery.start(serve_control, self.home, self._control)
            if self.config.discovery:
                self.discovery = Discovery(
                    self.identity,
                    self.name,
                    int(self.addresses[0].rsplit(":", 1)[1]),
                    self.config.discovery_interfaces or self._listen_hosts(),
                    self.adverts,
                    self._found,
                    self._lost,
                    priority=self.peers.ours_advert,
                )
                await nursery.start(self.discovery.run)
            for service in services:
                self.urls.extend(await nursery.start(service, self))
            nursery.start_soon(self._poll_changes)
            nursery.start_soon(self._expire_requests)
            nursery.start_soon(self.relay_link.run)
            self._write_agent_file()
            task_status.started(self.addresses)
            try:
                await trio.sleep_forever()
            finally:
                self._remove_agent_file()

    async def _open_listeners(self) -> list[trio.SocketListener]:
        listeners: list[trio.SocketListener] = []
        try:
            for host, port in self.listen:
                try:
                    listeners.extend(await trio.open_tcp_listeners(port, host=host))
                except OSError as exc:
                    message = cannot_listen(host, port, exc, "--listen HOST:PORT")
                    raise P2PSyncError(message) from exc
        except BaseException:
            for listener in listeners:
                listener.socket.close()
            raise
        return listeners

    def _listen_hosts(self) -> tuple[str, ...]:
        """Specific listen addresses also bound discovery (IPv4 only, as mDNS here);
        0.0.0.0 means every interface."""
        hosts = {parse_address(a)[0] for a in self.addresses}
        if hosts & {"0.0.0.0", "::"}:
            return ()
        ipv4 = tuple(sorted(h for h in hosts if ":" not in h))
        if not ipv4:
            raise P2PSyncError(
                "discovery works over IPv4 only and this agent listens on IPv6 only; "
                "name an IPv4 address with --discovery-interface IP, or use --no-discovery"
            )
        return ipv4

    def _found(self, found: Found) -> None:
        """A LAN advert: dial a known peer at once at the address it advertises."""
        peer = self.peers.known.get(found.key)
        log.info(
            "discovered %s (%s) at %s", short_id(found.key), found.name, ", ".join(found.addresses)
        )
        if peer is None or peer.state is PeerState.REMOVED:
            return
        if self._nursery is not None:
            self.dialing.update(self._nursery)
        self.dial_now(found.key)

    def _ours(self, key: bytes) -> bool:
        """Our peers are never evicted from the table of adverts."""
        return self.peers.ours(key)

    def _lost(self, key: bytes) -> None:
        log.info("%s withdrew from the LAN", short_id(key))

    def _write_agent_file(self) -> None:
        data = {
            "pid": os.getpid(),
            "listen": self.addresses,
            "device_id": self.identity.device_id,
            "name": self.name,
            "started": self.started_ms,
            "http": self.urls,
        }
        tmp = self.home / (AGENT_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.home / AGENT_FILE)

    def _remove_agent_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.home / AGENT_FILE).unlink()

    # ------------------------------------------------------------ peers and dialers

    async def _reload_peers(self) -> None:
        """Re-read the peers (and the rules, when they changed): live sessions re-send
        and re-check rule objects, the dialers follow."""
        if await self.peers.reload() or not self._splice_peers_read:
            self._splice_peers_read = True
            self._splice_peers = await trio.to_thread.run_sync(self.relay_link.mailer.live_peers)
            self.rules_feed.bump()
            self.relay_link.poke()  # a rule changed: the relay may carry more, or less
        if self._nursery is not None:
            self.dialing.update(self._nursery)
        await self.relay_link.reload()

    # ------------------------------------------------------------ connections

    async def _inbound(self, stream: trio.SocketStream) -> None:
        """A connection to the agent's port. Anyone may connect: an unpaired agent
        can only exchange rule objects (pairing requests, invite joins); no entry
        flows without a rule in force. So that a few sockets cannot keep the others
        out (``docs/protocol.md`` §2, "Handshake"): handshakes in progress are capped
        per source address and in total, a new one evicting the oldest that has not
        sent its first message (else the oldest); that message must come within
        :data:`FIRST_MESSAGE_SECONDS`; and unpaired agents are capped likewise, a
        new one closing the oldest unpaired connection from its address (or in all)."""
        try:
            remote = stream.socket.getpeername()
            host = str(remote[0])
            address = format_address(host, int(remote[1]))
        except OSError:
            host = address = "?"
        with trio.CancelScope() as scope:
            ticket = self.half_open.enter(host, scope)
            try:
                secured = await secure(
                    stream,
                    self.identity,
                    initiator=False,
                    name=self.name,
                    first_timeout=FIRST_MESSAGE_SECONDS,
                    on_first=lambda: self.half_open.progress(ticket),
                )
            except Exception as exc:  # one bad connection never takes the agent down
                log.info("refused connection from %s: %s", address, exc)
                await stream.aclose()
                return
            finally:
                self.half_open.leave(ticket)
        if scope.cancelled_caught:
            log.info("closed a half-open connection from %s to make room", address)
            with trio.move_on_after(1) as closing:
                closing.shield = True
                await stream.aclose()
            return
        side = sum(1 for conn in self.registry.others if conn.peer == secured.peer)
        if side >= MAX_SIDE:
            log.warning(
                "refused %s from %s: it already has %d other connections open",
                short_id(secured.peer),
                address,
                side,
            )
            await secured.aclose()
            return
        try:
            if secured.peer not in self.peers.standing.ours:
                if trio.current_time() - self._paired_checked > 1.0:  # someone may have paired
                    self._paired_checked = trio.current_time()
                    await self._reload_peers()
                if secured.peer not in self.peers.standing.ours:
                    self._room_for_a_stranger(host)
            await self.run_connection(secured, outbound=False, address=address)
        except Exception as exc:  # one bad connection (or failed read) never stops the agent
            log.warning("connection from %s (%s) ended: %s", short_id(secured.peer), address, exc)
            with trio.move_on_after(1) as closing:
                closing.shield = True
                await secured.aclose()

    def _strangers(self) -> list[Connection]:
        """Connections strangers opened to us (agents with no rule in force with us,
        that we never asked to pair), oldest first. Our own outbound connections
        (a pairing request of ours being delivered) are never strangers."""
        ours = self.peers.standing.ours
        return sorted(
            (
                conn
                for conn in self.registry.all()
                if not conn.outbound and conn.via is None and conn.peer not in ours
            ),
            key=lambda conn: conn.opened,
        )

    def _room_for_a_stranger(self, host: str) -> None:
        """Close the oldest stranger connections beyond the caps so that one more fits:
        from the new one's source at its cap, from the busiest source (IPv4 address
        or IPv6 /64, :func:`~p2psync.net.halfopen.source_of`) at the total cap. A
        flood of throwaway identities, from one address or a few, evicts its own; a
        stranger alone at its address (an invite holder) is the last to go."""
        strangers = [c for c in self._strangers() if not c.scope.cancel_called]
        source = source_of(host)
        mine = [c for c in strangers if source_of(_host(c.address)) == source]
        while len(mine) >= UNPAIRED_PER_ADDRESS:
            oldest = mine.pop(0)
            strangers.remove(oldest)
            self._evict_stranger(oldest)
        while len(strangers) >= MAX_UNPAIRED:
            oldest = busiest(strangers, lambda c: source_of(_host(c.address)))[0]
            strangers.remove(oldest)
            self._evict_stranger(oldest)

    def _evict_stranger(self, conn: Connection) -> None:
        log.info("closing the unpaired connection of %s (%s) to make room",
                 short_id(conn.peer), conn.address)
        conn.scope.cancel()

    async def run_connection(
        self, secured: SecureStream, *, outbound: bool, address: str, via: bytes | None = None
    ) -> SessionStats | None:
        """Run a sync session with the peer at the other end of ``secured`` (``via``: the
        relay it is spliced through; ``address`` says so)."""
        peer = secured.peer
        conn = Connection(
            peer=peer,
            dialled_by=self.identity.public_key if outbound else peer,
            outbound=outbound,
            address=address,
            via=via,
        )
        if not outbound:
            self.registry.hold(conn)  # live or on demand: its first RulesHeld says
        elif not self.registry.add(conn):
            log.debug("keeping the other connection with %s", short_id(peer))
            await secured.aclose()
            return None
        else:
            conn.live = True
        log.info("connected to %s (%s, %s)", short_id(peer), secured.peer_name, address)
        # an address we dialled proved the peer's key: try it first from now on
        dialled = address if outbound and via is None else None
        await self.peers.note(peer, PeerNote(seen=now_ms(), clear_error=True, address=dialled))

        def started(machine: SyncSession, stats: SessionStats) -> None:
            conn.machine, conn.stats = machine, stats
            self.registry.note_change()

        last_noted = -NOTE_EVERY

        def synced(_stats: SessionStats) -> None:
            nonlocal last_noted
            now = trio.current_time()
            if now - last_noted >= NOTE_EVERY:
                last_noted = now
                assert conn.machine is not None
                self.relay_link.note_in_step(peer, conn.machine.peer)
                note = PeerNote(
                    seen=now_ms(),
                    synced=now_ms(),
                    heads={a: h.seq for a, h in conn.machine.peer.items()},
                    clear_error=True,  # in step: whatever went wrong before is over
                )
                self._spawn(partial(self.peers.note, peer, note))

        def opened(live: bool) -> str | None:
            """The session opens: an on-demand one runs beside the live connection;
            a live one the peer dialled takes its place, or gives way to it. A
            reason ends it."""
            if outbound:
                return None
            if not live:
                running = [c for c in self.registry.others if c.peer == peer and c.on_demand]
                if len(running) >= MAX_ON_DEMAND:
                    log.info("%s is already syncing on demand; refused another", short_id(peer))
                    return "an on-demand sync between us is running already; try again after it"
                conn.on_demand = True
                return None
            if self.registry.add(conn):
                conn.live = True
                return None
            log.debug("keeping the other connection with %s", short_id(peer))
            return "another connection between us is kept"

        def stuck(stats: SessionStats) -> None:
            # `peers` shows it even after the agent stops
            note = PeerNote(error=f"cannot get in step: {stats.stuck}")
            self._spawn(partial(self.peers.note, peer, note))

        def rules_added() -> None:
            self._spawn(self._reload_peers)  # other sessions and the caps see them at once

        stats: SessionStats | None = None
        try:
            with conn.scope:
                link = PairLink(
                    self.db,
                    peer,
                    handshake_hash=secured.handshake_hash,
                    peer_name=secured.peer_name,
                    rules_feed=self.rules_feed,
                    on_rules_added=rules_added,
                    on_reconciled=partial(self._reconciled, peer),
                    via_relay=via is not None,
                )
                stats = await run_session(
                    secured,
                    self.store,
                    self.feed,
                    live=True,
                    config=self.config.session,
                    on_start=started,
                    on_synced=synced,
                    link=link,
                    on_open=opened,
                    on_stuck=stuck,
                    on_change=self.registry.note_change,
                )
        except Exception as exc:  # one bad connection never takes the agent down
            log.warning("connection with %s failed: %r", short_id(peer), exc)
            await self.peers.note(peer, PeerNote(error=str(exc)))
        finally:
            self.registry.remove(conn)
            self._connection_ended(conn)
            self.relay_link.poke()  # the peer may be out of direct reach now
            if conn.machine is not None and conn.stats is not None:
                await self._note_end(conn)
        return stats

    def _connection_ended(self, conn: Connection) -> None:
        """Tell the relay link how a connection ended (the registry already knows):
        a direct one, so a splice is asked for at once; a splice a direct connection
        replaced, which says nothing of the relay; or a splice that ended by itself,
        whose life decides the backoff."""
        taken = self.registry.get(conn.peer)
        if conn.via is None:
            self.relay_link.direct_ended(conn.peer)
        elif taken is not None and taken.via is None:
            self.relay_link.splice_ended(conn.peer, math.inf)
        else:
            self.relay_link.splice_ended(conn.peer, (now_ms() - conn.since_ms) / 1000)

    async def _outbound(self, secured: SecureStream, address: str) -> SessionStats | None:
        return await self.run_connection(secured, outbound=True, address=address)

    async def _note_end(self, conn: Connection) -> None:
        """What the peers table keeps of a connection that ended (also when the agent
        is stopping: shielded, and given a second)."""
        peer, machine, stats = conn.peer, conn.machine, conn.stats
        assert machine is not None and stats is not None
        # a live connection speaks for the peer unless another live one has taken
        # its place; a side one (on demand, or never opened) only when nothing else
        # with the peer is open (the live one, or one taking over)
        if conn.live:
            side = self.registry.get(peer) is not None
        else:
            side = any(other.peer == peer for other in self.registry.all())
        note = after_session(
            stats,
            in_step=machine.synced or machine.ended_in_sync,
            heads=machine.peer,
            now_ms=now_ms(),
            side=side,
        )
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await self.peers.note(peer, note)

    # ------------------------------------------------------------ live splices

    def wanted(self) -> set[bytes]:
        """Peers to ask the relay for a splice with: a live rule the relay may carry,
        not removed, and no live connection (direct or spliced)."""
        return {
            peer
            for peer in self._splice_peers
            if self.registry.get(peer) is None and self.peers.ours(peer)
        }

    def welcome(self, peer: bytes) -> bool:
        """Join a splice ``peer`` asked for: a live rule the relay may carry (the
        handshake inside proves it is that peer)."""
        return (
            peer in self._splice_peers
            and self.registry.get(peer) is None
            and self.peers.ours(peer)
        )

    def adopt(self, peer: bytes, stream: trio.abc.Stream, *, initiator: bool, relay: bytes) -> None:
        self._spawn(partial(self._spliced, peer, stream, initiator, relay))

    async def _spliced(
        self, peer: bytes, stream: trio.abc.Stream, initiator: bool, relay: bytes
    ) -> None:
        """The session with ``peer`` through a splice at ``relay``: the normal
        handshake, expecting that peer (a relay splicing us to anyone else fails it)."""
        address = f"via relay {short_id(relay)}"
        try:
            secured = await secure(
                stream, self.identity, initiator=initiator, name=self.name, expect=peer
            )
        except Exception as exc:  # one bad splice never takes the agent down
            log.warning("splice with %s through relay %s refused: %s", short_id(peer),
                        short_id(relay), exc)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await stream.aclose()
            return
        await self.run_connection(secured, outbound=initiator, address=address, via=relay)

    def _reconciled(self, peer: bytes, version: int) -> None:
        """The peer holds every rule object of ours about the pair, as of ``version``."""
        if self.peers.reconciled(peer, version) and self._nursery is not None:
            self.dialing.update(self._nursery)

    def on_demand_lock(self, peer: bytes) -> trio.Lock:
        """Held while this agent runs an on-demand sync with ``peer``."""
        return self._on_demand_locks.setdefault(peer, trio.Lock())

    def _spawn(self, work: Callable[[], Awaitable[object]]) -> None:
        """Run ``work`` in the agent's nursery, unless the agent is stopping."""
        if self._nursery is None:
            return
        with contextlib.suppress(RuntimeError):  # "closed to new arrivals": stopping
            self._nursery.start_soon(work)

    # ------------------------------------------------------------ local changes

    async def _notified(self, data: bytes) -> None:
        """Another process committed to the store (or changed the peers)."""
        if CHANGED_PEERS in data:
            await self._reload_peers()
            self.dial_now()
        self.feed.bump()

    async def _poll_changes(self) -> None:
        version = await trio.to_thread.run_sync(self.db.store.data_version)
        while True:
            await trio.sleep(self.config.poll_interval)
            current = await trio.to_thread.run_sync(self.db.store.data_version)
            if current != version:
                version = current
                await self._reload_peers()
                self.feed.bump()

    async def _expire_requests(self) -> None:
        """Forget strangers' requests left unanswered (or rejected) for
        :data:`~p2psync.store.rules.REQUEST_TTL_MS`, at start and every
        :data:`EXPIRY_EVERY` seconds: their rule objects go, and their slots."""
        while True:
            try:
                gone = await trio.to_thread.run_sync(
                    self.db.store.expire_requests, self.identity.public_key, now_ms()
                )
            except P2PSyncError as exc:
                log.warning("could not forget expired pairing requests: %s", exc)
                gone = []
            if gone:
                log.info(
                    "forgot %d pairing requests unanswered for %d days: %s",
                    len(gone),
                    REQUEST_TTL_MS // 86_400_000,
                    ", ".join(short_id(peer) for peer in gone[:10]),
                )
                await self._reload_peers()
            await trio.sleep(EXPIRY_EVERY)

    # ------------------------------------------------------------ control socket

    async def _control(self, stream: trio.SocketStream) -> None:
        await handle_control(self, stream)

    def status(self) -> dict[str, Any]:
        """What ``p2psync status`` shows."""
        document = agent_status(
            identity=self.identity,
            name=self.name,
            listen=self.addresses,
            started_ms=self.started_ms,
            interfaces=self.discovery.advertised if self.discovery else local_ipv4(None),
            registry=self.registry,
            peers=self.peers.known,
            adverts=self.adverts,
        )
        document["relay"] = describe(self.relay_link)
        document["http"] = self.urls
        return document

    def peers_changed(self) -> None:
        """Pairing changed in this process (the HTTP API): reload the peers, dial."""
        self._spawn(self._notified_peers)

    async def _notified_peers(self) -> None:
        await self._reload_peers()
        self.dial_now()

    def dial_now(self, key: bytes | None = None) -> None:
        """Skip the backoff wait of one dialer (or all)."""
        self.dialing.now(key)

