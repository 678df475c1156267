"""From the hostile-peer review of the seams restructure (issue 9): behaviour the
restructure changed that a peer could trigger, each test failing before its fix —
a flow that remembered every collection name a peer chose, a batch queued behind
a hostile one still stored, a Have taken as proof of rule objects never shown."""

from __future__ import annotations

import contextlib
import gc
import os
import tracemalloc
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.clock import now_ms
from p2psync.core import messages
from p2psync.core.entry import withhold
from p2psync.core.events import Refusal
from p2psync.core.flow import Flow
from p2psync.core.messages import MAX_AUTHORS, Entries, Have, RulesHeld
from p2psync.core.rules import Direction, Permissions, Terms
from p2psync.core.session import SyncSession
from p2psync.errors import ConnectionLost, FutureTimestampError
from p2psync.net.link import PairLink
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from p2psync.store.ingest import IngestResult, decode_batch
from tests.test_pairing import key, session
from tests.test_sync import Hostile, against_hostile, connect, fill

pytestmark = pytest.mark.trio_memory

MakeDb = Callable[[str], p2psync.Database]


def held_digest(db: p2psync.Database, peer: p2psync.Database) -> bytes:
    return messages.rules_digest(db.store.rule_objects(key(peer)))


# ---------------------------------------------------------------- 1. the flow's memo


def many_collections(db: p2psync.Database, prefix: str, count: int) -> bytes:
    """One entry (wire form) touching ``count`` distinct collections."""
    [entry_id] = db.write(
        [
            [
                p2psync.Change(p2psync.OpKind.PUT, f"{prefix}-{i:06d}-" + "x" * 60, "k", 1)
                for i in range(count)
            ]
        ]
    )
    del entry_id
    # its payloads withheld: ops in collections no rule lets the peer send here
    # then carry nothing the victim refuses, so every name is looked at
    return withhold(list(db.export())[-1], lambda collection: False)


@pytest.mark.pure
def test_what_a_peer_names_does_not_pile_up_in_the_flow_for_the_whole_session(
    make_db: MakeDb,
) -> None:
    """A session judges every batch with one Flow, which memoises, per collection
    name, whether the peer may send it here -- and never forgets. A paired peer
    (restricted receive rule) names fresh collections in every batch (entries it
    authored itself, e.g. with a clock far ahead, so they are refused without
    ending the session and nothing is stored): the victim's memory grows without
    bound for as long as the live session lasts. The old ingester cleared its memo
    for every batch."""
    attacker = make_db("attacker")
    rule_terms = Terms.make(["vouchers"], Direction.BOTH)
    flow = Flow(Permissions(send=(rule_terms,), receive=(rule_terms,)))
    wires = [many_collections(attacker, f"b{batch}", 3000) for batch in range(6)]

    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for wire in wires:  # one batch after another, as the session's ingester does
            result = IngestResult()
            items = decode_batch([wire], 0, 1 << 60, result, flow)
            del items, result
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # six batches of 3000 fresh names: about one batch's worth may stay, not all six
    assert retained < 1_000_000, f"{retained} bytes kept by the flow after six batches"


