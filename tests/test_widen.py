"""Payloads withheld under a narrower rule are fetched when the rule widens (issue 13,
item 7): the receiving side asks for the entries again (``Want``) and merges the ops
late, so that both sides end holding exactly what a fresh pairing with the wider
rule gives: the same entries with the same payloads, the same records, the same
conflicts."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable

import pytest
import trio

import p2psync
from p2psync import pairing
from p2psync.clock import now_ms
from p2psync.core import hlc
from p2psync.core.entry import Entry, withhold
from p2psync.core.flow import Flow
from p2psync.core.messages import Have, Head, Resent, Want
from p2psync.core.rules import Permissions, Terms
from p2psync.core.session import SyncSession
from p2psync.net.link import PairLink
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from p2psync.net.transport import SecureStream
from p2psync.store.missing import Missing
from tests.helpers import Author, flip_bit, undo_from_16
from tests.test_pairing import key, session
from tests.test_sync import connect, sync_pair

MakeDb = Callable[[str], p2psync.Database]


def agree(a: p2psync.Database, b: p2psync.Database, terms: Terms) -> None:
    """a proposes ``terms``, b accepts them; both hold every object."""
    proposal = pairing.propose(a, key(b), terms).rule
    b.store.add_rule_objects(key(b), a.store.rule_objects(key(b)), now_ms())
    pairing.accept(b, next(r for r in b.store.rules(key(a)) if r.id == proposal.id))
    a.store.add_rule_objects(key(a), b.store.rule_objects(key(a)), now_ms())


def holdings(db: p2psync.Database) -> tuple[object, ...]:
    """Everything a store holds of the shared data: entries with their payloads,
    records (winner and conflicted flag), the other heads, what it lacks."""
    conn = sqlite3.connect(db.home.store_path)
    try:
        return tuple(
            sorted(conn.execute(sql).fetchall())
            for sql in (
                "SELECT id, payloads FROM entries",
                "SELECT collection, key, entry, payload, deleted, conflicted FROM records",
                "SELECT collection, key, entry FROM losers",
                "SELECT * FROM payloads_missing",
                "SELECT * FROM incomplete",
            )
        )
    finally:
        conn.close()


def write_history(a: p2psync.Database, b: p2psync.Database) -> None:
    """Writes on both sides touching 'stock' (always shared) and 'misc' (shared once
    the rule widens): one entry mixing both, concurrent writes of one record."""
    with a.transaction() as tx:  # one entry, an op in each collection
        tx.put("stock", "s1", 1)
        tx.put("misc", "m1", "a1")
    a.put("misc", "m2", "a2")
    b.put("misc", "m1", "b1")  # concurrent with a's m1: a conflict once both see both
    b.put("stock", "s2", 2)
    b.put("misc", "m3", "b3")


@pytest.mark.trio_memory
async def test_widening_a_rule_brings_what_it_withheld_as_a_fresh_pairing_would(
    make_db: MakeDb,
) -> None:
    a, b, fresh = make_db("a"), make_db("b"), make_db("fresh")
    agree(a, b, Terms.make(["stock"]))
    write_history(a, b)
    stats, _ = await session(a, b)
    assert stats.synced, stats.reason
    assert b.get("stock", "s1") == 1 and b.get("misc", "m1") == "b1"  # a's m1 withheld
    assert b.store.incomplete() == {"misc": 2} and a.store.incomplete() == {"misc": 2}
    # after the narrow sync, a later write names a version b holds without payload:
    # merged late, that version must be superseded at once, not a conflict
    a.put("misc", "m2", "a2 again")
    b.delete("misc", "m3")

    agree(b, a, Terms.make(["misc"]))  # rules add up: now stock and misc
    stats, _ = await session(a, b)
    assert stats.synced, stats.reason
    assert stats.filled == 2, stats  # b's two entries, asked for again by a

    # a fresh site paired with the wider rule from the start, fed by a
    agree(fresh, a, Terms.make(["stock", "misc"]))
    stats, _ = await session(fresh, a)
    assert stats.synced, stats.reason
    assert holdings(a) == holdings(b), "a and b differ after widening"
    assert holdings(fresh) == holdings(a), "a fresh pairing holds something else"
    assert a.get("misc", "m2") == "a2 again" and not a.in_conflict("misc", "m2")
    assert a.in_conflict("misc", "m1") and b.in_conflict("misc", "m1")
    assert not b.exists("misc", "m3")
    assert a.store.incomplete() == {} and b.store.incomplete() == {}
    assert a.verify().ok and b.verify().ok


# ------------------------------------------------------------ the late merge alone


NARROW = Flow(Permissions(send=(Terms(),), receive=(Terms.make(["stock"]),)))


def only_stock(collection: str) -> bool:
    return collection == "stock"


@pytest.mark.pure
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_late_ops_merge_alike_in_any_order(make_db: MakeDb, order: tuple[int, ...]) -> None:
    """a writes m (X), then m again naming X (Y), then m again (Z), while b writes m
    concurrently. b first holds all three without their 'misc' payloads; the full
    copies then arrive one at a time, in every order (Y's op arrives knowing a
    base b still lacks: X). Whatever the order, b ends as a site given the full
    copies at once: b's own (later) write wins, Z is its conflict, X and Y are gone."""
    a = make_db("a")
    for value in ("x", "y", "z"):
        with a.transaction() as tx:
            tx.put("misc", "m", value)
            tx.put("stock", f"s-{value}", value)
    full = list(a.export(key(a)))
    reference = make_db("reference")
    b = make_db(f"b{''.join(map(str, order))}")
    b.put("misc", "m", "b")
    reference.ingest(list(b.export(key(b))))
    reference.ingest(full)

    withheld = [withhold(w, only_stock) for w in full]
    result = b.store.ingest(withheld, now_ms(), flow=NARROW)
    assert len(result.accepted) == 3 and b.get("misc", "m") == "b"
    for index in order:
        result = b.store.ingest([full[index]], now_ms())
        assert result.filled and not result.rejected, result
    assert holdings(b)[1:] == holdings(reference)[1:]  # records, losers, nothing missing
    assert holdings(b)[0] == holdings(reference)[0]  # the same payloads held
    assert b.get("misc", "m") == "b" and b.in_conflict("misc", "m")
    [conflict] = b.conflicts()
    assert len(conflict.losers) == 1 and conflict.losers[0].value == "z"
    assert b.verify().ok


