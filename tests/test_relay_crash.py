"""kill -9 of a relay process in the middle of deposits and of fetch+delete, 20
runs each: restarted, it holds every envelope it answered "stored" for (with
its T), and serves nothing it answered "deleted" for.

The agents here are relay clients driven directly (``net/relayclient.py``) so
the kill can land between any two requests of a pipelined stream.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import trio

from p2psync.agent.process import AgentProcess
from p2psync.clock import now_ms
from p2psync.core.envelope import EnvelopeClass, read_header, seal_envelope
from p2psync.core.identity import Identity
from p2psync.core.policy import sign_policy
from p2psync.core.relaywire import Duplicate, Stored
from p2psync.errors import P2PSyncError
from p2psync.net.relayclient import open_relay
from p2psync.relay import home as relay_home
from p2psync.relay.admission import Admission
from p2psync.store.relays import Relay

pytestmark = [pytest.mark.process, pytest.mark.slow]

RUNS = 20
SENDER = Identity(bytes([1]) * 32)
RECIPIENT = Identity(bytes([2]) * 32)


class Node:
    def __init__(self, tmp_path: Path) -> None:
        home = relay_home.init(tmp_path / "relay", "crashy")
        settings = json.loads((home.path / relay_home.SETTINGS_FILE).read_text())
        settings["limits"]["pair_count"] = 100_000  # one sender deposits thousands here
        (home.path / relay_home.SETTINGS_FILE).write_text(json.dumps(settings))
        admission = Admission(home.path)
        for identity in (SENDER, RECIPIENT):
            admission.allow(identity.public_key, now_ms())
        self.key = home.identity.public_key
        self.process = AgentProcess(
            home.path, command=("relay", "serve"), log=tmp_path / "relay.log"
        )

    def start(self) -> Relay:
        self.process.start()
        return Relay(self.key, (self.process.address,))

    def kill(self) -> None:
        self.process.kill9()


def envelope(seq: int) -> bytes:
    payload = seq.to_bytes(8, "big") * 16
    return seal_envelope(
        SENDER, RECIPIENT.public_key, seq, EnvelopeClass.DATA, 0, payload, os.urandom(32)
    )


async def held(relay: Relay) -> dict[int, int]:
    """seq -> T of every envelope the relay serves the recipient."""
    found: dict[int, int] = {}
    async with open_relay(RECIPIENT, "recipient", relay) as client:
        async for one in client.fetch_all():
            header = read_header(one.envelope)
            assert header.seq not in found, "served twice in one fetch"
            found[header.seq] = one.until_ms
    return found


async def open_mailbox(relay: Relay) -> None:
    async with open_relay(RECIPIENT, "recipient", relay) as client:
        await client.set_policy(sign_policy(RECIPIENT, 1, [SENDER.public_key], now_ms()))


async def deposit_until_killed(
    relay: Relay, node: Node, first: int, delay: float, stored: dict[int, int]
) -> int:
    """Deposit envelopes first, first+1, ... until the relay is killed after
    ``delay``; every "stored"/"duplicate" answer goes in ``stored``. The next seq."""
    seq = first
    async with trio.open_nursery() as nursery:

        async def killer() -> None:
            await trio.sleep(delay)
            await trio.to_thread.run_sync(node.kill)

        nursery.start_soon(killer)
        try:
            async with open_relay(SENDER, "sender", relay) as client:
                while True:
                    batch = [envelope(s) for s in range(seq, seq + 8)]
                    answers = await client.deposit_all(batch)
                    for s, answer in zip(range(seq, seq + 8), answers, strict=True):
                        assert isinstance(answer, Stored | Duplicate), answer
                        stored[s] = answer.until_ms
                    seq += 8
        except P2PSyncError:
            pass  # the relay was killed mid-stream
    return seq


def test_kill_9_during_deposits_loses_nothing_stored(tmp_path: Path) -> None:
    node = Node(tmp_path)
    rng = random.Random(201)
    stored: dict[int, int] = {}
    seq = 1
    try:
        relay = node.start()
        trio.run(open_mailbox, relay)
        for _ in range(RUNS):
            seq = trio.run(deposit_until_killed, relay, node, seq, rng.uniform(0.05, 0.4), stored)
            relay = node.start()
            served = trio.run(held, relay)
            missing = sorted(s for s in stored if s not in served)
            assert not missing, f"stored but lost: {missing[:10]}"
            assert all(served[s] == stored[s] for s in stored), "a held envelope's T changed"
    finally:
        node.process.stop()
    assert len(stored) > RUNS * 8


async def delete_until_killed(
    relay: Relay,
    node: Node,
    rng: random.Random,
    delay: float,
    deleted: set[int],
    asked: set[int],
) -> None:
    """Fetch and delete random envelopes until the relay is killed after
    ``delay``; every deletion answered goes in ``deleted``."""
    async with trio.open_nursery() as nursery:

        async def killer() -> None:
            await trio.sleep(delay)
            await trio.to_thread.run_sync(node.kill)

        nursery.start_soon(killer)
        try:
            async with open_relay(RECIPIENT, "recipient", relay) as client:
                while True:
                    batch = (await client.fetch(0, 20)).held
                    seqs = [read_header(h.envelope).seq for h in batch]
                    chosen = rng.sample(seqs, min(len(seqs), rng.randint(1, 5)))
                    asked.update(chosen)  # asked: may be gone even if the answer is lost
                    await client.delete([(SENDER.public_key, s) for s in chosen])
                    deleted.update(chosen)
        except P2PSyncError:
            pass


async def fill(relay: Relay, first: int, count: int) -> dict[int, int]:
    async with open_relay(SENDER, "sender", relay) as client:
        seqs = range(first, first + count)
        answers = await client.deposit_all([envelope(s) for s in seqs])
    return {s: a.until_ms for s, a in zip(seqs, answers, strict=True) if isinstance(a, Stored)}


def test_kill_9_during_fetch_and_delete_serves_nothing_deleted(tmp_path: Path) -> None:
    node = Node(tmp_path)
    rng = random.Random(202)
    deleted: set[int] = set()
    asked: set[int] = set()
    stored: dict[int, int] = {}
    try:
        relay = node.start()
        trio.run(open_mailbox, relay)
        for run in range(RUNS):
            stored |= trio.run(fill, relay, 1 + run * 100, 100)
            delay = rng.uniform(0.02, 0.3)
            trio.run(delete_until_killed, relay, node, rng, delay, deleted, asked)
            relay = node.start()
            served = trio.run(held, relay)
            again = sorted(set(served) & deleted)
            assert not again, f"deleted but served again: {again[:10]}"
            lost = sorted(s for s in stored if s not in asked and s not in served)
            assert not lost, f"neither deleted nor served: {lost[:10]}"
    finally:
        node.process.stop()
    assert len(deleted) > RUNS * 3
