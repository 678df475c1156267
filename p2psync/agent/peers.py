"""What the agent knows of its peers: the peers table and where it stands with each
(from the rules), as last read from the store, and what it notes about them in
the peers table (connections, errors, addresses that proved wrong).

The dialers, the control socket and the status read it; the agent reloads it
when the store says the peers or the rules changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from p2psync.clock import now_ms
from p2psync.core.identity import short_id
from p2psync.core.rules import Mode
from p2psync.errors import P2PSyncError
from p2psync.net.adverts import AdvertTable, advert_name
from p2psync.net.peernote import PeerNote
from p2psync.store.peers import Peer, PeerState
from p2psync.store.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Standing:
    """Where the agent stands with its peers, from the rules (reloaded when they
    change)."""

    paired: set[bytes] = field(default_factory=set)  # a rule in force, any mode
    #: an online rule in force that a direct connection carries: stay connected
    online: set[bytes] = field(default_factory=set)
    #: an on-demand rule in force that a direct connection carries
    on_demand: set[bytes] = field(default_factory=set)
    asking: set[bytes] = field(default_factory=set)  # a proposal of ours awaits an answer
    ours: set[bytes] = field(default_factory=set)  # paired, or we proposed to them once
    #: per peer, where the newest rule object we signed about the pair stands
    latest: dict[bytes, int] = field(default_factory=dict)

    @classmethod
    def load(cls, store: Store, me: bytes) -> Standing:
        """Fold the rules (blocking: call in a worker thread)."""
        modes = store.peers_in_force_modes()
        direct = store.peers_in_force_modes(direct=True)  # a route-relay rule: never dialled
        return cls(
            paired=set(modes),
            online={peer for peer, held in direct.items() if Mode.ONLINE in held},
            on_demand={peer for peer, held in direct.items() if Mode.ON_DEMAND in held},
            asking=store.peers_asked(me),
            latest=store.latest_signed(me),
            ours=set(modes) | store.peers_proposed_to(me),
        )


class Peers:
    """The agent's peers (``known``, by key) and its ``standing`` with them."""

    def __init__(self, store: Store, me: bytes, adverts: AdvertTable) -> None:
        self.store = store  # blocking: used from worker threads
        self.me = me
        self.adverts = adverts  # a connection is a sign of life on the LAN too
        self.known: dict[bytes, Peer] = {}
        self.standing = Standing()
        self._rules_version = -1
        self._reloading = trio.Lock()
        #: per peer, the rules version it is known to hold all our objects of (its
        #: RulesHeld matched ours, or it said Have after our Rules)
        self._reconciled: dict[bytes, int] = {}

    async def reload(self) -> bool:
        """Re-read the peers, and the rules when rule objects were added (cheap to
        check; folding them is not, so it is done only then). True when the rules
        were folded again."""
        async with self._reloading:  # one at a time: they never pile up on threads
            seen, store, me = self._rules_version, self.store, self.me

            def load() -> tuple[list[Peer], int, Standing | None]:
                version = store.rules_version()
                if version == seen:
                    return store.peers(), version, None
                return store.peers(), version, Standing.load(store, me)

            peers, version, standing = await trio.to_thread.run_sync(load)
            self.known = {peer.key: peer for peer in peers}
            if standing is None:
                return False
            self._rules_version = version
            self.standing = standing
            return True

    # ------------------------------------------------------------ decisions

    def should_dial(self, key: bytes) -> bool:
        """Peers we dial: known (not removed) and with an online rule in force (a live
        connection is what it asks for), a proposal of ours to deliver or hear back
        about, or rule objects of ours it may not hold yet (an answer, a revocation).
        Not, otherwise, a peer whose rules are all on demand (it syncs on `p2psync
        sync`), nor one that rejected us or whose rules were revoked."""
        peer = self.known.get(key)
        standing = self.standing
        return (
            peer is not None
            and peer.state is PeerState.KNOWN
            and (key in standing.online or key in standing.asking or self.has_news(key))
        )

    def has_news(self, key: bytes) -> bool:
        """We signed rule objects about the pair that the peer may not hold yet (an
        answer, a revocation): worth a connection to deliver them."""
        return self.standing.latest.get(key, 0) > self._reconciled.get(key, 0)

    def reconciled(self, key: bytes, version: int) -> bool:
        """The peer holds every rule object of ours about the pair, as of ``version``;
        True when that is news."""
        if version <= self._reconciled.get(key, 0):
            return False
        self._reconciled[key] = version
        return True

    def ours(self, key: bytes) -> bool:
        """Paired with us, or we asked to pair: kept in the discovery table and its
        adverts resolved first (an agent that merely sent us a request is not)."""
        peer = self.known.get(key)
        return key in self.standing.ours and peer is not None and peer.state is PeerState.KNOWN

    def ours_advert(self, instance: str) -> bool:
        """``instance`` is the advert name one of our peers would use."""
        return instance.lower() in {advert_name(key).lower() for key in self.standing.ours}

    # ------------------------------------------------------------ notes

    async def note(self, key: bytes, note: PeerNote) -> None:
        """Write what a connection showed of ``key`` to the peers table (a failure to
        write is logged, never raised)."""
        if note.seen:  # a connection: seen on the LAN
            self.adverts.seen(key, now_ms())
        try:
            await trio.to_thread.run_sync(note.write, self.store, key)
        except P2PSyncError as exc:
            log.warning("could not record the state of %s: %s", short_id(key), exc)

    async def forget_address(self, key: bytes, address: str) -> None:
        """``address`` answered as another agent: stop dialling ``key`` there."""
        await trio.to_thread.run_sync(self.store.forget_peer_address, key, address)
