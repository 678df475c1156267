"""Live splice through a relay (issue 11), end to end with real processes on
127.0.0.1: two agents that have no address for each other, both connected to one
relay, sync live through it; the relay reads nothing of what they say."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import p2psync
from p2psync.core.rules import Route, Terms
from tests.agents import SpawnedAgent, cli, value_at, wait_for
from tests.relaynode import RelayNode, pair_by_rule

pytestmark = pytest.mark.process

MARKER = "plaintext-marker-7f3e9c"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayNode]:
    node = RelayNode(tmp_path / "relay").init()
    yield node
    node.stop()


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[SpawnedAgent, SpawnedAgent]]:
    a = SpawnedAgent(tmp_path / "a", "head").init()
    b = SpawnedAgent(tmp_path / "b", "branch").init()
    yield a, b
    for agent in (a, b):
        agent.stop()


def live_path(agent: SpawnedAgent, peer: SpawnedAgent) -> tuple[str, str | None] | None:
    for conn in agent.status()["agent"]["connections"]:
        if conn["device_id"] == peer.device_id and conn["kind"] == "live":
            return conn["path"], conn["relay"]
    return None


def test_two_agents_with_no_address_sync_live_through_the_splice(
    relay: RelayNode, sites: tuple[SpawnedAgent, SpawnedAgent]
) -> None:
    a, b = sites
    pair_by_rule(a.home, b.home, Terms.make(["orders"], route=Route.AUTO))
    for agent in (a, b):
        cli(relay.home, "relay", "allow", agent.device_id)
    relay.start()
    for agent in (a, b):
        cli(agent.home, "relay", "add", relay.device_id, "--address", relay.address)
        agent.start()
    wait_for(lambda: live_path(a, b) == ("relay", relay.device_id), timeout=30)
    assert live_path(b, a) == ("relay", relay.device_id)
    wait_for(lambda: relay.status()["running"]["splices"], timeout=5)  # written each second
    deposits = relay.status()["running"]["counters"]["deposits"]
    cli(a.home, "put", "orders", "o1", json.dumps({"note": MARKER + "-a"}))
    wait_for(lambda: value_at(b, "orders", "o1") == {"note": MARKER + "-a"}, timeout=15)
    cli(b.home, "put", "orders", "o2", json.dumps({"note": MARKER + "-b"}))
    wait_for(lambda: value_at(a, "orders", "o2") == {"note": MARKER + "-b"}, timeout=15)
    status = relay.status()["running"]
    (splice,) = status["splices"]
    assert {splice["asker"], splice["target"]} == {a.device_id[:7], b.device_id[:7]}
    assert splice["bytes_to_target"] > 0 and splice["bytes_to_asker"] > 0
    # nothing went by the mailbox once spliced: the splice carried it live
    assert status["counters"]["deposits"] == deposits
    shown = cli(relay.home, "relay", "status")
    assert "live splices: 1" in shown and a.device_id[:7] in shown, shown
    shown = cli(a.home, "peers")
    assert f"path: via relay {relay.device_id[:7]} (live) since" in shown, shown
    assert f"connected via relay {relay.device_id[:7]}; in sync" in cli(a.home, "status")
    (row,) = json.loads(cli(b.home, "peers", "--json"))
    assert (row["path"], row["path_relay"]) == ("relay", relay.device_id), row
    # b goes away: a's path to it is the mailbox at once
    b.stop()
    wait_for(lambda: json.loads(cli(a.home, "peers", "--json"))[0]["path"] == "mailbox", 10)
    shown = cli(a.home, "peers")
    assert f"path: mailbox at relay {relay.device_id[:7]} since" in shown, shown
    a.stop()
    relay.stop()
    assert MARKER.encode() not in relay.files_bytes()


def test_what_a_splice_carries_does_not_also_go_by_the_mailbox(
    relay: RelayNode, sites: tuple[SpawnedAgent, SpawnedAgent]
) -> None:
    """Both sites come online with a backlog, their rule's route relay-only: the
    first exchange with the relay collects and waits a grace before depositing, the
    splice forms meanwhile, and everything goes live through it; nothing is left
    in the mailbox (the relay stored no deposit at all).

    The two agents start together: started one after the other, the second (a
    process start, a second or more on a loaded machine) came to the relay after the
    first one's grace (2 s) had ended, and the first deposited its backlog."""
    a, b = sites
    pair_by_rule(a.home, b.home, Terms.make(["orders"], route=Route.RELAY))
    with a.db() as db:
        db.write([p2psync.Change(p2psync.OpKind.PUT, "orders", f"a{i}", i)] for i in range(300))
    with b.db() as db:
        db.write([p2psync.Change(p2psync.OpKind.PUT, "orders", f"b{i}", i)] for i in range(300))
    for agent in (a, b):
        cli(relay.home, "relay", "allow", agent.device_id)
    relay.start()
    for agent in (a, b):
        cli(agent.home, "relay", "add", relay.device_id, "--address", relay.address)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(SpawnedAgent.start, (a, b)))
    wait_for(lambda: value_at(b, "orders", "a299") == 299, timeout=30)
    wait_for(lambda: value_at(a, "orders", "b299") == 299, timeout=30)
    assert live_path(a, b) == ("relay", relay.device_id)
    wait_for(lambda: relay.status()["running"]["splices"], timeout=5)
    assert relay.status()["running"]["counters"]["deposits"] == 0
