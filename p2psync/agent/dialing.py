"""Dialling peers: one task per peer we should dial that has an address, stored or
advertised on the LAN, with capped exponential backoff and jitter; it waits while
a direct connection with that peer is up, and keeps trying (backing off) while the
only one is spliced through a relay.

Addresses from LAN adverts are not trusted: they are tried first with a short
timeout, dropped after an identity mismatch (or a few failures), and stored only
once a handshake there proved the peer's key (the agent does that on connect).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

from p2psync.agent.connections import Registry
from p2psync.agent.peers import Peers
from p2psync.clock import now_ms
from p2psync.core.identity import Identity, short_id
from p2psync.errors import ConnectionLost, FrameError, HandshakeError, IdentityMismatch
from p2psync.net.adverts import AdvertTable
from p2psync.net.dial import dial
from p2psync.net.peernote import PeerNote
from p2psync.net.stats import SessionStats
from p2psync.net.transport import SecureStream

log = logging.getLogger(__name__)

LAN_DIAL_TIMEOUT = 2.0  # seconds to connect to an advertised address
HEALTHY_SESSION = 30.0  # seconds: a session this long resets the backoff

#: runs the session over a connection we dialled (at the address given)
Connect = Callable[[SecureStream, str], Awaitable[SessionStats | None]]


class Dialing:
    """The agent's dialers, one per peer it dials."""

    def __init__(
        self,
        peers: Peers,
        registry: Registry,
        adverts: AdvertTable,
        connect: Connect,
        *,
        identity: Identity,
        name: str,
        backoff_start: float,
        backoff_cap: float,
        dial_timeout: float,
    ) -> None:
        self.peers = peers  # whom to dial, at which stored addresses
        self.registry = registry  # a connection up: the dialer waits
        self.adverts = adverts  # addresses seen on the LAN
        self.connect = connect
        self.identity = identity
        self.name = name
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.dial_timeout = dial_timeout
        self._dialers: dict[bytes, object] = {}  # the token of each peer's dialer
        self._now: dict[bytes, trio.Event] = {}

    def lan_addresses(self, key: bytes) -> tuple[str, ...]:
        return self.adverts.addresses(key)

    def update(self, nursery: trio.Nursery) -> None:
        """A dialer for every peer we should dial that has an address (stored, or seen
        on the LAN). A dialer no longer wanted stops dialling, but a session it runs
        goes on to its end: a revocation that made it unwanted still has to reach
        the peer."""
        wanted = {
            key
            for key, peer in self.peers.known.items()
            if self.peers.should_dial(key) and (peer.addresses or self.lan_addresses(key))
        }
        for key in set(self._dialers) - wanted:
            del self._dialers[key]
            self.now(key)  # it wakes, sees it is no longer wanted, and ends
        for key in wanted - set(self._dialers):
            token = object()
            self._dialers[key] = token
            self._now.setdefault(key, trio.Event())
            nursery.start_soon(self._dialer, key, token)

    def now(self, key: bytes | None = None) -> None:
        """Skip the backoff wait of one dialer (or all)."""
        for peer, event in list(self._now.items()):
            if key is None or peer == key:
                event.set()
                self._now[peer] = trio.Event()

    async def _dialer(self, key: bytes, token: object) -> None:
        failures = 0
        quick = True  # one quick redial after a short session, then back off
        while self._dialers.get(key) is token:
            existing = self.registry.get(key)
            if existing is not None and existing.via is None:
                await existing.closed.wait()
                await trio.sleep(random.uniform(0.05, 0.3))  # let a restarting peer settle
                continue
            # no connection, or one through a relay: try direct (with the backoff);
            # a direct session that starts replaces the spliced one
            started = trio.current_time()
            stats = await self._dial_once(key)
            if trio.current_time() - started > HEALTHY_SESSION:
                failures, quick = 0, True
            elif stats is not None and stats.synced and quick:
                failures, quick = 0, False  # e.g. the rules changed: back at once
            else:
                # no session, or a short one: a peer that ends session after session
                # soon (whatever it says) is backed off like an unreachable one, not
                # redialled twice a second
                failures += 1
            delay = min(
                self.backoff_cap,
                self.backoff_start * 2 ** min(max(failures - 1, 0), 16),
            ) * random.uniform(0.5, 1.5)
            with trio.move_on_after(delay if failures else random.uniform(0.1, 0.5)):
                await self._now[key].wait()

    async def _dial_once(self, key: bytes) -> SessionStats | None:
        """Try each address once, the LAN's first; the session's figures when one ran."""
        peer = self.peers.known.get(key)
        if peer is None:
            return None
        advertised = [a for a in self.lan_addresses(key) if a not in peer.addresses]

        def timeout(address: str) -> float:
            if address in advertised:
                return min(self.dial_timeout, LAN_DIAL_TIMEOUT)
            return self.dial_timeout

        async def failed(address: str, exc: Exception) -> None:
            await self._failed(key, address, exc, advertised=address in advertised)

        secured, address = await dial(
            self.identity,
            self.name,
            key,
            [*advertised, *peer.addresses],
            timeout=timeout,
            on_failed=failed,
        )
        if secured is None:
            return None
        if address in advertised:
            self.adverts.succeeded(key, address, now_ms())
        return await self.connect(secured, address)

    async def _failed(self, key: bytes, address: str, exc: Exception, *, advertised: bool) -> None:
        if isinstance(exc, IdentityMismatch):
            # an advert or a stale address pointing at another agent: forget it
            log.warning("the agent at %s is not %s: %s", address, short_id(key), exc)
            if advertised:
                self.adverts.discard(key, address)
            else:
                await self.peers.forget_address(key, address)
            return
        if advertised:  # a few failures drop the hint
            self.adverts.failed(key, address)
        if isinstance(exc, HandshakeError | FrameError | ConnectionLost):
            await self.peers.note(key, PeerNote(error=f"handshake with {address} failed: {exc}"))
        elif not isinstance(exc, OSError | trio.TooSlowError):
            log.warning("dialling %s at %s failed: %r", short_id(key), address, exc)
