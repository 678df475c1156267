"""The relay node with real processes on loopback: `relay serve`, agents' `sync`
and `run` through it, admission, expiry, restarts (``docs/relay.md``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import p2psync
from p2psync import home as home_mod
from p2psync.core.rules import Route, Terms
from tests.agents import SpawnedAgent, cli, run, wait_for
from tests.relaynode import RelayNode, pair_by_rule

pytestmark = pytest.mark.process

MARKER = "PLAINTEXT-MARKER-7f3a9c"
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayNode]:
    node = RelayNode(tmp_path / "relay").init()
    yield node
    node.stop()


def site(tmp_path: Path, name: str) -> Path:
    home_mod.init(tmp_path / name, name)
    return tmp_path / name


def write(home: Path, count: int, prefix: str, collection: str = "stock") -> None:
    with p2psync.open(home) as db:
        db.write(
            [
                p2psync.Change(
                    p2psync.OpKind.PUT, collection, f"{prefix}{i}", {"n": i, "note": MARKER}
                )
            ]
            for i in range(count)
        )


def records(home: Path, collection: str = "stock") -> dict[str, object]:
    with p2psync.open(home) as db:
        return dict(db.scan(collection))


def use_relay(home: Path, relay: RelayNode, token: str | None = None) -> None:
    args = ["relay", "add", relay.device_id, "--address", relay.address]
    cli(home, *args, *(["--token", token] if token else []))


def test_two_sites_never_online_together_converge_through_the_relay(
    tmp_path: Path, relay: RelayNode
) -> None:
    """Head office and branch each run `p2psync sync` alone; the relay restarts in
    between; both end with the same records (a conflict included), A's envelopes
    are acknowledged, and the relay's files hold none of the plaintext."""
    a, b = site(tmp_path, "head"), site(tmp_path, "branch")
    ida, idb = pair_by_rule(a, b, Terms.make(["*"], route=Route.RELAY))
    cli(relay.home, "relay", "allow", ida)
    token = cli(relay.home, "relay", "token", "create").splitlines()[0]
    relay.start()
    use_relay(a, relay)
    use_relay(b, relay, token)
    write(a, 300, "h")
    write(b, 200, "b")
    write(a, 1, "same")  # the same key written on both sides: a conflict
    write(b, 1, "same")

    first = cli(a, "sync", "--timeout", "30")
    assert "301 entries at relay" in first, first
    relay.stop()
    relay.start()  # what was stored survives a restart
    second = cli(b, "sync", "--timeout", "30")
    assert "201 entries at relay" in second and "301 entries received" in second, second
    third = cli(a, "sync", "--timeout", "30")
    assert "201 entries received" in third and "1 envelope of ours acknowledged" in third
    fourth = cli(b, "sync", "--timeout", "30")  # A's receipt for B's envelope
    assert "1 envelope of ours acknowledged" in fourth, fourth

    assert records(a) == records(b)
    assert len(records(a)) == 300 + 200 + 1
    peers = json.loads(cli(a, "peers", "--json"))
    (row,) = [p for p in peers if p["device_id"] == idb]
    acknowledged = row["delivery"]["states"]["acknowledged"]
    assert (acknowledged["envelopes"], acknowledged["entries"]) == (1, 301)
    assert "acknowledged" in cli(a, "peers")
    status = relay.status()
    assert status["running"] is not None and len(status["admitted"]) == 2
    assert {r["device_id"] for r in status["admitted"]} == {ida, idb}
    assert MARKER.encode() not in relay.files_bytes()


