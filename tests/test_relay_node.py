"""The relay node with real processes on loopback: `relay serve`, agents' `sync`
and `run` through it, admission, expiry, restarts (``docs/relay.md``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
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
    assert status["running"] is not None and status["allowed"] == 2
    assert MARKER.encode() not in relay.files_bytes()
