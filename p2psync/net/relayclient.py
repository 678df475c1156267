"""An agent's session with a relay node (``docs/relay.md``, "Relay sessions").

:func:`open_relay` dials the relay's addresses in order (expecting its pinned
key, with the relay prologue), says ``Hello`` (with an admission token's proof
when one is given) and waits for ``Welcome``; it yields a :class:`RelayClient`
whose requests may be pipelined: each is answered in order, matched by its rid.
The relay's unasked ``Arrived`` bumps :attr:`RelayClient.arrived`; its ``Ping``
is answered; its ``Bye`` ends the session (:class:`ConnectionLost`).

Everything the relay sends is hostile until checked: an answer of the wrong type
or rid, or anything malformed, is a :class:`RemoteProtocolError` that ends the
session; what the relay says about envelopes is advice (only signed receipts
count, ``p2psync/mail``).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import trio

from p2psync.core import relaywire as wire
from p2psync.core.identity import Identity, device_id, short_id
from p2psync.core.mailbox import MAX_FETCH
from p2psync.errors import (
    ConnectionLost,
    IdentityMismatch,
    P2PSyncError,
    RelayUnavailable,
    RemoteProtocolError,
)
from p2psync.net.dial import dial
from p2psync.net.transport import SecureStream
from p2psync.store.relays import Relay

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds to reach a relay and be welcomed (per address: the handshake's own).
CONNECT_TIMEOUT = 10.0
#: Requests in flight at once on one session (deposits are pipelined).
WINDOW = 32
PING_INTERVAL = 60.0
#: Splice invitations waiting to be taken, at most (each lives seconds).
MAX_INVITATIONS = 16
#: Seconds a request may wait for its answer once sent (the relay answers in order,
#: after it has read the whole request); past that the session is given up.
ANSWER_TIMEOUT = 120.0


class _Slot:
    __slots__ = ("answer", "done", "error", "rid")

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.done = trio.Event()
        self.answer: wire.Message | None = None
        self.error: Exception | None = None


class RelayClient:
    """One admitted relay session."""

    def __init__(self, stream: SecureStream, welcome: wire.Welcome, address: str) -> None:
        self.stream = stream
        self.welcome = welcome
        self.address = address
        self.relay = stream.peer
        self.arrived = 0  # the highest position the relay said arrived for us
        self._arrival = trio.Event()
        self._pending: collections.deque[_Slot] = collections.deque()
        self._send_lock = trio.Lock()
        self._window = trio.Semaphore(WINDOW)
        self._next_rid = 1
        self._failure: Exception | None = None
        self._invitations: collections.deque[wire.Invited] = collections.deque(
            maxlen=MAX_INVITATIONS
        )
        self._invited = trio.Event()

    # ------------------------------------------------------------ requests

    async def set_policy(self, signed: bytes) -> wire.Done | wire.Refused:
        answer = await self._request(lambda rid: wire.Policy(rid, signed))
        if isinstance(answer, wire.Done | wire.Refused):
            return answer
        raise _unexpected(answer)

    async def deposit(self, envelope: bytes) -> wire.Stored | wire.Duplicate | wire.Refused:
        answer = await self._request(lambda rid: wire.Deposit(rid, envelope))
        if isinstance(answer, wire.Stored | wire.Duplicate | wire.Refused):
            return answer
        raise _unexpected(answer)

    async def deposit_all(
        self, envelopes: Sequence[bytes]
    ) -> list[wire.Stored | wire.Duplicate | wire.Refused]:
        """Deposit every envelope, pipelined (at most WINDOW in flight); the answers
        in the envelopes' order."""
        answers: list[wire.Stored | wire.Duplicate | wire.Refused | None] = [None] * len(envelopes)

        async def one(index: int, envelope: bytes) -> None:
            try:
                answers[index] = await self.deposit(envelope)
            finally:
                self._window.release()

        with _unwrapped():
            async with trio.open_nursery() as nursery:
                for index, envelope in enumerate(envelopes):
                    await self._window.acquire()
                    nursery.start_soon(one, index, envelope)
        return [a for a in answers if a is not None]

    async def fetch(self, after: int, limit: int = MAX_FETCH) -> wire.Envelopes:
        answer = _expect(
            await self._request(lambda rid: wire.Fetch(rid, after, limit)), (wire.Envelopes,)
        )
        if answer.held and answer.held[0].position <= after:
            raise RemoteProtocolError("the relay served an envelope from before the fetch cursor")
        return answer

    async def fetch_all(self, after: int = 0) -> AsyncGenerator[wire.Held, None]:
        """Every envelope the relay holds for us after ``after``, in position order."""
        while True:
            batch = await self.fetch(after)
            for held in batch.held:
                yield held
                after = held.position
            if not batch.more or not batch.held:
                return

    async def delete(self, keys: Iterable[tuple[bytes, int]]) -> int:
        total = 0
        names = list(keys)
        for start in range(0, len(names), wire.MAX_NAMES):
            answer = await self._request(_delete_of(tuple(names[start : start + wire.MAX_NAMES])))
            total += _expect(answer, (wire.Done,)).count
        return total

    async def retract(self, recipient: bytes, seqs: Iterable[int]) -> int:
        total = 0
        numbers = list(seqs)
        for start in range(0, len(numbers), wire.MAX_NAMES):
            answer = await self._request(
                _retract_of(recipient, tuple(numbers[start : start + wire.MAX_NAMES]))
            )
            total += _expect(answer, (wire.Done,)).count
        return total

    async def take_notices(self) -> tuple[wire.Notice, ...]:
        answer = await self._request(wire.TakeNotices)
        return _expect(answer, (wire.Notices,)).notices

    async def connect(self, peer: bytes) -> wire.Invitation | wire.Refused:
        """Ask for a live splice with ``peer`` (``Refused(unavailable)``, whatever the
        reason, when there is none)."""
        answer = await self._request(lambda rid: wire.Connect(rid, peer))
        if isinstance(answer, wire.Refused):
            return answer
        invitation = _expect(answer, (wire.Invitation,))
        if invitation.peer != peer:
            raise RemoteProtocolError("the relay answered a splice request for another peer")
        return invitation

    async def next_invitation(self) -> wire.Invited:
        """The next splice a peer asked for with us (the relay's unasked ``Invited``)."""
        while not self._invitations:
            self._check()
            await self._invited.wait()
            self._invited = trio.Event()
        return self._invitations.popleft()

    async def wait_arrived(self, seen: int) -> int:
        """Wait until the relay says something arrived past position ``seen``."""
        while self.arrived <= seen:
            self._check()
            await self._arrival.wait()
        return self.arrived

    # ------------------------------------------------------------ machinery

    async def _request(self, make: Callable[[int], wire.Request | wire.Connect]) -> wire.Message:
        self._check()
        async with self._send_lock:  # rid order = send order = answer order
            # (again: the session may have ended while we waited for the lock, and
            # a slot added after _fail emptied them would never be answered)
            self._check()
            rid = self._next_rid
            self._next_rid += 1
            slot = _Slot(rid)
            self._pending.append(slot)
            await self.stream.send(wire.encode(make(rid)))
        with trio.move_on_after(ANSWER_TIMEOUT):
            await slot.done.wait()
        if not slot.done.is_set():
            self._fail(
                ConnectionLost(
                    f"relay {short_id(self.relay)} did not answer within {ANSWER_TIMEOUT:g} s"
                )
            )
        if slot.error is not None:
            raise slot.error
        assert slot.answer is not None
        return slot.answer

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def read_loop(self) -> None:
        """Read the relay's messages until the session ends; fails every request in
        flight with the reason."""
        try:
            while True:
                message = wire.decode(await self.stream.receive())
                await self._dispatch(message)
        except Exception as exc:
            if not isinstance(exc, P2PSyncError):
                log.warning("relay session with %s failed: %r", short_id(self.relay), exc)
                exc = ConnectionLost(f"relay session failed: {exc}")
            self._fail(exc)
            if not isinstance(exc, ConnectionLost | RemoteProtocolError):
                raise

    async def _dispatch(self, message: wire.Message) -> None:
        if isinstance(message, wire.Arrived):
            if message.position > self.arrived:
                self.arrived = message.position
                self._arrival.set()
                self._arrival = trio.Event()
        elif isinstance(message, wire.Invited):
            self._invitations.append(message)  # the oldest beyond a few is dropped
            self._invited.set()
        elif isinstance(message, wire.Ping):
            await self.stream.send(wire.encode(wire.Pong(message.nonce)))
        elif isinstance(message, wire.Pong):
            pass
        elif isinstance(message, wire.Bye):
            raise ConnectionLost(f"the relay ended the session: {message.reason!r}")
        elif isinstance(message, wire.ANSWERS):
            if not self._pending or self._pending[0].rid != message.rid:
                raise RemoteProtocolError(f"the relay answered request {message.rid} out of turn")
            slot = self._pending.popleft()
            slot.answer = message
            slot.done.set()
        else:
            raise RemoteProtocolError(f"the relay sent {type(message).__name__} mid-session")

    def _fail(self, exc: Exception) -> None:
        if self._failure is None:
            self._failure = exc
        while self._pending:
            slot = self._pending.popleft()
            slot.error = exc
            slot.done.set()
        self._arrival.set()
        self._invited.set()

    async def ping_loop(self) -> None:
        """Keep the session alive through the relay's idle timeout."""
        nonce = 0
        while True:
            await trio.sleep(PING_INTERVAL)
            nonce += 1
            await self.stream.send(wire.encode(wire.Ping(nonce)))