def test_running_agents_with_no_address_for_each_other_sync_live_through_the_relay(
    tmp_path: Path, relay: RelayNode, agents: Callable[[str], SpawnedAgent]
) -> None:
    """Two running agents that cannot dial each other (no address, no discovery):
    writes on either side reach the other through the relay within seconds (live,
    spliced: issue 11), and the status says which relay is in use."""
    a, b = agents("head"), agents("branch")
    pair_by_rule(a.home, b.home, Terms.make(["*"], route=Route.AUTO))
    relay.start()
    for agent in (a, b):
        cli(relay.home, "relay", "allow", agent.device_id)
        use_relay(agent.home, relay)
        agent.start()
    write(a.home, 50, "h")
    wait_for(lambda: len(records(b.home)) == 50, timeout=30)
    write(b.home, 20, "b")
    wait_for(lambda: len(records(a.home)) == 70, timeout=30)
    assert records(a.home) == records(b.home)
    status = cli(a.home, "status")
    assert "relay: connected to" in status, status
    assert f"path: via relay {relay.device_id[:7]} (live)" in cli(a.home, "peers")
    assert MARKER.encode() not in relay.files_bytes()


def test_a_direct_rule_never_touches_the_relay(tmp_path: Path, relay: RelayNode) -> None:
    """Route direct: `sync` deposits nothing, and the relay lists no one in the
    mailbox policy (nothing could be deposited for us either)."""
    a, b = site(tmp_path, "head"), site(tmp_path, "branch")
    ida, idb = pair_by_rule(a, b, Terms.make(["*"], route=Route.DIRECT))
    relay.start()
    for home, ident in ((a, ida), (b, idb)):
        cli(relay.home, "relay", "allow", ident)
        use_relay(home, relay)
    write(a, 20, "h")
    result = run(a, "sync", "--timeout", "10")
    assert result.returncode == 1  # branch is not running: not in sync
    assert "at relay" not in result.stdout and "nothing waiting" in result.stdout
    assert relay.status()["mailbox"]["envelopes"] == 0


def test_a_relay_that_does_not_admit_us_is_a_clear_error(tmp_path: Path, relay: RelayNode) -> None:
    a, b = site(tmp_path, "head"), site(tmp_path, "branch")
    pair_by_rule(a, b, Terms.make(["*"], route=Route.RELAY))
    relay.start()
    added = cli(a, "relay", "add", relay.device_id, "--address", relay.address)
    assert "could not connect" in added and "did not admit this agent" in added
    write(a, 5, "h")
    result = run(a, "sync", "--timeout", "10")
    assert result.returncode == 1
    assert "did not admit this agent" in result.stderr
    assert "Traceback" not in result.stderr
    used = cli(relay.home, "relay", "token", "create", "--uses", "1").splitlines()[0]
    added = cli(a, "relay", "add", relay.device_id, "--address", relay.address, "--token", used)
    assert "admitted this agent" in added
    other = site(tmp_path, "other")
    again = cli(other, "relay", "add", relay.device_id, "--address", relay.address, "--token", used)
    assert "did not admit" in again  # the token's one use is spent
    typo = run(
        other,
        "relay",
        "add",
        relay.device_id,
        "--address",
        relay.address,
        "--token",
        used[:-2] + ("aa" if not used.endswith("aa") else "bb"),
    )
    assert typo.returncode == 2 and "typo" in typo.stderr


def test_envelopes_the_relay_expired_go_again(tmp_path: Path, relay: RelayNode) -> None:
    """The relay's clock passes the envelopes' time (its sweep drops them and
    queues notices): the sender's next sync learns it and deposits them again; the
    recipient then gets everything."""
    a, b = site(tmp_path, "head"), site(tmp_path, "branch")
    ida, idb = pair_by_rule(a, b, Terms.make(["*"], route=Route.RELAY))
    relay.start()
    for home, ident in ((a, ida), (b, idb)):
        cli(relay.home, "relay", "allow", ident)
        use_relay(home, relay)
    write(a, 40, "h")
    assert "40 entries at relay" in cli(a, "sync", "--timeout", "20")
    relay.stop()
    relay.start(env={"P2PSYNC_CLOCK_SKEW_MS": str(8 * DAY_MS)})  # a week and a day later
    wait_for(lambda: relay.status()["mailbox"]["envelopes"] == 0, timeout=20)
    assert relay.status()["mailbox"]["notices"] >= 1
    again = cli(a, "sync", "--timeout", "20")
    assert "40 entries at relay" in again, again
    assert "40 entries received" in cli(b, "sync", "--timeout", "20")
    assert len(records(b)) == 40


