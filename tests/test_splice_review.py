"""Review of the live splice (e07fddb..3a817b9, helper-26): each finding as the test
that failed on the code as reviewed; the docstrings say what was wrong."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

import p2psync
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.identity import Identity
from p2psync.core.rules import Route, Terms
from p2psync.net.relayclient import open_relay
from p2psync.net.splice import join_splice
from p2psync.relay import home as relay_home
from p2psync.relay.guards import Bucket
from p2psync.relay.node import Node
from p2psync.relay.splice import KEY_SECONDS
from p2psync.store import relays as relays_mod
from tests.relayfake import open_fake_relay
from tests.relaynode import RelayNode
from tests.test_mail import pair
from tests.test_splice_relay import allow, read, target


async def _splice(
    relay: RelayNode, who: dict[str, Identity], *, stagger: float = 0.0
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """A splice between a and b; ``stagger``: seconds between a's join and b's."""
    spot = target(relay)
    async with (
        open_relay(who["a"], "a", spot) as a,
        open_relay(who["b"], "b", spot) as b,
    ):
        await allow(b, who["b"], who["a"])
        invitation = await a.connect(who["b"].public_key)
        assert isinstance(invitation, wire.Invitation)
        with trio.fail_after(5):
            invited = await b.next_invitation()
        streams: dict[str, trio.abc.Stream] = {}

        async def join(name: str, key: bytes, peer: Identity) -> None:
            streams[name] = await join_splice(
                who[name], name, spot.key, relay.address, key, peer.public_key, wait=5
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join, "a", invitation.key, who["b"])
            await trio.sleep(stagger)
            nursery.start_soon(join, "b", invited.key, who["a"])
    return streams["a"], streams["b"]


@pytest.mark.process
async def test_a_live_splice_outlives_its_invitation_keys(
    splice_relay: tuple[RelayNode, dict[str, Identity]],
) -> None:
    """Finding 1 (high): in relay/node.py ``_splice`` the FIRST side to join waits
    ``move_on_at(invitation.expires)`` for ``joining.done``, which is only set when
    the pipe ENDS. So KEY_SECONDS after the invitation, the first joiner's task gives
    up, sends a Bye on the detached stream and returns; ``_connection`` then closes
    its socket: every live splice is cut ~10 s after it was asked for (and the agents
    splice again, in a loop)."""
    relay, who = splice_relay
    one, two = await _splice(relay, who)
    await one.send_all(b"ping")
    assert await read(two, 4) == b"ping"
    await trio.sleep(KEY_SECONDS + 1.5)  # busy or not, the keys' life is over
    await one.send_all(b"still here")
    assert await read(two, 10) == b"still here"
    await two.send_all(b"and back")
    assert await read(one, 8) == b"and back"
    for stream in (one, two):
        await stream.aclose()


@pytest.mark.process
async def test_a_relay_pushing_invitations_cannot_make_the_agent_open_unbounded_joins(
    make_db: Callable[[str], p2psync.Database],
) -> None:
    """Finding 2 (medium, hostile relay): agent/relaying.py ``_take_invitations``
    starts a ``_join`` task (a fresh TCP connection + Noise handshake to the relay,
    held up to CONNECT_SECONDS + SPLICE_WAIT) for EVERY ``Invited`` naming a welcome
    peer, with no limit per peer or in all (``_joining`` only counts them; the
    ``expires`` of the invitation is ignored too). A relay pushing Invited at line
    rate makes the agent hold as many connections and tasks as it likes."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["orders"], route=Route.RELAY))
    if a.identity.public_key < b.identity.public_key:
        # the agent with the larger key: the asked-at-once tie-break never declines
        # for it (with the smaller key only a join of its own ask stops the flood)
        a, b = b, a
    joins = [0]

    async def hang(stream: object, key: bytes) -> None:  # a join the relay holds
        joins[0] += 1
        await trio.sleep_forever()

    async with open_fake_relay() as relay, trio.open_nursery() as nursery:
        relay._join = hang  # type: ignore[method-assign]
        relays_mod.put(a.store, relay.target)
        agent = Agent(a, [("127.0.0.1", 0)], AgentConfig(discovery=False))
        await nursery.start(agent.run)
        with trio.fail_after(20):
            while a.identity.public_key not in relay._online:
                await trio.sleep(0.05)
            while b.identity.public_key not in agent._splice_peers:
                await trio.sleep(0.05)
        session = relay._online[a.identity.public_key]
        for _ in range(60):
            await session.send(
                wire.Invited(b.identity.public_key, os.urandom(32), now_ms() + 10_000)
            )
            await trio.sleep(0.01)
        await trio.sleep(3)
        held = joins[0]
        nursery.cancel_scope.cancel()
    assert held <= 2, f"the agent joined {held} splices with one peer at once"


