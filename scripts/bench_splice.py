"""``scripts/bench relay`` (issue 11): the live splice against a direct connection,
interleaved in one run, with real processes on 127.0.0.1.

Each run does, for the direct path and then for the splice (fresh homes each):

* **W1.** A holds N records (a copy of one source home); B is empty; both are
  paired by a rule with route auto. Direct: B has A's address. Splice: neither has
  an address for the other, both are ``relay add``-ed to a relay process that
  admits them. A's agent starts, then B's; records/s is counted from launching B
  until B's store holds the N records.
* **W2.** With both agents still running and in step: single puts at A (the API,
  another process than the agents), each timed until readable in B's store, one
  every 10 ms; median and p99 in ms.
* **Splice to direct** (splice runs only): B's stored address for A is added
  (``pair add`` with ``--address``, as when a route appears); the time until B's
  agent reports its live connection with A as direct.
* **Peer gone to mailbox** (splice runs only, after the return to the splice: A's
  address removed and the direct connection closed by restarting A): B's agent is
  killed (SIGKILL); the time until A's agent has no connection with B, and until a
  write at A made then is deposited at the relay (the grace of 2 s included).
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import bench_w2, fresh_home, head_seq, start_agent
from bench_relay import cli, pair_by_rule, start_relay

import p2psync
from p2psync.agent.process import AgentProcess
from p2psync.core.identity import parse_device_id
from p2psync.core.rules import Route, Terms
from p2psync.errors import P2PSyncError
from p2psync.net import agentsockets


@dataclass
class PathRun:
    w1: float  # records/s from launching B
    w2: list[float] = field(default_factory=list)  # ms
    to_direct: float | None = None  # s
    to_gone: float | None = None  # s
    to_mailbox: float | None = None  # s


def _wait(check: Callable[[], object], timeout: float, what: str) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"splice bench: {what} did not happen within {timeout:g} s")
        time.sleep(0.005)
    return time.perf_counter() - started


def _live(agent: AgentProcess, peer: str) -> dict[str, object] | None:
    try:
        status = agentsockets.request(agent.home, {"op": "status"}, timeout=2)
    except (OSError, P2PSyncError):
        return None
    for conn in status.get("connections", []):
        if conn["device_id"] == peer and conn["kind"] == "live":
            return dict(conn)
    return None


def _device(home: Path) -> str:
    with p2psync.open(home) as db:
        return db.identity.device_id


def path_run(base: Path, source: Path, count: int, writes: int, *, splice: bool) -> PathRun:
    a_home = base / f"a-{time.monotonic_ns()}"
    shutil.copytree(source, a_home)
    b_home = fresh_home(base, "b")
    pair_by_rule(a_home, b_home, Terms.make(["*"], route=Route.AUTO))
    a_id, b_id = _device(a_home), _device(b_home)
    relay: AgentProcess | None = None
    agents: list[AgentProcess] = []
    try:
        if splice:
            with p2psync.open(a_home) as a, p2psync.open(b_home) as b:
                keys = [a.identity.public_key, b.identity.public_key]
            relay, relay_id = start_relay(base, keys)
            for home in (a_home, b_home):
                cli(home, "relay", "add", relay_id, "--address", relay.address)
        agent_a = start_agent(a_home)
        agents.append(agent_a)
        if not splice:
            cli(b_home, "pair", "add", a_id, "--address", agent_a.address)
        started = time.perf_counter()
        agent_b = start_agent(b_home)
        agents.append(agent_b)
        conn = sqlite3.connect(f"file:{b_home / 'store.sqlite'}?mode=ro", uri=True)
        _wait(lambda: head_seq(conn) >= count, 3600, "W1")
        run = PathRun(count / (time.perf_counter() - started))
        conn.close()
        path = "relay" if splice else "direct"
        _wait(lambda: (c := _live(agent_b, a_id)) and c["path"] == path and c["synced"], 30,
              f"a {path} connection in step")
        run.w2 = bench_w2(a_home, b_home, writes)
        if splice:
            assert relay is not None
            run.to_direct, run.to_gone, run.to_mailbox = _moves(
                a_home, b_home, a_id, b_id, agents, relay
            )
        return run
    finally:
        for agent in agents:
            agent.stop()
        if relay is not None:
            relay.stop()
            shutil.rmtree(relay.home)
        for home in (a_home, b_home):
            shutil.rmtree(home)


def _moves(
    a_home: Path, b_home: Path, a_id: str, b_id: str, agents: list[AgentProcess],
    relay: AgentProcess,
) -> tuple[float, float, float]:
    agent_a, agent_b = agents
    started = time.perf_counter()
    cli(b_home, "pair", "add", a_id, "--address", agent_a.address)  # a route appears
    _wait(lambda: (c := _live(agent_b, a_id)) and c["path"] == "direct", 120, "the move to direct")
    to_direct = time.perf_counter() - started
    # back to the splice: B forgets A's address (its agent is told), A restarts
    with p2psync.open(b_home) as db:
        db.store.forget_peer_address(parse_device_id(a_id), agent_a.address)
    agentsockets.notify(b_home, agentsockets.CHANGED_PEERS)
    time.sleep(0.5)
    agent_a.stop()
    agent_a.start()
    _wait(lambda: (c := _live(agent_b, a_id)) and c["path"] == "relay", 60, "the splice again")
    deposits = _relay_deposits(relay)
    agent_b.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    dropped = time.perf_counter()
    to_gone = _wait(lambda: _live(agent_a, b_id) is None, 60, "A seeing B gone")
    with p2psync.open(a_home) as db:
        db.put("live", "after-drop", 1)
    _wait(lambda: _relay_deposits(relay) > deposits, 60, "a deposit for B")
    to_mailbox = time.perf_counter() - dropped
    agent_b.process.wait()  # type: ignore[union-attr]
    agent_b.process = None
    return to_direct, to_gone, to_mailbox


def _relay_deposits(relay: AgentProcess) -> int:
    try:
        state = json.loads((relay.home / "state.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(state["counters"]["deposits"])


def summarize(direct: list[PathRun], spliced: list[PathRun]) -> list[tuple[str, list[float], int]]:
    """The lines to print: label, samples, digits."""
    def median(values: list[float]) -> float:
        return statistics.median(values)

    def p99(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    pairs = list(zip(direct, spliced, strict=True))
    lines: list[tuple[str, list[float], int]] = [
        ("W1 direct, records/s", [r.w1 for r in direct], 0),
        ("W1 through the splice, records/s", [r.w1 for r in spliced], 0),
        ("W1 splice / direct (target >= 0.8)", [s.w1 / d.w1 for d, s in pairs], 3),
        ("W2 direct, median ms", [median(r.w2) for r in direct], 2),
        ("W2 through the splice, median ms", [median(r.w2) for r in spliced], 2),
        ("W2 added by the splice, median ms (target <= 1)",
         [median(s.w2) - median(d.w2) for d, s in pairs], 2),
        ("W2 direct, p99 ms", [p99(r.w2) for r in direct], 2),
        ("W2 through the splice, p99 ms", [p99(r.w2) for r in spliced], 2),
        ("W2 added by the splice, p99 ms",
         [p99(s.w2) - p99(d.w2) for d, s in pairs], 2),
    ]
    lines += [
        ("route appears -> session direct, s", [r.to_direct for r in spliced if r.to_direct], 2),
        ("peer killed -> its splice gone at A, s", [r.to_gone for r in spliced if r.to_gone], 2),
        ("peer killed -> A's next write at the relay, s",
         [r.to_mailbox for r in spliced if r.to_mailbox], 2),
    ]
    return lines
