"""Connections accepted and not yet through their handshake (and admission), so that
a few sockets cannot keep everyone else out: the relay's and the agent's listeners.

:class:`HalfOpen` tracks each such connection with its source address and a cancel
scope. Beyond the cap per source address, or the cap in total, one half-open
connection is closed to make room for the new one, never the new one refused:
the *oldest that has not yet sent its first handshake message*, else the oldest.
So a slow-loris holding many sockets (each sending a byte, or nothing) only ever
evicts its own connections first, a peer that sends its 32-byte first message at
once is not evicted by sockets that never will, and one that arrives last still
gets its handshake deadline.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

import trio


@dataclass(eq=False)
class Ticket:
    address: str
    scope: trio.CancelScope
    number: int
    evicted: bool = field(default=False)
    progressed: bool = field(default=False)  # its first handshake message came


class HalfOpen:
    """Connections accepted and not yet admitted, oldest first."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self._all: collections.OrderedDict[int, Ticket] = collections.OrderedDict()
        self._count = itertools.count()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._all)

    def enter(self, address: str, scope: trio.CancelScope) -> Ticket:
        """Track a new connection, evicting others beyond the caps."""
        mine = [t for t in self._all.values() if t.address == address]
        while len(mine) >= self.per_address:
            victim = _first_idle(mine)
            mine.remove(victim)
            self._evict(victim)
        while len(self._all) >= self.total:
            self._evict(_first_idle(list(self._all.values())))
        ticket = Ticket(address, scope, next(self._count))
        self._all[ticket.number] = ticket
        return ticket

    def progress(self, ticket: Ticket) -> None:
        """The connection's first handshake message came: evicted only after the
        idle ones."""
        ticket.progressed = True

    def leave(self, ticket: Ticket) -> None:
        self._all.pop(ticket.number, None)

    def _evict(self, ticket: Ticket) -> None:
        ticket.evicted = True
        ticket.scope.cancel()
        self._all.pop(ticket.number, None)
        self.evicted += 1


def _first_idle(tickets: list[Ticket]) -> Ticket:
    """The oldest ticket that has not progressed, else the oldest (oldest first in)."""
    return next((t for t in tickets if not t.progressed), tickets[0])
