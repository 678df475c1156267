"""Starting and stopping a real agent process: a start-up failure is one sentence
that says what to do; stopping is quick. Discovery, where used, is bound to
127.0.0.1 (nothing is sent on other interfaces)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import ifaddr
import pytest

from p2psync import home as home_mod
from p2psync.agent.process import AgentProcess
from p2psync.home import AGENT_FILE
from tests.agents import SpawnedAgent
from tests.lan import HOLD_MDNS_PORT, Lan, unavailable

pytestmark = pytest.mark.process

ABSENT_IP = "203.0.113.77"  # TEST-NET-3: documentation only, never this machine's


def _local_ips() -> set[str]:
    return {
        ip.ip if isinstance(ip.ip, str) else ip.ip[0]
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
    }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    home_mod.init(path, "home")
    return path


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 held by a program that is not an agent."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def run_agent(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``p2psync run`` expected to fail at start-up (killed after 30 s otherwise)."""
    return subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(home), "run", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def one_sentence(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("p2psync: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    return result.stderr.removeprefix("p2psync: ").strip()


def test_a_port_in_use_by_another_program(home: Path, listener: int) -> None:
    message = one_sentence(run_agent(home, "--listen", f"127.0.0.1:{listener}", "--no-discovery"))
    assert message == (
        f"127.0.0.1:{listener} is in use by another program; "
        "choose another port with --listen HOST:PORT"
    )


def test_a_second_home_on_the_port_of_a_running_agent(tmp_path: Path, home: Path) -> None:
    first = SpawnedAgent(tmp_path / "first", "first").init().start()
    try:
        message = one_sentence(run_agent(home, "--listen", first.address, "--no-discovery"))
    finally:
        first.stop()
    assert message.startswith(f"{first.address} is in use by another program")
    assert "--listen HOST:PORT" in message


def test_listening_on_an_address_that_is_not_this_machines(home: Path) -> None:
    assert ABSENT_IP not in _local_ips()
    message = one_sentence(run_agent(home, "--listen", f"{ABSENT_IP}:7717", "--no-discovery"))
    assert message.startswith(f"cannot listen on {ABSENT_IP}:7717: {ABSENT_IP} is not an address")
    assert "--listen HOST:PORT" in message


def test_a_relay_node_on_an_address_that_is_not_this_machines(tmp_path: Path) -> None:
    """The relay node says why as the agent does (it gave the bare OS error)."""
    relay = tmp_path / "relay"
    subprocess.run([sys.executable, "-m", "p2psync", "relay", "init", "--home", str(relay)],
                   capture_output=True, check=True, timeout=60)
    result = subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(relay), "relay", "serve",
         "--listen", f"{ABSENT_IP}:7720"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    message = one_sentence(result)
    assert message.startswith(f"cannot listen on {ABSENT_IP}:7720: {ABSENT_IP} is not an address")
    assert "--listen HOST:PORT" in message


def test_discovery_on_an_address_that_is_not_this_machines(home: Path) -> None:
    assert ABSENT_IP not in _local_ips()
    result = run_agent(home, "--listen", "127.0.0.1:0", "--discovery-interface", ABSENT_IP)
    message = one_sentence(result)
    assert message.startswith(f"{ABSENT_IP} is not an address of this machine")
    assert "127.0.0.1" in message and "--discovery-interface" in message


@pytest.mark.parametrize("interface", ["nonsense", "::1", "127.0.0.1:5353"])
def test_discovery_on_something_that_is_not_an_ipv4_address(home: Path, interface: str) -> None:
    result = run_agent(home, "--listen", "127.0.0.1:0", "--discovery-interface", interface)
    message = one_sentence(result, code=2)  # a usage error, like a malformed --listen
    assert message.startswith(f"--discovery-interface takes an IPv4 address, not {interface!r}")


def test_discovery_when_listening_on_ipv6_only(home: Path) -> None:
    if "::1" not in _local_ips():
        pytest.skip("no ::1 here")
    message = one_sentence(run_agent(home, "--listen", "[::1]:0"))
    assert message.startswith("discovery works over IPv4 only")
    assert "--no-discovery" in message


@pytest.mark.lan
@pytest.mark.skipif(unavailable() is not None, reason=f"no namespace: {unavailable()}")
def test_discovery_where_another_program_holds_the_mdns_port(home: Path) -> None:
    lan = Lan(1)  # a namespace of its own: no agent of this machine loses mDNS meanwhile
    try:
        holder = lan.spawn(1, sys.executable, "-c", HOLD_MDNS_PORT)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = lan.p2psync(1, home, "run", "--listen", "127.0.0.1:0")
    finally:
        lan.close()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    # zeroconf logs its own error line first; ours is the last
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("p2psync: cannot use mDNS: another program holds UDP port 5353")
    assert "--no-discovery" in last


STOP_WITHIN = 1.0  # seconds from the signal to the exit; a user waits for the prompt


@pytest.mark.parametrize(
    ("signum", "after"),
    [
        (signal.SIGTERM, 0.0),  # still probing and announcing on mDNS
        (signal.SIGINT, 0.0),
        (signal.SIGTERM, 0.5),
        (signal.SIGINT, 2.5),  # advertised: it says goodbye
    ],
)
def test_stopping_is_quick(home: Path, signum: signal.Signals, after: float) -> None:
    agent = AgentProcess(home, args=["--discovery-interface", "127.0.0.1"])
    agent.start()
    try:
        time.sleep(after)
        assert agent.process is not None
        signalled = time.monotonic()
        agent.process.send_signal(signum)
        code = agent.process.wait(timeout=10)
        took = time.monotonic() - signalled
        assert agent.process.stdout is not None
        assert agent.process.stdout.read().strip() == "stopped"
    finally:
        agent.stop()
    assert code == 0
    assert not (home / AGENT_FILE).exists()
    assert took < STOP_WITHIN, f"stopping took {took:.2f} s"
