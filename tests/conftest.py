from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import p2psync
from p2psync import home as home_mod
from tests.agents import SpawnedAgent


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
