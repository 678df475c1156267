"""A scripted relay node for tests: honest by default, hostile on demand.

:func:`open_fake_relay` listens on 127.0.0.1 (a free port) with its own identity,
runs the relay handshake (Noise XX, ``relaywire.PROLOGUE``) as the responder, reads
``Hello`` and answers ``Welcome`` (or ``Bye`` when :attr:`FakeRelay.admit` is
False), then answers requests. The honest answers keep an in-memory mailbox per
recipient (positions, "stored until", policies, expiry notices), after
``docs/relay.md`` "Mailbox", without quotas.

To misbehave, set :attr:`FakeRelay.script`: it sees every request first, with the
:class:`Session` (to send anything, raw bytes included, or to hang up) and returns
True when it dealt with the request itself, False to let the honest answer go.
:attr:`FakeRelay.log` keeps every request the relay received, in order.

This is a test double, not the relay node (``p2psync/relay/``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.envelope import MAX_SEALED_BYTES, EnvelopeClass, read_header
from p2psync.core.identity import Identity
from p2psync.core.policy import decode_policy
from p2psync.errors import ConnectionLost, P2PSyncError
from p2psync.net.transport import Prefixed, SecureStream, secure
from p2psync.store.relays import Relay

TTL_MS = 7 * 24 * 3600 * 1000


@dataclass
class Held:
    """One envelope in a mailbox."""

    position: int
    sender: bytes
    seq: int
    until_ms: int
    envelope: bytes


@dataclass
class Session:
    """One agent's admitted session, as a script sees it."""

    relay: FakeRelay
    stream: SecureStream
    key: bytes  # the agent's authenticated key
    relay_nursery: trio.Nursery | None = None  # where unasked messages are sent from

    async def send(self, message: wire.Message) -> None:
        await self.stream.send(wire.encode(message))

    async def send_bytes(self, data: bytes) -> None:
        """One sealed message holding ``data`` as it is (need not be a relay message)."""
        await self.stream.send(data)

    async def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket, outside any frame's seal."""
        await self.stream.stream.send_all(data)

    async def hang_up(self) -> None:
        await self.stream.stream.aclose()


Script = Callable[[Session, wire.Request], Awaitable[bool]]


