"""``p2psync demo`` as a user runs it, on a machine where other agents run too."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from p2psync import home as home_mod
from p2psync.agent.process import AgentProcess
from tests.lan import HOLD_MDNS_PORT, Lan, unavailable

pytestmark = [pytest.mark.process, pytest.mark.slow]


def test_the_demo_ignores_another_agent_on_this_machine(tmp_path: Path) -> None:
    """Another agent with discovery on 127.0.0.1 is seen by the demo's agents; the
    demo neither waits for it nor mentions it."""
    foreign_id = home_mod.init(tmp_path / "foreign", "Foreign").identity.device_id
    foreign = AgentProcess(
        tmp_path / "foreign",
        args=["--discovery-interface", "127.0.0.1"],
        log=tmp_path / "foreign.log",
    )
    foreign.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "p2psync", "demo"],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        foreign.stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Done: all agents stopped" in result.stdout
    assert re.search(r"head office sees Branch North \(\w+\) at 127\.0\.0\.1:\d+", result.stdout)
    assert foreign_id[:7] not in result.stdout and "Foreign" not in result.stdout



@pytest.mark.lan
@pytest.mark.skipif(unavailable() is not None, reason=f"no namespace: {unavailable()}")
def test_the_demo_runs_where_another_program_holds_the_mdns_port() -> None:
    """In a namespace of its own, so that no agent of this machine loses mDNS meanwhile."""
    lan = Lan(1)
    try:
        holder = lan.spawn(1, sys.executable, "-c", HOLD_MDNS_PORT)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = lan.exec(1, sys.executable, "-m", "p2psync", "demo", timeout=180)
    finally:
        lan.close()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "mDNS is not usable here" in result.stdout
    assert "Done: all agents stopped" in result.stdout
