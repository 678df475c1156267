"""Dialling peers: one task per known peer with an address, stored or advertised
on the LAN, with capped exponential backoff and jitter; it waits while any
connection with that peer is up.

Addresses from LAN adverts are not trusted: they are tried first with a short
timeout, dropped after an identity mismatch (or a few failures), and stored only
once a handshake there proved the peer's key (the agent does that on connect).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import trio

from p2psync.clock import now_ms
from p2psync.core.frames import FrameError
from p2psync.core.handshake import IdentityMismatch
from p2psync.core.identity import short_id
from p2psync.core.noise import HandshakeError
from p2psync.net.address import parse_address
from p2psync.net.transport import ConnectionLost, secure
from p2psync.store.peers import PeerState

if TYPE_CHECKING:
    from p2psync.agent.agent import Agent
    from p2psync.net.sync import SessionStats

log = logging.getLogger(__name__)

LAN_DIAL_TIMEOUT = 2.0  # seconds to connect to an advertised address
HEALTHY_SESSION = 30.0  # seconds: a session this long resets the backoff


class Dialing:
    """The agent's dialers, one per peer it dials."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._dialers: dict[bytes, object] = {}  # the token of each peer's dialer
        self._now: dict[bytes, trio.Event] = {}

    def dialled(self, key: bytes) -> bool:
        """Peers we dial: known (not removed) and with an online rule in force (a live
        connection is what it asks for), a proposal of ours to deliver or hear back
        about, or rule objects of ours it may not hold yet (an answer, a revocation).
        Not, otherwise, a peer whose rules are all on demand (it syncs on `p2psync
        sync`), nor one that rejected us or whose rules were revoked."""
        peer = self.agent.peers.get(key)
        standing = self.agent.standing
        return (
            peer is not None
            and peer.state is PeerState.KNOWN
            and (key in standing.online or key in standing.asking or self.agent.has_news(key))
        )

    def lan_addresses(self, key: bytes) -> tuple[str, ...]:
        return self.agent.adverts.addresses(key)

    def update(self, nursery: trio.Nursery) -> None:
        """A dialer for every peer we dial that has an address (stored, or seen on the
        LAN). A dialer no longer wanted stops dialling, but a session it runs goes on
        to its end: a revocation that made it unwanted still has to reach the peer."""
        wanted = {
            key
            for key, peer in self.agent.peers.items()
            if self.dialled(key) and (peer.addresses or self.lan_addresses(key))
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
        config = self.agent.config
        failures = 0
        quick = True  # one quick redial after a short session, then back off
        while self._dialers.get(key) is token:
            existing = self.agent.registry.get(key)
            if existing is not None:
                await existing.closed.wait()
                await trio.sleep(random.uniform(0.05, 0.3))  # let a restarting peer settle
                continue
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
                config.backoff_cap,
                config.backoff_start * 2 ** min(max(failures - 1, 0), 16),
            ) * random.uniform(0.5, 1.5)
            with trio.move_on_after(delay if failures else random.uniform(0.1, 0.5)):
                await self._now[key].wait()

    async def _dial_once(self, key: bytes) -> SessionStats | None:
        """Try each address once, the LAN's first; the session's figures when one ran."""
        agent = self.agent
        peer = agent.peers.get(key)
        if peer is None:
            return None
        advertised = [a for a in self.lan_addresses(key) if a not in peer.addresses]
        for address in [*advertised, *peer.addresses]:
            try:
                host, port = parse_address(address)
            except ValueError:
                continue
            timeout = agent.config.dial_timeout
            if address in advertised:
                timeout = min(timeout, LAN_DIAL_TIMEOUT)
            stream: trio.SocketStream | None = None
            try:
                with trio.fail_after(timeout):
                    stream = await trio.open_tcp_stream(host, port)
                secured = await secure(
                    stream, agent.identity, initiator=True, name=agent.name, expect=key
                )
            except Exception as exc:  # whatever the far end does, only this attempt fails
                log.debug("dialling %s at %s failed: %r", short_id(key), address, exc)
                if stream is not None:
                    await stream.aclose()
                await self._failed(key, address, exc, advertised=address in advertised)
                continue
            if address in advertised:
                agent.adverts.succeeded(key, address, now_ms())
            return await agent.run_connection(secured, outbound=True, address=address)
        return None

    async def _failed(self, key: bytes, address: str, exc: Exception, *, advertised: bool) -> None:
        agent = self.agent
        if isinstance(exc, IdentityMismatch):
            # an advert or a stale address pointing at another agent: forget it
            log.warning("the agent at %s is not %s: %s", address, short_id(key), exc)
            if advertised:
                agent.adverts.discard(key, address)
            else:
                await trio.to_thread.run_sync(agent.db.store.forget_peer_address, key, address)
            return
        if advertised:  # a few failures drop the hint
            agent.adverts.failed(key, address)
        if isinstance(exc, HandshakeError | FrameError | ConnectionLost):
            await agent.record(key, error=f"handshake with {address} failed: {exc}")
        elif not isinstance(exc, OSError | trio.TooSlowError):
            log.warning("dialling %s at %s failed: %r", short_id(key), address, exc)
