"""Review of the splice fixes (3a817b9..f0f1fb7, helper review-splice2): each
finding as a test that fails on the code as reviewed; the docstrings say what is
wrong."""

from __future__ import annotations

import os
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import trio

import p2psync
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.agent.connections import Connection
from p2psync.core import relaywire as wire


class _Client:
    """A relay session that answers every Connect with an Invitation (the peer is
    there) and pushes no invitations."""

    def __init__(self) -> None:
        self.relay = os.urandom(32)
        self.address = "127.0.0.1:1"
        self.asked: list[tuple[float, bytes]] = []

    async def connect(self, peer: bytes) -> wire.Message:
        self.asked.append((trio.current_time(), peer))
        return wire.Invitation(1, peer, os.urandom(32), 0)

    async def next_invitation(self) -> wire.Invited:
        await trio.sleep_forever()
        raise AssertionError


@pytest.mark.trio_memory
async def test_when_the_direct_connection_that_replaced_a_splice_ends_the_splice_is_asked_for_at_once(  # noqa: E501
    make_db: Callable[[str], p2psync.Database],
) -> None:
    """Finding 1 (medium, docs vs code; LAN paths): relay.md "Direct first" says a
    direct connection replaces a spliced one and "when the direct connection ends,
    the agent asks for a splice again at once". But agent.py run_connection calls
    ``relay_link.splice_ended(peer, lasted)`` for EVERY spliced session that ends,
    also the one a direct connection just replaced (connections.py ``prefer``): a
    splice that lived under SPLICE_STEADY (60 s) before the route appeared counts as
    "cut short" and sets ``_splice_next`` 5 s ahead, doubling with every move
    (10, 20 ... 300 s; ``_join`` no longer resets ``_splice_delay`` either). Both
    sides do the same, so neither asks: when the route goes again the peers fall
    back to the mailbox for up to 5 minutes instead of going live again at once."""
    db = make_db("a")
    peer = os.urandom(32)
    agent = Agent(db, [("127.0.0.1", 0)], AgentConfig(discovery=False))
    link = agent.relay_link
    client = _Client()

    async def join(client: object, splicer: object, peer: bytes, key: bytes,
                   initiator: bool, address: str) -> None:  # the splice forms (run_connection)
        agent.registry.add(Connection(peer, peer, False, "via relay", via=b"R" * 32))

    link._join = join  # type: ignore[method-assign]
    splicer = SimpleNamespace(
        wanted=lambda: {peer} if agent.registry.get(peer) is None else set(),
        welcome=lambda p: True,
    )
    waited = []
    direct = Connection(peer, peer, True, "10.0.0.2:7717")
    agent.registry.add(direct)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link._splices, client, splicer)
        await trio.sleep(0.1)
        for _ in range(3):  # the LAN route comes and goes: relay, direct, relay ...
            agent.registry.remove(direct)  # the direct connection ended
            agent._connection_ended(direct)
            ended, asked = trio.current_time(), len(client.asked)
            with trio.move_on_after(25):
                while len(client.asked) == asked:
                    await trio.sleep(0.01)
            waited.append(round(trio.current_time() - ended, 1))
            await trio.sleep(1)  # spliced a while, then the route appears:
            splice = agent.registry.get(peer)
            assert splice is not None and splice.via is not None
            direct = Connection(peer, peer, True, "10.0.0.2:7717")
            assert agent.registry.add(direct)  # the direct connection replaces the splice
            agent.registry.remove(splice)
            agent._connection_ended(splice)
            await trio.sleep(1)  # direct for a second
        nursery.cancel_scope.cancel()
    assert max(waited) < 1, f"seconds from the direct connection's end to the ask: {waited}"
