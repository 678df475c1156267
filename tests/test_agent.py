"""Two and three real agent processes over loopback."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import time
from collections.abc import Callable

import pytest

import p2psync
from tests.agents import SpawnedAgent, cli, value_at, wait_for

pytestmark = pytest.mark.process

Make = Callable[[str], SpawnedAgent]


def pair_up(*agents: SpawnedAgent) -> None:
    for a in agents:
        for b in agents:
            if a is not b:
                a.pair(b)


def test_two_agents_sync_live(agents: Make) -> None:
    a, b = agents("a").start(), agents("b").start()
    pair_up(a, b)
    with a.db() as db:
        db.put("vouchers", "V-1", {"amount": 5})  # from another process than the agent
    wait_for(lambda: value_at(b, "vouchers", "V-1") == {"amount": 5}, timeout=5)
    cli(b.home, "put", "vouchers", "V-2", '{"amount": 7}')
    wait_for(lambda: value_at(a, "vouchers", "V-2") == {"amount": 7}, timeout=5)
    status = a.status()
    [connection] = status["agent"]["connections"]  # both dialled: exactly one connection kept
    assert status["running"] and connection["device_id"] == b.device_id
    peers = json.loads(cli(a.home, "peers", "--json"))
    assert peers[0]["connected"] and peers[0]["state"] == "paired"
    agent_file = json.loads((a.home / "agent.json").read_text())
    assert agent_file["pid"] == a.pid and agent_file["listen"] == [a.address]
    assert a.stop() == 0
    assert not (a.home / "agent.json").exists()


def test_entries_travel_through_a_middle_agent(agents: Make) -> None:
    a, b, c = agents("a").start(), agents("b").start(), agents("c").start()
    pair_up(a, b)
    pair_up(b, c)  # a and c never meet
    cli(a.home, "put", "stock", "bolts", '{"qty": 1}')
    wait_for(lambda: value_at(c, "stock", "bolts") == {"qty": 1}, timeout=5)
    cli(c.home, "put", "stock", "nuts", '{"qty": 2}')
    wait_for(lambda: value_at(a, "stock", "nuts") == {"qty": 2}, timeout=5)


def test_a_stopped_agent_catches_up_when_restarted(agents: Make) -> None:
    a, b = agents("a").start(), agents("b").start()
    pair_up(a, b)
    cli(a.home, "put", "c", "before", "1")
    wait_for(lambda: value_at(b, "c", "before") == 1)
    b.stop()
    for i in range(3):
        cli(a.home, "put", "c", f"while-down-{i}", str(i))
    with a.db() as db:
        db.write([p2psync.Change(p2psync.OpKind.PUT, "c", f"bulk{i}", i)] for i in range(500))
    b.start()
    wait_for(lambda: value_at(b, "c", "bulk499") == 499, timeout=10)
    assert value_at(b, "c", "while-down-2") == 2


def test_an_unpaired_agent_gets_nothing_and_can_be_rejected(agents: Make) -> None:
    a = agents("a").start()
    stranger = agents("stranger").start()
    stranger.pair(a)  # a pairing request a never asked for
    cli(stranger.home, "put", "c", "k", "1")
    cli(a.home, "put", "c", "secret", "1")
    out = cli(stranger.home, "sync", "--timeout", "5", check=False)
    assert "NOT in sync" in out and "awaits approval" in out
    with a.db() as db:
        assert db.authors()[0].seq == 1 and db.get("c", "k") is None  # nothing of its data
    assert value_at(stranger, "c", "secret") is None  # and nothing of ours
    pending = json.loads(cli(a.home, "pair", "pending", "--json"))
    assert pending[0]["peer_name"] == "stranger" and pending[0]["awaiting"] == "you"
    cli(a.home, "pair", "reject", "stranger", "--reason", "we do not know you")
    cli(stranger.home, "sync", "--timeout", "5", check=False)  # hears the answer
    [row] = json.loads(cli(stranger.home, "peers", "--json"))
    assert row["state"] == "rejected by them: we do not know you"


def test_hostile_connections_do_not_disturb_the_agent(agents: Make) -> None:
    a, b = agents("a").start(), agents("b").start()
    pair_up(a, b)
    host, port = a.address.rsplit(":", 1)
    attacks = [
        struct.pack(">I", 0xFFFFFFFF),  # a 4 GiB frame announced
        os.urandom(5000),  # garbage instead of a handshake
        struct.pack(">I", 32) + os.urandom(32) + struct.pack(">I", 3000) + os.urandom(3000),
        b"",  # connect and say nothing
    ]
    sockets = []
    for attack in attacks:
        sock = socket.create_connection((host, int(port)))
        if attack:
            with contextlib.suppress(OSError):
                sock.sendall(attack)
        sockets.append(sock)
    cli(a.home, "put", "c", "still", "1")
    wait_for(lambda: value_at(b, "c", "still") == 1, timeout=5)
    for sock in sockets:
        sock.close()
    assert a.running
    assert "refused connection" in a.log.read_text()


def test_a_flood_of_silent_connections_does_not_starve_known_peers(agents: Make) -> None:
    a, b = agents("a").start(), agents("b").start()
    pair_up(a, b)
    host, port = a.address.rsplit(":", 1)
    flood = [socket.create_connection((host, int(port))) for _ in range(60)]
    try:
        wait_for(lambda: "to make room" in a.log.read_text(), timeout=10)  # the flood evicts itself
        cli(b.home, "put", "c", "through", "1")
        wait_for(lambda: value_at(a, "c", "through") == 1, timeout=10)
        assert a.running
    finally:
        for sock in flood:
            sock.close()


def test_on_demand_sync_without_an_agent(agents: Make) -> None:
    a = agents("a").start()
    b = agents("b")  # never started
    a.pair(b, with_address=False)
    b.pair(a)
    with a.db() as db:
        db.write([p2psync.Change(p2psync.OpKind.PUT, "c", f"k{i}", i)] for i in range(300))
    out = cli(b.home, "sync")
    assert "in sync (received 300, sent 0)" in out
    assert value_at(b, "c", "k299") == 299
    assert cli(b.home, "sync", a.device_id).strip().endswith("sent 0)")
    assert cli(b.home, "verify").startswith("300 entries from 1 author verified")


def test_sync_through_a_running_agent(agents: Make) -> None:
    a, b = agents("a").start(), agents("b").start()
    pair_up(a, b)
    cli(a.home, "put", "c", "k", "1")
    out = cli(b.home, "sync", "--timeout", "10")
    assert "in sync" in out
    assert value_at(b, "c", "k") == 1


def test_sync_through_an_agent_that_cannot_get_in_step_says_why_at_once(
    agents: Make,
) -> None:
    """c shares only vouchers with b, so b holds c's entries without their payroll
    payloads and cannot give them to a, whose rule with b covers payroll: `sync`
    through a's agent ends as soon as all else has flowed, with the reason, rather
    than at its timeout."""
    a, b = agents("a").start(), agents("b").start()
    c = agents("c")  # never started: syncs on demand
    pair_up(a, b)
    cli(c.home, "pair", "add", b.device_id, "--address", b.address, "--collection", "vouchers")
    b.pair(c, with_address=False)
    cli(c.home, "put", "payroll", "eve", "1")
    cli(c.home, "put", "vouchers", "V-9", "9")
    cli(b.home, "put", "vouchers", "V-10", "10")
    cli(c.home, "sync", b.device_id, "--address", b.address, "--timeout", "10")
    wait_for(lambda: value_at(b, "vouchers", "V-9") == 9, timeout=10)
    wait_for(lambda: value_at(a, "vouchers", "V-10") == 10, timeout=10)
    started = time.monotonic()
    out = cli(a.home, "sync", b.device_id, "--timeout", "20", check=False)
    assert time.monotonic() - started < 5
    assert "NOT in sync" in out and "'payroll'" in out
    assert "leave it out of the rule with the sender" in out
    assert out.count("not in sync") == 0  # said once, by the CLI


def test_the_live_sender_hears_why_its_peer_cannot_get_in_step(agents: Make) -> None:
    """Issue 13 item 6: the same refusal, seen from b, which sent the entries and
    believed them delivered: `sync` through b's agent says why at once too, and
    b's `peers` shows it, while the connection stays up."""
    a, b = agents("a").start(), agents("b").start()
    c = agents("c")
    pair_up(a, b)
    cli(c.home, "pair", "add", b.device_id, "--address", b.address, "--collection", "vouchers")
    b.pair(c, with_address=False)
    cli(c.home, "put", "payroll", "eve", "1")
    cli(c.home, "put", "vouchers", "V-9", "9")
    cli(c.home, "sync", b.device_id, "--address", b.address, "--timeout", "10")
    wait_for(lambda: value_at(b, "vouchers", "V-9") == 9, timeout=10)
    started = time.monotonic()
    out = cli(b.home, "sync", a.device_id, "--timeout", "20", check=False)
    assert time.monotonic() - started < 5, out
    assert "NOT in sync" in out and "the peer refused what we sent" in out, out
    assert "'payroll'" in out, out
    wait_for(lambda: "cannot get in step" in cli(b.home, "peers"), timeout=5)
    [row] = [r for r in json.loads(cli(b.home, "peers", "--json")) if r["name"] == "a"]
    assert row["connected"] and "the peer refused what we sent" in row["problem"], row


