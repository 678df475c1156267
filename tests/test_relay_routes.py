"""Hostile review (issue 10, relay part 1): a pair with a relay-only rule for one
collection and a direct-only rule for another. What one path carries with the other
path's payload withheld used to be applied without it, so the full copy that came by
the other path later was a duplicate and the payload never arrived (nobody was told).
Now such an entry waits (held, the sync says why) until the other path brings it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync.agent.agent import Agent, AgentConfig
from p2psync.agent.relaying import RelayLink
from p2psync.clock import now_ms
from p2psync.core.messages import Head
from p2psync.core.rules import Route, Terms
from p2psync.mail.exchange import exchange
from p2psync.mail.mailer import Mailer
from p2psync.net.oneshot import sync_once
from p2psync.net.relayclient import open_relay
from p2psync.net.storeio import ChangeFeed
from tests.relayfake import open_fake_relay
from tests.test_rule_delivery import agree

pytestmark = pytest.mark.process  # in-process agent on a loopback socket

MakeDb = Callable[[str], p2psync.Database]


def key(db: p2psync.Database) -> bytes:
    return db.identity.public_key


async def direct_sync(
    a: p2psync.Database, b: p2psync.Database, *, held: bool | None = False
) -> None:
    """A direct sync from a to b; ``held``: b holds an entry waiting for the payload
    the other path carries, so they cannot get in step (and the sync says why);
    None: either (a may see itself in step first, as it lacks nothing of b's)."""
    async with trio.open_nursery() as nursery:
        agent_b = Agent(b, [("127.0.0.1", 0)], AgentConfig(discovery=False))
        await nursery.start(agent_b.run)
        a.store.add_peer(key(b), "b", [agent_b.addresses[0]], now_ms())
        [outcome] = await sync_once(a, [key(b)], None, timeout=10)
        if held is None:
            pass
        elif held:
            assert not outcome.synced and "by the other path" in (outcome.error or ""), outcome
        else:
            assert outcome.synced, outcome
        nursery.cancel_scope.cancel()


def relay_rounds(a: p2psync.Database, b: p2psync.Database, rounds: int = 3) -> None:
    """Every envelope each makes reaches the other (a perfect relay), a few rounds."""
    ma, mb = Mailer(a), Mailer(b)
    for _ in range(rounds):
        for e in ma.outgoing(key(b), now_ms()):
            mb.incoming(e.wire, now_ms())
        for e in mb.outgoing(key(a), now_ms()):
            ma.incoming(e.wire, now_ms())


def mixed_pair(make_db: MakeDb) -> tuple[p2psync.Database, p2psync.Database]:
    a, b = make_db("a"), make_db("b")
    agree(a, b, Terms.make(["viarelay"], route=Route.RELAY))
    agree(a, b, Terms.make(["direct"], route=Route.DIRECT))
    return a, b


async def test_relay_only_payload_arrives_even_when_a_direct_session_ran_first(
    make_db: MakeDb,
) -> None:
    a, b = mixed_pair(make_db)
    a.put("viarelay", "k", "only the relay may carry this")
    await direct_sync(a, b, held=True)  # carries the entry, its 'viarelay' payload withheld
    assert {x.author: x.seq for x in b.authors()}.get(key(a)) is None  # not applied: it waits
    relay_rounds(a, b)  # the relay-only rule's path
    assert b.get("viarelay", "k") == "only the relay may carry this"
    await direct_sync(a, b)  # in step now


async def test_direct_only_payload_arrives_even_when_the_relay_delivered_first(
    make_db: MakeDb,
) -> None:
    a, b = mixed_pair(make_db)
    a.put("direct", "k", "only a direct session may carry this")
    relay_rounds(a, b)  # carries the entry, its 'direct' payload withheld: it waits
    assert {x.author: x.seq for x in b.authors()}.get(key(a)) is None
    await direct_sync(a, b)
    assert b.get("direct", "k") == "only a direct session may carry this"


async def test_control_relay_alone_carries_the_relay_only_payload(make_db: MakeDb) -> None:
    """Control (passes): with no direct session the relay path delivers it."""
    a, b = mixed_pair(make_db)
    a.put("viarelay", "k", "only the relay may carry this")
    relay_rounds(a, b)
    assert b.get("viarelay", "k") == "only the relay may carry this"


async def test_a_live_direct_connection_keeps_relay_only_entries_off_the_relay(
    make_db: MakeDb,
) -> None:
    """A running agent deposits only for peers with no live direct connection
    (agent/relaying.py RelayLink._exchange), whatever the rules' routes: while a and b
    are connected directly (their direct rule), what only the relay may carry (the
    relay-only rule) never goes at all."""

    a, b = mixed_pair(make_db)
    a.put("viarelay", "k", "only the relay may carry this")
    async with open_fake_relay() as relay:
        await exchange(b, relay.target)  # b's mailbox policy is at the relay
        link = RelayLink(a, ChangeFeed(), lambda: {key(b)})  # b is connected directly
        async with open_relay(a.identity, a.name, relay.target) as client:
            await link._exchange(client)
        await exchange(b, relay.target)
    assert b.get("viarelay", "k") == "only the relay may carry this"


async def test_a_direct_session_retracts_the_only_copy_of_a_relay_only_payload(
    make_db: MakeDb,
) -> None:
    """The envelope carrying the relay-only payload is at the relay; then a direct
    session gets in step (the entry goes, payload withheld). Mailer.superseded (what
    the running agent calls, RelayLink._retract_superseded) marks the envelope
    superseded and names it for retraction: the relay deletes the only full copy
    before b ever committed the payload."""

    a, b = mixed_pair(make_db)
    a.put("viarelay", "k", "only the relay may carry this")
    ma = Mailer(a)
    [out] = ma.outgoing(key(b), now_ms())
    ma.deposited(key(b), out.seq, where="relay-x", until_ms=now_ms() + 86_400_000, now_ms=now_ms())
    await direct_sync(a, b, held=True)
    holds = {x.author: Head(x.seq, x.head, x.frozen) for x in b.authors() if x.seq}
    retract = ma.superseded(key(b), holds, now_ms())
    assert b.get("viarelay", "k") is None  # b does not have it
    assert out.seq not in retract, "the only copy with the payload is retracted"


@pytest.mark.parametrize("first", ["direct", "relay"])
async def test_entry_touching_both_a_relay_only_and_a_direct_only_collection_is_applied(
    make_db: MakeDb, first: str
) -> None:
    """Review (helper-23): one entry changes a relay-only and a direct-only
    collection. Neither path can bring it whole, so waiting for "the other path"
    held it on both forever, and every later entry of its author with it. The first
    copy is applied; the author's later entries flow by both paths."""
    a, b = mixed_pair(make_db)
    with a.transaction() as tx:
        tx.put("viarelay", "k", "relay part")
        tx.put("direct", "k", "direct part")
    a.put("direct", "after", "a later entry")
    a.put("viarelay", "after", "a later entry")
    if first == "direct":
        await direct_sync(a, b, held=True)  # entry 3 ('viarelay') waits for the relay
        assert {x.author: x.seq for x in b.authors()}.get(key(a)) == 2
        relay_rounds(a, b)
    else:
        relay_rounds(a, b)  # entry 2 ('direct') waits for a direct session
        assert {x.author: x.seq for x in b.authors()}.get(key(a)) == 1
        await direct_sync(a, b, held=None)  # entry 3 waits for the relay again
        relay_rounds(a, b)
    assert {x.author: x.seq for x in b.authors()}.get(key(a)) == 3
    assert b.get("direct", "after") == b.get("viarelay", "after") == "a later entry"
    # the copy applied first brought its path's part (the other part cannot come)
    kept = "direct" if first == "direct" else "viarelay"
    assert b.get(kept, "k") == ("direct part" if first == "direct" else "relay part")