def test_joining_with_an_invite_for_route_relay_pairs_and_syncs_nothing_directly(
    tmp_path: Path, agents: Callable[[str], SpawnedAgent]
) -> None:
    """The invite's rule goes only through a relay: the join still completes (both
    hold the rule), says so, and the direct connection carries no entry."""
    head = agents("head")
    head.start()
    write(head.home, 3, "h", collection="orders")
    code = cli(head.home, "pair", "invite", "-c", "orders", "--route", "relay").splitlines()[-1]
    laptop = site(tmp_path, "laptop")
    joined = cli(laptop, "pair", "join", code)
    assert "paired with head" in joined and "only through a relay" in joined, joined
    assert records(laptop, "orders") == {}
    with p2psync.open(laptop) as db:
        (rule,) = db.store.rules(db.store.peers()[0].key)
        assert rule.state.value == "accepted" and rule.terms.route is Route.RELAY
    with p2psync.open(head.home) as db:
        (rule,) = db.store.rules(db.store.peers()[0].key)
        assert rule.state.value == "accepted"


def test_pairing_through_the_relay_with_a_site_that_is_never_online_with_us(
    tmp_path: Path, relay: RelayNode
) -> None:
    """`pair add ID --relay R` leaves the request at the relay; the other site,
    alone, fetches it (`sync`), sees it pending under our name, accepts; its answer
    and its records come back through the relay; then records flow both ways."""
    a, b = site(tmp_path, "head"), site(tmp_path, "laptop")
    ida = cli(a, "id").strip()
    idb = cli(b, "id").strip()
    relay.start()
    for home, ident in ((a, ida), (b, idb)):
        cli(relay.home, "relay", "allow", ident)
        use_relay(home, relay)
    write(a, 10, "h", collection="orders")
    asked = cli(
        a,
        "pair",
        "add",
        idb,
        "--name",
        "laptop",
        "-c",
        "orders",
        "--route",
        "relay",
        "--relay",
        relay.device_id[:8],
    )
    assert "pairing request left at relay" in asked, asked
    fetched = cli(b, "sync", "--timeout", "20")
    assert "head" in fetched and "pairing request received" in fetched, fetched
    assert "head" in cli(b, "pair", "pending")
    cli(b, "pair", "accept", "head")
    write(b, 5, "b", collection="orders")
    assert "5 entries at relay" in cli(b, "sync", "--timeout", "20")
    back = cli(a, "sync", "--timeout", "20")
    assert "5 entries received" in back and "10 entries at relay" in back, back
    assert "10 entries received" in cli(b, "sync", "--timeout", "20")
    assert records(a, "orders") == records(b, "orders") and len(records(b, "orders")) == 15


def test_a_running_agent_survives_its_relay_dying_and_carries_on_when_it_is_back(
    tmp_path: Path, relay: RelayNode, agents: Callable[[str], SpawnedAgent]
) -> None:
    a, b = agents("head"), agents("branch")
    pair_by_rule(a.home, b.home, Terms.make(["*"], route=Route.RELAY))
    relay.start()
    for agent in (a, b):
        cli(relay.home, "relay", "allow", agent.device_id)
        use_relay(agent.home, relay)
        agent.start()
    write(a.home, 5, "h")
    wait_for(lambda: len(records(b.home)) == 5, timeout=30)
    assert relay.process is not None
    relay.process.kill()  # kill -9, mid-session for both agents
    relay.process.wait()
    relay.process = None
    write(a.home, 5, "later")
    time.sleep(1.5)
    assert a.running and b.running, "an agent died with its relay"
    assert "relay: not connected" in cli(a.home, "status")
    relay.start()
    wait_for(lambda: len(records(b.home)) == 10, timeout=60)
