"""The relay node: listens, admits agents, serves their mailbox requests.

One :class:`Node` per relay home (``relay serve`` holds ``serve.lock``). Each
connection goes through, in order (``docs/relay.md``, "Relay sessions"):

1. **half-open** (:class:`~p2psync.relay.guards.HalfOpen`): the Noise XX
   handshake with the relay prologue and ``Hello`` must finish within
   ``caps.handshake_seconds``; beyond the caps the oldest half-open
   connection is closed first. Until admitted, frames are capped at 512 bytes.
2. **admission** (:class:`~p2psync.relay.admission.Admission`): the allow-list,
   or a token whose proof is bound to this handshake. Anything else: ``Bye``
   with the same reason, whoever asks.
3. **session**: requests answered in order, one at a time (each answer after
   its transaction committed); ``Arrived`` pushed, unasked, when a deposit
   for this device is stored; ``Ping`` answered; silent for
   ``caps.idle_seconds``: ``Bye``; reading nothing of an answer for as long:
   closed. A device has at most ``caps.sessions_per_device`` sessions: a newer
   one closes the oldest.

Inbound bytes are rate-capped per connection and in total
(:class:`~p2psync.relay.guards.Throttled`). The sweep drops expired envelopes
every ``caps.sweep_seconds``; ``state.json`` is rewritten every second for
``relay status``. Nothing of an envelope's content is ever logged (the relay
cannot read it anyway); logs name devices by short ID.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from functools import partial
from typing import Any

import trio

from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.envelope import MAX_SEALED_BYTES
from p2psync.core.identity import device_id, short_id
from p2psync.errors import (
    ConnectionLost,
    HandshakeError,
    HomeError,
    P2PSyncError,
    ProtocolError,
    StoreError,
)
from p2psync.net.address import cannot_listen
from p2psync.net.transport import SecureStream, secure
from p2psync.relay.backend import open_admission, open_mailbox, shown
from p2psync.relay.cluster import (
    HEARTBEAT_S,
    INVITE_CHANNEL,
    Cluster,
    Handed,
    Listener,
    NodeInfo,
)
from p2psync.relay.guards import Bucket, HalfOpen, Throttled
from p2psync.relay.home import ADMISSION_FILE, STATE_FILE, RelayHome
from p2psync.relay.service import Service
from p2psync.relay.splice import KEY_SECONDS, Invitation, Live, Splices
from p2psync.store.pgmailbox import ARRIVED_CHANNEL
from p2psync.store.pgpool import Pool

log = logging.getLogger("p2psync.relay")

#: seconds for a connection's first handshake message (32 bytes) to come
FIRST_MESSAGE_SECONDS = 2.0
#: The largest frame before admission (a Hello with a token is under 64 bytes).
HELLO_FRAME = 512
NOT_ADMITTED = "not admitted: ask this relay's operator to allow your device ID or for a token"
ADMISSION_FAILED = "the relay cannot check admissions now; try again later"
#: how often (seconds) open sessions are checked against the admission file
ADMISSION_TICK = 1.0
#: invitations waiting to be pushed to one session, at most
MAX_INVITATIONS_QUEUED = 8
#: the one answer to a splice request that cannot be met, whatever the reason
UNAVAILABLE = "unavailable"
#: seconds to tell both sides they are spliced
SPLICED_SEND_SECONDS = 5.0
#: reading this many bytes at a time from one side of a splice
SPLICE_CHUNK = 1 << 16
#: worker threads (and database connections) serving requests on PostgreSQL
#: (SQLite has one writer: one thread)
PG_THREADS = 8
#: how often the replication state is read for ``relay status`` (seconds)
REPLICATION_EVERY_S = 5.0


class Session:
    """One admitted session."""

    def __init__(
        self, stream: SecureStream, address: str, throttled: Throttled, send_seconds: float
    ) -> None:
        self.stream = stream
        self.send_seconds = send_seconds
        self.key = stream.peer
        self.address = address
        self.throttled = throttled
        self.since_ms = now_ms()
        self.scope = trio.CancelScope()
        self.requests = 0
        self.deposits = 0
        self.fetched = 0
        self.arrived = 0
        self.ending = ""  # why the relay closed it (a newer session, no longer admitted)
        self._arrival = trio.Event()
        self.invitations: list[wire.Invited] = []  # to push, unasked (newest kept)
        self._invited = trio.Event()
        self.connects: Bucket | None = None  # splice requests (set when served)

    async def send(self, message: wire.Message) -> None:
        """Send one message; a device that reads nothing of it for ``send_seconds``
        (the idle cap) loses the session (its unread answers pile up otherwise)."""
        with trio.move_on_after(self.send_seconds) as scope:
            await self.stream.send(wire.encode(message))
        if scope.cancelled_caught:
            raise ConnectionLost(f"{short_id(self.key)} read nothing for {self.send_seconds:g} s")

    def notify(self, position: int) -> None:
        if position > self.arrived:
            self.arrived = position
            self._arrival.set()

    async def push_arrivals(self) -> None:
        """Tell the device, unasked, that something arrived (never blocking the
        depositor's session: only the latest position is sent)."""
        sent = 0
        while True:
            await self._arrival.wait()
            self._arrival = trio.Event()
            if self.arrived > sent:
                sent = self.arrived
                await self.send(wire.Arrived(sent))

    def invite(self, message: wire.Invited) -> None:
        """Queue an invitation to push (never blocking the asker's session); an
        invitation not pushed within its life is useless, so only a few wait."""
        self.invitations = [*self.invitations[-(MAX_INVITATIONS_QUEUED - 1) :], message]
        self._invited.set()

    async def push_invitations(self) -> None:
        while True:
            await self._invited.wait()
            self._invited = trio.Event()
            waiting, self.invitations = self.invitations, []
            for message in waiting:
                await self.send(message)

    def describe(self) -> dict[str, Any]:
        return {
            "device_id": device_id(self.key),
            "short_id": short_id(self.key),
            "address": self.address,
            "since": self.since_ms,
            "requests": self.requests,
            "deposits": self.deposits,
            "fetched": self.fetched,
            "bytes_in": self.stream.bytes_in,
            "bytes_out": self.stream.bytes_out,
        }


class Joining:
    """A connection that presented a splice key, waiting for the other side."""

    def __init__(self, stream: SecureStream, throttled: Throttled, invitation: Invitation) -> None:
        self.stream = stream
        self.throttled = throttled
        self.invitation = invitation
        self.started = trio.Event()  # the other side joined: the pipe owns this stream
        self.done = trio.Event()  # the splice it joined has ended


class Node:
    def __init__(
        self, home: RelayHome, listen: list[tuple[str, int]], advertise: list[str] | None = None
    ) -> None:
        self.home = home
        self.caps = home.caps
        self.listen = listen
        self.advertise = list(advertise or [])
        shared = home.store is not None
        self.mailbox = open_mailbox(home, PG_THREADS)
        self.service = Service(self.mailbox, home.limits)
        self.cluster: Cluster | None = None
        self.listener: Listener | None = None
        self._pools: list[Pool] = []
        try:
            if home.store is not None:
                self._pools = [Pool(home.store, 2), Pool(home.store, 2)]
                self.cluster = Cluster(self._pools[0], home.name)
                self.listener = Listener(home.store)
            self.admission = open_admission(home, self._pools[1] if shared else None)
        except BaseException:
            self.close()
            raise
        self.nodes: list[NodeInfo] = []  # every node seen lately (this one first)
        self.replication: dict[str, Any] = {}
        self.sessions: dict[bytes, list[Session]] = {}
        self.half_open = HalfOpen(self.caps.half_open_per_address, self.caps.half_open_total)
        self.started_ms = now_ms()
        self.addresses: list[str] = []
        self.counters = {
            "accepted": 0,
            "admitted": 0,
            "refused": 0,
            "handshake_failed": 0,
            "timed_out": 0,
            "deposits": 0,
            "expired": 0,
        }
        self.splices = Splices(
            per_device=self.caps.splices_per_device, total=self.caps.splices_total
        )
        self._store_limiter = trio.CapacityLimiter(PG_THREADS if shared else 1)
        #: taken around writing relay_sessions (a session opening or closing, the
        #: heartbeat's whole list): the last write is always the present
        self._where_lock = trio.Lock()
        self._total: Bucket | None = None
        self._welcoming = 0  # sessions being welcomed, not yet in self.sessions

    def close(self) -> None:
        if self.cluster is not None:
            try:
                self.cluster.leave()
            except StoreError as exc:
                log.warning("could not say this node leaves: %s", exc)
        if self.listener is not None:
            self.listener.close()
        for pool in self._pools:
            pool.close()
        self.mailbox.close()

    # ------------------------------------------------------------ running

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the listen addresses once listening."""
        self._total = Bucket(self.caps.bytes_per_second_total)
        listeners: list[trio.SocketListener] = []
        try:
            for host, port in self.listen:
                try:
                    listeners.extend(await trio.open_tcp_listeners(port, host=host))
                except OSError as exc:
                    raise P2PSyncError(
                        cannot_listen(host, port, exc, "--listen HOST:PORT")
                    ) from exc
        except BaseException:
            for listener in listeners:
                listener.socket.close()
            raise
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            self.addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(trio.serve_listeners, self._connection, listeners))
                nursery.start_soon(self._sweeper)
                nursery.start_soon(self._state_writer)
                nursery.start_soon(self._admission_watch)
                if self.cluster is not None:
                    advertised = self.advertise or self.addresses
                    if any(a.startswith(("0.0.0.0:", "[::]:")) for a in advertised):
                        log.warning(
                            "this node advertises %s to the other nodes of the relay: give "
                            "--advertise HOST:PORT (the address agents reach it at), or "
                            "splices cannot be sent here from another node",
                            ", ".join(advertised),
                        )
                    await trio.to_thread.run_sync(self.cluster.join, advertised, now_ms())
                    nursery.start_soon(self._heartbeat)
                    nursery.start_soon(self._listen)
                log.info(
                    "relay %s (%s) listening on %s, mailbox in %s",
                    self.home.identity.short_id,
                    self.home.name,
                    ", ".join(self.addresses),
                    shown(self.home.store),
                )
                task_status.started(list(self.addresses))
        finally:
            with contextlib.suppress(FileNotFoundError):
                (self.home.path / STATE_FILE).unlink()

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.counters["accepted"] += 1
        try:
            address = str(stream.socket.getpeername()[0])
        except OSError:
            address = "?"
        assert self._total is not None
        throttled = Throttled(
            stream, Bucket(self.caps.bytes_per_second_per_connection), self._total
        )
        try:
            session = await self._admit(throttled, address)
            if isinstance(session, Joining):
                await self._splice(session)
            elif session is not None:
                await self._serve(session)
        except* (ConnectionLost, ProtocolError) as group:  # one bad peer never takes us down
            log.info("connection from %s ended: %s", address, _first(group))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.info("connection from %s broke: %s", address, _first(group))
        except* Exception as group:  # a bug, not the peer's doing: this connection only
            log.error("connection from %s failed: %r", address, _first(group),
                      exc_info=_first(group))
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await stream.aclose()

    async def _admit(self, throttled: Throttled, address: str) -> Session | Joining | None:
        deadline = self.caps.handshake_seconds
        with trio.CancelScope(deadline=trio.current_time() + deadline) as scope:
            ticket = self.half_open.enter(address, scope)
            try:
                try:
                    stream = await secure(
                        throttled,
                        self.home.identity,
                        initiator=False,
                        name=self.home.name,
                        timeout=deadline,
                        prologue=wire.PROLOGUE,
                        max_frame=HELLO_FRAME,
                        first_timeout=min(deadline, FIRST_MESSAGE_SECONDS),
                        on_first=lambda: self.half_open.progress(ticket),
                    )
                except HandshakeError as exc:
                    self.counters["handshake_failed"] += 1
                    log.info("handshake from %s failed: %s", address, exc)
                    return None
                hello = wire.decode(await stream.receive())
                if not isinstance(hello, wire.Hello | wire.Join):
                    await stream.send(wire.encode(wire.Bye("expected Hello")))
                    return None
                token = hello.token if isinstance(hello, wire.Hello) else None
                try:
                    refusal = await trio.to_thread.run_sync(
                        self.admission.admit,
                        stream.peer,
                        token,
                        stream.handshake_hash,
                        now_ms(),
                    )
                except HomeError as exc:  # admission.json broken: refuse, keep serving
                    log.error("cannot check admission: %s", exc)
                    await stream.send(wire.encode(wire.Bye(ADMISSION_FAILED)))
                    return None
                if refusal is not None:
                    self.counters["refused"] += 1
                    log.info("refused %s from %s: %s", short_id(stream.peer), address, refusal)
                    await stream.send(wire.encode(wire.Bye(NOT_ADMITTED)))
                    return None
                if isinstance(hello, wire.Join):
                    invitation = self.splices.claim(hello.key, stream.peer, trio.current_time())
                    if invitation is None and self.cluster is not None:
                        # handed by another node, and this one not told yet
                        await self._take_handed()
                        invitation = self.splices.claim(
                            hello.key, stream.peer, trio.current_time()
                        )
                    if invitation is None:
                        log.info("refused a splice join from %s: no such key for it (used, "
                                 "late, or another's)", short_id(stream.peer))
                        await stream.send(wire.encode(wire.Bye(UNAVAILABLE)))
                        return None
                    return Joining(stream, throttled, invitation)
                sessions = sum(len(s) for s in self.sessions.values()) + self._welcoming
                if sessions >= self.caps.sessions_total:
                    await stream.send(wire.encode(wire.Bye("the relay is busy; try again later")))
                    return None
                stream.set_max_frame(wire.MAX_MESSAGE_BYTES + 64)
                limits = self.home.limits
                # counted from here: _serve registers the session with no await between
                self._welcoming += 1
                try:
                    await stream.send(
                        wire.encode(
                            wire.Welcome(
                                now_ms(),
                                min(limits.max_envelope_bytes, MAX_SEALED_BYTES),
                                limits.ttl_default_ms,
                                limits.ttl_max_ms,
                            )
                        )
                    )
                finally:
                    self._welcoming -= 1
            finally:
                self.half_open.leave(ticket)
        if scope.cancelled_caught:
            if not ticket.evicted:
                self.counters["timed_out"] += 1
            log.info("connection from %s not admitted in time", address)
            return None
        self.counters["admitted"] += 1
        log.info("admitted %s from %s", short_id(stream.peer), address)
        return Session(stream, address, throttled, self.caps.idle_seconds)

    async def _serve(self, session: Session) -> None:
        mine = self.sessions.setdefault(session.key, [])
        mine.append(session)
        if self.cluster is not None and len(mine) == 1:
            await self._where(session.key, True)
        while len(mine) > self.caps.sessions_per_device:
            oldest = mine.pop(0)
            log.info("closing an older session of %s", short_id(oldest.key))
            oldest.ending = "replaced by a newer session of this device"
            oldest.scope.cancel()
        try:
            with session.scope:
                session.connects = Bucket(self.caps.connects_per_second, burst=10)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.push_arrivals)
                    nursery.start_soon(session.push_invitations)
                    await self._requests(session)
                    nursery.cancel_scope.cancel()
            if session.ending:  # closed by the relay: say why, briefly
                with trio.move_on_after(1) as bye:
                    bye.shield = True
                    with contextlib.suppress(P2PSyncError):
                        await session.send(wire.Bye(session.ending))
        finally:
            with contextlib.suppress(ValueError):
                mine.remove(session)
            if not mine and self.sessions.get(session.key) is mine:
                del self.sessions[session.key]
                if self.cluster is not None:
                    with trio.move_on_after(5) as scope:
                        scope.shield = True
                        await self._where(session.key, False)

    async def _where(self, device: bytes, here: bool) -> None:
        """Record in the database whether this node holds a session of ``device``."""
        assert self.cluster is not None
        cluster = self.cluster
        try:
            async with self._where_lock:  # never between a heartbeat's list and its write
                if here and device in self.sessions:
                    await trio.to_thread.run_sync(cluster.opened, device)
                elif not here and device not in self.sessions:
                    await trio.to_thread.run_sync(cluster.closed, device)
        except StoreError as exc:
            log.error("cannot record the session of %s: %s", short_id(device), exc)

    async def _requests(self, session: Session) -> None:
        while True:
            with trio.move_on_after(self.caps.idle_seconds) as idle:
                data = await session.stream.receive()
            if idle.cancelled_caught:
                await session.send(wire.Bye("idle for too long"))
                return
            try:
                message = wire.decode(data)
            except ProtocolError as exc:
                await session.send(wire.Bye(f"malformed message: {exc}"))
                return
            if isinstance(message, wire.Ping):
                await session.send(wire.Pong(message.nonce))
            elif isinstance(message, wire.Pong):
                pass
            elif isinstance(message, wire.Bye):
                return
            elif isinstance(message, wire.Connect):
                session.requests += 1
                await session.send(await self._connect(session, message))
            elif isinstance(message, wire.REQUESTS):
                session.requests += 1
                try:
                    outcome = await trio.to_thread.run_sync(
                        self.service.handle,
                        session.key,
                        message,
                        now_ms(),
                        limiter=self._store_limiter,
                    )
                except StoreError as exc:
                    log.error("storage failed: %s", exc)
                    await session.send(wire.Bye("the relay's storage failed; try again later"))
                    return
                await session.send(outcome.answer)
                if isinstance(outcome.answer, wire.Envelopes):
                    session.fetched += len(outcome.answer.held)
                if outcome.arrived is not None:
                    session.deposits += 1
                    self.counters["deposits"] += 1
                    recipient, position = outcome.arrived
                    for other in self.sessions.get(recipient, ()):
                        other.notify(position)
            else:
                await session.send(wire.Bye(f"unexpected {type(message).__name__}"))
                return

    # ------------------------------------------------------------ live splices

    async def _connect(self, session: Session, request: wire.Connect) -> wire.Message:
        """Invite ``session``'s device and the peer it asks for, or one uniform
        refusal: the peer unknown, not here, not listing the asker on its mailbox
        policy, a cap reached, or requests too fast."""
        unavailable = wire.Refused(request.rid, wire.RefusalCode.UNAVAILABLE, UNAVAILABLE)
        assert session.connects is not None
        if not session.connects.try_take(1):
            self.splices.counters["unavailable"] += 1
            return unavailable
        # the same work whoever is asked for (online or not, known or not): the
        # answer's timing tells nothing either
        allowed = False
        try:
            policy = await trio.to_thread.run_sync(
                self.mailbox.policy, request.peer, limiter=self._store_limiter
            )
        except StoreError as exc:
            log.error("storage failed: %s", exc)
        else:
            allowed = session.key in policy.senders
        targets = [s for s in self.sessions.get(request.peer, ()) if not s.ending]
        if allowed and not targets and self.cluster is not None:
            return await self._connect_elsewhere(session, request, unavailable)
        allowed = allowed and bool(targets)
        invitation = (
            self.splices.invite(session.key, request.peer, trio.current_time())
            if allowed
            else None
        )
        if invitation is None:
            self.splices.counters["unavailable"] += 1
            return unavailable
        expires_ms = now_ms() + int((invitation.expires - trio.current_time()) * 1000)
        target_key = self.splices.key_of(invitation, request.peer)
        targets[-1].invite(wire.Invited(session.key, target_key, expires_ms))
        log.info("splice invitation: %s asks for %s", short_id(session.key),
                 short_id(request.peer))
        return wire.Invitation(
            request.rid, request.peer, self.splices.key_of(invitation, session.key), expires_ms
        )

    async def _connect_elsewhere(
        self, session: Session, request: wire.Connect, unavailable: wire.Message
    ) -> wire.Message:
        """The peer has no session here: if another node holds one, hand it an
        invitation (it pushes the peer's key and accepts both joins) and send the
        asker there."""
        assert self.cluster is not None
        cluster = self.cluster
        try:
            node = await trio.to_thread.run_sync(cluster.locate, request.peer)
        except StoreError as exc:
            log.error("cannot look for %s on the other nodes: %s", short_id(request.peer), exc)
            node = None
        # counted here as an invitation of this node's (against the asker's cap and
        # the total), with keys nobody is told: the real ones go to the peer's node
        reserved = (
            self.splices.invite(session.key, request.peer, trio.current_time())
            if node is not None and node.addresses
            else None
        )
        if node is None or reserved is None:
            self.splices.counters["unavailable"] += 1
            return unavailable
        asker_key, target_key = os.urandom(wire.SPLICE_KEY_BYTES), os.urandom(
            wire.SPLICE_KEY_BYTES
        )
        expires_ms = now_ms() + int(KEY_SECONDS * 1000)  # this node's clock, for the asker
        handed = Handed(session.key, request.peer, asker_key, target_key, int(KEY_SECONDS * 1000))
        try:
            await trio.to_thread.run_sync(cluster.hand, node.node, handed)
        except StoreError as exc:
            log.error("cannot hand a splice to node %s: %s", node.name, exc)
            self.splices.drop(reserved)
            self.splices.counters["unavailable"] += 1
            return unavailable
        self.splices.counters["redirected"] = self.splices.counters.get("redirected", 0) + 1
        log.info("splice invitation: %s asks for %s, who is at node %s (%s)",
                 short_id(session.key), short_id(request.peer), node.node, node.addresses[0])
        return wire.Invitation(request.rid, request.peer, asker_key, expires_ms, node.addresses[0])

    async def _take_handed(self) -> None:
        """Adopt the invitations other nodes handed to this one: push each to its
        device here and accept both joins, as for an invitation made here."""
        assert self.cluster is not None
        try:
            handed = await trio.to_thread.run_sync(self.cluster.take_handed)
        except StoreError as exc:
            log.error("cannot read the splices handed to this node: %s", exc)
            return
        for h in handed:
            seconds = min(KEY_SECONDS, h.life_ms / 1000)  # whatever the nodes' clocks say
            targets = [s for s in self.sessions.get(h.target, ()) if not s.ending]
            if seconds <= 0 or not targets:
                continue
            invitation = self.splices.invite(
                h.asker, h.target, trio.current_time(), random=h.asker_key + h.target_key
            )
            if invitation is None:
                self.splices.counters["unavailable"] += 1
                continue
            invitation.expires = trio.current_time() + seconds
            expires_ms = now_ms() + int(seconds * 1000)
            targets[-1].invite(wire.Invited(h.asker, h.target_key, expires_ms))
            log.info("splice invitation handed here: %s asks for %s", short_id(h.asker),
                     short_id(h.target))

    async def _heartbeat(self) -> None:
        """Tell the other nodes this one is alive; learn who they are, and what the
        database says of its replication (for ``relay status``)."""
        assert self.cluster is not None
        cluster = self.cluster
        last_replication = -REPLICATION_EVERY_S
        while True:
            try:
                async with self._where_lock:  # the list is what the database gets
                    self.nodes = await trio.to_thread.run_sync(
                        cluster.heartbeat, list(self.sessions)
                    )
            except StoreError as exc:
                log.warning("heartbeat to the database failed: %s", exc)
            if trio.current_time() - last_replication >= REPLICATION_EVERY_S:
                last_replication = trio.current_time()
                self.replication = await trio.to_thread.run_sync(cluster.replication)
            await trio.sleep(HEARTBEAT_S)

    async def _listen(self) -> None:
        """Deposits stored through other nodes (tell the recipient's sessions here
        at once) and splices handed to this node."""
        assert self.listener is not None and self.cluster is not None
        listener, me = self.listener, self.cluster.node
        while True:
            notes = await trio.to_thread.run_sync(listener.wait, 1.0, abandon_on_cancel=True)
            if not notes and listener.error:
                log.warning("listening to the database failed: %s", listener.error)
                await trio.sleep(1.0)
                continue
            handed = False
            for channel, payload in notes:
                if channel == ARRIVED_CHANNEL:
                    recipient, _, position = payload.partition(":")
                    try:
                        key, at = bytes.fromhex(recipient), int(position)
                    except ValueError:
                        continue
                    for other in self.sessions.get(key, ()):
                        other.notify(at)
                elif channel == INVITE_CHANNEL and payload == me:
                    handed = True
            if handed:
                await self._take_handed()

    async def _splice(self, joining: Joining) -> None:
        """One side of a splice joined: wait for the other (until the keys expire);
        the second to arrive pipes both ways until either side ends or both are
        silent for ``caps.idle_seconds``, while the first waits for that end (it
        never touches its stream again: the pipe owns both)."""
        invitation, device = joining.invitation, joining.stream.peer
        invitation.joined[device] = joining
        other = invitation.other(device)
        if other in invitation.joined:
            partner = invitation.joined[other]
            assert isinstance(partner, Joining)
            self.splices.drop(invitation)
            partner.started.set()
            try:
                await self._pipe(invitation, joining, partner)
            finally:
                partner.done.set()
            return
        with trio.move_on_at(invitation.expires):
            await joining.started.wait()
        if joining.started.is_set():
            await joining.done.wait()
            return
        invitation.joined.pop(device, None)
        self.splices.drop(invitation)
        log.info("splice of %s with %s: the other side did not join in time",
                 short_id(device), short_id(other))
        with contextlib.suppress(P2PSyncError):
            await joining.stream.send(wire.encode(wire.Bye(UNAVAILABLE)))

    async def _pipe(self, invitation: Invitation, one: Joining, two: Joining) -> None:
        asker, target = (one, two) if one.stream.peer == invitation.asker else (two, one)
        live = Live(invitation.asker, invitation.target, now_ms())
        with trio.move_on_after(SPLICED_SEND_SECONDS) as sending:
            await asker.stream.send(wire.encode(wire.Spliced(invitation.target)))
            await target.stream.send(wire.encode(wire.Spliced(invitation.asker)))
        if sending.cancelled_caught:
            log.info("splice %s <-> %s: a side read nothing", short_id(live.asker),
                     short_id(live.target))
            return
        a_raw, a_left = asker.stream.detach()
        b_raw, b_left = target.stream.detach()
        self.splices.live.append(live)
        self.splices.counters["spliced"] += 1
        log.info("splice %s <-> %s started", short_id(live.asker), short_id(live.target))
        last = [trio.current_time()]
        try:
            async with trio.open_nursery() as nursery:

                async def pump(src: trio.abc.Stream, left: bytes, dst: trio.abc.Stream,
                               to_target: bool) -> None:
                    data = left
                    while True:
                        if data:
                            await dst.send_all(data)
                            last[0] = trio.current_time()
                            if to_target:
                                live.bytes_a += len(data)
                            else:
                                live.bytes_b += len(data)
                        data = bytes(await src.receive_some(SPLICE_CHUNK))
                        if not data:
                            break
                    nursery.cancel_scope.cancel()  # one side ended: so does the splice

                async def idle() -> None:
                    while True:
                        await trio.sleep_until(last[0] + self.caps.idle_seconds)
                        if trio.current_time() >= last[0] + self.caps.idle_seconds:
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(pump, a_raw, a_left, b_raw, True)
                nursery.start_soon(pump, b_raw, b_left, a_raw, False)
                nursery.start_soon(idle)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.splices.live.remove(live)
            log.info("splice %s <-> %s ended (%d and %d bytes)", short_id(live.asker),
                     short_id(live.target), live.bytes_a, live.bytes_b)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                for raw in (a_raw, b_raw):
                    with contextlib.suppress(trio.BrokenResourceError, OSError):
                        await raw.aclose()

    # ------------------------------------------------------------ housekeeping

    async def _sweeper(self) -> None:
        while True:
            try:
                notices = await trio.to_thread.run_sync(
                    self.mailbox.sweep, now_ms(), limiter=self._store_limiter
                )
            except StoreError as exc:
                log.error("the expiry sweep failed: %s", exc)
            else:
                if notices:
                    self.counters["expired"] += len(notices)
                    log.info("expired %d envelopes (their senders get a notice)", len(notices))
            await trio.sleep(self.caps.sweep_seconds)

    def state(self) -> dict[str, Any]:
        sessions = [s.describe() for group in self.sessions.values() for s in group]
        return {
            "pid": os.getpid(),
            "device_id": self.home.identity.device_id,
            "name": self.home.name,
            "listen": self.addresses,
            "started": self.started_ms,
            "written": now_ms(),
            "sessions": sessions,
            "half_open": len(self.half_open),
            "half_open_evicted": self.half_open.evicted,
            "counters": dict(self.counters),
            "splices": [live.describe() for live in self.splices.live],
            "splice_counters": dict(self.splices.counters),
            "store": shown(self.home.store),
            "node": self.cluster.node if self.cluster is not None else None,
            "advertise": self.advertise or self.addresses,
            "nodes": [n.describe() for n in self.nodes],
            "replication": self.replication,
        }

    async def _admission_watch(self) -> None:
        """End the sessions of devices no longer admitted (`relay deny`) within a
        second or so of the change to the admission file.

        The file is read again whenever it may have changed (a new inode, size or
        modification time: a deny replaces it); every open session is checked against
        the last reading each second, so a session registered just after a reading
        (its admission checked just before the deny) is ended at the next tick."""
        path = self.home.path / ADMISSION_FILE
        seen: tuple[int, int, int] | None = None
        allowed: dict[bytes, object] | None = None
        while True:
            await trio.sleep(ADMISSION_TICK)
            if self.admission.watch_by_file:
                try:
                    info = path.stat()
                except OSError:
                    continue
                stamp: tuple[int, int, int] | None = (info.st_ino, info.st_size, info.st_mtime_ns)
            else:
                stamp = None  # in the database: read every tick
            if stamp != seen or stamp is None:
                try:
                    allowed = dict(await trio.to_thread.run_sync(self.admission.allowed))
                except P2PSyncError as exc:
                    log.error("cannot read the admission file: %s", exc)
                    continue
                seen = stamp
            if allowed is not None:
                self._end_unadmitted(allowed)

    def _end_unadmitted(self, allowed: Mapping[bytes, object]) -> None:
        for key, sessions in list(self.sessions.items()):
            if key in allowed:
                continue
            for session in list(sessions):
                if session.ending:
                    continue
                log.info("closing the session of %s: no longer admitted", short_id(key))
                session.ending = "no longer admitted to this relay"
                session.scope.cancel()

    async def _state_writer(self) -> None:
        path = self.home.path / STATE_FILE
        tmp = path.with_name(STATE_FILE + ".tmp")
        while True:
            try:
                tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
                os.replace(tmp, path)
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)
            await trio.sleep(1.0)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group (trio nests them)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