@pytest.mark.pure
def test_a_copy_still_lacking_the_payload_changes_nothing(make_db: MakeDb) -> None:
    """A peer asked for an entry may hold it without the payload too (it was
    filtered on its way there): its copy is no refusal and fills nothing."""
    a, b = make_db("a"), make_db("b")
    a.put("misc", "m", 1)
    withheld = [withhold(w, only_stock) for w in a.export(key(a))]
    b.store.ingest(withheld, now_ms(), flow=NARROW)
    before = holdings(b)
    result = b.store.ingest(withheld, now_ms())  # a flow that lets misc come
    assert not result.rejected and not result.filled and result.duplicates == 1
    assert holdings(b) == before


@pytest.mark.pure
def test_a_store_from_before_version_16_knows_what_it_lacks(make_db: MakeDb) -> None:
    """The migration reads the ops held without payload, and what later ops named
    of them, from the entries held."""
    a, b = make_db("a"), make_db("b")
    a.put("misc", "m", "x")
    first = [withhold(w, only_stock) for w in a.export(key(a))]
    b.store.ingest(first, now_ms(), flow=NARROW)
    a.put("misc", "m", "y")  # names x as its base
    b.store.ingest(list(a.export(key(a)))[1:], now_ms())
    expected = holdings(b)
    path = b.home.store_path
    b.close()
    with sqlite3.connect(path) as conn:
        undo_from_16(conn)
    again = p2psync.open(path.parent)
    try:
        assert holdings(again) == expected
        again.store.ingest(list(a.export(key(a)))[:1], now_ms())  # x, in full
        assert again.get("misc", "m") == "y" and not again.in_conflict("misc", "m")
    finally:
        again.close()


@pytest.mark.trio_memory
async def test_two_live_sides_are_in_sync_once_the_payloads_came(make_db: MakeDb) -> None:
    """The side asked for entries sends them with its heads unchanged, after its
    Caught for those heads: the asker takes the batch for more to come, so the
    answering side must say Caught again (it did not: never in sync while live)."""
    a, c = make_db("a"), make_db("c")
    agree(a, c, Terms.make(["stock"]))
    a.put("stock", "S-1", 3)
    vouchers_only = Flow(Permissions(send=(Terms(),), receive=(Terms.make(["vouchers"]),)))
    withheld = [withhold(w, lambda name: name == "vouchers") for w in a.export(key(a))]
    c.store.ingest(withheld, now_ms(), flow=vouchers_only)  # as if through a hub
    sa, sc = await connect(a, c)
    machines: dict[str, SyncSession] = {}

    async def side(name: str, stream: SecureStream, db: p2psync.Database, peer: bytes) -> None:
        link = PairLink(db, peer, handshake_hash=stream.handshake_hash, peer_name="x")
        await run_session(
            stream, TrioStore(db.store), ChangeFeed(), live=True, link=link,
            on_start=lambda machine, _: machines.__setitem__(name, machine),
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "a", sa, a, key(c))
        nursery.start_soon(side, "c", sc, c, key(a))
        with trio.fail_after(10):
            while not (len(machines) == 2 and all(m.synced for m in machines.values())):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert c.get("stock", "S-1") == 3 and c.store.incomplete() == {}


