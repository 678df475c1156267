"""Review of issue 13 item 7 (Want, late merge of withheld payloads): hostile peers,
hostile authors, and what a newcomer is told."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

import p2psync
from p2psync.cli.peers import describe_incomplete
from p2psync.clock import now_ms
from p2psync.core.entry import withhold
from p2psync.core.rules import Terms
from tests.helpers import Author, flip_bit, undo_from_16
from tests.test_pairing import session
from tests.test_sync import sync_pair
from tests.test_widen import NARROW, agree, forked, live_author, only_stock

MakeDb = Callable[[str], p2psync.Database]



@pytest.mark.trio_memory
async def test_an_on_demand_sync_that_only_fills_ends(make_db: MakeDb) -> None:
    """The rule widens and nothing else changed: ``p2psync sync`` asks for the
    entries again, they arrive and fill, and then it never ends. The peer said
    Caught before it answered the Want; its answer (an Entries batch) makes us
    forget that Caught (``peer_caught(None)``), and since the answer moved no head
    the peer's digest is unchanged, so it never says Caught again: no verdict, the
    on-demand session waits for ever (Pings keep it from the idle timeout)."""
    a, b = make_db("a"), make_db("b")
    agree(a, b, Terms.make(["stock"]))
    with b.transaction() as tx:
        tx.put("stock", "s", 1)
        tx.put("misc", "m", "b")
    stats, _ = await session(a, b)
    assert stats.synced and a.get("misc", "m") is None
    agree(b, a, Terms.make(["misc"]))
    ended = False
    with trio.move_on_after(5):  # it takes well under a second
        stats, _ = await session(a, b)  # a syncs on demand; b serves live
        ended = True
    assert a.get("misc", "m") == "b"  # the fill came...
    assert ended, "...but the on-demand sync never ended"
    assert stats.synced and stats.done, stats


@pytest.mark.trio_memory
async def test_a_want_for_an_entry_of_a_frozen_author_does_not_break_every_session(
    make_db: MakeDb,
) -> None:
    """An author forks: we hold branch A's seq 1 without its 'misc' payload, then
    its branch B's seq 1 arrives (we freeze the author). The peer holds branch B
    further (seq 2) and never saw A. Our Want asks it for A1 (its Have names the
    author beyond seq 1, not frozen there), which it does not hold: it ends the
    session with an error, in every session from now on."""
    a, b = make_db("a"), make_db("b")
    a1, b1, b2 = forked()
    a.store.ingest([withhold(a1.wire(), only_stock)], now_ms(), flow=NARROW)
    a.store.ingest([b1.wire()], now_ms())  # the fork: x frozen here
    assert a.store.forks()
    b.store.ingest([b1.wire(), b2.wire()], now_ms())
    for _ in range(2):  # not once: every time
        with trio.fail_after(30):
            stats_a, stats_b = await sync_pair(a, b)
        assert "not held here" not in stats_b.reason, stats_b
        assert not stats_a.error and not stats_b.error, (stats_a, stats_b)


def many_collections(author: Author, entries: int) -> list[bytes]:
    """``entries`` entries of 10,000 ops each, every op in a collection of its own,
    as a path that carries none of them delivers them: every payload withheld."""
    wires = []
    for j in range(entries):
        ops = [author.op(f"c{j}-{i}", "k", 1) for i in range(10_000)]
        wires.append(withhold(author.write(*ops).wire(), lambda _: False))
    return wires


@pytest.mark.trio_memory
async def test_ops_missing_in_many_collections_do_not_stop_sessions(make_db: MakeDb) -> None:
    """A hostile author writes ops in 260,000 collections; they reach us and the
    peer by paths that carry none of them (any key may author; ops in
    collections not carried are applied without payload). Opening a session then
    builds one SQL statement with a parameter per collection (missing.wanted):
    past SQLite's limit on parameters the session cannot open, with any peer whose
    rules may carry those collections, ever."""
    a, b = make_db("a"), make_db("b")
    wires = many_collections(live_author(), 26)
    for db in (a, b):
        result = db.store.ingest(wires, now_ms(), flow=NARROW)
        assert len(result.accepted) == 26
    a.put("stock", "s", 1)  # something to sync
    with trio.move_on_after(20):  # (whether the session ends is another test's)
        await sync_pair(a, b)  # raises StoreError: too many SQL variables
    assert b.get("stock", "s") == 1


@pytest.mark.trio_memory
async def test_ops_the_peer_cannot_send_do_not_starve_those_it_can(make_db: MakeDb) -> None:
    """Opening a session reads at most 100,000 missing ops (store.py
    MAX_ASKED_PER_SESSION), the first by author key, *before* keeping those the
    peer may send (its Have). A hostile author with a low key and 100,000 ops held
    here without payload (the peer holds them without payload too) fills the
    quota in every session: y's entry, which the peer holds in full, is never
    asked for."""
    a, b = make_db("a"), make_db("b")
    x, y = live_author(), live_author()
    if x.key > y.key:
        x, y = y, x
    junk = [
        withhold(x.write(*[x.op("misc", f"k{i}", i) for i in range(10_000)]).wire(), only_stock)
        for _ in range(10)
    ]
    wanted = y.put("misc", "y", "from y")
    for db in (a, b):
        db.store.ingest(junk, now_ms(), flow=NARROW)
    a.store.ingest([withhold(wanted.wire(), only_stock)], now_ms(), flow=NARROW)
    b.store.ingest([wanted.wire()], now_ms())
    for _ in range(2):
        with trio.move_on_after(10):  # (whether the session ends is another test's)
            await sync_pair(a, b)
    assert a.get("misc", "y") == "from y"


@pytest.mark.trio_memory
async def test_an_unchanged_pair_does_not_send_the_same_entries_again_each_session(
    make_db: MakeDb,
) -> None:
    """Both sides hold an author's entries without their 'misc' payloads (each
    got them by a path that withholds 'misc'), and the rule between them carries
    everything. Each asks the other for them in every session, and each sends
    them all again, in every session, though neither holds a payload: a no-op
    resync re-sends up to 100,000 ops' entries (up to 1 MiB each) each way, at
    every reconnection."""
    a, b = make_db("a"), make_db("b")
    x = live_author()
    wires = [withhold(x.put("misc", f"k{i}", i).wire(), only_stock) for i in range(50)]
    for db in (a, b):
        db.store.ingest(wires, now_ms(), flow=NARROW)
    for _ in range(2):
        with trio.fail_after(20):
            stats_a, stats_b = await sync_pair(a, b)
        assert stats_a.synced, stats_a
    assert stats_a.sent_again == 0 and stats_b.sent_again == 0, (stats_a, stats_b)


@pytest.mark.pure
def test_the_migration_keys_missing_ops_by_the_stored_entry_id(make_db: MakeDb) -> None:
    """missing.rebuild (schema 16) keys each missing op by the ID it recomputes from
    the stored signed bytes, not by the stored ``id``. A row damaged in its
    signature (``p2psync verify`` names it; the body still decodes) so leaves a
    missing op under an ID no store holds: every session with a peer that may
    send 'misc' then asks for it, and the peer ends the session ("asked for entry
    …, not held here"), every time."""
    a = make_db("a")
    x = live_author()
    a.store.ingest([withhold(x.put("misc", "m", 1).wire(), only_stock)], now_ms(), flow=NARROW)
    path = a.home.store_path
    a.close()
    with sqlite3.connect(path) as conn:
        (signed,) = conn.execute("SELECT signed FROM entries").fetchone()
        conn.execute("UPDATE entries SET signed = ?", (flip_bit(signed, len(signed) * 8 - 1),))
        undo_from_16(conn)
    again = p2psync.open(path.parent)
    try:
        conn = sqlite3.connect(path)
        held = {row[0] for row in conn.execute("SELECT id FROM entries")}
        missing = {row[0] for row in conn.execute("SELECT entry FROM payloads_missing")}
        conn.close()
        assert missing <= held, "a missing op under an ID not held"
    finally:
        again.close()


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.pure
def test_the_protocol_documents_want_and_no_longer_says_payloads_are_never_fetched() -> None:
    """docs/protocol.md is the wire spec, yet the commit left it alone: its message
    table stops at type 11 (no ``Want``, no word on its limits: ascending unique
    IDs, 1-1,024 of them, one at a time, only once both said Have, not when no
    rule lets the receiver send), §5 has no step for it, and it still says
    withheld payloads are not fetched later ("Known limitation"); entry-format
    §3.4 still says a later complete copy "would only count as a duplicate", and
    the README still says "Until withheld parts can be fetched later"."""
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    entry_format = (ROOT / "docs" / "entry-format.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "| 12 | `Want`" in protocol
    assert "not fetched later" not in protocol
    assert "would only\ncount as a duplicate" not in entry_format
    assert "Until\nwithheld parts can be fetched later" not in readme


@pytest.mark.pure
def test_peers_and_sync_no_longer_say_withheld_payloads_cannot_be_fetched() -> None:
    """``p2psync peers``, ``status`` and ``sync`` note ops held without payload in
    collections a peer may send with "p2psync cannot fetch them later yet, so they
    will not come from this peer either": now they are asked for at every session
    with that peer (and left only when it lacks them too)."""
    note = describe_incomplete({"misc": 2})
    assert "cannot fetch them later" not in note, note


@pytest.mark.trio_memory
async def test_a_copy_of_an_entry_damaged_here_does_not_crash_the_session(
    make_db: MakeDb,
) -> None:
    """Writer.try_apply now decodes the stored payloads of an entry it holds when a
    copy brings other payloads (to see whether it lacks one). A stored row damaged
    there (``p2psync verify`` names it) makes that raise ``DecodeError`` out of
    ``Store.ingest``: not a StoreError, so the session's ingester does not catch
    it and the whole session dies with the exception. The Want asks for exactly
    that entry at every session (its op is missing here): every session dies.
    Before, such a copy was a duplicate."""
    a, b = make_db("a"), make_db("b")
    x = live_author()
    entry = x.put("misc", "m", 1)
    a.store.ingest([withhold(entry.wire(), only_stock)], now_ms(), flow=NARROW)
    b.store.ingest([entry.wire()], now_ms())
    with sqlite3.connect(a.home.store_path) as conn:
        (payloads,) = conn.execute("SELECT payloads FROM entries").fetchone()
        conn.execute("UPDATE entries SET payloads = ?", (payloads[:-1],))  # truncated
    with trio.move_on_after(10):
        await sync_pair(a, b)  # raises: DecodeError out of the ingester
