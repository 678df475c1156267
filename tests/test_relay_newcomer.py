"""Newcomer review of issue 10 (relay, part 1): what a branch clerk, an integrator
or the next developer runs into, each failing on the reviewed tree. Real relay
processes and stores, CLI through subprocesses, 127.0.0.1 only, no mocks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2psync import home as home_mod
from p2psync.core.rules import Route, Terms
from tests.agents import SpawnedAgent, cli, run, wait_for
from tests.relaynode import RelayNode, pair_by_rule

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayNode]:
    node = RelayNode(tmp_path / "relay").init()
    yield node
    node.stop()


def site(tmp_path: Path, name: str) -> Path:
    home_mod.init(tmp_path / name, name)
    return tmp_path / name


def device(home: Path) -> str:
    return cli(home, "id").strip()


def use_relay(home: Path, relay: RelayNode) -> str:
    return cli(home, "relay", "add", relay.device_id, "--address", relay.address)


# ---------------------------------------------------------------- pair add --relay


def test_pair_add_with_an_unknown_relay_proposes_nothing(tmp_path: Path) -> None:
    """`pair add ID --relay TYPO` fails (exit 1) but the rule is already proposed:
    running it again with the right relay leaves two proposals to the peer."""
    a, b = site(tmp_path, "a"), site(tmp_path, "b")
    result = run(a, "pair", "add", device(b), "--relay", "XXXXXXX")
    assert result.returncode != 0
    assert "names no relay" in result.stderr
    assert cli(a, "rule", "list").strip() == "no rules", "a failed `pair add` left a proposal"


def test_pair_add_relay_with_route_direct_is_refused_before_proposing(tmp_path: Path) -> None:
    """A usage error (exit 2) that nonetheless proposes a route-direct rule."""
    a, b = site(tmp_path, "a"), site(tmp_path, "b")
    result = run(a, "pair", "add", device(b), "--relay", "TP7", "--route", "direct")
    assert result.returncode == 2
    assert cli(a, "rule", "list").strip() == "no rules", "a usage error left a proposal"


def test_a_rejection_reaches_the_proposer_through_the_relay(
    tmp_path: Path, relay: RelayNode
) -> None:
    """docs/relay.md: "a rejection [comes back] as an introduction carrying the
    rejection". By hand it never does: the rejecting side's `sync` says "no
    paired peer with an address" and the proposer waits forever."""
    a, b = site(tmp_path, "a"), site(tmp_path, "b")
    for home in (a, b):
        cli(relay.home, "relay", "allow", device(home))
    relay.start()
    use_relay(a, relay)
    use_relay(b, relay)
    cli(a, "pair", "add", device(b), "--name", "b", "--relay", relay.device_id[:7])
    assert "pairing request received" in cli(b, "sync", "--timeout", "20")
    cli(b, "pair", "reject", device(a)[:7], "--reason", "not now")
    answer = run(b, "sync", "--timeout", "20")
    cli(a, "sync", "--timeout", "20")
    rules = cli(a, "rule", "list")
    assert "rejected" in rules, (rules, answer.stderr)


# ---------------------------------------------------------------- messages


def test_agent_commands_on_a_relay_home_say_it_is_a_relay_home(
    tmp_path: Path, relay: RelayNode
) -> None:
    """`relay add`/`status`/`put` on a relay home say it is "damaged or incomplete";
    the operator's relay is fine, it is just the wrong kind of home."""
    for args in (("status",), ("relay", "list"), ("put", "c", "k", "1")):
        result = run(relay.home, *args)
        assert result.returncode != 0
        assert "damaged" not in result.stderr, (args, result.stderr)
        assert "relay" in result.stderr, (args, result.stderr)


def test_relay_node_help_names_the_relay_home_default() -> None:
    """`relay serve --help` (and init, status, allow, ...) say "Agent home folder
    (default: $P2PSYNC_HOME, else the XDG data dir)"; the relay home's default is
    $P2PSYNC_RELAY_HOME, else ~/.local/share/p2psync-relay (docs/relay.md)."""
    for sub in ("init", "serve", "status", "allow", "deny", "purge"):
        text = run(ROOT, "relay", sub, "--help").stdout
        assert "Agent home folder" not in text, sub
        assert "P2PSYNC_RELAY_HOME" in text, sub


