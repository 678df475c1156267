"""The running agent's relay link: its mailbox at the first relay that admits it.

While the agent runs and relays are configured (``p2psync relay add``), it keeps
one session with the first relay, in the order added, that admits it (backing
off and trying the next when none does). On each session it runs an exchange
(``mail/exchange.py``): it hands over its mailbox policy, fetches and applies
what waits for it, and deposits, for each peer the relay carries anything for
that has **no live direct connection** (or has a rule whose route is ``relay``:
what only it carries never goes on a direct connection), what that peer lacks. Then it waits
for a reason to exchange again:

* the relay says something arrived for us (``Arrived``);
* our store gained entries (a local write, or entries from another peer) —
  after a short grace, so a burst of writes goes as one batch, not one
  envelope per entry, and a peer that is about to connect directly gets them
  directly;
* a direct connection ended (its peer may now be out of reach);
* a timer (expiry by our own clock, the relay's notices, retracting envelopes a
  direct session superseded).

A peer whose direct session got in step has its envelopes at the relay
superseded and retracted (``Mailer.superseded``). While an invite code is open
that names another relay in our list (one we joined, or one of ours), that relay
is visited too, by a task of its own beside the session, every :data:`SIDE_EVERY`
seconds counted from the end of a visit, for the peers due there
(``visit_side_relays``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Protocol

import trio

from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.identity import device_id, short_id
from p2psync.core.messages import Head
from p2psync.errors import ConnectionLost, P2PSyncError, RelayUnavailable
from p2psync.home import OpenHome
from p2psync.mail.exchange import ExchangeReport, exchange_on, visit_side_relays
from p2psync.mail.mailer import Mailer
from p2psync.net.relayclient import RelayClient, open_relay
from p2psync.net.splice import join_splice
from p2psync.net.storeio import ChangeFeed, Signal
from p2psync.store import relays as relays_mod
from p2psync.store.relays import Relay

log = logging.getLogger(__name__)

GRACE = 2.0  # seconds between a change and the deposit it causes
TICK = 60.0  # seconds between exchanges when nothing happens
BACKOFF_START = 1.0
BACKOFF_CAP = 300.0
STEADY = 60.0  # a session that lasted this long (seconds) resets the backoff
#: Seconds a peer whose envelopes the relay refused (all of them: it has no mailbox
#: of the peer that lists us yet, or is full) gets no new attempt from this link.
REFUSED_PAUSE = 600.0
#: Seconds between visits to the other relays that open invite codes name (a join
#: waits for its answer there; joins of our codes are collected there).
SIDE_EVERY = 30.0
#: Seconds between splice requests for peers the agent has no connection with.
SPLICE_TICK = 15.0
#: After "unavailable", seconds before asking again for that peer (doubling).
SPLICE_BACKOFF_START = 5.0
SPLICE_BACKOFF_CAP = 300.0
#: Seconds before asking again for a peer whose splice was just joined.
SPLICE_COOLDOWN = 10.0
#: Seconds a join waits for the other side.
SPLICE_WAIT = 15.0
#: A spliced session that lasted this long (seconds) resets the backoff.
SPLICE_STEADY = 60.0
#: Splice joins under way at once, at most (a relay pushing invitations gets no more).
MAX_JOINS = 8


class Splicer(Protocol):
    """What the agent does with live splices (``agent/agent.py``)."""

    def wanted(self) -> set[bytes]:
        """Peers to ask a splice for now: a live rule the relay may carry, and no
        live connection."""
        ...

    def welcome(self, peer: bytes) -> bool:
        """Whether to join a splice ``peer`` asked for."""
        ...

    def adopt(self, peer: bytes, stream: trio.abc.Stream, *, initiator: bool, relay: bytes) -> None:
        """Run the agent-to-agent session over a spliced ``stream``."""
        ...


class RelayLink:
    """The agent's side of its relays (module docstring)."""

    def __init__(
        self,
        db: OpenHome,
        feed: ChangeFeed,
        connected: Callable[[], set[bytes]],
        *,
        grace: float = GRACE,
        tick: float = TICK,
        splicer: Splicer | None = None,
        spliced: Callable[[], set[bytes]] = set,
    ) -> None:
        self.db = db
        self.splicer = splicer
        self.spliced = spliced  # peers with a live session spliced through a relay now
        self.feed = feed
        self.connected = connected  # peers with a live direct connection now
        self.grace = grace
        self.tick = tick
        self.mailer = Mailer(db)
        self.relay: bytes | None = None  # the relay of the session in use
        self.address = ""
        self.since_ms = 0
        self.last: ExchangeReport | None = None
        self.last_ms = 0
        self.error: str | None = None
        self._wake = Signal()
        self._changed = trio.Event()
        self._in_step: dict[bytes, dict[bytes, Head]] = {}
        self._admitted = False
        self._relays: list[Relay] = []
        self._refused: dict[bytes, float] = {}  # peer -> trio time of the next attempt
        self._splice_wake = trio.Event()
        self._splice_next: dict[bytes, float] = {}  # peer -> trio time of the next request
        self._splice_delay: dict[bytes, float] = {}  # peer -> the backoff after "unavailable"
        self._splice_cooldown: dict[bytes, float] = {}  # peer -> after a splice was joined
        self._joining: dict[bytes, set[bool]] = {}  # peer -> joins under way (initiator?)

    def poke(self) -> None:
        """Something changed that may call for an exchange (a connection ended)."""
        self._wake.set()
        self._splice_wake.set()

    def direct_ended(self, peer: bytes) -> None:
        """A direct connection with ``peer`` ended: if a splice is wanted now, ask at
        once, whatever backoff earlier splices left."""
        for table in (self._splice_next, self._splice_delay, self._splice_cooldown):
            table.pop(peer, None)
        self._splice_wake.set()

    def splice_ended(self, peer: bytes, lasted: float) -> None:
        """A session spliced with ``peer`` ended after ``lasted`` seconds: one that
        lasted is asked for again at once; a short one (the relay or the peer cuts
        splices) backs off as an "unavailable" does, so nothing loops."""
        now = trio.current_time()
        self._splice_cooldown.pop(peer, None)
        if lasted >= SPLICE_STEADY:
            self._splice_delay.pop(peer, None)
            self._splice_next.pop(peer, None)
        else:
            delay = self._splice_delay.get(peer, SPLICE_BACKOFF_START)
            self._splice_next[peer] = now + delay
            self._splice_delay[peer] = min(delay * 2, SPLICE_BACKOFF_CAP)
        self._splice_wake.set()

    async def reload(self) -> None:
        """Re-read the list of relays; if it changed, start over with the new one."""
        relays = await trio.to_thread.run_sync(relays_mod.load, self.db.store)
        if relays != self._relays:
            self._changed.set()

    async def run(self) -> None:
        """Keep a session with the first relay that admits us, until cancelled."""
        backoff = BACKOFF_START
        while True:
            self._changed = trio.Event()
            relays = self._relays = await trio.to_thread.run_sync(relays_mod.load, self.db.store)
            if not relays:
                self.relay, self.error = None, None
                await self._changed.wait()
                continue
            for relay in relays:
                started = trio.current_time()
                if await self._attempt(relay):
                    break  # the list of relays changed: start over at once
                if self._admitted and trio.current_time() - started > STEADY:
                    backoff = BACKOFF_START  # a session that lasted: no reason to wait long
            else:
                with trio.move_on_after(backoff):
                    await self._changed.wait()
                backoff = min(backoff * 2, BACKOFF_CAP)

    async def _attempt(self, relay: Relay) -> bool:
        """One session with ``relay`` until it ends or the list of relays changes;
        True if the list changed."""
        changed = self._changed
        self._admitted = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await changed.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await self._session(relay)
            except (RelayUnavailable, ConnectionLost) as exc:
                self.error = str(exc)
                log.info("relay %s: %s", short_id(relay.key), exc)
            except P2PSyncError as exc:  # the relay broke its protocol, or our store failed
                self.error = str(exc)
                log.warning("relay %s: %s", short_id(relay.key), exc)
            nursery.cancel_scope.cancel()
        self.relay = None
        return changed.is_set()

    async def _session(self, relay: Relay) -> None:
        async with open_relay(self.db.identity, self.db.name, relay) as client:
            self._admitted = True
            if relay.token is not None:
                await trio.to_thread.run_sync(relays_mod.admitted, self.db.store, relay.key)
            self.relay, self.address, self.since_ms = relay.key, client.address, now_ms()
            self._refused.clear()  # a new session: try every peer again
            self.error = None
            log.info("relay %s: connected at %s", short_id(relay.key), client.address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_arrivals, client)
                nursery.start_soon(self._watch_feed)
                nursery.start_soon(self._visit_sides, relay.key)
                if self.splicer is not None and self.splicer.wanted():
                    nursery.start_soon(self._splices, client, self.splicer)
                    # collect at once; deposit only after a grace in which the peers
                    # that are here too get spliced (what a splice carries live does
                    # not go by the mailbox)
                    await self._exchange(client, deposit=False)
                    await trio.sleep(self.grace)
                elif self.splicer is not None:
                    nursery.start_soon(self._splices, client, self.splicer)
                while True:
                    await self._exchange(client)
                    with trio.move_on_after(self.tick):
                        await self._wake.wait()
                        await trio.sleep(self.grace)  # let a burst settle into one batch

    async def _exchange(self, client: RelayClient, *, deposit: bool = True) -> None:
        direct, spliced = self.connected(), self.spliced()
        await self._retract_superseded(client)
        targets = await trio.to_thread.run_sync(self.mailer.targets, client.relay)
        relay_only = await trio.to_thread.run_sync(self.mailer.relay_only)
        # a live direct connection carries what goes by direct or auto rules; what
        # only a relay rule carries still goes through the relay
        now = trio.current_time()
        # a spliced session carries what the relay may (route relay or auto) live
        peers = [
            p
            for p in targets
            if p not in spliced
            and (p not in direct or p in relay_only)
            and self._refused.get(p, 0) <= now
        ] if deposit else []
        report = await exchange_on(client, self.mailer, peers)
        for peer, row in report.peers.items():
            if row.refused and not row.deposited:  # e.g. no mailbox of the peer there yet
                self._refused[peer] = now + REFUSED_PAUSE
            else:
                self._refused.pop(peer, None)
        self.last, self.last_ms = report, now_ms()
        received = sum(p.entries_in + p.filled for p in report.peers.values())
        if received:
            self.feed.bump()  # live sessions forward what arrived through the relay
        for peer, row in report.peers.items():
            if row.deposited or row.received or row.refused:
                log.info(
                    "relay %s: %s: %d envelopes (%d entries) deposited, %d received "
                    "(%d entries), %d refused; payloads asked again for %d entries, "
                    "arrived for %d",
                    short_id(client.relay),
                    short_id(peer),
                    row.deposited,
                    row.entries_out,
                    row.received,
                    row.entries_in,
                    len(row.refused),
                    row.asked,
                    row.filled,
                )

    async def _splices(self, client: RelayClient, splicer: Splicer) -> None:
        """Live splices on this relay: join those peers ask for; ask for one with each
        peer the agent wants live and has no connection with (backing off per peer
        while the relay answers "unavailable"), now, whenever a connection ends, and
        every :data:`SPLICE_TICK` seconds."""
        self._splice_next.clear()
        self._splice_delay.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take_invitations, client, splicer, nursery)
            while True:
                self._splice_wake = trio.Event()
                now = trio.current_time()
                for peer in sorted(splicer.wanted()):
                    if (
                        self._splice_next.get(peer, 0.0) > now
                        or self._splice_cooldown.get(peer, 0.0) > now
                        or peer in self._joining
                    ):
                        continue
                    answer = await client.connect(peer)
                    if isinstance(answer, wire.Invitation):
                        self._splice_cooldown[peer] = now + SPLICE_COOLDOWN
                        # at the node of the relay the answer names (the peer is there)
                        nursery.start_soon(
                            self._join, client, splicer, peer, answer.key, True,
                            answer.address or client.address,
                        )
                    else:
                        delay = self._splice_delay.get(peer, SPLICE_BACKOFF_START)
                        self._splice_next[peer] = now + delay
                        self._splice_delay[peer] = min(delay * 2, SPLICE_BACKOFF_CAP)
                # the next tick, or the end of the nearest backoff
                due = [t for t in (*self._splice_next.values(),
                                   *self._splice_cooldown.values()) if t > now]
                with trio.move_on_after(min([SPLICE_TICK, *(t - now for t in due)])):
                    await self._splice_wake.wait()

    async def _take_invitations(
        self, client: RelayClient, splicer: Splicer, nursery: trio.Nursery
    ) -> None:
        while True:
            invited = await client.next_invitation()
            under_way = self._joining.get(invited.peer, set())
            # both asked at once: the splice the smaller key asked for is the one kept
            mine_wins = self.db.identity.public_key < invited.peer
            if (
                False in under_way  # one join as the responder at a time, per peer
                or (True in under_way and mine_wins)
                or sum(len(j) for j in self._joining.values()) >= MAX_JOINS
                or not splicer.welcome(invited.peer)
            ):
                log.info("relay %s: declined a splice with %s", short_id(client.relay),
                         short_id(invited.peer))
                continue
            nursery.start_soon(
                self._join, client, splicer, invited.peer, invited.key, False, client.address
            )

    async def _join(
        self,
        client: RelayClient,
        splicer: Splicer,
        peer: bytes,
        key: bytes,
        initiator: bool,
        address: str,
    ) -> None:
        self._joining.setdefault(peer, set()).add(initiator)
        try:
            stream = await join_splice(
                self.db.identity, self.db.name, client.relay, address, key, peer,
                wait=SPLICE_WAIT,
            )
        except P2PSyncError as exc:
            log.info("relay %s: splice with %s failed: %s", short_id(client.relay),
                     short_id(peer), exc)
            return
        finally:
            self._joining[peer].discard(initiator)
            if not self._joining[peer]:
                del self._joining[peer]
        self._splice_cooldown[peer] = trio.current_time() + SPLICE_COOLDOWN
        log.info("relay %s: spliced with %s", short_id(client.relay), short_id(peer))
        splicer.adopt(peer, stream, initiator=initiator, relay=client.relay)

    async def _visit_sides(self, current: bytes) -> None:
        """Beside the session with ``current``: visit the other relays open invite
        codes name, then wait :data:`SIDE_EVERY` seconds (a relay that never answers
        costs this task its visit's time, never the session's)."""
        while True:
            reports = await visit_side_relays(self.db, self.mailer, current, self._relays)
            if any(row.entries_in for report in reports for row in report.peers.values()):
                self.feed.bump()
            await trio.sleep(SIDE_EVERY)

    def note_in_step(self, peer: bytes, heads: Mapping[bytes, Head]) -> None:
        """A direct session with ``peer`` is in step, the peer holding ``heads``:
        envelopes it made redundant are superseded at the next exchange."""
        self._in_step[peer] = dict(heads)

    async def _retract_superseded(self, client: RelayClient) -> None:
        while self._in_step:
            peer, heads = self._in_step.popitem()
            seqs = await trio.to_thread.run_sync(self.mailer.superseded, peer, heads, now_ms())
            if seqs:
                await client.retract(peer, seqs)

    async def _watch_arrivals(self, client: RelayClient) -> None:
        seen = client.arrived
        while True:
            seen = await client.wait_arrived(seen)
            self._wake.set()

    async def _watch_feed(self) -> None:
        version = self.feed.version
        while True:
            version = await self.feed.wait_beyond(version)
            self._wake.set()


def describe(link: RelayLink | None) -> dict[str, object] | None:
    """The relay link as ``status --json`` shows it."""
    if link is None:
        return None
    return {
        "relay": short_id(link.relay) if link.relay else None,
        "relay_id": device_id(link.relay) if link.relay else None,
        "address": link.address or None,
        "since_ms": link.since_ms or None,
        "last_exchange_ms": link.last_ms or None,
        "error": link.error,
        "grace_s": link.grace,
        "tick_s": link.tick if math.isfinite(link.tick) else None,
    }