def test_second_agent_on_one_home_is_refused(agents: Make) -> None:
    a = agents("a").start()
    second = SpawnedAgent(a.home, "a-again")
    with pytest.raises(AssertionError, match="already running"):
        second.start()


@pytest.mark.slow
def test_kill_9_of_the_receiver_mid_sync(agents: Make) -> None:
    """20 times: kill the receiving agent at a random moment, restart it; in the end
    it holds every entry exactly once and verifies."""
    a, b = agents("a").start(), agents("b")
    with a.db() as db:
        db.write(
            [p2psync.Change(p2psync.OpKind.PUT, "bench", f"k{i}", {"i": i, "pad": "x" * 80})]
            for i in range(30_000)
        )
    a.pair(b, with_address=False)
    b.pair(a)
    rng = random.Random(os.getpid())
    seen = 0
    for _ in range(20):
        b.start()
        time.sleep(rng.uniform(0.0, 0.6))
        b.kill9()
        with b.db() as db:
            report = db.verify()
            assert report.ok, report.problems
            held = sum(x.seq for x in db.authors())
            assert held >= seen  # nothing committed was lost
            seen = held
    b.start()
    wait_for(lambda: value_at(b, "bench", "k29999") == {"i": 29999, "pad": "x" * 80}, 60)
    with b.db() as db:
        assert db.verify().entries == 30_000
        count = db.store._reader.conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        assert count == 30_000 and len(list(db.scan("bench"))) == 30_000


