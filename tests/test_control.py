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
from p2psync.agent.control import RECHECK_EVERY, Controlled, _wait_live
from p2psync.net.sync import SessionStats

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
    # a check at the start, one per RECHECK_EVERY, one when told (polling every 20 ms:
    # 175)
    assert registry.looked <= 3.5 / RECHECK_EVERY + 2


async def test_a_session_back_in_step_without_a_word_is_seen_within_a_recheck(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = Registry()
    _, machine = _live(registry)

    async def silently_in_step() -> None:
        await trio.sleep(0.2)
        machine.synced = True  # no note_change

    results: dict[bytes, tuple[bool, str | None]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(silently_in_step)
        start = trio.current_time()
        await _wait_live(_agent(registry), [KEY], 10, results)
    assert results == {KEY: (True, None)}
    assert trio.current_time() - start == pytest.approx(RECHECK_EVERY)


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
