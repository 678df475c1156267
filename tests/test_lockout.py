"""Issue 13, items 1 and 2: no cheap lock-out of a running agent, and no queue a
peer can grow by not reading.

The attacker sits at another address (127.0.0.2: a host on the same network) and
floods the agent's listening port, while a paired peer and an invite holder at
127.0.0.1 try to get in:

* 32 connections that each send one byte (the first handshake message is 32
  bytes), reopened whenever the agent drops one;
* 24 throwaway identities that complete the handshake and then stay silent
  (strangers: they may only exchange rule objects).

And a paired peer that sends Pings and never reads: the agent keeps at most one
Pong for it, not one per Ping.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.core import messages
from p2psync.core.identity import Identity
from p2psync.core.rules import Terms
from p2psync.net.oneshot import join_once, sync_once
from p2psync.net.transport import secure
from tests.test_pairing import key
from tests.test_pairing_hostile import mutual

pytestmark = pytest.mark.process

MakeDb = Callable[[str], p2psync.Database]
ATTACKER = "127.0.0.2"


async def start(nursery: trio.Nursery, db: p2psync.Database) -> Agent:
    agent = Agent(db, [("127.0.0.1", 0)], AgentConfig(discovery=False))
    await nursery.start(agent.run)
    return agent


def port_of(agent: Agent) -> int:
    return int(agent.addresses[0].rsplit(":", 1)[1])


async def one_byte_flood(nursery: trio.Nursery, port: int, count: int, opened: list[int]) -> None:
    """``count`` sockets from ATTACKER each sending one byte, reopened when dropped."""

    async def one() -> None:
        while True:
            sock = trio.socket.socket()
            try:
                await sock.bind((ATTACKER, 0))
                await sock.connect(("127.0.0.1", port))
                opened[0] += 1
                await sock.send(b"\x00")
                while await sock.recv(1024):
                    pass
            except OSError:
                await trio.sleep(0.005)
            finally:
                sock.close()

    for _ in range(count):
        nursery.start_soon(one)


async def stranger_flood(
    nursery: trio.Nursery, port: int, count: int, held: list[int], source: str = ATTACKER
) -> None:
    """``count`` throwaway identities from ``source`` completing the handshake and
    holding the connection silently, each reconnecting when dropped."""

    async def one() -> None:
        while True:
            try:
                sock = trio.socket.socket()
                await sock.bind((source, 0))
                await sock.connect(("127.0.0.1", port))
                stream = trio.SocketStream(sock)
                secured = await secure(
                    stream, Identity(os.urandom(32)), initiator=True, name="flood", timeout=5
                )
                held[0] += 1
                try:
                    while True:
                        await secured.receive()
                except Exception:
                    pass
                finally:
                    held[0] -= 1
                    await secured.aclose()
            except Exception:
                await trio.sleep(0.01)

    for _ in range(count):
        nursery.start_soon(one)


async def test_a_paired_peer_gets_in_while_32_one_byte_sockets_flood_the_agent(
    make_db: MakeDb,
) -> None:
    a, b = make_db("a"), make_db("b")
    mutual(a, b)
    b.put("c", "k", 1)
    async with trio.open_nursery() as nursery:
        agent_a = await start(nursery, a)
        opened = [0]
        await one_byte_flood(nursery, port_of(agent_a), 32, opened)
        with trio.fail_after(5):
            while opened[0] < 32:
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # the flood holds every slot it can
        b.store.add_peer(key(a), "a", [agent_a.addresses[0]], p2psync.clock.now_ms())
        for _ in range(3):  # again and again, while the flood goes on
            [outcome] = await sync_once(b, [key(a)], None, timeout=10)
            assert outcome.synced, outcome
        nursery.cancel_scope.cancel()
    assert a.get("c", "k") == 1


async def test_an_invite_holder_gets_in_while_throwaway_identities_flood_the_agent(
    make_db: MakeDb,
) -> None:
    a, c = make_db("a"), make_db("c")
    a.put("vouchers", "V-1", 1)
    code = pairing.parse_invite(pairing.create_invite(a, Terms.make(["vouchers"]), 600, []))
    async with trio.open_nursery() as nursery:
        agent_a = await start(nursery, a)
        held = [0]
        await stranger_flood(nursery, port_of(agent_a), 24, held)
        with trio.fail_after(10):
            while held[0] < 12:
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        outcome = await join_once(c, pairing.JoinTicket.of(code), agent_a.addresses, timeout=10)
        assert outcome.rule is not None, outcome
        nursery.cancel_scope.cancel()
    assert c.get("vouchers", "V-1") == 1 or outcome.rule is not None


async def test_a_paired_peer_that_pings_and_never_reads_gets_at_most_one_pong_queued(
    make_db: MakeDb,
) -> None:
    """The agent's writer stalls on a peer that reads nothing (its receive buffer is
    tiny here); the reader keeps taking its Pings. One Pong waits, not one a Ping."""
    a, b = make_db("a"), make_db("b")
    mutual(a, b)
    async with trio.open_nursery() as nursery:
        agent_a = await start(nursery, a)
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port_of(agent_a)))
        secured = await secure(trio.SocketStream(sock), b.identity, initiator=True, name="b")
        digest = messages.rules_digest(b.store.rule_objects(None))
        await secured.send(messages.encode(messages.RulesHeld(digest, True)))
        await secured.send(messages.encode(messages.Have({})))
        for nonce in range(60_000):
            await secured.send(messages.encode(messages.Ping(nonce)))
        await trio.sleep(0.5)
        [conn] = [c for c in agent_a.registry.all() if c.peer == key(b)]
        assert conn.machine is not None
        queued = conn.machine.take_outbox(trio.current_time())
        pongs = [m for m in queued if isinstance(m, messages.Pong)]
        assert len(pongs) <= 1, f"{len(pongs)} Pongs queued for a peer that reads nothing"
        assert not pongs or pongs[0].nonce == 59_999  # the latest one
        await secured.aclose()
        nursery.cancel_scope.cancel()
