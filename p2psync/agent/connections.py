"""Which connections an agent keeps: one live connection per peer.

When two agents dial each other at the same moment both connections may
complete. Each side then keeps the connection **dialled by the smaller
identity key** (bytewise), so both keep the same one and close the other.
Between two connections dialled by the same side, the newer one wins (the older
is most likely dead: the peer restarted).

A connection we dial is live from the start. One the peer dialled is decided
when its session opens (its first ``RulesHeld`` says whether the peer syncs on
demand): an on-demand sync (``p2psync sync``, ``pair join`` from a process
beside the peer's agent) runs beside the live connection and never displaces
it; until then the connection is *pending*. Pending and on-demand connections
count towards the caps on strangers like live ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from p2psync.clock import now_ms
from p2psync.core.session import SyncSession
from p2psync.net.sync import SessionStats


@dataclass(eq=False)
class Connection:
    peer: bytes
    dialled_by: bytes
    outbound: bool
    address: str
    since_ms: int = field(default_factory=now_ms)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: trio.Event = field(default_factory=trio.Event)
    stats: SessionStats | None = None
    machine: SyncSession | None = None
    on_demand: bool = False
    live: bool = False  # it was (or is) the live connection with its peer


def prefer(new: Connection, old: Connection) -> bool:
    """True when ``new`` should replace ``old`` (both with the same peer)."""
    if new.dialled_by != old.dialled_by:
        return new.dialled_by < old.dialled_by
    return True


class Registry:
    """The live connections of one agent, by peer."""

    def __init__(self) -> None:
        self.by_peer: dict[bytes, Connection] = {}
        self.others: set[Connection] = set()  # pending and on-demand connections
        self.changed = trio.Event()

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
        return True

    def hold(self, conn: Connection) -> None:
        """Keep ``conn`` beside the live ones (pending or on demand)."""
        self.others.add(conn)

    def remove(self, conn: Connection) -> None:
        if self.by_peer.get(conn.peer) is conn:
            del self.by_peer[conn.peer]
        self.others.discard(conn)
        conn.closed.set()

    def all(self) -> list[Connection]:
        return [*self.by_peer.values(), *self.others]

    def get(self, peer: bytes) -> Connection | None:
        return self.by_peer.get(peer)
