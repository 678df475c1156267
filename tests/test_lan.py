"""Agents on a real (virtual) LAN of network namespaces: discovery over mDNS,
pairing by invite and by request, rules across three hosts, partitions, frame
loss, a spoofed advert, and avahi seeing us. Root only; every namespace is made
here and removed after (see tests/lan.py)."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2psync.agent.process import AgentProcess
from tests.lan import Lan, unavailable

pytestmark = [
    pytest.mark.lan,
    pytest.mark.skipif(unavailable() is not None, reason=f"no LAN: {unavailable()}"),
    pytest.mark.slow,
]


class HostAgent:
    """An agent with its home on the test machine, running inside LAN host i."""

    def __init__(self, lan: Lan, i: int, base: Path, name: str) -> None:
        self.lan, self.i, self.name = lan, i, name
        self.home = base / name
        out = self.cli("init", "--name", name)
        self.device_id = out.splitlines()[0]
        self.log = base / f"{name}.log"
        self.agent = AgentProcess(
            self.home,
            listen="0.0.0.0:7717",
            prefix=["ip", "netns", "exec", lan.host(i)],
            log=self.log,
        )

    def cli(self, *args: str, check: bool = True) -> str:
        result = self.lan.p2psync(self.i, self.home, *args)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: p2psync {' '.join(args)}: {result.stderr}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def start(self) -> HostAgent:
        self.agent.start()
        return self

    def stop(self) -> None:
        self.agent.stop()

    def get(self, collection: str, key: str) -> Any:
        result = self.lan.p2psync(self.i, self.home, "get", collection, key)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def discovered(self) -> set[str]:
        return {
            row["device_id"] for row in self.json("peers") if row["state"].startswith("discovered")
        }


def wait(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
def lan3() -> Iterator[Lan]:
    lan = Lan(3)
    try:
        yield lan
    finally:
        lan.close()


def invite_pair(inviter: HostAgent, joiner: HostAgent, *rule: str) -> None:
    code = inviter.cli("pair", "invite", *rule).splitlines()[-1]
    out = joiner.cli("pair", "join", code)
    assert "paired with" in out


def test_three_hosts_discover_pair_and_relay_by_rule(lan3: Lan, tmp_path: Path) -> None:
    h1, h2, h3 = (HostAgent(lan3, i, tmp_path, f"h{i}").start() for i in (1, 2, 3))
    agents = (h1, h2, h3)
    for agent in agents:
        others = {a.device_id for a in agents if a is not agent}
        took = wait(lambda a=agent, o=others: a.discovered() >= o, 3.5, f"{agent.name} sees both")
        assert took <= 3.5
    # h1 and h2 pair by invite (vouchers and stock), h1 and h3 by request and accept (vouchers)
    invite_pair(h1, h2, "-c", "vouchers", "-c", "stock")
    h3.cli("pair", "add", h1.device_id, "-c", "vouchers")  # no address: h3 saw h1 on the LAN
    wait(
        lambda: any(p["awaiting"] == "you" for p in h1.json("pair", "pending")),
        10,
        "h1 sees h3's request",
    )
    h1.cli("pair", "accept", "h3")
    # h3 also asks h2, which says no
    h3.cli("pair", "add", h2.device_id)
    wait(lambda: h2.json("pair", "pending"), 10, "h2 sees h3's request")
    h2.cli("pair", "reject", "h3", "--reason", "head office only")
    wait(
        lambda: any("head office only" in p["state"] for p in h3.json("peers")),
        15,
        "h3 sees the rejection",
    )
    # records written on h2 reach h3 only through h1, only where both rules allow
    h2.cli("put", "vouchers", "V-1", '{"amount": 10}')
    h2.cli("put", "stock", "S-1", '{"qty": 3}')
    h2.cli("put", "payroll", "P-1", '{"salary": 1}')
    wait(lambda: h3.get("vouchers", "V-1") == {"amount": 10}, 10, "V-1 reaches h3")
    wait(lambda: h1.get("stock", "S-1") == {"qty": 3}, 10, "S-1 reaches h1")
    assert h3.get("stock", "S-1") is None  # h1-h3 covers vouchers only
    assert h1.get("payroll", "P-1") is None and h3.get("payroll", "P-1") is None
    for agent in agents:
        assert "verified" in agent.cli("verify")


def test_the_readme_walk_works_as_written(lan3: Lan, tmp_path: Path) -> None:
    """README "A head office and two branches, step by step", command by command."""
    ho = HostAgent(lan3, 1, tmp_path, "Head office").start()
    b1 = HostAgent(lan3, 2, tmp_path, "Branch 1").start()
    b2 = HostAgent(lan3, 3, tmp_path, "Branch 2").start()
    for agent in (ho, b1, b2):
        others = {a.device_id for a in (ho, b1, b2) if a is not agent}
        wait(lambda a=agent, o=others: a.discovered() >= o, 10, f"{agent.name} lists the others")
    # with an invite code
    code = ho.cli("pair", "invite", "-c", "vouchers", "-c", "ledgers").splitlines()[-1]
    joined = b1.cli("pair", "join", code)
    assert joined.startswith(
        f"paired with Head office ({ho.device_id[:7]}): ledgers, vouchers; both; online; "
        "route auto (rule "
    ), joined
    # by request and approval
    asked = b2.cli("pair", "add", "Head office", "-c", "vouchers")
    assert "proposed to Head office" in asked, asked
    wait(lambda: "Branch 2 asks: vouchers; both; online; route auto" in ho.cli("pair", "pending"),
         10, "the head office sees the request")
    assert "paired with Branch 2" in ho.cli("pair", "accept", "Branch 2")
    # from then on
    ho.cli("put", "vouchers", "V-1001", '{"party": "ACME", "amount": 1200}')
    for branch in (b1, b2):
        wait(lambda b=branch: b.get("vouchers", "V-1001") == {"amount": 1200, "party": "ACME"},
             10, f"{branch.name} holds V-1001")
    for agent in (ho, b1, b2):
        assert "in sync" in agent.cli("sync", "--timeout", "10")
        for row in agent.json("peers"):
            if row["state"] == "paired":
                assert row["connected"] and row["in_sync"] and not row["problem"], row
        assert "accepted" in agent.cli("rule", "list")
    assert "nothing pending" in ho.cli("pair", "pending")
    peers_b1 = b1.cli("peers")
    assert "Head office" in peers_b1 and "paired; connected; in sync; 0 behind, 0 ahead" in peers_b1


def test_partition_then_heal_converges(lan3: Lan, tmp_path: Path) -> None:
    h1, h2 = HostAgent(lan3, 1, tmp_path, "h1").start(), HostAgent(lan3, 2, tmp_path, "h2").start()
    invite_pair(h1, h2)
    h1.cli("put", "ledgers", "ACME", '{"balance": 0}')
    wait(lambda: h2.get("ledgers", "ACME") == {"balance": 0}, 10, "first sync")
    lan3.partition(1, 2)
    for i in range(5):
        h1.cli("put", "c", f"h1-{i}", str(i))
    h2.cli("put", "c", "h2-0", "0")
    h1.cli("put", "ledgers", "ACME", '{"balance": 100}')
    h2.cli("put", "ledgers", "ACME", '{"balance": 50}')
    time.sleep(2)
    assert h2.get("c", "h1-0") is None  # really apart
    lan3.heal()

    def converged() -> bool:
        return (
            h1.get("c", "h2-0") == 0
            and h2.get("c", "h1-4") == 4
            and len(h1.json("conflicts")) == 1
            and len(h2.json("conflicts")) == 1
        )

    wait(converged, 90, "converged after healing")
    assert h1.json("conflicts") == h2.json("conflicts")
    assert h1.json("ls", "c") == h2.json("ls", "c")
    assert h1.cli("verify") == h2.cli("verify")  # same entries, none twice


def test_converges_through_20_percent_frame_loss(lan3: Lan, tmp_path: Path) -> None:
    h1, h2 = HostAgent(lan3, 1, tmp_path, "h1").start(), HostAgent(lan3, 2, tmp_path, "h2").start()
    invite_pair(h1, h2)
    lan3.loss(20)
    lines = tmp_path / "load.jsonl"
    lines.write_text(
        "".join(
            json.dumps({"collection": "c", "key": f"k{i}", "value": {"i": i}}) + "\n"
            for i in range(300)
        )
    )
    h1.cli("put", "--from", str(lines))
    h2.cli("put", "c", "from-h2", "1")
    wait(
        lambda: h2.get("c", "k299") == {"i": 299} and h1.get("c", "from-h2") == 1,
        120,
        "converged through loss",
    )
    lan3.loss(0)
    assert h1.cli("verify") == h2.cli("verify")


SPOOF = """
import socket, sys, time
from zeroconf import IPVersion, ServiceInfo, Zeroconf
device_id, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
zc = Zeroconf(ip_version=IPVersion.V4Only)
info = ServiceInfo("_p2psync._tcp.local.", "SPOOFED._p2psync._tcp.local.",
                   addresses=[socket.inet_aton(address)], port=port,
                   properties={"id": device_id, "v": "1", "name": "not really"},
                   server="spoofed.local.")
