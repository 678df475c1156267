"""Which connections an agent keeps: one live connection per peer.

When two agents dial each other at the same moment both connections may
complete. Each side then keeps the connection **dialled by the smaller
identity key** (bytewise), so both keep the same one and close the other.
A direct connection always wins over one spliced through a relay (both sides
know which is which), so a direct path, once it works, replaces the relay.
Between two connections dialled by the same side, the newer one wins (the older
is most likely dead: the peer restarted).

A connection we dial is live from the start. One the peer dialled is decided
when its session opens (its first ``RulesHeld`` says whether the peer syncs on
demand): an on-demand sync (``p2psync sync``, ``pair join`` from a process
beside the peer's agent) runs beside the live connection and never displaces
it; until then the connection is *pending*. Pending and on-demand connections
count towards the caps on strangers like live ones.

The registry also remembers how each peer's last live connection ended, and
wakes whoever waits for a change (``wait_change``): a connection added or gone,
or, as the agent tells it, a session that started, opened, got in sync or stuck.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from p2psync.clock import now_ms
from p2psync.core.session import SyncSession
from p2psync.net.stats import SessionStats

MAX_ENDED = 1024  # connection endings remembered (for status and sync requests)


@dataclass(eq=False)
class Connection:
    peer: bytes
    dialled_by: bytes
    outbound: bool
    address: str
    since_ms: int = field(default_factory=now_ms)
    opened: float = field(default_factory=time.monotonic)  # orders connections exactly
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: trio.Event = field(default_factory=trio.Event)
    stats: SessionStats | None = None
    machine: SyncSession | None = None
    on_demand: bool = False
    live: bool = False  # it was (or is) the live connection with its peer
    via: bytes | None = None  # the relay it is spliced through (None: direct)


@dataclass(frozen=True, slots=True)
class Ended:
    """How a peer's last live (or pending) connection ended."""

    at: float  # trio time
    reason: str
    in_sync: bool


def prefer(new: Connection, old: Connection) -> bool:
    """True when ``new`` should replace ``old`` (both with the same peer): a direct
    connection over one spliced through a relay, else by who dialled."""
    if (new.via is None) != (old.via is None):
        return new.via is None
    if new.dialled_by != old.dialled_by:
        return new.dialled_by < old.dialled_by
    return True


class Registry:
    """The live connections of one agent, by peer."""

    def __init__(self) -> None:
        self.by_peer: dict[bytes, Connection] = {}
        self.others: set[Connection] = set()  # pending and on-demand connections
        #: per peer: how its last connection ended, unless that was a side sync
        self.ended: dict[bytes, Ended] = {}
        self._changed = trio.Event()

    def note_change(self) -> None:
        """Something about the connections changed: wake whoever waits."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self) -> None:
        """Wait for the next :meth:`note_change`."""
        await self._changed.wait()

    def add(self, conn: Connection) -> bool:
        """Register ``conn`` as the live connection with its peer; False when an
        existing connection is kept instead."""
        self.others.discard(conn)
        existing = self.by_peer.get(conn.peer)
        if existing is not None:
            if not prefer(conn, existing):
                return False
            existing.scope.cancel()
        self.by_peer[conn.peer] = conn
        self.note_change()
        return True

    def hold(self, conn: Connection) -> None:
        """Keep ``conn`` beside the live ones (pending or on demand)."""
        self.others.add(conn)
        self.note_change()

    def remove(self, conn: Connection) -> None:
        """``conn`` ended; unless it was an on-demand side sync, its peer's ``ended``
        says how."""
        if self.by_peer.get(conn.peer) is conn:
            del self.by_peer[conn.peer]
        self.others.discard(conn)
        if not conn.on_demand:  # the live connection's story, not a side sync's
            self.ended.pop(conn.peer, None)
            self.ended[conn.peer] = Ended(
                trio.current_time(),
                conn.stats.reason if conn.stats else "connection failed",
                bool(conn.stats and conn.stats.synced),
            )
            while len(self.ended) > MAX_ENDED:
                del self.ended[next(iter(self.ended))]
        conn.closed.set()
        self.note_change()

    def all(self) -> list[Connection]:
        return [*self.by_peer.values(), *self.others]

    def get(self, peer: bytes) -> Connection | None:
        return self.by_peer.get(peer)
