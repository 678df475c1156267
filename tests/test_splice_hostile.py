"""Agents spliced through a hostile relay (issue 11), in process over loopback
sockets with a scripted relay (``tests/relayfake.py``): the relay splices A to
the wrong peer (the handshake inside refuses it), or flips a byte in the spliced
stream (the session detects it, ends, and the agents splice again; nothing bad is
applied). The agents have no address for each other: only the relay joins them."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.core import relaywire as wire
from p2psync.core.identity import Identity
from p2psync.core.rules import Route, Terms
from p2psync.store import relays as relays_mod
from tests.relayfake import FakeRelay, Session, open_fake_relay
from tests.test_mail import pair

pytestmark = pytest.mark.process

MakeDb = Callable[[str], p2psync.Database]


async def start(nursery: trio.Nursery, db: p2psync.Database, relay: FakeRelay) -> Agent:
    relays_mod.put(db.store, relay.target)
    agent = Agent(db, [("127.0.0.1", 0)], AgentConfig(discovery=False))
    await nursery.start(agent.run)
    return agent


def live(agent: Agent, peer: p2psync.Database) -> str | None:
    conn = agent.registry.get(peer.identity.public_key)
    if conn is None or conn.machine is None or not conn.machine.synced:
        return None
    return "relay" if conn.via is not None else "direct"


async def until(check: Callable[[], object], timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)


async def test_a_relay_that_splices_a_to_the_wrong_peer_is_refused_by_the_handshake(
    make_db: MakeDb, caplog: pytest.LogCaptureFixture
) -> None:
    """A asks for B; the relay answers with an invitation and, when A joins, splices
    it to someone else (here: itself, with a key of its own, posing as B). A's
    handshake inside expects B's key: it fails, A never counts a session with B, and
    asks again later (each time refused the same way)."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["orders"], route=Route.RELAY))
    async with open_fake_relay() as relay, trio.open_nursery() as nursery:
        relay.impersonate = Identity(os.urandom(32))
        agent_a = await start(nursery, a, relay)
        await until(lambda: relay.impostor_results, timeout=30)
        await trio.sleep(0.5)
        assert agent_a.registry.get(b.identity.public_key) is None
        assert not any(c.peer == b.identity.public_key for c in agent_a.registry.all())
        nursery.cancel_scope.cancel()
    assert all(r.startswith("handshake failed") for r in relay.impostor_results), (
        relay.impostor_results
    )
    assert "splice with" in caplog.text and "refused" in caplog.text


async def test_a_flipped_byte_in_the_splice_ends_the_session_and_nothing_bad_is_applied(
    make_db: MakeDb,
) -> None:
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["orders"], route=Route.AUTO))
    for i in range(50):
        a.put("orders", f"o{i}", {"n": i, "pad": "x" * 200})
    flipped: list[int] = []

    def tamper(device: bytes, offset: int, chunk: bytes) -> bytes:
        # once, in A's direction, well into the stream (past both handshakes)
        at = 4000 - offset
        if device == a.identity.public_key and not flipped and 0 <= at < len(chunk):
            flipped.append(offset + at)
            return chunk[:at] + bytes([chunk[at] ^ 0x01]) + chunk[at + 1 :]
        return chunk

    async def no_mailbox(session: Session, request: wire.Request) -> bool:
        if isinstance(request, wire.Deposit):  # only the splice carries anything
            await session.send(wire.Refused(request.rid, wire.RefusalCode.FULL, "full"))
            return True
        return False

    async with open_fake_relay() as relay, trio.open_nursery() as nursery:
        relay.tamper = tamper
        relay.script = no_mailbox
        agent_a = await start(nursery, a, relay)
        agent_b = await start(nursery, b, relay)
        await until(lambda: flipped)
        await until(lambda: b.get("orders", "o49") is not None, timeout=60)
        assert relay.splices >= 2  # the tampered splice ended; a new one carried the rest
        # the last record is applied a moment before the session counts as in step
        await until(lambda: live(agent_a, b) == "relay" or live(agent_b, a) == "relay", 10)
        nursery.cancel_scope.cancel()
    assert [b.get("orders", f"o{i}") for i in range(50)] == [
        {"n": i, "pad": "x" * 200} for i in range(50)
    ]
    assert b.verify().ok