zc.register_service(info)
print("advertised", flush=True)
time.sleep(120)
"""


def test_a_spoofed_advert_fails_the_handshake(lan3: Lan, tmp_path: Path) -> None:
    h1, h2 = HostAgent(lan3, 1, tmp_path, "h1").start(), HostAgent(lan3, 2, tmp_path, "h2").start()
    invite_pair(h1, h2)
    h1.stop()
    h2.stop()
    impostor = HostAgent(lan3, 3, tmp_path, "impostor").start()  # another key, on h3
    spoof = lan3.spawn(3, sys.executable, "-c", SPOOF, h2.device_id, lan3.ip(3), "7717")
    assert spoof.stdout is not None and spoof.stdout.readline().startswith("advertised")
    h1.start()  # sees only the advert claiming to be h2, and dials it
    wait(
        lambda: f"is not {h2.device_id.replace('-', '')[:7]}" in h1.log.read_text(),
        20,
        "the impostor's handshake is refused and logged",
    )
    stored = [p["addresses"] for p in h1.json("peers") if p["device_id"] == h2.device_id]
    assert stored and f"{lan3.ip(3)}:7717" not in stored[0]  # an advert is not stored
    h2.start()
    h2.cli("put", "c", "real", "1")
    wait(lambda: h1.get("c", "real") == 1, 20, "h1 syncs with the real h2")
    h2.cli("put", "c", "later", "2")
    wait(lambda: h1.get("c", "later") == 2, 10, "the real peer keeps syncing")
    assert impostor.get("c", "later") is None


AVAHI = """
set -e
D=$(mktemp -d)
mount -t tmpfs tmpfs /run/dbus 2>/dev/null || mkdir -p /run/dbus
mkdir -p /run/avahi-daemon; mount -t tmpfs tmpfs /run/avahi-daemon
cat > $D/avahi.conf <<EOF
[server]
host-name=avahi-h3
allow-interfaces=eth0
use-ipv6=no
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
EOF
dbus-daemon --system --fork --print-pid=3 3>$D/dbus.pid
sleep 0.3
avahi-daemon --no-drop-root --no-chroot --no-rlimits -f $D/avahi.conf & echo $! > $D/avahi.pid
sleep 1.5
timeout 10 avahi-browse -rtp _p2psync._tcp || true
kill $(cat $D/avahi.pid) || true
sleep 0.3
kill $(cat $D/dbus.pid) || true
rm -rf $D
"""


@pytest.mark.skipif(
    shutil.which("avahi-browse") is None or shutil.which("avahi-daemon") is None,
    reason="avahi is not installed (scripts/test installs it when run as root)",
)
def test_avahi_resolves_our_agent(lan3: Lan, tmp_path: Path) -> None:
    h1 = HostAgent(lan3, 1, tmp_path, "h1").start()
    time.sleep(2)  # h1 has announced itself
    result = lan3.exec(
        3,
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        textwrap.dedent(AVAHI),
        timeout=60,
    )
    resolved = [line for line in result.stdout.splitlines() if line.startswith("=")]
    assert any(
        lan3.ip(1) in line and "7717" in line and h1.device_id in line for line in resolved
    ), result.stdout + result.stderr
    assert h1.agent.running


def test_last_seen_moves_when_an_agent_is_heard_again(lan3: Lan, tmp_path: Path) -> None:
    h1, h2 = HostAgent(lan3, 1, tmp_path, "h1").start(), HostAgent(lan3, 2, tmp_path, "h2").start()

    def last_seen() -> int:
        rows = [r for r in h1.json("peers") if r["device_id"] == h2.device_id]
        return int(rows[0]["last_seen"]) if rows else 0

    wait(lambda: last_seen() > 0, 5, "h1 discovers h2")
    first = last_seen()
    h2.agent.kill9()  # no goodbye: h1 keeps h2's advert, unchanged when h2 is back
    time.sleep(1)
    h2.start()  # announces the very same records again
    wait(lambda: last_seen() > first, 10, "h1 hears h2 again")
