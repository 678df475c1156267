"""A throwaway LAN of Linux network namespaces for tests (root only).

Topology: a "switch" namespace holding bridge ``br0`` (STP off, multicast
snooping off, no addresses), and hosts ``<prefix>-h<i>`` each with ``eth0`` =
``10.98.0.<i>/24`` cabled to the bridge by a veth pair, ``lo`` up and a route
for ``224.0.0.0/4`` so mDNS has an egress. Nothing is configured in the root
namespace: the veth pairs are created inside the switch and host namespaces.

Faults (nftables, bridge family, in the switch): partition two hosts, random
frame loss. Everything started in a host is tracked and ended by PID; the
namespaces are deleted on close.

Adapted from the team's verified recipe (``shared/lan``), which a user's clone
does not have.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

NET = "10.98.0"

HOLD_MDNS_PORT = """
import socket, time
held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
held.bind(("", 5353))  # no SO_REUSEADDR: nobody else may bind it
print("held", flush=True)
time.sleep(300)
"""
"""``python -c`` this in a host: a program holding the mDNS port without sharing it
(as avahi with disallow-other-stacks=yes); it prints ``held`` once it does."""


def unavailable() -> str | None:
    """Why a LAN cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = subprocess.run(["ip", "netns", "help"], capture_output=True, text=True, check=False)
    if "netns add" not in probe.stdout + probe.stderr:
        return "this 'ip' has no netns support"
    return None


def run(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, **kw)


class Lan:
    def __init__(self, hosts: int, prefix: str | None = None) -> None:
        self.prefix = prefix or f"p2pt{os.getpid() % 100000}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = hosts
        self.processes: list[subprocess.Popen[str]] = []
        self._nft = False
        try:
            self._up()
        except BaseException:
            self.close()
            raise

    def host(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def ip(self, i: int) -> str:
        return f"{NET}.{i}"

    def _up(self) -> None:
        run("ip", "netns", "add", self.switch)
        run("ip", "-n", self.switch, "link", "set", "lo", "up")
        run(
            "ip",
            "netns",
            "exec",
            self.switch,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            check=False,
        )
        run(
            "ip",
            "-n",
            self.switch,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        )
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i in range(1, self.hosts + 1):
            host = self.host(i)
            run("ip", "netns", "add", host)
            run("ip", "-n", host, "link", "set", "lo", "up")
            run(
                "ip",
                "netns",
                "exec",
                host,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                check=False,
            )
            run(
                "ip",
                "link",
                "add",
                "name",
                f"p{i}",
                "netns",
                self.switch,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host,
            )
            run("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            run("ip", "-n", self.switch, "link", "set", f"p{i}", "up")
            run("ip", "-n", host, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            run("ip", "-n", host, "link", "set", "eth0", "up")
            run("ip", "-n", host, "route", "add", "224.0.0.0/4", "dev", "eth0")

    # ---------------------------------------------------------------- processes

    def exec(self, i: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.host(i), *args, check=False, timeout=timeout)

    def spawn(
        self,
        i: int,
        *args: str,
        stdout: int | IO[str] = subprocess.PIPE,
        stderr: int | IO[str] = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.host(i), *args],
            stdout=stdout,
            stderr=stderr,
            text=True,
        )
        self.processes.append(process)
        return process

    def p2psync(self, i: int, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.exec(i, sys.executable, "-m", "p2psync", "--home", str(home), *args)

    # ---------------------------------------------------------------- faults

    def _ensure_nft(self) -> None:
        if self._nft:
            return
        if shutil.which("nft") is None:
            raise RuntimeError("partitions and loss need nftables: apt-get install -y nftables")
        ruleset = (
            "table bridge p2ptest {\n"
            "  set parts { type ifname . ifname; }\n"
            "  chain filt {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            "    iifname . oifname @parts drop\n"
            "  }\n"
            "  chain loss {\n"
            "    type filter hook forward priority 1; policy accept;\n"
            "  }\n"
            "}\n"
        )
        run("ip", "netns", "exec", self.switch, "nft", "-f", "-", input=ruleset)
        self._nft = True

    def partition(self, i: int, j: int) -> None:
        self._ensure_nft()
        run(
            "ip",
            "netns",
            "exec",
            self.switch,
            "nft",
            "add",
            "element",
            "bridge",
            "p2ptest",
            "parts",
            f'{{ "p{i}" . "p{j}", "p{j}" . "p{i}" }}',
        )

    def heal(self) -> None:
        self._ensure_nft()
        run("ip", "netns", "exec", self.switch, "nft", "flush", "set", "bridge", "p2ptest", "parts")

    def loss(self, percent: int) -> None:
        self._ensure_nft()
        run(
            "ip", "netns", "exec", self.switch, "nft", "flush", "chain", "bridge", "p2ptest", "loss"
        )
        if percent:
            run(
                "ip",
                "netns",
                "exec",
                self.switch,
                "nft",
                "add",
                "rule",
                "bridge",
                "p2ptest",
                "loss",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                str(percent),
                "drop",
            )

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for i in range(1, self.hosts + 1):
            self._kill_inside(self.host(i))
            run("ip", "netns", "del", self.host(i), check=False)
        run("ip", "netns", "del", self.switch, check=False)

    @staticmethod
    def _kill_inside(namespace: str) -> None:
        """End anything still running in a namespace we made (by PID)."""
        pids = run("ip", "netns", "pids", namespace, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