def test_relay_add_with_the_wrong_relay_id_says_so(tmp_path: Path, relay: RelayNode) -> None:
    """A wrong (but valid) relay ID: `relay add` says "unreachable ... keep trying",
    exits 0 and keeps the relay. It will never work: the key is pinned."""
    a, other = site(tmp_path, "a"), site(tmp_path, "other")
    relay.start()
    result = run(a, "relay", "add", device(other), "--address", relay.address)
    text = result.stdout + result.stderr
    assert "keep trying" not in text, text
    assert relay.device_id[:7] in text and "relay ID" in text, text


def test_relay_remove_takes_the_short_id_every_output_shows(
    tmp_path: Path, relay: RelayNode
) -> None:
    """Every output names the relay by its short ID ("added relay TP7ZZ3N") and
    `pair add --relay` takes first characters, but `relay remove TP7ZZ3N` is a
    usage error ("expected 56 letters and digits")."""
    a = site(tmp_path, "a")
    cli(a, "relay", "add", relay.device_id, "--address", "127.0.0.1:1", "--no-check")
    result = run(a, "relay", "remove", relay.device_id[:7])
    assert result.returncode == 0, result.stderr


def test_refused_because_the_peer_never_connected_says_what_to_do(
    tmp_path: Path, relay: RelayNode
) -> None:
    """The peer has never connected to the relay (no policy there). The sync line
    reads "nothing to exchange through relay R; NOT delivered: relay refused: not
    allowed (the recipient's mailbox policy does not list this sender)": it says
    both nothing and something, and not that the peer must connect once."""
    e, f = site(tmp_path, "e"), site(tmp_path, "f")
    pair_by_rule(e, f, Terms.make(["*"], route=Route.RELAY))
    cli(relay.home, "relay", "allow", device(e))
    relay.start()
    use_relay(e, relay)
    cli(e, "put", "stock", "E-1", "1")
    result = run(e, "sync", "--timeout", "20")
    assert "nothing to exchange" not in result.stdout, result.stdout
    assert "connect" in result.stdout, result.stdout


def test_sync_with_a_relay_and_nothing_waiting_does_not_blame_addresses(
    tmp_path: Path, relay: RelayNode
) -> None:
    """A new site added the relay and syncs to collect its pairing request; none
    is there yet. The relay was reached, yet `sync` exits 1 with "no paired peer
    with an address to sync with"."""
    d = site(tmp_path, "d")
    cli(relay.home, "relay", "allow", device(d))
    relay.start()
    use_relay(d, relay)
    result = run(d, "sync", "--timeout", "20")
    assert "no paired peer with an address" not in result.stderr, result.stderr


# ---------------------------------------------------------------- operator


def test_deny_ends_the_sessions_of_a_running_agent(
    tmp_path: Path, relay: RelayNode, agents: Callable[[str], SpawnedAgent]
) -> None:
    """`relay deny` while the agent is connected: its session stays (relay status
    lists it, minutes later) and its deposits are still stored and delivered."""
    b = agents("branch")
    cli(relay.home, "relay", "allow", b.device_id)
    relay.start()
    use_relay(b.home, relay)
    b.start()
    wait_for(lambda: len(relay.status()["running"]["sessions"]) == 1, timeout=20)
    cli(relay.home, "relay", "deny", b.device_id)
    time.sleep(3)
    sessions = relay.status()["running"]["sessions"]
    assert sessions == [], json.dumps(sessions)


def test_sync_on_a_running_agent_does_not_dial_a_relay_only_peer(
    tmp_path: Path, relay: RelayNode, agents: Callable[[str], SpawnedAgent]
) -> None:
    """README: "relay: only through a relay"; docs: "the peer is never dialled for
    it". With the agent running and the relay down, `sync` says "Branch (...): NOT
    in sync: no address to dial" (a newcomer adds an address), not that the relay
    is down; the relay's reason only follows on stderr."""
    a = agents("head")
    b = site(tmp_path, "branch")
    pair_by_rule(a.home, b, Terms.make(["*"], route=Route.RELAY))
    cli(a.home, "relay", "add", relay.device_id, "--address", "127.0.0.1:1", "--no-check")
    a.start()
    result = run(a.home, "sync", "--timeout", "10")
    assert result.returncode != 0
    assert "no address to dial" not in result.stdout, result.stdout
