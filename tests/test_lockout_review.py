"""Review of issue 13 items 1 and 2 (the lock-out caps): what a hostile network
can still do.

The per-address caps only stop an attacker with *one* source address; an attacker
with a few (127.0.0.2..127.0.0.6 here: IPv4 aliases on a LAN, or any address of an
IPv6 /64) reaches the total caps, and there the *oldest* half-open connection (once
all have sent message 1: 32 bytes anyone can send) or the *oldest* stranger goes,
whatever its address: a legitimate connection from an address of its own is
closed by the flood. And the stranger cap counts the agent's own outbound
connections (a pairing request of ours being delivered) as strangers to evict.
And a store error while a stranger connects escapes ``_inbound`` and stops the agent.

Each test fails now and passes once the finding is fixed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.core.identity import Identity
from p2psync.core.rules import Terms
from p2psync.errors import StoreError
from p2psync.net.halfopen import HalfOpen, source_of
from p2psync.net.oneshot import join_once
from p2psync.net.transport import secure
from tests.test_lockout import stranger_flood as lockout_flood
from tests.test_pairing import key

pytestmark = pytest.mark.process

MakeDb = Callable[[str], p2psync.Database]
ATTACKERS = [f"127.0.0.{n}" for n in range(2, 7)]  # five source addresses


async def start(nursery: trio.Nursery, db: p2psync.Database, host: str = "127.0.0.1") -> Agent:
    agent = Agent(db, [(host, 0)], AgentConfig(discovery=False))
    await nursery.start(agent.run)
    return agent


def port_of(agent: Agent) -> int:
    return int(agent.addresses[0].rsplit(":", 1)[1])


async def stranger_flood(
    nursery: trio.Nursery, port: int, sources: list[str], per_source: int, held: list[int]
) -> None:
    """``per_source`` throwaway identities from each of ``sources`` (test_lockout's
    flood, from several addresses)."""
    for source in sources:
        await lockout_flood(nursery, port, per_source, held, source=source)


# ------------------------------------------------------------ half-open: total cap


@pytest.mark.trio_memory
async def test_half_open_total_cap_spares_a_lone_address_in_a_multi_address_flood() -> None:
    """A legitimate peer (127.0.0.1, one connection, message 1 sent) is mid-handshake;
    an attacker at five addresses holds the other 31 slots with sockets that sent a
    valid message 1 (32 random bytes: 'progressed' like the peer) and stalled. The
    attacker's next connection must evict one of its own (the address holding the
    most), not the lone peer just because it is the oldest."""
    half_open = HalfOpen(per_address=8, total=32)
    legit_scope = trio.CancelScope()
    legit = half_open.enter("127.0.0.1", legit_scope)
    half_open.progress(legit)
    for n in range(31):  # 8 + 8 + 8 + 7 from four addresses: no per-address cap hit
        ticket = half_open.enter(ATTACKERS[n // 8], trio.CancelScope())
        half_open.progress(ticket)
    half_open.enter(ATTACKERS[4], trio.CancelScope())  # the 33rd: the total cap
    assert not legit.evicted and not legit_scope.cancel_called, (
        "the lone legitimate half-open connection was evicted by a multi-address flood"
    )


# ------------------------------------------------------------ strangers: total cap


async def slow_link(nursery: trio.Nursery, host: str, port: int, source: str, delay: float) -> str:
    """A forwarder at ``source`` to ``host:port`` that delays every chunk by ``delay``
    each way (a peer across a WAN link); returns its address."""

    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                await trio.sleep(delay)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await dst.aclose()

    async def serve(client: trio.SocketStream) -> None:
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect((host, port))
        upstream = trio.SocketStream(sock)
        async with trio.open_nursery() as inner:
            inner.start_soon(pump, client, upstream)
            inner.start_soon(pump, upstream, client)

    [listener] = await trio.open_tcp_listeners(0, host=source)
    nursery.start_soon(trio.serve_listeners, serve, [listener])
    return f"{source}:{listener.socket.getsockname()[1]}"


async def test_an_invite_holder_on_a_slow_link_gets_in_while_five_addresses_flood_the_agent(
    make_db: MakeDb,
) -> None:
    """tests/test_lockout.py's invite test, with the flood from five addresses instead
    of one (6 identities each: every address at UNPAIRED_PER_ADDRESS, 20 > 16 in all)
    and the joiner 50 ms away (each chunk delayed 50 ms each way). Each new throwaway
    identity closes the oldest stranger in all, whatever its address, and the joiner
    is soon the oldest. docs/protocol.md §2 says such a flood keeps no invite holder
    out; the joiner (alone at its address) should be the last one evicted."""
    a, c = make_db("a"), make_db("c")
    a.put("vouchers", "V-1", 1)
    code = pairing.parse_invite(pairing.create_invite(a, Terms.make(["vouchers"]), 600, []))
    async with trio.open_nursery() as nursery:
        agent_a = await start(nursery, a)
        held = [0]
        await stranger_flood(nursery, port_of(agent_a), ATTACKERS, 6, held)
        with trio.fail_after(10):
            while held[0] < 14:
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        via = await slow_link(nursery, "127.0.0.1", port_of(agent_a), "127.0.0.7", 0.05)
        outcome = await join_once(c, pairing.JoinTicket.of(code), [via], timeout=10)
        nursery.cancel_scope.cancel()
    assert outcome.rule is not None, outcome


# ------------------------------------------------------------ strangers: outbound


async def test_a_stranger_flood_does_not_close_our_own_outbound_pairing_request(
    make_db: MakeDb,
) -> None:
    """Agent A proposed to B and dials it (B's address: 127.0.0.3) to deliver the
    request. Throwaway identities connect to A from 127.0.0.3 too (B's host, a NAT,
    a shared machine). _room_for_a_stranger counts A's *outbound* connection to B as
    a stranger 'from' 127.0.0.3 (it keys on conn.address, the dialled one) and closes
    it as the oldest: an inbound flood tears down connections the agent itself made."""
    a, b = make_db("a"), make_db("b")
    host_b = ATTACKERS[1]  # 127.0.0.3
    async with trio.open_nursery() as nursery:
        agent_b = await start(nursery, b, host_b)
        pairing.propose(a, key(b), Terms(), addresses=[agent_b.addresses[0]])
        agent_a = await start(nursery, a)
        with trio.fail_after(5):
            while not (ours := [c for c in agent_a.registry.all() if c.peer == key(b)]):
                await trio.sleep(0.01)
        [outbound] = ours
        assert outbound.outbound
        held = [0]
        await stranger_flood(nursery, port_of(agent_a), [host_b], 4, held)
        with trio.fail_after(5):
            while held[0] < 4:
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        evicted = outbound.scope.cancel_called
        nursery.cancel_scope.cancel()
    assert not evicted, "an inbound stranger flood closed the agent's own outbound connection"


# ------------------------------------------------------------ _inbound: errors escape


async def test_a_store_error_while_a_stranger_connects_does_not_stop_the_agent(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stranger now makes _inbound await _reload_peers (at most once a second;
    before the change only at the cap), outside any try: a store error there (a
    locked or failing database) escapes the connection handler, and
    trio.serve_listeners takes the whole agent down with it. One bad connection
    (or one failed read) must never take the agent down."""
    a = make_db("a")
    agent = Agent(a, [("127.0.0.1", 0)], AgentConfig(discovery=False))
    crashed: list[BaseException] = []

    async def run_agent(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await agent.run(task_status=task_status)
        except Exception as exc:  # what stopped it (an ExceptionGroup)
            crashed.append(exc)

    async def boom() -> None:
        raise StoreError("database disk image is malformed")

    async with trio.open_nursery() as nursery:
        await nursery.start(run_agent)
        monkeypatch.setattr(agent, "_reload_peers", boom)
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port_of(agent)))
        with trio.move_on_after(2), contextlib.suppress(Exception):
            await secure(
                trio.SocketStream(sock),
                Identity(os.urandom(32)),
                initiator=True,
                name="stranger",
                timeout=5,
            )
            await trio.sleep(0.3)
        sock.close()
        nursery.cancel_scope.cancel()
    assert not crashed, f"a store error while a stranger connected stopped the agent: {crashed!r}"


@pytest.mark.pure
def test_a_source_is_an_ipv4_address_or_an_ipv6_64() -> None:
    """Whoever holds one IPv6 address usually holds its /64: 2^64 addresses must not
    mean 2^64 per-address caps."""
    assert source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9")
    assert source_of("2001:db8:1:2::1") != source_of("2001:db8:1:3::1")
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("fe80::1%eth0") == source_of("fe80::2%eth1")
    assert source_of("?") == "?"


@pytest.mark.trio_memory
async def test_half_open_per_address_cap_covers_an_ipv6_64() -> None:
    half_open = HalfOpen(per_address=2, total=32)
    first = half_open.enter("2001:db8::1", trio.CancelScope())
    half_open.enter("2001:db8::2", trio.CancelScope())
    half_open.enter("2001:db8::3", trio.CancelScope())
    assert first.evicted and len(half_open) == 2
