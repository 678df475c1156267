"""Real agent processes for tests: start, stop (by PID), kill -9, talk to them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import p2psync
from p2psync import home as home_mod
from p2psync.agent.process import AgentProcess


def cli(home: Path, *args: str, check: bool = True, timeout: float = 60) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"p2psync {' '.join(args)} failed: {result.stderr}\n(stdout: {result.stdout})"
        )
    return result.stdout


def run(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``p2psync --home HOME ARGS``, whatever its exit status."""
    return subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class SpawnedAgent(AgentProcess):
    """An agent process for tests: made with its own home, logging to a file."""

    def __init__(self, home: Path, name: str) -> None:
        super().__init__(home, args=["--no-discovery"], log=home.parent / f"{name}.log")
        self.name = name
        self.device_id = ""

    def init(self) -> SpawnedAgent:
        self.device_id = home_mod.init(self.home, self.name).identity.device_id
        return self

    def start(self, *extra: str) -> SpawnedAgent:  # type: ignore[override]
        try:
            super().start(*extra)
        except p2psync.P2PSyncError as exc:
            raise AssertionError(str(exc)) from exc
        return self

    def pair(self, other: SpawnedAgent, with_address: bool = True) -> None:
        args = ["pair", "add", other.device_id, "--name", other.name]
        if with_address and other.address:
            args += ["--address", other.address]
        cli(self.home, *args)

    def db(self) -> p2psync.Database:
        return p2psync.open(self.home)

    def status(self) -> dict[str, Any]:
        return json.loads(cli(self.home, "status", "--json"))  # type: ignore[no-any-return]

    def last_change(self) -> int:
        with self.db() as db:
            return db.last_change()


def http_agent(base: Path, name: str, *extra: str) -> SpawnedAgent:
    """An agent started with its HTTP API on a free loopback port."""
    return SpawnedAgent(base / name, name).init().start("--http", "127.0.0.1:0", *extra)


@contextmanager
def serving(base: Path, name: str) -> Iterator[SpawnedAgent]:
    """:func:`http_agent`, stopped at the end (a module's ``site`` fixture)."""
    agent = http_agent(base, name)
    try:
        yield agent
    finally:
        agent.stop()


def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def value_at(agent: SpawnedAgent, collection: str, key: str) -> Any:
    with agent.db() as db:
        return db.get(collection, key)
