"""What a new user hits in the first week, with real agent processes on loopback:
invite codes pasted twice or at the wrong site, several invites and requests
between one pair, one-way rules, and what `status`/`peers` say meanwhile."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agents import SpawnedAgent, cli, run, value_at, wait_for

Make = Callable[[str], SpawnedAgent]

pytestmark = [pytest.mark.process, pytest.mark.slow]


def invite(agent: SpawnedAgent, *rule: str) -> str:
    """A code from ``agent`` for ``rule`` (the code is the last line)."""
    return cli(agent.home, "pair", "invite", *rule).strip().splitlines()[-1]


def rules(agent: SpawnedAgent) -> list[dict[str, Any]]:
    return json.loads(cli(agent.home, "rule", "list", "--json"))  # type: ignore[no-any-return]


def in_force(agent: SpawnedAgent) -> list[dict[str, Any]]:
    return [r for r in rules(agent) if r["state"] == "accepted"]


def sql(agent: SpawnedAgent, query: str) -> list[Any]:
    with sqlite3.connect(agent.home / "store.sqlite") as conn:
        return conn.execute(query).fetchall()


def log_lines(agent: SpawnedAgent, text: str) -> int:
    log = agent.home.parent / f"{agent.name}.log"
    return log.read_text().count(text) if log.exists() else 0


# ---------------------------------------------------------------- invite codes


def test_a_used_code_pasted_at_a_paired_site_is_refused_and_changes_nothing(
    agents: Make,
) -> None:
    x, y, z = agents("x").start(), agents("y").start(), agents("z").start()
    c1 = invite(x, "-c", "vouchers")
    assert run(y.home, "pair", "join", c1).returncode == 0
    c2 = invite(x, "-c", "vouchers")
    assert run(z.home, "pair", "join", c2).returncode == 0
    before = rules(z)

    again = run(z.home, "pair", "join", c1)  # the code Y used

    assert again.returncode == 1, again.stdout
    assert "already used" in again.stderr and "ask" in again.stderr, again.stderr
    assert "paired" not in again.stdout
    assert rules(z) == before  # nothing stored
    assert not sql(z, "SELECT key FROM meta WHERE key LIKE 'join:%'")
    # the pair keeps working after a restart (the refused code is not presented again)
    z.stop()
    z.start()
    cli(x.home, "put", "vouchers", "V-1", "1")
    wait_for(lambda: value_at(z, "vouchers", "V-1") == 1, timeout=10)
    time.sleep(2)
    assert log_lines(x, "already used") <= 1  # the refusal at join time, nothing after


def test_an_unknown_code_is_refused_at_join_time(agents: Make) -> None:
    x, z = agents("x").start(), agents("z").start()
    code = invite(x, "-c", "vouchers")
    sql(x, "DELETE FROM invites")  # the inviter forgets it (as if another home made it)
    joined = run(z.home, "pair", "join", code)
    assert joined.returncode == 1
    assert "did not issue it" in joined.stderr and "new code" in joined.stderr, joined.stderr
    assert rules(z) == []
    assert not sql(z, "SELECT key FROM meta WHERE key LIKE 'join:%'")


@pytest.mark.parametrize("agent_running", [True, False])
def test_a_second_invite_names_the_rule_it_made_and_takes_effect(
    agents: Make, agent_running: bool
) -> None:
    x, z = agents("x").start(), agents("z")
    if agent_running:
        z.start()
    assert run(z.home, "pair", "join", invite(x, "-c", "a")).returncode == 0

    second = run(z.home, "pair", "join", invite(x, "-c", "c"))

    assert second.returncode == 0, second.stderr
    assert "paired with x" in second.stdout and ": c; both" in second.stdout, second.stdout
    # both rules in force at both ends, nothing left pending
    wait_for(lambda: len(in_force(x)) == 2, timeout=10)
    assert len(in_force(z)) == 2
    assert not [r for r in rules(x) if r["state"] == "proposed"]
    cli(x.home, "put", "c", "k", "1")
    if agent_running:
        wait_for(lambda: value_at(z, "c", "k") == 1, timeout=10)


def test_an_invite_with_the_terms_in_force_is_merged(agents: Make) -> None:
    x, z = agents("x").start(), agents("z").start()
    assert run(z.home, "pair", "join", invite(x, "-c", "a")).returncode == 0
    again = run(z.home, "pair", "join", invite(x, "-c", "a"))
    assert again.returncode == 0, again.stderr
    assert "already" in again.stdout, again.stdout
    assert len(in_force(x)) == 1 and len(in_force(z)) == 1
    assert not [r for r in rules(x) if r["state"] == "proposed"]


# ---------------------------------------------------------------- one-way rules


def test_the_sending_side_of_a_one_way_rule_gets_in_step(agents: Make) -> None:
    """In step, for a one-way rule, means everything that may flow has flowed: the
    receiver's own writes (which never flow back) do not keep the sender 'syncing'."""
    p, q = agents("p").start(), agents("q").start()
    code = invite(p, "-c", "vouchers", "--direction", "send")
    assert run(q.home, "pair", "join", code).returncode == 0
    cli(p.home, "put", "vouchers", "V-1", "1")
    wait_for(lambda: value_at(q, "vouchers", "V-1") == 1, timeout=10)
    cli(q.home, "put", "vouchers", "Q-1", "1")
    cli(p.home, "put", "vouchers", "V-2", "2")
    wait_for(lambda: value_at(q, "vouchers", "V-2") == 2, timeout=10)
    for agent in (p, q):
        synced = run(agent.home, "sync", "--timeout", "5")
        assert synced.returncode == 0, (agent.name, synced.stdout, synced.stderr)
        [conn] = agent.status()["agent"]["connections"]
        assert conn["synced"], (agent.name, conn)
    assert value_at(p, "vouchers", "Q-1") is None  # nothing flowed back


