"""Fixtures shared by the tests, the test tiers, and the leaked-thread check.

Every test belongs to exactly one tier (``pytest -m pure`` runs the first alone):

* ``pure`` — no event loop, no sockets, no subprocess (temporary files and SQLite
  are fine): seconds for all of them;
* ``trio_memory`` — a trio event loop, with memory streams instead of sockets;
* ``process`` — real loopback sockets or subprocesses (agents, the CLI as a process);
* ``lan`` — several hosts in network namespaces (``tests/lan.py``; root only).

A module names its tier at the top (``pytestmark = pytest.mark.pure``); a test of
another tier in it carries its own tier mark, which replaces the module's.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import p2psync
from p2psync import home as home_mod
from p2psync.core.identity import Identity
from tests.agents import SpawnedAgent, cli
from tests.pgcluster import PgCluster, temp_root, unavailable_reason
from tests.relaynode import RelayNode

TIERS = ("pure", "trio_memory", "process", "lan")

#: How long threads a test started may take to end after it.
THREAD_GRACE_S = 1.0


@pytest.hookimpl(tryfirst=True)  # before -m selects by these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test exactly one tier: its own tier mark, else its module's.
    A test left with none, or with several, stops the run."""
    module_tiers: dict[pytest.Module, list[str]] = {}
    for item in items:
        module = item.getparent(pytest.Module)
        if module is None:
            continue
        if module not in module_tiers:
            module_tiers[module] = [m.name for m in module.own_markers if m.name in TIERS]
            module.own_markers[:] = [m for m in module.own_markers if m.name not in TIERS]
        if any(m.name in TIERS for m in item.iter_markers()):
            continue  # its own mark (or its class's)
        for tier in module_tiers[module]:
            item.add_marker(tier)
    wrong = [
        f"{item.nodeid}: {tiers or 'none'}"
        for item in items
        if len(tiers := [m.name for m in item.iter_markers() if m.name in TIERS]) != 1
    ]
    if wrong:
        raise pytest.UsageError(
            f"every test needs exactly one tier mark of {', '.join(TIERS)} "
            "(see tests/conftest.py):\n" + "\n".join(wrong)
        )


def _idle_trio_worker(thread: threading.Thread) -> bool:
    """trio keeps finished worker threads a while for reuse, named ``Trio thread N``
    while idle (a job renames it): not a leak."""
    return thread.name.startswith("Trio thread ")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (after a short grace to end)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    leaked = []
    for thread in threading.enumerate():
        if thread in before or _idle_trio_worker(thread):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked.append(f"{thread.name!r}{' (daemon)' if thread.daemon else ''}")
    if leaked:
        pytest.fail(f"the test left {len(leaked)} thread(s) running: {', '.join(leaked)}")


@pytest.fixture
def make_db(tmp_path: Path) -> Iterator[Callable[[str], p2psync.Database]]:
    """Create (init + open) a fresh home under tmp_path; closed at teardown."""
    opened: list[p2psync.Database] = []

    def make(name: str = "a") -> p2psync.Database:
        path = tmp_path / name
        home_mod.init(path, name)
        db = p2psync.open(path)
        opened.append(db)
        return db

    yield make
    for db in opened:
        db.close()


@pytest.fixture
def db(make_db: Callable[[str], p2psync.Database]) -> p2psync.Database:
    return make_db("a")


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[str], SpawnedAgent]]:
    """Make agent processes (each with its own home under tmp_path, discovery off);
    every one started is stopped at teardown."""
    started: list[SpawnedAgent] = []

    def make(name: str) -> SpawnedAgent:
        agent = SpawnedAgent(tmp_path / name, name).init()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.stop()


@pytest.fixture
def splice_relay(tmp_path: Path) -> Iterator[tuple[RelayNode, dict[str, Identity]]]:
    """A real relay process admitting four fresh identities, a to d (splice tests)."""
    relay = RelayNode(tmp_path / "relay").init()
    people = {name: Identity(os.urandom(32)) for name in ("a", "b", "c", "d")}
    for identity in people.values():
        cli(relay.home, "relay", "allow", identity.device_id)
    relay.start()
    yield relay, people
    relay.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL cluster for the whole session (Unix socket only),
    started the first time a test asks for it and destroyed at the end. Skips when
    this machine has no PostgreSQL server (``scripts/test`` installs it as root)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    root = temp_root("pgc-session-")
    try:
        cluster = PgCluster.create(root, "main")
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_conninfo(pg_cluster: PgCluster) -> Iterator[str]:
    """A libpq conninfo of a fresh database in the session cluster, dropped after."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = pg_cluster.create_database(name)
    yield conninfo
    pg_cluster.drop_database(name)
