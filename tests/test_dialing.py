"""The agent's dialers, LAN hints and connection caps, in process over real
loopback sockets: an advertised address that keeps failing is dropped, one where
the handshake proved the peer's key comes first, an impostor's is dropped at
once; strangers are capped without locking out a paired peer."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from functools import partial

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.agent import agent as agent_mod
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.clock import now_ms
from p2psync.core.identity import Identity
from p2psync.core.rules import Terms
from p2psync.core.session import SessionConfig
from p2psync.net.adverts import MAX_FAILURES, AdvertTable
from p2psync.net.link import PairLink
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from p2psync.net.transport import SecureStream, secure

pytestmark = pytest.mark.process

MakeDb = Callable[[str], p2psync.Database]


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hint(agent: Agent, key: bytes, *addresses: str) -> AdvertTable:
    """As if ``key`` had been advertised on the LAN at ``addresses``."""
    agent.adverts.advertised("advert", key, "peer", addresses, now_ms())
    return agent.adverts


async def start(nursery: trio.Nursery, db: p2psync.Database) -> Agent:
    agent = Agent(db, [("127.0.0.1", 0)], AgentConfig(discovery=False))
    await nursery.start(agent.run)
    return agent


async def test_an_advertised_address_that_keeps_failing_is_dropped(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, b.identity.public_key, Terms())
    async with trio.open_nursery() as nursery:
        agent = await start(nursery, a)
        dead = f"127.0.0.1:{closed_port()}"
        discovery = hint(agent, b.identity.public_key, dead)
        for _ in range(MAX_FAILURES - 1):
            assert not await agent.dialing._dial_once(b.identity.public_key)
        assert discovery.addresses(b.identity.public_key) == (dead,)
        await agent.dialing._dial_once(b.identity.public_key)
        assert discovery.addresses(b.identity.public_key) == ()
        nursery.cancel_scope.cancel()


async def test_an_advert_proven_by_a_handshake_comes_first_and_an_impostor_goes(
    make_db: MakeDb,
) -> None:
    a, b, impostor = make_db("a"), make_db("b"), make_db("impostor")
    pairing.propose(a, b.identity.public_key, Terms())
    pairing.propose(b, a.identity.public_key, Terms())
    async with trio.open_nursery() as nursery:
        agent_a, agent_b = await start(nursery, a), await start(nursery, b)
        fake = await start(nursery, impostor)
        real, spoof = agent_b.addresses[0], fake.addresses[0]
        key = b.identity.public_key
        discovery = hint(agent_a, key, spoof, real)
        nursery.start_soon(agent_a.dialing._dial_once, key)  # runs the session
        with trio.fail_after(10):
            while agent_a.registry.get(key) is None:
                await trio.sleep(0.01)
        assert discovery.addresses(key) == (real,)  # the impostor's: dropped at once
        discovery.agents[key].instances["newer advert"] = ("127.0.0.1:9",)
        assert discovery.addresses(key)[0] == real  # proven first, newer or not
        nursery.cancel_scope.cancel()


async def test_strangers_are_capped_but_a_paired_peer_still_gets_in(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections with agents that have no rule in force are capped: beyond the
    cap a new one closes the oldest (issue 13: the newest refused let a flood of
    throwaway identities keep everyone out). A peer with a rule in force, and one
    we asked to pair (a proposal of ours awaits its answer), is let in however many
    strangers are connected, and closes none of them."""
    monkeypatch.setattr(agent_mod, "MAX_UNPAIRED", 2)
    a, b, known = make_db("a"), make_db("b"), make_db("known")
    me = a.identity.public_key
    pairing.propose(b, me, Terms())  # b's request reaches a, and a accepts it
    a.store.add_rule_objects(me, b.store.rule_objects(me), now_ms())
    [request] = a.store.rules(b.identity.public_key)
    pairing.accept(a, request)
    assert a.store.peers_in_force() == {b.identity.public_key}
    pairing.propose(a, known.identity.public_key, Terms())  # no answer yet
    # the strangers here never speak: the pairing deadline must not close them
    # while the test runs (it is what ends a silent stranger's session otherwise)
    config = AgentConfig(discovery=False, session=SessionConfig(pairing_timeout=120))
    async with trio.open_nursery() as nursery:
        agent = Agent(a, [("127.0.0.1", 0)], config)
        await nursery.start(agent.run)
        host, port = agent.addresses[0].rsplit(":", 1)

        def connected() -> set[bytes]:
            return {c.peer for c in agent.registry.all() if not c.scope.cancel_called}

        async def connect(identity: Identity) -> SecureStream:
            stream = await trio.open_tcp_stream(host, int(port))
            secured = await secure(stream, identity, initiator=True, name="x")
            with trio.fail_after(5):
                while identity.public_key not in connected():
                    await trio.sleep(0.01)
            return secured

        first = [Identity(os.urandom(32)) for _ in range(2)]
        streams = [await connect(identity) for identity in first]
        third = Identity(os.urandom(32))
        streams.append(await connect(third))  # gets in: the oldest stranger made room
        with trio.fail_after(5):  # the evicted one's session ends a moment later
            while len(connected()) > 2:
                await trio.sleep(0.01)
        strangers = connected()
        assert third.public_key in strangers
        assert len(strangers & {i.public_key for i in first}) == 1
        streams.append(await connect(known.identity))  # asked to pair: not a stranger
        streams.append(await connect(b.identity))  # paired
        await trio.sleep(0.2)  # room for an eviction, were one (wrongly) made
        assert connected() == strangers | {known.identity.public_key, b.identity.public_key}
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_peer_that_ends_every_session_the_same_way_is_backed_off(
    make_db: MakeDb,
) -> None:
    """A faulty peer that closes each session as soon as it is in sync is not
    redialled twice a second: after one quick redial, a session that ends soon
    counts as a failure even though it synced."""
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, b.identity.public_key, Terms())
    pairing.propose(b, a.identity.public_key, Terms())
    sessions = 0

    async def faulty(stream: trio.SocketStream) -> None:
        nonlocal sessions
        sessions += 1
        secured = await secure(stream, b.identity, initiator=False, name="b")
        link = PairLink(
            b, secured.peer, handshake_hash=secured.handshake_hash, peer_name="a"
        )
        await run_session(
            secured, TrioStore(b.store), ChangeFeed(), live=False, link=link
        )  # ends with Bye("synced")

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            partial(trio.serve_tcp, faulty, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        a.store.add_peer(b.identity.public_key, "b", [f"127.0.0.1:{port}"], now_ms())
        await start(nursery, a)
        await trio.sleep(6)
        nursery.cancel_scope.cancel()
    # 0.5 + 1 + 2 s (x 0.5-1.5) of backoff leave room for at most ~6 sessions in 6 s;
    # without backoff there are 15-40
    assert 2 <= sessions <= 7, sessions
