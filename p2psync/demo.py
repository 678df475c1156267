"""``p2psync demo``: a head office and two branches syncing on this machine.

Three agent processes on 127.0.0.1 (nothing listens on other interfaces),
each with its own home in a temporary folder. The demo narrates live sync, a
conflict and its resolution, and a stopped branch catching up; then a relay node
(a fourth process) and a field laptop that syncs with the head office only
through it. It stops every process it started (by PID) and removes the folder,
whatever happens.

Whatever else runs on the machine: the agents listen on ports the system
picks, other agents seen over mDNS are left out of the story, and where
another program holds the mDNS port without sharing it the sites are given
each other's addresses instead of finding each other.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import p2psync
from p2psync import home as home_mod
from p2psync.agent.process import AgentProcess

Say = Callable[[str], None]


class Site:
    """One site: a home and, while running, its agent process."""

    is_relay = False  # the relay node's process is stopped with the sites

    def __init__(self, base: Path, name: str, discovery: bool, http: bool = False) -> None:
        self.name = name
        self.home = base / name.lower().replace(" ", "-")
        self.device_id = home_mod.init(self.home, name).identity.device_id
        args = ["--discovery-interface", "127.0.0.1"] if discovery else ["--no-discovery"]
        if http:
            args += ["--http", "127.0.0.1:0"]  # the HTTP API and console, any free port
        self.agent = AgentProcess(self.home, args=args, log=self.home / "agent.log")

    @property
    def address(self) -> str:
        return self.agent.address

    def start(self) -> None:
        self.agent.start()

    def stop(self) -> None:
        self.agent.stop()

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "p2psync", "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise p2psync.P2PSyncError(f"{self.name}: p2psync {args[0]} failed: {result.stderr}")
        return result.stdout

    def get(self, collection: str, key: str) -> Any:
        with p2psync.open(self.home) as db:
            return db.get(collection, key)

    def count(self, collection: str) -> int:
        with p2psync.open(self.home) as db:
            return dict(db.collections()).get(collection, 0)


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise p2psync.P2PSyncError(f"the demo waited {timeout:g} s in vain")
        time.sleep(0.005)
    return time.monotonic() - started


def run(say: Say, shell: Say, keep: bool = False) -> None:
    base = Path(tempfile.mkdtemp(prefix="p2psync-demo-"))
    sites: list[Site] = []
    try:
        _story(base, sites, say, shell)
    finally:
        for site in sites:
            site.stop()
        if keep:
            say(f"homes kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _http_get(url: str, home: Path, path: str) -> Any:
    """GET ``path`` of a site's HTTP API, with its key."""
    request = urllib.request.Request(
        url + path, headers={"X-API-Key": (home / "http.key").read_text().strip()}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def _story(base: Path, sites: list[Site], say: Say, shell: Say) -> None:
    say("Three sites, each with its own agent, home and key, on this machine (127.0.0.1)")
    discovery = _mdns_usable()
    head = Site(base, "Head office", discovery, http=True)
    north, south = (Site(base, n, discovery) for n in ("Branch North", "Branch South"))
    sites.extend([head, north, south])
    for site in sites:
        site.start()
        shell(f"{site.name}: device ID {site.device_id}, listening on {site.address}")

    if discovery:
        say("They find each other over mDNS (bound to 127.0.0.1 here), but share nothing yet")
        # other agents on this machine may be seen too: only the demo's own sites count
        ids = {site.device_id for site in sites}
        wait_until(lambda: all(ids - {s.device_id} <= _discovered(s) for s in sites), timeout=10)
        for row in json.loads(head.cli("peers", "--json")):
            if row["device_id"] in ids:
                shell(
                    f"head office sees {row['name']} ({row['device_id'][:7]}) at "
                    f"{', '.join(row['addresses'])}: {row['state']}"
                )
    else:
        say(
            "mDNS is not usable here (another program holds UDP port 5353 without sharing "
            "it): the sites are told each other's addresses instead"
        )

    say("The head office invites Branch North with a one-time code (all collections)")
    code = head.cli("pair", "invite", "--expires", "5m").splitlines()[-1]
    shell(f"p2psync pair invite  ->  {code}")
    joined = north.cli("pair", "join", code).splitlines()[0]
    shell(f"Branch North: p2psync pair join <code>  ->  {joined}")

    say("Branch South asks to pair for vouchers and ledgers only; the head office accepts")
    rule = ["-c", "vouchers", "-c", "ledgers", "--name", "Head office"]
    where = [] if discovery else ["--address", head.address]  # else: as discovered
    south.cli("pair", "add", head.device_id, *rule, *where)
    wait_until(lambda: bool(json.loads(head.cli("pair", "pending", "--json"))))
    for line in head.cli("pair", "pending").splitlines()[:1]:
        shell(f"head office: p2psync pair pending  ->  {line}")
    head.cli("pair", "accept", "Branch South")
    shell("head office: p2psync pair accept 'Branch South'")
    wait_until(lambda: _connections(head) == 2)
    shell(
        "connected: every message signed and encrypted end to end (Noise XX); "
        "the branches reach each other's records through the head office"
    )

    say("Live sync: the head office records a voucher; the branches have it at once")
    started = time.monotonic()
    head.cli("put", "vouchers", "V-1001", '{"party": "ACME", "amount": 1200}')
    wait_until(
        lambda: (
            north.get("vouchers", "V-1001") is not None
            and south.get("vouchers", "V-1001") is not None
        )
    )
    shell(
        f"Branch North and Branch South hold V-1001 {1000 * (time.monotonic() - started):.0f} "
        "ms after the command was started (including its own start-up)"
    )
    shell(f"Branch South reads: {json.dumps(south.get('vouchers', 'V-1001'))}")

    say("A program beside the head office follows the change feed over its HTTP API")
    url = head.agent.http_url or ""
    changes = _http_get(url, head.home, "/changes?since=0&collection=vouchers")
    for change in changes["changes"]:
        shell(
            f"GET {url}/changes?since=0&collection=vouchers  ->  #{change['change']} "
            f"{change['collection']}/{change['key']} = {json.dumps(change['value'])}"
        )
    shell(f"web console: {url}/ (log in with the link `p2psync console` prints)")

    say(
        "A conflict: Branch South goes offline, and both it and the head office "
        "change the ACME ledger"
    )
    south.stop()
    head.cli("put", "ledgers", "ACME", '{"balance": 1200, "by": "head office"}')
    south.cli("put", "ledgers", "ACME", '{"balance": 1150, "by": "branch south"}')
    shell("head office wrote balance 1200; Branch South (offline) wrote balance 1150")
    south.start()
    wait_until(lambda: all(_conflicts(s) == 1 for s in sites))
    shell(
        "Branch South is back: every site now lists the same conflict, and applies "
        "the same winner (the later write):"
    )
    for line in north.cli("conflicts").splitlines():
        shell(f"    {line}")

    say("The head office resolves it; the resolution reaches everyone")
    head.cli("resolve", "ledgers", "ACME", '{"balance": 1150, "by": "agreed"}')
    wait_until(lambda: all(_conflicts(s) == 0 for s in sites))
    shell(f"every site: ledgers/ACME = {json.dumps(north.get('ledgers', 'ACME'))}, no conflicts")

    say("Branch North stops; the head office keeps working; North catches up on restart")
    north.stop()
    lines = base / "stock.jsonl"
    with lines.open("w") as out:
        for i in range(2000):
            out.write(
                json.dumps(
                    {
                        "collection": "stock",
                        "key": f"item-{i:04d}",
                        "value": {"qty": i % 50, "site": "head office"},
                    }
                )
                + "\n"
            )
    head.cli("put", "--from", str(lines))
    shell("head office loaded 2,000 stock records while Branch North was down")
    north.start()
    took = wait_until(lambda: north.count("stock") == 2000, timeout=30)
    shell(f"Branch North restarted and caught up on 2,000 records in {took:.1f} s")

    _through_relay(base, sites, head, say, shell)

    say("Every site verifies every chain, hash and signature it holds")
    for site in sites:
        if not site.is_relay:
            shell(f"{site.name}: {site.cli('verify').strip()}")
    say("Done: all agents stopped, nothing left running")


def _through_relay(base: Path, sites: list[Site], head: Site, say: Say, shell: Say) -> None:
    """A field laptop never online with the head office: they go through a relay
    that can neither read nor forge what it carries."""
    say(
        "A field laptop is never online with the head office: they go through a relay "
        "(a fourth process with its own key), which stores sealed envelopes it cannot read"
    )
    relay_home = base / "relay"
    relay_id = _run(relay_home, "relay", "init", "--name", "Relay").splitlines()[0]
    relay = AgentProcess(relay_home, command=("relay", "serve"), log=base / "relay.log")
    relay_site = Site.__new__(Site)  # stopped with the sites, by PID
    relay_site.name, relay_site.home, relay_site.agent = "Relay", relay_home, relay
    relay_site.is_relay = True
    sites.append(relay_site)
    relay.start()
    shell(f"Relay: device ID {relay_id}, listening on {relay.address}")

    laptop = Site(base, "Field laptop", discovery=False)
    sites.append(laptop)
    laptop.start()
    code = head.cli("pair", "invite", "-c", "orders", "--route", "relay", "--expires", "5m")
    laptop.cli("pair", "join", code.splitlines()[-1])
    laptop.stop()
    shell("the laptop paired once at the office (orders only, route relay), then left")
    for site in (head, laptop):
        _run(relay_home, "relay", "allow", site.device_id)
    laptop.cli("relay", "add", relay_id, "--address", relay.address)
    shell("operator: p2psync relay allow <ID> (each site); the laptop: p2psync relay add <relay>")

    say(
        "The head office records 300 orders, then adds the relay; its agent leaves what the "
        "laptop lacks there"
    )
    orders = base / "orders.jsonl"
    with orders.open("w") as out:
        for i in range(300):
            value = {"customer": "ACME", "qty": i % 7 + 1, "note": "SECRET-PRICE-4711"}
            out.write(json.dumps({"collection": "orders", "key": f"O-{i:04d}", "value": value}))
            out.write("\n")
    head.cli("put", "--from", str(orders))
    head.cli("relay", "add", relay_id, "--address", relay.address)
    _settle(lambda: _delivery(head, laptop) if "at relay" in _delivery(head, laptop) else "")
    shell(f"head office: p2psync peers  ->  {_delivery(head, laptop)}")
    shell(
        "    (the 300 orders, and the head office's other entries without their contents: "
        "the laptop checks every chain it holds)"
    )
    status = _run(relay_home, "relay", "status").splitlines()
    shell(f"relay: p2psync relay status  ->  {next(x for x in status if x.startswith('mail'))}")
    leaked = any(
        b"SECRET-PRICE-4711" in p.read_bytes() for p in relay_home.iterdir() if p.is_file()
    )
    shell(f"the relay's files hold the text of an order: {'YES' if leaked else 'no'}")

    say("Later the laptop, alone, syncs once; then records an order of its own and syncs again")
    for line in laptop.cli("sync").splitlines():
        shell(f"Field laptop: p2psync sync  ->  {line}")
    laptop.cli("put", "orders", "O-9001", '{"customer": "Field client", "qty": 2}')
    for line in laptop.cli("sync").splitlines():
        shell(f"Field laptop: p2psync sync  ->  {line}")
    wait_until(lambda: head.get("orders", "O-9001") is not None, timeout=30)
    shell("the head office's agent was told by the relay and applied O-9001 at once")
    wait_until(lambda: "acknowledged" in _delivery(head, laptop), timeout=30)
    shell(f"head office: p2psync peers  ->  {_delivery(head, laptop)}")


def _settle(read: Callable[[], str], quiet: float = 3.0, timeout: float = 60.0) -> str:
    """Wait until ``read()`` is not empty and has not changed for ``quiet`` seconds
    (a running agent deposits in batches)."""
    started = time.monotonic()
    last, since = "", time.monotonic()
    while time.monotonic() - started < timeout:
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= quiet:
            return now
        time.sleep(0.2)
    raise p2psync.P2PSyncError(f"the demo waited {timeout:g} s in vain")


def _run(home: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(home), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise p2psync.P2PSyncError(f"p2psync {' '.join(args[:2])} failed: {result.stderr}")
    return result.stdout


def _delivery(site: Site, peer: Site) -> str:
    """What ``peers`` says about envelopes to ``peer`` (the first such line)."""
    lines = site.cli("peers").splitlines()
    start = next((i for i, line in enumerate(lines) if peer.name in line), None)
    if start is None:
        return ""
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        if line.strip().startswith("by relay"):
            return line.strip()
    return ""


def _status(site: Site) -> dict[str, Any]:
    try:
        return json.loads(site.cli("status", "--json"))  # type: ignore[no-any-return]
    except (p2psync.P2PSyncError, ValueError):
        return {}


def _mdns_usable() -> bool:
    """Whether agents here can share UDP port 5353 (mDNS) as zeroconf does: not when
    another program holds it without sharing (avahi with disallow-other-stacks=yes).
    Binding sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(("", 5353))
        except OSError:
            return False
    return True


def _discovered(site: Site) -> set[str]:
    """Device IDs of the agents ``site`` has discovered on the LAN."""
    rows = json.loads(site.cli("peers", "--json"))
    return {r["device_id"] for r in rows if r["state"].startswith("disc")}


def _connections(site: Site) -> int:
    agent = _status(site).get("agent") or {}
    return len(agent.get("connections", []))


def _conflicts(site: Site) -> int:
    with p2psync.open(site.home) as db:
        return len(db.conflicts())
