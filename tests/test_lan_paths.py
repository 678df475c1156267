"""Sites that cannot reach each other, a relay both reach, on a LAN of network
namespaces (issue 11; root only, see tests/lan.py): they pair through the relay,
stay in step by splice while both run and by mailbox while one is down, move to
a direct connection by themselves when a route between them appears, and back to
the relay when it goes; `peers` shows each change; the stores end identical.

Host 1 is the head office, host 2 the branch, host 3 the relay. "No route between
the two networks" is a partition of hosts 1 and 2 on the switch (their frames to
each other dropped, mDNS included); both still reach host 3."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2psync.agent.process import AgentProcess
from tests.lan import Lan, unavailable
from tests.test_lan import HostAgent, wait

pytestmark = [
    pytest.mark.lan,
    pytest.mark.skipif(unavailable() is not None, reason=f"no LAN: {unavailable()}"),
    pytest.mark.slow,
]

RELAY_PORT = 7718


@pytest.fixture
def lan() -> Iterator[Lan]:
    network = Lan(3)
    try:
        yield network
    finally:
        network.close()


class HostRelay:
    """A relay node with its home on the test machine, serving inside LAN host i."""

    def __init__(self, lan: Lan, i: int, base: Path) -> None:
        self.lan, self.i = lan, i
        self.home = base / "relay"
        out = lan.p2psync(i, self.home, "relay", "init", "--name", "hub")
        assert out.returncode == 0, out.stderr
        self.device_id = out.stdout.splitlines()[0]
        self.address = f"{lan.ip(i)}:{RELAY_PORT}"
        self.node = AgentProcess(
            self.home,
            listen=f"0.0.0.0:{RELAY_PORT}",
            prefix=["ip", "netns", "exec", lan.host(i)],
            log=base / "relay.log",
            command=("relay", "serve"),
        )

    def allow(self, device_id: str) -> None:
        out = self.lan.p2psync(self.i, self.home, "relay", "allow", device_id)
        assert out.returncode == 0, out.stderr


def path_of(site: HostAgent, peer: HostAgent) -> str | None:
    rows: list[dict[str, Any]] = site.json("peers")
    row = next((r for r in rows if r["device_id"] == peer.device_id), None)
    return None if row is None else row["path"]


def at_relay(site: HostAgent, peer: HostAgent) -> int:
    """Data envelopes of ``site`` for ``peer`` at the relay now."""
    rows: list[dict[str, Any]] = site.json("peers")
    row = next(r for r in rows if r["device_id"] == peer.device_id)
    delivery = row["delivery"] or {"states": {}}
    return int(delivery["states"].get("at-relay", {}).get("envelopes", 0))


def orders(site: HostAgent) -> list[Any]:
    return json.loads(site.cli("ls", "orders", "--json"))  # type: ignore[no-any-return]


def test_sites_move_between_splice_mailbox_and_direct_by_themselves(
    lan: Lan, tmp_path: Path
) -> None:
    head, branch = HostAgent(lan, 1, tmp_path, "head"), HostAgent(lan, 2, tmp_path, "branch")
    relay = HostRelay(lan, 3, tmp_path)
    for site in (head, branch):
        relay.allow(site.device_id)
    relay.node.start()
    lan.partition(1, 2)  # two networks with no route between them
    for site in (head, branch):
        site.cli("relay", "add", relay.device_id, "--address", relay.address)
    head.start()
    # pairing through the relay (part 1): the branch cannot reach the head office
    made = head.cli("pair", "invite", "-c", "orders", "--relay", relay.device_id[:7])
    code = made.strip().splitlines()[-1]
    joined = branch.cli("pair", "join", code, "--name", "head", "--timeout", "5")
    assert "left at relay" in joined, joined
    branch.start()
    wait(lambda: branch.cli("pair", "pending").strip() == "nothing pending", 60, "paired")
    # both run: a live splice through the relay
    wait(lambda: path_of(head, branch) == path_of(branch, head) == "relay", 60, "spliced")
    assert f"via relay {relay.device_id[:7]} (live)" in head.cli("peers")
    head.cli("put", "orders", "o1", '"from head, spliced"')
    wait(lambda: branch.get("orders", "o1") == "from head, spliced", 20, "o1 at the branch")
    branch.cli("put", "orders", "o2", '"from branch, spliced"')
    wait(lambda: head.get("orders", "o2") == "from branch, spliced", 20, "o2 at the head")
    # the branch goes down: the head office leaves what it lacks at the relay
    branch.stop()
    wait(lambda: path_of(head, branch) == "mailbox", 30, "the mailbox")
    assert f"mailbox at relay {relay.device_id[:7]}" in head.cli("peers")
    head.cli("put", "orders", "o3", '"from head, by mailbox"')
    wait(lambda: at_relay(head, branch) > 0, 30, "o3 at the relay")
    branch.start()
    wait(lambda: branch.get("orders", "o3") == "from head, by mailbox", 30, "o3 from the mailbox")
    wait(lambda: path_of(head, branch) == path_of(branch, head) == "relay", 60, "spliced again")
    # a route appears: they move to direct by themselves (discovery, then a dial)
    lan.heal()
    wait(lambda: path_of(head, branch) == path_of(branch, head) == "direct", 90, "direct")
    assert "path: direct since" in branch.cli("peers")
    head.cli("put", "orders", "o4", '"from head, direct"')
    wait(lambda: branch.get("orders", "o4") == "from head, direct", 20, "o4 at the branch")
    # the route goes: back to the relay (the direct session times out, then a splice)
    lan.partition(1, 2)
    wait(lambda: path_of(head, branch) == path_of(branch, head) == "relay", 150, "back to relay")
    branch.cli("put", "orders", "o5", '"from branch, spliced again"')
    wait(lambda: head.get("orders", "o5") == "from branch, spliced again", 20, "o5 at the head")
    head.stop()
    branch.stop()
    relay.node.stop()
    assert orders(head) == orders(branch)
    assert len(orders(head)) == 5
