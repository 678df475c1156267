"""A real relay node process for tests (``p2psync relay serve``), stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import p2psync
from p2psync import pairing
from p2psync.core.rules import RuleState, Terms
from tests.agents import cli


class RelayNode:
    def __init__(self, home: Path, name: str = "hub") -> None:
        self.home = home
        self.name = name
        self.log = home.parent / f"{home.name}.log"
        self.address = "127.0.0.1:0"
        self.device_id = ""
        self.process: subprocess.Popen[str] | None = None

    def init(self, *args: str) -> RelayNode:
        """``relay init`` (``args``: e.g. ``--store CONNINFO`` or ``--node-of HOME``)."""
        self.device_id = cli(
            self.home, "relay", "init", "--name", self.name, *args
        ).splitlines()[0]
        return self

    def start(self, env: dict[str, str] | None = None, *args: str) -> RelayNode:
        """Serve (on the port chosen the first time, kept across restarts)."""
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "p2psync", "--home", str(self.home), "relay", "serve",
                 "--listen", self.address, *args],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, **(env or {})},
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise AssertionError(f"the relay did not start: {self.log.read_text()[-800:]}")
        self.address = line.split()[-1]
        return self

    def kill(self) -> None:
        """kill -9, by PID."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.process = None

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.process = None
        return code

    def status(self) -> dict[str, Any]:
        return json.loads(cli(self.home, "relay", "status", "--json"))  # type: ignore[no-any-return]

    def files_bytes(self) -> bytes:
        """Everything the relay wrote: its home's files and its log."""
        data = b""
        for path in sorted(self.home.iterdir()):
            if path.is_file():
                data += path.read_bytes()
        return data + self.log.read_bytes()


def pair_by_rule(a_home: Path, b_home: Path, terms: Terms) -> tuple[str, str]:
    """Pair the agents at ``a_home`` and ``b_home`` with ``terms`` in force (A
    proposes, B accepts), as if they had met once; their device IDs."""
    with p2psync.open(a_home) as a, p2psync.open(b_home) as b:
        ka, kb = a.identity.public_key, b.identity.public_key
        pairing.propose(a, kb, terms, name=b.name)
        pairing.receive(b, ka, a.store.rule_objects(kb), (), a.name)
        proposal = next(r for r in b.store.rules(ka) if r.state is RuleState.PROPOSED)
        pairing.accept(b, proposal)
        pairing.receive(a, kb, b.store.rule_objects(ka))
        return a.identity.device_id, b.identity.device_id
