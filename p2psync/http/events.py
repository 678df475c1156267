"""What happens at the site besides record changes, as events for ``/events``:
peers connecting, leaving, getting in step or stuck (``peer``), pairing requests
arriving and being answered (``request``), the delivery ledger of a peer changing
(``ledger``), and problems (``error``).

One :class:`Hub` per agent works them out while anyone listens: when the
connections or the rules change, when entries arrive (at most every
:data:`SETTLE` seconds) and every :data:`EVERY` seconds, it compares the rows
``peers`` and ``pair pending`` show with the last ones and publishes what
differs. Record changes are not here: each stream reads them from the change
feed by number (so a client resumes with ``Last-Event-ID``)."""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from p2psync.http.site import Site
from p2psync.net.storeio import ChangeFeed
from p2psync.views.peers import peer_rows
from p2psync.views.rules import pending

log = logging.getLogger(__name__)

SETTLE = 0.5  # seconds between looks caused by arriving entries
EVERY = 10.0  # seconds between looks when nothing wakes the hub
KEPT = 1000  # events kept for streams that fall behind

#: What a peer row says that a ``peer`` event reports when it changes.
PEER_FIELDS = ("state", "connected", "path", "path_relay", "in_sync", "begun", "problem")


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    kind: str
    data: dict[str, Any]


class Hub:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.seq = 0
        self.events: deque[Event] = deque(maxlen=KEPT)
        self.listeners = 0
        self._published = trio.Event()
        self._listened = trio.Event()
        self._peers: dict[str, dict[str, Any]] | None = None
        self._ledgers: dict[str, Any] = {}
        self._requests: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------ streams

    def listen(self) -> None:
        self.listeners += 1
        self._listened.set()

    def leave(self) -> None:
        self.listeners -= 1

    def after(self, seq: int) -> list[Event]:
        return [event for event in self.events if event.seq > seq]

    async def wait(self, seq: int, feed_version: int, timeout: float) -> bool:
        """Until an event after ``seq`` is published or the store gains entries
        beyond ``feed_version`` (True), or ``timeout`` seconds pass (False)."""
        if self.seq > seq or self.site.feed.version > feed_version:
            return True
        published = self._published
        with trio.move_on_after(timeout):
            await first_of(published.wait, partial(self.site.feed.wait_beyond, feed_version))
            return True
        return False

    # ------------------------------------------------------------ the looks

    async def run(self) -> None:
        """Look while anyone listens; never ends by itself."""
        while True:
            if not self.listeners:
                self._peers = None  # what changed while nobody listened is not news
                self._listened = trio.Event()
                await self._listened.wait()
            version = self.site.feed.version
            rules = self.site.rules_feed.version
            try:
                await self.look()
            except Exception as exc:  # a failed look never ends the hub (or the agent)
                log.warning("could not work out the site's events: %s", exc)
                self.publish("error", {"message": f"could not read the site's state: {exc}"})
            with trio.move_on_after(EVERY):
                await first_of(
                    self.site.registry.wait_change,
                    partial(self.site.rules_feed.wait_beyond, rules),
                    partial(_settled, self.site.feed, version),
                )

    async def look(self) -> None:
        site = self.site
        running = site.status()

        def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            rows = peer_rows(site.db, running)
            asks, _joins, _strangers = pending(site.db, expire=False)  # the agent sweeps
            return rows, asks

        rows, asks = await trio.to_thread.run_sync(read)
        first = self._peers is None
        peers = {row["device_id"]: row for row in rows}
        old = self._peers or {}
        for device, row in peers.items():
            brief = {k: row.get(k) for k in PEER_FIELDS}
            before = old.get(device)
            if before is not None and {k: before.get(k) for k in PEER_FIELDS} == brief:
                pass
            elif not first:
                self.publish("peer", {"device_id": device, "name": row["name"], **brief})
                problem = row.get("problem")
                if problem and (before is None or before.get("problem") != problem):
                    self.publish(
                        "error",
                        {"device_id": device, "name": row["name"], "message": row["problem"]},
                    )
            ledger = row.get("delivery")
            if not first and _same(self._ledgers.get(device)) != _same(ledger):
                self.publish(
                    "ledger", {"device_id": device, "name": row["name"], "delivery": ledger}
                )
            self._ledgers[device] = ledger
        for device in old.keys() - peers.keys():
            gone = {"device_id": device, "name": old[device]["name"], "state": "gone"}
            self.publish("peer", gone)
        self._peers = peers
        requests = {row["id"]: row for row in asks}
        if not first:
            for rule_id, row in requests.items():
                if rule_id not in self._requests:
                    self.publish("request", {"event": "arrived", **row})
            for rule_id, row in self._requests.items():
                if rule_id not in requests:
                    self.publish("request", {"event": "answered", **row})
        self._requests = requests

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        self.seq += 1
        self.events.append(Event(self.seq, kind, data))
        self._published.set()
        self._published = trio.Event()


def _same(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


async def _settled(feed: ChangeFeed, version: int) -> None:
    await feed.wait_beyond(version)
    await trio.sleep(SETTLE)  # a burst of entries: one look after it


async def first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return when the first of ``waits`` returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)