def discovered_by(agent: SpawnedAgent) -> set[str]:
    rows = json.loads(cli(agent.home, "peers", "--json"))
    return {row["device_id"] for row in rows if row["state"] == "discovered (not paired)"}


def test_a_rule_can_be_proposed_to_an_agent_only_discovered(agents: Make) -> None:
    """`p2psync peers` lists agents found on the LAN; proposing to one by its name or
    the first characters of its ID finds it too, and uses its advertised address.
    (mDNS on 127.0.0.1 only: nothing goes out on other interfaces.)"""
    a, b, c = agents("a"), agents("b"), agents("c")
    for agent in (a, b, c):
        agent.args = ["--discovery-interface", "127.0.0.1"]
        agent.start()
    wait_for(lambda: discovered_by(a) >= {b.device_id, c.device_id}, timeout=15)
    assert "proposed to b" in cli(a.home, "rule", "propose", "b", "-c", "vouchers")
    assert "proposed to c" in cli(a.home, "rule", "propose", c.device_id[:6].lower())
    with a.db() as db:
        known = {p.name: p for p in db.store.peers()}
    assert set(known) == {"b", "c"} and known["b"].addresses == (b.address,)

    def asked(agent: SpawnedAgent) -> bool:
        return any(
            row["peer"] == a.device_id and row["awaiting"] == "you"
            for row in json.loads(cli(agent.home, "pair", "pending", "--json"))
        )

    wait_for(lambda: asked(b) and asked(c), timeout=15)