@dataclass(eq=False)
class _Splice:
    """An invitation: each side's device, the peer each is told it gets, its key."""

    devices: dict[bytes, bytes]  # key -> device
    told: dict[bytes, bytes]  # device -> the peer it is told it is spliced to
    joined: dict[bytes, SecureStream] = field(default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class FakeRelay:
    identity: Identity = field(default_factory=lambda: Identity(os.urandom(32)))
    address: str = ""
    admit: bool = True
    max_sealed: int = MAX_SEALED_BYTES  # what Welcome says
    script: Script | None = None
    boxes: dict[bytes, list[Held]] = field(default_factory=dict)  # by recipient
    policies: dict[bytes, tuple[int, frozenset[bytes]]] = field(default_factory=dict)
    notices: dict[bytes, list[wire.Notice]] = field(default_factory=dict)  # by sender
    deleted: list[Held] = field(default_factory=list)  # what the recipients deleted
    log: list[tuple[bytes, wire.Message]] = field(default_factory=list)
    sessions: int = 0
    _position: int = 0
    # ---- live splice (honest: the asked-for peer, bytes untouched)
    #: whom to invite instead of the peer asked for (a relay splicing to the wrong one)
    invite_instead: dict[bytes, bytes] = field(default_factory=dict)
    #: what the pipe does to a chunk: (from device, its offset in that direction, chunk)
    tamper: Callable[[bytes, int, bytes], bytes] | None = None
    #: answer every splice request itself, as this identity (the relay, or whoever
    #: it hands the connection to, posing as the peer asked for)
    impersonate: Identity | None = None
    impostor_results: list[str] = field(default_factory=list)  # each attempt's outcome
    splices: int = 0  # splices piped
    _online: dict[bytes, Session] = field(default_factory=dict)
    _keys: dict[bytes, _Splice] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        return self.identity.public_key

    @property
    def target(self) -> Relay:
        """The relay as an agent pins it."""
        return Relay(self.key, (self.address,), None)

    def held(self, recipient: bytes) -> list[Held]:
        return self.boxes.setdefault(recipient, [])

    def requests(self, kind: type[wire.Message]) -> list[wire.Message]:
        return [m for _, m in self.log if isinstance(m, kind)]

    # ------------------------------------------------------------ honest answers

    def store(self, sender: bytes, envelope: bytes, until_ms: int | None = None) -> Held:
        """Put an envelope in its recipient's mailbox unchecked (for scripts)."""
        header = read_header(envelope)
        self._position += 1
        until = until_ms if until_ms is not None else now_ms() + TTL_MS
        held = Held(self._position, sender, header.seq, until, envelope)
        self.held(header.recipient).append(held)
        return held

    def answer(self, key: bytes, request: wire.Request) -> wire.Message:
        """What an honest relay answers ``key``'s ``request``."""
        now = now_ms()
        match request:
            case wire.Policy(rid, signed):
                policy = decode_policy(signed, owner=key)
                if policy.version <= self.policies.get(key, (0, frozenset()))[0]:
                    return wire.Refused(rid, wire.RefusalCode.NOT_NEWER, "not newer")
                self.policies[key] = (policy.version, frozenset(policy.senders))
                return wire.Done(rid, 1)
            case wire.Deposit(rid, envelope):
                return self._deposit(key, rid, envelope, now)
            case wire.Fetch(rid, after, limit):
                live = [h for h in self.held(key) if h.position > after and h.until_ms > now]
                rows = tuple(wire.Held(h.position, h.until_ms, h.envelope) for h in live[:limit])
                return wire.Envelopes(rid, rows, len(live) > limit)
            case wire.Delete(rid, keys):
                gone = [h for h in self.held(key) if (h.sender, h.seq) in set(keys)]
                self.deleted += gone
                self.boxes[key] = [h for h in self.held(key) if h not in gone]
                return wire.Done(rid, len(gone))
            case wire.Retract(rid, recipient, seqs):
                box = self.held(recipient)
                gone = [h for h in box if h.sender == key and h.seq in seqs]
                self.boxes[recipient] = [h for h in box if h not in gone]
                return wire.Done(rid, len(gone))
            case wire.TakeNotices(rid):
                return wire.Notices(rid, tuple(self.notices.pop(key, [])))
        raise AssertionError(f"not a request: {request!r}")

    def _deposit(self, key: bytes, rid: int, envelope: bytes, now: int) -> wire.Message:
        try:
            header = read_header(envelope)
        except P2PSyncError as exc:
            return wire.Refused(rid, wire.RefusalCode.MALFORMED, str(exc))
        if header.sender != key:
            return wire.Refused(rid, wire.RefusalCode.MALFORMED, "not the session's sender")
        for held in self.held(header.recipient):
            if (held.sender, held.seq) == (key, header.seq):
                return wire.Duplicate(rid, held.until_ms)
        allowed = self.policies.get(header.recipient, (0, frozenset()))[1]
        if header.cls is not EnvelopeClass.INTRODUCTION and key not in allowed:
            return wire.Refused(rid, wire.RefusalCode.NOT_ALLOWED, "not on the policy")
        if header.expiry_ms and header.expiry_ms <= now:
            return wire.Refused(rid, wire.RefusalCode.EXPIRED, "expired")
        until = min(header.expiry_ms or now + TTL_MS, now + TTL_MS)
        return wire.Stored(rid, self.store(key, envelope, until).until_ms)

    def expire(self, recipient: bytes, seq: int, sender: bytes) -> None:
        """Sweep one envelope now, queuing its expiry notice (as a sweep would)."""
        box = self.held(recipient)
        for held in [h for h in box if (h.sender, h.seq) == (sender, seq)]:
            box.remove(held)
            self.notices.setdefault(sender, []).append(wire.Notice(recipient, seq, now_ms()))

    # ------------------------------------------------------------ the session

    async def serve_one(self, tcp: trio.SocketStream) -> None:
        try:
            stream = await secure(
                tcp,
                self.identity,
                initiator=False,
                name="fake relay",
                prologue=wire.PROLOGUE,
                max_frame=wire.MAX_MESSAGE_BYTES + 64,
            )
            session = Session(self, stream, stream.peer)
            first = wire.decode(await stream.receive())
            if isinstance(first, wire.Join):
                await self._join(stream, first.key)
                return
            if not isinstance(first, wire.Hello):
                return
            self.sessions += 1
            if not self.admit:
                await session.send(wire.Bye("not admitted"))
                return
            await session.send(wire.Welcome(now_ms(), self.max_sealed, TTL_MS, TTL_MS))
            async with trio.open_nursery() as nursery:
                session.relay_nursery = nursery
                self._online[session.key] = session
                try:
                    await self._requests(session)
                finally:
                    if self._online.get(session.key) is session:
                        del self._online[session.key]
                    nursery.cancel_scope.cancel()
        except* (ConnectionLost, P2PSyncError, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the agent went away, or broke the protocol: the session ends
        finally:
            await tcp.aclose()


    async def _requests(self, session: Session) -> None:
        while True:
            message = wire.decode(await session.stream.receive())
            self.log.append((session.key, message))
            if isinstance(message, wire.Ping):
                await session.send(wire.Pong(message.nonce))
            elif isinstance(message, wire.Connect):
                await session.send(self._connect(session.key, message))
            elif not isinstance(message, wire.REQUESTS):
                await session.send(wire.Bye("unexpected"))
                return
            elif self.script is None or not await self.script(session, message):
                await session.send(self.answer(session.key, message))

    # ------------------------------------------------------------ live splice

    def _connect(self, asker: bytes, request: wire.Connect) -> wire.Message:
        expires = now_ms() + 10_000
        if self.impersonate is not None:
            key = os.urandom(32)
            self._keys[key] = _Splice({key: asker}, {asker: request.peer})
            return wire.Invitation(request.rid, request.peer, key, expires)
        invited = self.invite_instead.get(request.peer, request.peer)
        other = self._online.get(invited)
        if other is None or invited == asker:
            return wire.Refused(request.rid, wire.RefusalCode.UNAVAILABLE, "unavailable")
        key_a, key_b = os.urandom(32), os.urandom(32)
        splice = _Splice({key_a: asker, key_b: invited}, {asker: request.peer, invited: asker})
        self._keys[key_a] = self._keys[key_b] = splice
        assert other.relay_nursery is not None
        other.relay_nursery.start_soon(other.send, wire.Invited(asker, key_b, expires))
        return wire.Invitation(request.rid, request.peer, key_a, expires)

    async def _join(self, stream: SecureStream, key: bytes) -> None:
        splice = self._keys.pop(key, None)
        if splice is None or splice.devices[key] != stream.peer:
            await stream.send(wire.encode(wire.Bye("unavailable")))
            return
        splice.joined[stream.peer] = stream
        if self.impersonate is not None:
            await stream.send(wire.encode(wire.Spliced(splice.told[stream.peer])))
            raw, rest = stream.detach()
            try:
                inner = await secure(
                    Prefixed(raw, rest), self.impersonate, initiator=False, name="impostor"
                )
                self.impostor_results.append(f"handshake passed with {inner.peer.hex()}")
            except Exception as exc:  # what the agent's handshake did to us
                self.impostor_results.append(f"handshake failed: {exc!r}")
            return
        if len(splice.joined) < 2:
            with trio.move_on_after(10):
                await splice.done.wait()
            return
        one, two = splice.joined.values()
        try:
            for side in (one, two):
                await side.send(wire.encode(wire.Spliced(splice.told[side.peer])))
            self.splices += 1
            ends = [(side.peer, *side.detach()) for side in (one, two)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, ends[0], ends[1][1], nursery)
                nursery.start_soon(self._pump, ends[1], ends[0][1], nursery)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            splice.done.set()

    async def _pump(
        self, source: tuple[bytes, trio.abc.Stream, bytes], sink: trio.abc.Stream,
        nursery: trio.Nursery,
    ) -> None:
        device, raw, data = source
        offset = 0
        try:
            while True:
                if data:
                    chunk = self.tamper(device, offset, data) if self.tamper else data
                    offset += len(data)
                    await sink.send_all(chunk)
                data = bytes(await raw.receive_some(1 << 16))
                if not data:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        nursery.cancel_scope.cancel()
        for end in (raw, sink):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await end.aclose()


@asynccontextmanager
async def open_fake_relay(identity: Identity | None = None) -> AsyncIterator[FakeRelay]:
    relay = FakeRelay(identity) if identity is not None else FakeRelay()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, relay.serve_one, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        relay.address = f"127.0.0.1:{port}"
        try:
            yield relay
        finally:
            nursery.cancel_scope.cancel()
