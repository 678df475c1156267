"""Real agent processes for tests: start, stop (by PID), kill -9, talk to them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import p2psync
from p2psync import home as home_mod


def cli(home: Path, *args: str, check: bool = True, timeout: float = 60) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"p2psync {' '.join(args)} failed: {result.stderr}")
    return result.stdout


@dataclass
class AgentProcess:
    home: Path
    name: str
    device_id: str = ""
    address: str = ""
    process: subprocess.Popen[str] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home.parent / f"{self.name}.log"

    def init(self) -> AgentProcess:
        created = home_mod.init(self.home, self.name)
        self.device_id = created.identity.device_id
        return self

    def start(self, listen: str | None = None) -> AgentProcess:
        listen = listen or (self.address or "127.0.0.1:0")
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "p2psync",
                    "--home",
                    str(self.home),
                    "run",
                    "--listen",
                    listen,
                    "--no-discovery",
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.process.kill()
            raise AssertionError(f"agent {self.name} did not start: {self.log.read_text()}")
        self.address = line.split()[-1]
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._close()
        return code

    def kill9(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self._close()

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def pair(self, other: AgentProcess, with_address: bool = True) -> None:
        args = ["pair", "add", other.device_id, "--name", other.name]
        if with_address and other.address:
            args += ["--address", other.address]
        cli(self.home, *args)

    def db(self) -> p2psync.Database:
        return p2psync.open(self.home)

    def status(self) -> dict[str, Any]:
        return json.loads(cli(self.home, "status", "--json"))  # type: ignore[no-any-return]


def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def value_at(agent: AgentProcess, collection: str, key: str) -> Any:
    with agent.db() as db:
        return db.get(collection, key)