# ---------------------------------------------------------------- several requests


def test_several_requests_from_one_peer(agents: Make) -> None:
    p, q = agents("p").start(), agents("q").start()
    cli(q.home, "pair", "add", p.device_id, "--address", p.address, "--name", "p", "-c", "a")
    wait_for(lambda: len(json.loads(cli(p.home, "pair", "pending", "--json"))) == 1)
    assert "p2psync pair accept " in cli(p.home, "pair", "pending")  # one request: by peer
    cli(q.home, "rule", "propose", "p", "-c", "b")
    wait_for(lambda: len(json.loads(cli(p.home, "pair", "pending", "--json"))) == 2)
    pending = cli(p.home, "pair", "pending")
    assert "pair accept" not in pending  # it would not know which
    ids = [r["id"][:12] for r in json.loads(cli(p.home, "pair", "pending", "--json"))]
    assert all(f"p2psync rule accept {i}" in pending for i in ids), pending
    # the same request again is not a new one
    again = cli(q.home, "rule", "propose", "p", "-c", "a")
    assert "already proposed" in again and len(rules(q)) == 2, again
    wanted = next(r for r in rules(p) if r["collections"] == ["a"])
    cli(p.home, "rule", "accept", wanted["id"][:12])
    wait_for(lambda: len(in_force(q)) == 1, timeout=10)
    # proposing what is in force is not a request, and does not print "paired" anew
    same = cli(q.home, "rule", "propose", "p", "-c", "a")
    assert "already paired" in same and "nothing new" in same, same
    assert len(rules(q)) == 2
    # pair add without --name keeps the name the peer is known by
    cli(q.home, "pair", "add", p.device_id, "-c", "a")
    assert [peer["name"] for peer in json.loads(cli(q.home, "peers", "--json"))] == ["p"]
    assert "already paired" in cli(q.home, "pair", "add", p.device_id, "-c", "a")


# ---------------------------------------------------------------- stuck, and shown


def test_a_branch_that_cannot_get_in_step_is_told_where_it_looks(agents: Make) -> None:
    """Head office <-> Branch 2 share ledgers only; head office <-> Branch 1 share
    vouchers and ledgers. Branch 2's vouchers reach the head office without their
    payload (Branch 2 may not send them there), so Branch 1, which may receive
    vouchers from the head office, cannot apply them: `status`, `peers` and `sync`
    say so, with what to do."""
    ho, b1, b2 = agents("ho").start(), agents("b1").start(), agents("b2").start()
    code = invite(ho, "-c", "vouchers", "-c", "ledgers")
    assert run(b1.home, "pair", "join", code).returncode == 0
    assert run(b2.home, "pair", "join", invite(ho, "-c", "ledgers")).returncode == 0
    cli(b2.home, "put", "vouchers", "B2-1", "1")
    cli(b2.home, "put", "ledgers", "L-1", "1")
    wait_for(lambda: value_at(ho, "ledgers", "L-1") == 1, timeout=10)

    synced = run(b1.home, "sync", "--timeout", "10")
    assert synced.returncode == 1
    assert "cannot get in step" in synced.stdout and "vouchers" in synced.stdout, synced.stdout
    status = cli(b1.home, "status")
    assert "cannot get in step" in status and "syncing" not in status, status
    [row] = [r for r in json.loads(cli(b1.home, "peers", "--json")) if r["name"] == "ho"]
    assert "cannot get in step" in (row["problem"] or ""), row
    assert "cannot get in step" in cli(b1.home, "peers")


# ---------------------------------------------------------------- messages


def test_sync_to_an_address_names_it_and_says_what_failed(tmp_path: Path) -> None:
    lonely = SpawnedAgent(tmp_path / "lonely", "lonely").init()
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = run(lonely.home, "sync", "--address", f"127.0.0.1:{port}", "--timeout", "5")
    assert time.monotonic() - started < 4
    assert result.returncode == 1
    assert f"127.0.0.1:{port}: NOT in sync: cannot reach 127.0.0.1:{port}" in result.stdout, (
        result.stdout
    )
    assert "after 5 s" not in result.stdout


def test_a_stranger_is_told_it_is_not_paired_and_reconnects_are_not_pairings(
    agents: Make,
) -> None:
    x, stranger = agents("x").start(), agents("stranger")
    result = run(stranger.home, "sync", "--address", x.address, "--timeout", "10")
    assert "not paired: no rule in force" in result.stdout, result.stdout
    assert "awaits approval" not in result.stdout
    # a paired pair that reconnects logs "paired with" once, at the pairing
    y = agents("y").start()
    assert run(y.home, "pair", "join", invite(x, "-c", "c")).returncode == 0
    wait_for(lambda: x.status()["agent"]["connections"], timeout=10)
    for _ in range(2):
        y.stop()
        y.start()
        wait_for(lambda: any(c["synced"] for c in x.status()["agent"]["connections"]), 10)
    assert log_lines(x, "paired with") <= 1