async def test_a_paired_peer_grows_the_victims_memory_without_storing_anything(
    make_db: MakeDb,
) -> None:
    """The same, end to end: the attacker is paired for ``vouchers`` only and sends,
    batch after batch, an entry of its own with its clock a day ahead (refused, not
    the sender's fault: the session goes on, nothing is stored) naming 3000 fresh
    collections, their payloads withheld. Every name stays in the session's Flow."""
    victim, attacker = make_db("victim"), make_db("attacker")
    pairing.propose(victim, key(attacker), Terms.make(["vouchers"]))
    pairing.propose(attacker, key(victim), Terms.make(["vouchers"]))
    await session(victim, attacker)
    ahead = now_ms() + 24 * 3600 * 1000
    batches = []
    for batch in range(6):
        attacker.store.write_local(
            attacker.identity,
            [
                [
                    p2psync.Change(p2psync.OpKind.PUT, f"b{batch}-{i:05d}-" + "x" * 60, "k", 1)
                    for i in range(3000)
                ]
            ],
            lambda: ahead,
            lambda: os.urandom(16),
        )
        batches.append(withhold(list(attacker.export(key(attacker)))[-1], lambda c: False))
    sa, sb = await connect(attacker, victim)
    machines: list[object] = []
    result: list[SessionStats] = []

    async def serve() -> None:
        link = PairLink(
            victim, key(attacker), handshake_hash=sb.handshake_hash, peer_name="a"
        )
        result.append(
            await run_session(
                sb,
                TrioStore(victim.store),
                ChangeFeed(),
                live=True,
                link=link,
                on_start=lambda machine, _stats: machines.append(machine),
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        h = Hostile(attacker, sa)
        await h.send(RulesHeld(held_digest(attacker, victim), False))
        await h.send(Have({}))
        await trio.sleep(0.3)
        for number, wire in enumerate(batches, 1):
            await h.send(Entries(number, [wire]))
            with trio.fail_after(60):  # ingested and acknowledged
                while messages.decode(await h.stream.receive()) != messages.Ack(number):
                    pass
        [machine] = machines
        assert not machine.closed  # type: ignore[attr-defined]
        kept = len(machine.flow._receivable)  # type: ignore[attr-defined]
        with contextlib.suppress(ConnectionLost):
            await h.send(messages.Bye("done"))
        with trio.fail_after(10):
            while not result:
                await trio.sleep(0.05)
    assert key(attacker) not in {a.author for a in victim.authors()}  # nothing stored
    assert kept <= 3000, f"{kept} collection names kept for the session's lifetime"


# ---------------------------------------------------------------- 2. after a hostile batch


async def test_batches_queued_after_a_hostile_one_are_not_ingested(make_db: MakeDb) -> None:
    """A forged entry proves the peer hostile and closes the session; a batch it
    had already queued behind the forged one must not be stored (the old ingester
    returned at once: passes on aac4e20). The new ingester goes round its loop and
    ingests the next queued batch (into the store, in a worker thread) before it
    looks whether the session is closed."""
    victim, attacker, other = make_db("victim"), make_db("attacker"), make_db("other")
    fill(attacker, 1)
    fill(other, 3)
    forged = bytearray(next(iter(attacker.export())))
    forged[-40] ^= 1
    valid = list(other.export())

    async def behave(h: Hostile) -> None:
        with contextlib.suppress(ConnectionLost):
            await h.send(Entries(1, [bytes(forged)]))
            await h.send(Entries(2, valid))

    stats = await against_hostile(victim, attacker, behave)
    assert stats.error and "invalid entry" in stats.reason
    stored = [a.author for a in victim.authors()]
    assert stored == [], "entries sent after the forged one were stored"


# ---------------------------------------------------------------- 3. reconciled version


async def test_a_have_does_not_vouch_for_rule_objects_the_peer_was_never_shown(
    make_db: MakeDb,
) -> None:
    """The peer's Have says it holds our rule objects as of the version we answered
    its RulesHeld with. The new pump reports the version of whatever objects it
    read last -- also ones read for a local change after that answer, which the
    peer has not received (here it never reads them). The agent then believes the
    peer holds them and stops dialling it to deliver them (``Peers.has_news``).
    The old session reported the version it answered the RulesHeld with (passes
    on aac4e20)."""
    victim, attacker = make_db("victim"), make_db("attacker")
    pairing.propose(victim, key(attacker), Terms())
    pairing.propose(attacker, key(victim), Terms())
    await session(victim, attacker)
    sa, sb = await connect(attacker, victim)
    rules_feed = ChangeFeed()
    versions: list[int] = []
    answered: list[int] = []
    result: list[SessionStats] = []

    async def serve() -> None:
        link = PairLink(
            victim,
            key(attacker),
            handshake_hash=sb.handshake_hash,
            peer_name="attacker",
            rules_feed=rules_feed,
            on_reconciled=versions.append,
        )
        result.append(
            await run_session(sb, TrioStore(victim.store), ChangeFeed(), live=True, link=link)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        h = Hostile(attacker, sa)
        await h.send(RulesHeld(held_digest(attacker, victim), False))
        await trio.sleep(0.5)  # the victim settles, begins (says Have)
        answered.append(victim.store.rules_version())
        # a local rule change on the victim: a new proposal about the pair
        assert pairing.propose(victim, key(attacker), Terms.make(["extra"])).new
        rules_feed.bump()
        await trio.sleep(0.5)  # the victim sends its Rules (never read here)
        await h.send(Have({}))
        await trio.sleep(0.5)
        with contextlib.suppress(ConnectionLost):
            await h.send(messages.Bye("done"))
        with trio.fail_after(10):
            while not result:
                await trio.sleep(0.05)
    assert versions, "the victim never reconciled"
    assert max(versions) <= answered[0], (
        f"reconciled as of {max(versions)}; the peer was only shown objects as of {answered[0]}"
    )


# ---------------------------------------------------------------- 4. throwaway authors


@pytest.mark.pure
def test_refused_entries_of_throwaway_authors_do_not_grow_a_session_without_bound() -> None:
    """A paired peer sends entries of ever new authors that we refuse (clock far
    ahead: not its fault, the session goes on): a session tracks at most as many
    authors as a Have may name."""
    machine = SyncSession(0.0)
    machine.begin({})
    machine.receive(Have({}), 0.0)
    for batch in range(1, 4):
        machine.receive(Entries(batch, []), 0.0)
        authors = [os.urandom(32) for _ in range(MAX_AUTHORS // 2)]
        positions = [(a, 1, os.urandom(32)) for a in authors]
        error = FutureTimestampError("its clock is far ahead")
        refusals = [Refusal(a, error, "entry 1: clock far ahead") for a in authors]
        machine.ingested(batch, positions, {}, refusals)
        machine.take_outbox(0.0)
    assert not machine.closed
    assert len(machine.peer) <= MAX_AUTHORS and len(machine.refusals) <= MAX_AUTHORS