@pytest.mark.trio_memory
async def test_unavailable_takes_as_long_for_an_online_peer_as_for_an_offline_one(
    tmp_path: Path,
) -> None:
    """Finding 3 (medium, oracle): relay/node.py ``_connect`` looks the target's
    mailbox policy up (a thread hop behind ``_store_limiter``, the one lock every
    deposit and fetch commits under) ONLY when the target has a session. "B is
    offline" is answered at once, "B is online but does not list you" after a store
    read: the uniform answer leaks who is online by its timing, widely so while the
    store is busy (here: a commit holding the limiter for 0.5 s)."""
    node = Node(relay_home.init(tmp_path / "relay"), [])
    try:
        asker = SimpleNamespace(key=os.urandom(32), connects=Bucket(100, burst=100))
        online, offline = os.urandom(32), os.urandom(32)  # neither lists the asker
        node.sessions[online] = [SimpleNamespace(ending="", key=online)]  # type: ignore[list-item]

        async def busy_store() -> None:  # a deposit being committed
            async with node._store_limiter:
                await trio.sleep(0.5)

        took = {}
        for name, peer in (("offline", offline), ("online", online)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(busy_store)
                await trio.sleep(0.01)
                start = trio.current_time()
                answer = await node._connect(asker, wire.Connect(1, peer))  # type: ignore[arg-type]
                took[name] = trio.current_time() - start
            assert isinstance(answer, wire.Refused) and answer.detail == "unavailable"
        assert abs(took["online"] - took["offline"]) < 0.1, took
    finally:
        node.close()


@pytest.mark.process
async def test_splices_cut_short_are_not_asked_for_again_in_a_tight_loop(
    make_db: Callable[[str], p2psync.Database],
) -> None:
    """Finding 4 (medium, hostile or flaky relay; also with finding 1): a spliced
    session that ends calls ``relay_link.poke()`` (agent.py run_connection), which
    clears ``_splice_cooldown`` (relaying.py ``poke``), and ``_join`` had popped the
    backoff on success: the agents ask, join, handshake and sync again AT ONCE. A
    relay that cuts each splice right after the handshake keeps both agents in a
    reconnect loop paced only by round trips, with no backoff."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["orders"], route=Route.RELAY))
    async with open_fake_relay() as relay, trio.open_nursery() as nursery:
        original = relay._pump

        async def short_pump(
            source: tuple[bytes, trio.abc.Stream, bytes], sink: trio.abc.Stream,
            inner: trio.Nursery,
        ) -> None:
            with trio.move_on_after(1.0):  # long enough for the handshake and RulesHeld
                await original(source, sink, inner)
            inner.cancel_scope.cancel()
            for end in (source[1], sink):
                with contextlib.suppress(Exception):
                    await end.aclose()

        relay._pump = short_pump  # type: ignore[method-assign]
        for db in (a, b):
            relays_mod.put(db.store, relay.target)
            agent = Agent(db, [("127.0.0.1", 0)], AgentConfig(discovery=False))
            await nursery.start(agent.run)
        with trio.fail_after(20):
            while not relay.splices:
                await trio.sleep(0.05)
        first = relay.splices
        await trio.sleep(12)
        again = relay.splices - first
        nursery.cancel_scope.cancel()
    assert again <= 3, f"{again} splices in 12 s, each cut after 1 s"


@pytest.mark.process
async def test_while_spliced_the_relay_link_deposits_nothing_for_that_peer(
    make_db: Callable[[str], p2psync.Database],
) -> None:
    """Finding 5 (low-medium, docs vs code): relay.md "The agent's side" says that
    while a splice is live "the relay link deposits nothing for that peer". But
    relaying.py ``_exchange`` keeps every peer in ``mailer.relay_only()`` (a rule
    whose route is ``relay``: exactly the peers a splice is for) among the targets
    even when ``connected()`` (all of ``registry.by_peer``, spliced included) has
    it: what the splice carries is deposited in the mailbox as well."""
    a, b = make_db("a"), make_db("b")
    pair(a, b, Terms.make(["orders"], route=Route.RELAY))
    agents = {}
    async with open_fake_relay() as relay, trio.open_nursery() as nursery:
        for db in (a, b):
            relays_mod.put(db.store, relay.target)
            config = AgentConfig(discovery=False, relay_grace=0.2)
            agents[db.name] = agent = Agent(db, [("127.0.0.1", 0)], config)
            await nursery.start(agent.run)

        def spliced() -> bool:
            conn = agents["a"].registry.get(b.identity.public_key)
            return bool(conn and conn.via and conn.machine and conn.machine.synced)

        with trio.fail_after(30):
            while not spliced():
                await trio.sleep(0.05)
        await trio.sleep(1)
        def from_a() -> int:
            mine = a.identity.public_key
            return sum(1 for k, m in relay.log if k == mine and isinstance(m, wire.Deposit))

        before = from_a()
        for i in range(5):
            a.put("orders", f"o{i}", {"n": i})
        with trio.fail_after(10):
            while b.get("orders", "o4") is None:
                await trio.sleep(0.05)
        await trio.sleep(3)
        still = spliced()
        deposited = from_a() - before
        nursery.cancel_scope.cancel()
    assert still, "the splice ended during the test"
    assert deposited == 0, f"{deposited} deposits for a peer spliced live"


@pytest.mark.process
async def test_a_device_is_in_at_most_splices_per_device_live_splices(
    splice_relay: tuple[RelayNode, dict[str, Identity]],
) -> None:
    """Finding 6 (low, cap): relay/splice.py ``invite`` checks live and pending
    separately (live < 8, pending < 8) and nothing re-checks when a pending one goes
    live (node.py ``_pipe``): ask 7 and join them, then ask 8 more and join them:
    15 live splices for one device, where relay.md's table says
    ``splices_per_device`` (8) bounds the live splices a device may be in."""
    relay, who = splice_relay
    spot = target(relay)
    streams: list[trio.abc.Stream] = []
    async with (
        open_relay(who["a"], "a", spot) as a,
        open_relay(who["b"], "b", spot) as b,
    ):
        await allow(b, who["b"], who["a"])

        async def batch(count: int) -> None:
            pairs = []
            for _ in range(count):
                invitation = await a.connect(who["b"].public_key)
                if not isinstance(invitation, wire.Invitation):
                    break
                with trio.fail_after(5):
                    invited = await b.next_invitation()
                pairs.append((invitation.key, invited.key))

            async def join(name: str, key: bytes, peer: Identity) -> None:
                streams.append(await join_splice(
                    who[name], name, spot.key, relay.address, key, peer.public_key, wait=5
                ))

            for key_a, key_b in pairs:  # a pair at a time (half-open caps per address)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(join, "a", key_a, who["b"])
                    nursery.start_soon(join, "b", key_b, who["a"])

        await batch(7)
        await batch(8)
        with trio.fail_after(5):  # state.json is written each second
            await trio.sleep(1.5)
            live = len(relay.status()["running"]["splices"])
    for stream in streams:
        await stream.aclose()
    assert live <= 8, f"{live} live splices for one device (splices_per_device = 8)"


@pytest.mark.process
async def test_a_splice_whose_first_side_reads_slowly_does_not_crash_the_relay(
    splice_relay: tuple[RelayNode, dict[str, Identity]],
) -> None:
    """Finding 7 (high, hostile agent: relay crash; a consequence of finding 1): at
    the keys' expiry the first joiner's task in ``_splice`` sends ``Bye`` on its
    (detached) stream while the pump may be blocked in ``send_all`` on that same
    socket (the first joiner reads slowly, the other side sends a lot). trio raises
    ``BusyResourceError``: ``SecureStream.send`` does not turn it into
    ConnectionLost, ``_splice`` only suppresses P2PSyncError and ``_connection``'s
    ``except*`` does not name it, so it escapes ``serve_listeners`` and takes the
    whole relay down. Two admitted devices (one listing the other) can do it at
    will."""
    relay, who = splice_relay
    first, second = await _splice(relay, who, stagger=0.5)  # a joins first
    streams = {"a": first, "b": second}

    async def flood() -> None:  # b sends; a reads nothing: the pump blocks on a
        with contextlib.suppress(Exception):
            while True:
                await streams["b"].send_all(b"x" * 65536)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await trio.sleep(KEY_SECONDS + 2)
        nursery.cancel_scope.cancel()
    for stream in streams.values():
        with contextlib.suppress(Exception):
            await stream.aclose()
    await trio.sleep(0.5)
    assert relay.process is not None and relay.process.poll() is None, (
        "the relay process died:\n" + relay.log.read_text()[-1500:]
    )