# ------------------------------------------------------------ Want and Resent


def live_author() -> Author:
    author = Author()
    author.clock = hlc.from_wall(now_ms())
    return author


def forked() -> tuple[Entry, Entry, Entry]:
    """An author's fork: branch A's seq 1, then branch B's seq 1 and 2 (all 'misc')."""
    x = live_author()
    a1 = x.put("misc", "m", "branch a")
    x.seq, x.prev = 0, None
    b1 = x.put("misc", "m", "branch b")
    return a1, b1, x.put("misc", "m", "branch b again", bases=[b1.id])


@pytest.mark.trio_memory
async def test_a_want_for_an_entry_the_peer_does_not_hold_is_answered_all_the_same(
    make_db: MakeDb,
) -> None:
    """An author forked and neither side knows yet: we hold its branch A (seq 1,
    'misc' withheld), the peer its branch B up to seq 2. By the peer's Have it
    holds seq 1, so we ask for A1; it holds B1 there. It skips A1 and says
    Resent(0) instead of ending the session in an error at every session: the
    first ends on the fork proof (as any fork does), the next is clean."""
    a, b = make_db("a"), make_db("b")
    a1, b1, b2 = forked()
    a.store.ingest([withhold(a1.wire(), only_stock)], now_ms(), flow=NARROW)
    b.store.ingest([b1.wire(), b2.wire()], now_ms())
    for _ in range(2):  # the first ends on the fork (as forks do), the next clean
        with trio.fail_after(20):
            stats_a, stats_b = await sync_pair(a, b)
        for stats in (stats_a, stats_b):
            assert "Want" not in stats.reason and "Resent" not in stats.reason, stats
            assert not stats.error or "signed two different entries" in stats.reason, stats
    assert not stats_a.error and not stats_b.error, (stats_a, stats_b)
    assert a.store.forks()  # (b learns of it from the author, or a peer that sends it A1)


@pytest.mark.pure
@pytest.mark.parametrize("state", ["unasked", "answered"])
def test_a_resent_nobody_asked_for_is_a_protocol_error(state: str) -> None:
    """A peer's Resent when we asked nothing (or once more after its answer) is
    the peer's protocol error: it must not clear what we wait for."""
    machine = SyncSession(0.0)
    machine.begin({}, [Missing(b"e" * 32, 0, "misc", b"x" * 32, 1)])
    machine.receive(Have({b"x" * 32: Head(1, b"e" * 32)}), 0.0)
    out = machine.take_outbox(0.0)
    assert Want([b"e" * 32]) in out, out
    if state == "answered":
        machine.receive(Resent(0), 0.0)
        assert not machine.closed
    else:
        machine = SyncSession(0.0)
        machine.begin({})
        machine.receive(Have({}), 0.0)
    machine.receive(Resent(0), 0.0)
    assert machine.closed and "Resent" in (machine.close_reason or "")


@pytest.mark.pure
def test_a_want_while_answering_one_is_a_protocol_error() -> None:
    machine = SyncSession(0.0)
    machine.begin({})
    machine.receive(Have({}), 0.0)
    machine.receive(Want([b"e" * 32]), 0.0)
    assert machine.to_resend() == [b"e" * 32]
    machine.receive(Want([b"f" * 32]), 0.0)
    assert machine.closed and "answered" in (machine.close_reason or "")


@pytest.mark.pure
def test_a_copy_mends_a_payload_damaged_here(make_db: MakeDb) -> None:
    """A bit flipped in a stored payload (`p2psync verify` names it): a sound copy
    of the entry mends the stored bytes and changes no record."""
    a, b = make_db("a"), make_db("b")
    a.put("stock", "s", "x" * 40)
    wire = next(iter(a.export(key(a))))
    b.store.ingest([wire], now_ms())
    before = holdings(b)[1:]
    with sqlite3.connect(b.home.store_path) as conn:
        (payloads,) = conn.execute("SELECT payloads FROM entries").fetchone()
        conn.execute("UPDATE entries SET payloads = ?", (flip_bit(payloads, 8 * 30),))
    assert not b.verify().ok
    result = b.store.ingest([wire], now_ms(), peer=key(a))
    assert result.mended and not result.rejected, result
    assert b.verify().ok and holdings(b)[1:] == before