def _delete_of(keys: tuple[tuple[bytes, int], ...]) -> Callable[[int], wire.Request]:
    return lambda rid: wire.Delete(rid, keys)


def _retract_of(recipient: bytes, seqs: tuple[int, ...]) -> Callable[[int], wire.Request]:
    return lambda rid: wire.Retract(rid, recipient, seqs)


def _expect(message: wire.Message, kinds: tuple[type[T], ...]) -> T:
    if not isinstance(message, kinds):
        raise _unexpected(message)
    return message


def _unexpected(message: wire.Message) -> RemoteProtocolError:
    return RemoteProtocolError(f"the relay answered with {type(message).__name__}")


@contextmanager
def _unwrapped() -> Iterator[None]:
    """Let the p2psync error a nursery wrapped (nested) in exception groups out as
    itself, so callers catch a :class:`P2PSyncError`, not an ExceptionGroup: when
    several tasks failed (the session broke under each of them), the first error
    stands for all."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: dict[int, BaseException] = {}
        pending: list[BaseException] = [group]
        while pending:
            exc = pending.pop()
            if isinstance(exc, BaseExceptionGroup):
                pending.extend(exc.exceptions)
            else:
                leaves[id(exc)] = exc
        errors = [e for e in leaves.values() if not isinstance(e, trio.Cancelled)]
        if not errors or not all(isinstance(e, P2PSyncError) for e in errors):
            raise  # anything else is a bug: keep every traceback
        # several tasks failed for the one reason (the session broke): say it once
        first = errors[0]
        raise first from first.__cause__


@asynccontextmanager
async def open_relay(
    identity: Identity, name: str, target: Relay, *, timeout: float = CONNECT_TIMEOUT
) -> AsyncIterator[RelayClient]:
    """An admitted session with ``target``; raises :class:`RelayUnavailable` when no
    address answers or the relay does not admit us."""
    impostors: list[str] = []

    async def failed(address: str, exc: Exception) -> None:
        if isinstance(exc, IdentityMismatch):
            impostors.append(f"{address} ({exc})")

    stream, how = await dial(
        identity,
        name,
        target.key,
        target.addresses,
        timeout=lambda _address: timeout,
        on_failed=failed,
        prologue=wire.PROLOGUE,
        max_frame=wire.MAX_MESSAGE_BYTES + 64,
    )
    if stream is None and impostors:
        raise RelayUnavailable(
            f"another relay or agent answers at {'; '.join(impostors)}: check the relay ID "
            f"and address (`p2psync relay add RELAY_ID --address HOST:PORT` replaces them)"
        )
    if stream is None:
        raise RelayUnavailable(f"relay {short_id(target.key)} is unreachable ({how})")
    address = how
    try:
        welcome = await _admission(stream, identity, target, timeout)
        client = RelayClient(stream, welcome, address)
        with _unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.read_loop)
                nursery.start_soon(client.ping_loop)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


async def _admission(
    stream: SecureStream, identity: Identity, target: Relay, timeout: float
) -> wire.Welcome:
    proof = None
    if target.token is not None:
        try:
            ident, secret = wire.parse_token(target.token)
        except ValueError as exc:
            raise RelayUnavailable(f"the token for relay {short_id(target.key)}: {exc}") from exc
        proof = (ident, wire.token_proof(secret, stream.handshake_hash))
    try:
        with trio.fail_after(timeout):
            await stream.send(wire.encode(wire.Hello(proof)))
            first = wire.decode(await stream.receive())
    except trio.TooSlowError as exc:
        raise RelayUnavailable(f"relay {short_id(target.key)} did not answer in time") from exc
    except ConnectionLost as exc:
        raise RelayUnavailable(f"relay {short_id(target.key)} closed the session: {exc}") from exc
    if isinstance(first, wire.Bye):
        if not first.reason.startswith("not admitted"):
            raise RelayUnavailable(f"relay {short_id(target.key)}: {first.reason}")
        used = " (the token was not accepted: used up, expired or revoked?)" if proof else ""
        raise RelayUnavailable(
            f"relay {short_id(target.key)} did not admit this agent{used}; ask its operator "
            f"to run `p2psync relay allow {device_id(identity.public_key)}` or for a token"
        )
    if not isinstance(first, wire.Welcome):
        raise RemoteProtocolError(f"the relay answered Hello with {type(first).__name__}")
    return first
