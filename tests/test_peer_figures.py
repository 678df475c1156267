"""What `peers` and `status` say about a peer is true: one source for in step,
behind and ahead; "last in sync" is when the pair was last known in step, not
when a dead connection was dropped or a reconnect failed."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.clock import now_ms
from p2psync.core.rules import Terms
from p2psync.core.session import SessionConfig
from tests.agents import SpawnedAgent, cli, value_at, wait_for

pytestmark = pytest.mark.process

MakeDb = Callable[[str], p2psync.Database]


@pytest.mark.slow
def test_peers_and_status_agree_after_live_writes(
    agents: Callable[[str], SpawnedAgent],
) -> None:
    a, b = agents("a").start(), agents("b").start()
    a.pair(b)
    b.pair(a)
    for i in range(3):
        cli(a.home, "put", "c", f"k{i}", str(i))
    wait_for(lambda: value_at(b, "c", "k2") == 2, timeout=10)
    for agent in (a, b):

        def agree(agent: SpawnedAgent = agent) -> bool:
            status = json.loads(cli(agent.home, "status", "--json"))
            [row] = json.loads(cli(agent.home, "peers", "--json"))
            [conn] = status["agent"]["connections"]
            [peer] = status["peers"]
            figures = (row["behind"], row["ahead"], row["in_sync"])
            return (
                figures == (0, 0, True)
                and (conn["behind"], conn["ahead"], conn["synced"]) == figures
                and (peer["behind"], peer["ahead"], peer["in_sync"]) == figures
            )

        wait_for(agree, timeout=5)
        text = cli(agent.home, "peers")
        assert "in sync; 0 behind, 0 ahead" in text, text


class Freezer:
    """A TCP relay between two agents that can stop passing bytes while keeping the
    sockets open: a network that goes dead without telling anyone (a faulty party)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.frozen = False
        self.refuse = False

    async def handle(self, client: trio.SocketStream) -> None:
        if self.refuse:
            await client.aclose()
            return
        host, port = self.target.rsplit(":", 1)
        server = await trio.open_tcp_stream(host, int(port))

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    data = await src.receive_some(65536)
                    if not data:
                        break
                    while self.frozen:
                        await trio.sleep(3600)
                    await dst.send_all(data)
            nursery.cancel_scope.cancel()  # one side gone: drop both

        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server)
            nursery.start_soon(pump, server, client)


async def test_last_in_sync_is_when_last_known_in_step(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    pairing.propose(a, b.identity.public_key, Terms())
    pairing.propose(b, a.identity.public_key, Terms())
    quick = AgentConfig(
        session=SessionConfig(keepalive=0.2, idle_timeout=1.0), discovery=False
    )
    async with trio.open_nursery() as nursery:
        agent_b = Agent(b, [("127.0.0.1", 0)], AgentConfig(discovery=False))
        await nursery.start(agent_b.run)
        freezer = Freezer(agent_b.addresses[0])
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, freezer.handle, 0, host="127.0.0.1")
        )
        a.store.add_peer(
            b.identity.public_key, "b", [f"127.0.0.1:{listener.socket.getsockname()[1]}"], now_ms()
        )
        agent_a = Agent(a, [("127.0.0.1", 0)], quick)
        await nursery.start(agent_a.run)
        key = b.identity.public_key
        with trio.fail_after(10):
            while not (
                (conn := agent_a.registry.get(key)) and conn.machine and conn.machine.synced
            ):
                await trio.sleep(0.02)
        await trio.sleep(0.5)  # keepalives flow: still in step
        [row] = agent_a.status()["connections"]
        assert row["synced"] and row["last_sync"] >= now_ms() - 100
        frozen_at = now_ms()
        freezer.frozen = freezer.refuse = True  # dead, and reconnects fail from now on
        with trio.fail_after(10):
            while agent_a.registry.get(key) is not None:
                await trio.sleep(0.05)
        dropped_at = now_ms()
        await trio.sleep(1.5)  # a few failed reconnects
        last_sync = a.store.peer(key).last_sync  # type: ignore[union-attr]
        assert last_sync is not None and last_sync <= frozen_at < dropped_at - 500
        nursery.cancel_scope.cancel()
