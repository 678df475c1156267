"""The agents seen on the LAN, from their mDNS adverts: a pure table (no sockets,
no zeroconf, no clock: the time is passed in). ``discovery.py`` feeds it what
zeroconf resolves; the agent's dialers read addresses from it and report how
dialling them went.

An advert is an instance name (``<short ID>._p2psync._tcp.local.``) whose TXT
record claims an agent ID, with the addresses it gives. What an advert claims is
only a hint: an address is dialled *expecting* the advertised identity, so an
advert claiming someone else's ID fails the handshake. So that no advert can
push out another's:

* several adverts may claim one ID (a restart under a new name, or a spoof);
  each keeps its own addresses, at most :data:`MAX_INSTANCES` per ID (adverts
  left without addresses, then the oldest unproven one go first; the agent's
  own name gets in unless every other is proven);
* an advert at whose address a handshake proved the key comes first;
* an address that failed :data:`MAX_FAILURES` dials in a row, or answered as
  another agent, is dropped until re-advertised;
* a goodbye removes only its own advert; the name an agent advertises (or one
  proven) cannot be taken over by an advert claiming another ID;
* the table holds at most ``capacity`` agents: the least recently seen one that
  is not wanted (our peers are) is evicted to make room.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from p2psync.core.identity import parse_device_id, short_id
from p2psync.errors import InvalidDeviceID

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2psync._tcp.local."
PROTOCOL_VERSION = "1"
MAX_TABLE = 1000  # agents remembered from adverts
MAX_ADDRESSES = 8  # per advert, and offered per agent
MAX_INSTANCES = 4  # adverts (instance names) remembered per agent ID
MAX_FAILURES = 3  # failed dials after which an advertised address is dropped


def advert_name(key: bytes) -> str:
    """The instance name an agent advertises: its short device ID."""
    return f"{short_id(key)}.{SERVICE_TYPE}"


def parse_advert(properties: Mapping[bytes, bytes | None]) -> tuple[bytes, str] | None:
    """(identity key, name) from a TXT record, or None when it is not one of ours."""
    try:
        text = {k.decode("ascii"): (v or b"").decode("utf-8") for k, v in properties.items()}
    except (UnicodeDecodeError, AttributeError):
        return None
    if text.get("v") != PROTOCOL_VERSION or "id" not in text:
        return None
    try:
        key = parse_device_id(text["id"])
    except InvalidDeviceID:
        return None
    name = "".join(c for c in text.get("name", "") if c.isprintable())[:64]
    return key, name


@dataclass
class Found:
    """An agent ID seen on the LAN, with the adverts claiming it."""

    key: bytes
    name: str
    instances: dict[str, tuple[str, ...]]  # advert -> its addresses (host:port)
    first_seen: int  # ms since the epoch
    last_seen: int  # heard, or connected with
    failures: dict[str, int] = field(default_factory=dict)  # address -> failed dials
    proven: set[str] = field(default_factory=set)  # adverts where the key was proven

    @property
    def addresses(self) -> tuple[str, ...]:
        """At most :data:`MAX_ADDRESSES`, taken in turn from each advert (proven
        ones, then the newest, first)."""
        order = sorted(
            self.instances, key=lambda i: (i not in self.proven, -list(self.instances).index(i))
        )
        lists = [self.instances[i] for i in order]
        merged: dict[str, None] = {}
        for rank in range(MAX_ADDRESSES):
            for addresses in lists:
                if rank < len(addresses):
                    merged.setdefault(addresses[rank])
        return tuple(merged)[:MAX_ADDRESSES]


@dataclass(frozen=True)
class AgentDiscovered:
    """An advert for ``found`` was taken in (new, or with new addresses)."""

    found: Found


@dataclass(frozen=True)
class AgentLost:
    """The table no longer holds ``key``: its last advert went, or it was evicted."""

    key: bytes


Event = AgentDiscovered | AgentLost


class AdvertTable:
    """The agents seen on the LAN, by ID (``agents``), with their adverts."""

    def __init__(
        self,
        me: bytes,
        *,
        wanted: Callable[[bytes], bool] = lambda key: False,
        capacity: int = MAX_TABLE,
    ) -> None:
        self.me = me  # our own adverts are not listed
        self.wanted = wanted  # agents never evicted to make room (our peers)
        self.capacity = capacity
        self.agents: dict[bytes, Found] = {}
        self._instances: dict[str, bytes] = {}  # advert -> the ID it claims

    # ------------------------------------------------------------ adverts

    def advertised(
        self,
        instance: str,
        key: bytes,
        name: str,
        addresses: Iterable[str],
        now_ms: int,
    ) -> list[Event]:
        """The advert ``instance`` resolved: it claims ``key`` (named ``name``) at
        ``addresses``. Returns what changed."""
        if key == self.me:
            return []
        offered = tuple(addresses)[:MAX_ADDRESSES]
        if not offered:
            return []
        events: list[Event] = []
        previous = self._instances.get(instance)
        if previous is not None and previous != key:  # the name now claims another ID
            held = self.agents.get(previous)
            if (held is not None and instance in held.proven) or _same(
                instance, advert_name(previous)
            ):
                log.debug("ignoring %s: the name belongs to another agent", instance)
                return []
            events += self._drop_instance(previous, instance)
        found = self.agents.get(key)
        if found is None:
            room, evicted = self._make_room()
            events += evicted
            if not room:
                log.debug("discovery table full; ignoring %s", instance)
                return events
            found = self.agents[key] = Found(key, name, {}, first_seen=now_ms, last_seen=now_ms)
        elif instance not in found.instances and not self._room_for(found, instance):
            log.debug("ignoring %s: %d adverts already claim that ID", instance, MAX_INSTANCES)
            return events
        found.instances.pop(instance, None)  # newest last
        found.instances[instance] = offered
        found.name = name
        found.last_seen = now_ms
        for address in offered:  # re-advertised: a fresh chance
            found.failures.pop(address, None)
        self._instances[instance] = key
        return [*events, AgentDiscovered(found)]

    def withdrawn(self, instance: str) -> list[Event]:
        """A goodbye or an expired advert: only that advert's addresses go."""
        key = self._instances.pop(instance, None)
        return self._drop_instance(key, instance) if key is not None else []

    def heard(self, instances: Iterable[str], now_ms: int) -> None:
        """Records of these adverts were heard again: their agents are still there."""
        for instance in instances:
            key = self._instances.get(instance)
            if key is not None:
                self.seen(key, now_ms)

    # ------------------------------------------------------------ dialling

    def seen(self, key: bytes, now_ms: int) -> None:
        """``key`` was heard or connected with at ``now_ms`` (if the table holds it)."""
        found = self.agents.get(key)
        if found is not None:
            found.last_seen = now_ms

    def addresses(self, key: bytes) -> tuple[str, ...]:
        """Where the LAN says ``key`` is (unverified until a handshake proves it)."""
        found = self.agents.get(key)
        return found.addresses if found is not None else ()

    def discard(self, key: bytes, address: str) -> None:
        """``address`` did not answer as ``key``: stop offering it (until re-advertised)."""
        found = self.agents.get(key)
        if found is not None:
            for instance, addresses in found.instances.items():
                found.instances[instance] = tuple(a for a in addresses if a != address)
            found.failures.pop(address, None)

    def failed(self, key: bytes, address: str) -> None:
        """Dialling ``key`` at ``address`` failed; after a few failures in a row the
        address is dropped (until re-advertised)."""
        found = self.agents.get(key)
        if found is None or address not in found.addresses:
            return
        found.failures[address] = found.failures.get(address, 0) + 1
        if found.failures[address] >= MAX_FAILURES:
            self.discard(key, address)

    def succeeded(self, key: bytes, address: str, now_ms: int) -> None:
        """A handshake at ``address`` proved ``key``: its advert comes first from now on."""
        found = self.agents.get(key)
        if found is not None:
            found.failures.pop(address, None)
            found.proven.update(i for i, a in found.instances.items() if address in a)
            found.last_seen = now_ms

    # ------------------------------------------------------------ room

    def _room_for(self, found: Found, instance: str) -> bool:
        """Make room for another advert claiming ``found``'s ID: drop adverts left
        without addresses, then the oldest unproven one other than the agent's own
        name; the agent's own name always gets in unless every other is proven."""
        for other in [i for i, a in found.instances.items() if not a and i not in found.proven]:
            self._drop_advert(found, other)
        if len(found.instances) < MAX_INSTANCES:
            return True
        own = advert_name(found.key)
        victims = [i for i in found.instances if i not in found.proven and not _same(i, own)]
        if not victims and _same(instance, own):
            victims = [i for i in found.instances if i not in found.proven]
        if not victims:
            return False
        self._drop_advert(found, victims[0])  # the oldest
        return True

    def _drop_advert(self, found: Found, instance: str) -> None:
        found.instances.pop(instance, None)
        found.proven.discard(instance)
        if self._instances.get(instance) == found.key:
            del self._instances[instance]

    def _make_room(self) -> tuple[bool, list[Event]]:
        """Below ``capacity`` entries, evicting the least recently seen agent that is
        not wanted if need be; False when every entry is wanted."""
        if len(self.agents) < self.capacity:
            return True, []
        victims = [f for f in self.agents.values() if not self.wanted(f.key)]
        if not victims:
            return False, []
        oldest = min(victims, key=lambda f: f.last_seen)
        del self.agents[oldest.key]
        for instance in oldest.instances:
            self._instances.pop(instance, None)
        return True, [AgentLost(oldest.key)]

    def _drop_instance(self, key: bytes, instance: str) -> list[Event]:
        found = self.agents.get(key)
        if found is None:
            return []
        found.instances.pop(instance, None)
        found.proven.discard(instance)
        if not found.instances:
            del self.agents[key]
            return [AgentLost(key)]
        return []


def _same(name: str, other: str) -> bool:
    return name.lower() == other.lower()  # DNS names ignore case
