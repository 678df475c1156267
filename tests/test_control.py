"""The agent's registry of connections and `sync` through the agent waiting on it,
in memory with virtual time: the wait is woken by changes, not by polling."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing

from p2psync.agent.connections import Connection, Ended, Registry
from p2psync.agent.control import Controlled, _wait_live
from p2psync.core.session import SyncSession
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from tests.test_sync import MakeDb, connect, fill

KEY = os.urandom(32)

pytestmark = pytest.mark.trio_memory


class CountingRegistry(Registry):
    def __init__(self) -> None:
        super().__init__()
        self.looked = 0

    def get(self, peer: bytes) -> Connection | None:
        self.looked += 1
        return super().get(peer)


def _agent(registry: Registry) -> Controlled:
    dialing = SimpleNamespace(now=lambda key=None: None)
    return cast(Controlled, SimpleNamespace(registry=registry, dialing=dialing))


def _live(registry: Registry) -> tuple[Connection, Any]:
    conn = Connection(peer=KEY, dialled_by=KEY, outbound=True, address="127.0.0.1:1")
    assert registry.add(conn)
    machine = SimpleNamespace(synced=False, stuck_reason=None)
    conn.machine = machine  # type: ignore[assignment]
    return conn, machine


async def test_a_sync_request_wakes_when_told_not_by_polling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CountingRegistry()
    _, machine = _live(registry)

    async def in_step_later() -> None:
        await trio.sleep(3.5)
        machine.synced = True
        registry.note_change()  # as the agent does when the session says it is in sync

    results: dict[bytes, tuple[bool, str | None]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_step_later)
        start = trio.current_time()
        await _wait_live(_agent(registry), [KEY], 10, results)
        waited = trio.current_time() - start
    assert results == {KEY: (True, None)}
    assert waited == pytest.approx(3.5)
    # a check at the start, one when told (polling every 20 ms: 175)
    assert registry.looked == 2


async def test_a_connection_that_ends_out_of_step_answers_with_its_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = Registry()
    conn, _ = _live(registry)
    conn.stats = SessionStats(reason="connection closed by the peer")

    async def drop_later() -> None:
        await trio.sleep(0.5)
        registry.remove(conn)

    results: dict[bytes, tuple[bool, str | None]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drop_later)
        await _wait_live(_agent(registry), [KEY], 10, results)
    assert results == {KEY: (False, "connection closed by the peer")}


async def test_the_registry_remembers_how_live_connections_ended(
    mock_clock: trio.testing.MockClock,
) -> None:
    registry = Registry()
    live, _ = _live(registry)
    live.stats = SessionStats(reason="synced", synced=True)
    side = Connection(peer=KEY, dialled_by=KEY, outbound=False, address="x", on_demand=True)
    registry.hold(side)
    registry.remove(live)
    at = trio.current_time()
    assert registry.ended[KEY] == Ended(at, "synced", True) and live.closed.is_set()
    registry.remove(side)  # an on-demand side sync does not tell the live story
    assert registry.ended[KEY] == Ended(at, "synced", True)
    never = Connection(peer=os.urandom(32), dialled_by=KEY, outbound=True, address="x")
    registry.hold(never)
    registry.remove(never)
    assert registry.ended[never.peer].reason == "connection failed"


async def test_waiters_wake_on_every_change_of_the_registry() -> None:
    registry = Registry()
    woken = 0

    async def waiter() -> None:
        nonlocal woken
        while True:
            await registry.wait_change()
            woken += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        conn, _ = _live(registry)  # added
        await trio.testing.wait_all_tasks_blocked()
        registry.remove(conn)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert woken == 2


async def test_a_live_session_tells_every_change_of_standing(make_db: MakeDb) -> None:
    """What the control socket waits on: a live session calls ``on_change`` when
    it comes in sync, leaves it (a local write) and comes back, whether or not its
    machine says SyncedWithPeer again (no polling needed)."""
    a, b = make_db("a"), make_db("b")
    fill(a, 3)
    sa, sb = await connect(a, b)
    feed_a = ChangeFeed()
    changes: list[bool] = []
    machines: list[SyncSession] = []

    def started(machine: SyncSession, _stats: SessionStats) -> None:
        machines.append(machine)

    def changed() -> None:
        changes.append(machines[0].synced)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_session(
                sa, TrioStore(a.store), feed_a, live=True, on_start=started, on_change=changed
            )
        )
        nursery.start_soon(lambda: run_session(sb, TrioStore(b.store), ChangeFeed(), live=True))
        with trio.fail_after(5):
            while changes != [True]:
                await trio.sleep(0.01)
            a.put("live", "k", 1)
            feed_a.bump()
            while changes[-3:] != [True, False, True]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert changes[0] is True and changes[-1] is True
