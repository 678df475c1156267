"""Connections accepted and not yet through their handshake (and admission), so that
a few sockets cannot keep everyone else out: the relay's and the agent's listeners.

:class:`HalfOpen` tracks each such connection with its source address and a cancel
scope. Beyond the cap per source address, or the cap in total, one half-open
connection is closed to make room for the new one, never the new one refused:
the *oldest that has not yet sent its first handshake message*, else the oldest,
from the new one's source at its own cap, and from the *busiest source* (the one
holding the most) at the total cap. A source is an IPv4 address or an IPv6 /64
(:func:`source_of`: whoever holds one IPv6 address usually holds its whole /64).
So a slow-loris holding many sockets (each sending a byte, or nothing) from one
address or from several only ever evicts its own connections first, a peer alone
at its address is the last to go, a peer that sends its 32-byte first message at
once is not evicted by sockets that never will, and one that arrives last still
gets its handshake deadline.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

T = TypeVar("T")


@dataclass(eq=False)
class Ticket:
    address: str  # its source (source_of)
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
        """Track a new connection from ``address`` (a host), evicting others beyond
        the caps."""
        source = source_of(address)
        mine = [t for t in self._all.values() if t.address == source]
        while len(mine) >= self.per_address:
            victim = _first_idle(mine)
            mine.remove(victim)
            self._evict(victim)
        while len(self._all) >= self.total:
            self._evict(_first_idle(busiest(list(self._all.values()), lambda t: t.address)))
        ticket = Ticket(source, scope, next(self._count))
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


def source_of(host: str) -> str:
    """Where a connection comes from, for the caps: an IPv4 address, the /64 of an
    IPv6 one (an IPv4-mapped one is its IPv4 address); any other text as it is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def busiest(items: list[T], source: Callable[[T], str]) -> list[T]:
    """The items (oldest first, as given) of the source that holds the most of them;
    of sources holding as many, the one with the oldest item."""
    counts = collections.Counter(source(item) for item in items)
    most = max(counts.values())
    top = next(source(item) for item in items if counts[source(item)] == most)
    return [item for item in items if source(item) == top]
