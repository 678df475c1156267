"""Review of the mend commits (Want answered by Resent, ``missing_lacked``,
``entries_damaged`` and ``verify --repair``): a hostile peer, a damaged store, and
what a newcomer is told. Each test fails on the code under review."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

import p2psync
from p2psync.cli.main import cli
from p2psync.clock import now_ms
from p2psync.core.entry import withhold
from p2psync.core.flow import Flow
from p2psync.core.rules import Permissions, Terms
from p2psync.core.session import SyncSession
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from tests.helpers import flip_bit
from tests.test_mend import damage, verify_cli
from tests.test_sync import connect, sync_pair
from tests.test_widen import NARROW, key, live_author, only_stock

MakeDb = Callable[[str], p2psync.Database]

ROOT = Path(__file__).resolve().parent.parent

#: what a peer that may send us only 'misc' may send
ONLY_MISC = Flow(Permissions(send=(Terms(),), receive=(Terms.make(["misc"]),)))


def only_misc(collection: str) -> bool:
    return collection == "misc"


def missing_rows(db: p2psync.Database) -> list[tuple[object, ...]]:
    with sqlite3.connect(db.home.store_path) as conn:
        return conn.execute("SELECT entry, op, collection FROM payloads_missing").fetchall()


def own_entry_2_unmendable(b: p2psync.Database) -> None:
    """b writes s0-s2, then s1 again (so entry 2's version is gone from its
    records), and entry 2 is damaged and marked: no copy of it exists anywhere."""
    for i in range(3):
        b.put("stock", f"s{i}", "x" * 50)
    b.put("stock", "s1", "again")
    damage(b, 2, "payloads")
    code, text = verify_cli(b, "--repair")
    assert code == 1 and "marked" in text, text


# ------------------------------------------------------------ the late merge


@pytest.mark.pure
def test_a_copy_that_cannot_mend_an_entry_merges_none_of_it_halfway(make_db: MakeDb) -> None:
    """An entry holds an op in 'misc' (withheld here: missing) then one in 'stock'
    (held here, then damaged on disk). A peer that may send 'misc' but not 'stock'
    sends a copy: ``Writer.fill`` merges the misc op into its record (op 0), then
    meets the damaged stock op that the copy lacks (op 1) and returns DUPLICATE
    without storing the payload or clearing ``payloads_missing``. The record now
    shows the late op while the store still says it lacks it (and asks for it at
    every session), ``incomplete`` was decremented (``status`` says nothing is
    missing), and the entry this site forwards still lacks the payload its own
    record shows."""
    b = make_db("b")
    x = live_author()
    entry = x.write(x.op("misc", "m", "late"), x.op("stock", "s", "y" * 40))
    b.store.ingest([withhold(entry.wire(), only_stock)], now_ms(), flow=NARROW)
    assert b.get("misc", "m") is None and b.store.incomplete() == {"misc": 1}
    with sqlite3.connect(b.home.store_path) as conn:  # a bit flipped in the stock payload
        (blob,) = conn.execute("SELECT payloads FROM entries").fetchone()
        conn.execute("UPDATE entries SET payloads = ?", (flip_bit(blob, (len(blob) - 4) * 8),))
    assert not b.verify().ok

    copy = withhold(entry.wire(), only_misc)  # misc yes, stock withheld
    result = b.store.ingest([copy], now_ms(), flow=ONLY_MISC, peer=b"p" * 32)
    # refused with the reason (it cannot mend), or applied whole: never half
    assert all("cannot mend" in r.describe() for r in result.rejected), result
    merged = b.get("misc", "m") == "late"
    still_missing = bool(missing_rows(b))
    assert merged != still_missing, (
        f"record merged: {merged}, yet payloads_missing still lists it: {still_missing}"
    )
    assert b.store.incomplete() == ({"misc": 1} if still_missing else {})


# ------------------------------------------------------------ damaged entries


@pytest.mark.trio_memory
async def test_a_damaged_entry_the_peer_cannot_mend_is_named_as_the_reason(
    make_db: MakeDb,
) -> None:
    """b holds a's entry 2 damaged in its 'misc' payload and marks it (``verify
    --repair``); p holds a's log with 'misc' withheld (it never had it). b's sync
    with p gets entries 2-3 again, cannot mend entry 2 (the copy lacks what is
    damaged), and ends "cannot get in step: entries of 1 author that the peer holds
    were not applied here (see the log)": nothing was refused, the log names
    nothing, and the user is not told the damaged entry is what keeps it stuck
    (nor that p cannot mend it)."""
    a, b, p = make_db("a"), make_db("b"), make_db("p")
    a.put("stock", "s1", 1)
    with a.transaction() as tx:
        tx.put("stock", "s2", 2)
        tx.put("misc", "m2", "x" * 40)
    a.put("stock", "s3", 3)
    with a.transaction() as tx:  # entry 2's versions are gone from b's records
        tx.put("stock", "s2", "again")
        tx.put("misc", "m2", "again")
    wires = list(a.export(key(a)))
    b.store.ingest(wires, now_ms())
    p.store.ingest([withhold(w, only_stock) for w in wires], now_ms(), flow=NARROW)
    damage(b, 2, "payloads")
    code, text = verify_cli(b, "--repair")
    assert code == 1 and "marked" in text, text

    with trio.fail_after(10):
        stats_b, _ = await sync_pair(b, p)  # b syncs on demand
    assert not stats_b.synced
    assert "damaged" in stats_b.reason, stats_b.reason


@pytest.mark.trio_memory
async def test_own_writes_after_an_unmendable_own_entry_do_not_end_in_sync_unsent(
    make_db: MakeDb,
) -> None:
    """b's own entry 2 is damaged and no peer ever got it; ``verify --repair``
    marks it (and says "the next sync with a peer that holds them ... mends
    them"). From then on b's Have shows its own log at seq 1 and nothing of it
    from entry 2 on is ever sent, including what b writes afterwards (local
    writes go on: the writer reads ``authors``, not ``heads()``). ``p2psync sync``
    with c says "synced" while c lacks everything b wrote since: the new writes
    never leave this site, and nothing says so."""
    b, c = make_db("b"), make_db("c")
    own_entry_2_unmendable(b)
    b.put("stock", "after", "written after the repair")

    with trio.fail_after(10):
        stats_b, stats_c = await sync_pair(b, c)
    delivered = c.get("stock", "after") == "written after the repair"
    assert delivered or (not stats_b.synced and "damaged" in stats_b.reason), (
        f"c lacks b's own later writes, yet b's sync ended: {stats_b.reason!r}"
    )
    # (fixed: the sync ends "cannot get in step", naming the entry, on both sides)
    assert "lacks entries 2-5 of" in stats_b.reason and "entry 2 of" in stats_b.reason
    assert "holds but cannot send" in stats_c.reason, stats_c.reason


@pytest.mark.trio_memory
async def test_repair_while_a_live_session_runs_mends_once_it_reconnects(
    make_db: MakeDb,
) -> None:
    """The agent runs, live with a (the author itself, holding entry 3 sound).
    ``verify --repair`` marks b's entry 3; the agent notices the commit (PRAGMA
    data_version bumps its feed) and its heads drop to seq 2. But a's session
    believes b holds seq 5 (it sent them), so it never sends 3-5 again: both
    sides log "cannot get in step" (a: "the peer refused what we sent") and stay
    so for as long as the connection lasts. ``p2psync sync`` goes through the
    running agent, so the recovery verify prints ("run verify --repair, then
    sync") does not mend anything while the agent runs."""
    a, b = make_db("a"), make_db("b")
    for i in range(5):
        a.put("stock", f"s{i}", "x" * 50)
    a.put("stock", "s2", "again")  # entry 3's version is gone from b's records
    sa, sb = await connect(a, b)
    feed_b = ChangeFeed()
    mended = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_session(sa, TrioStore(a.store), ChangeFeed(), live=True))
        ended: dict[str, str] = {}

        async def run_b() -> None:
            stats = await run_session(sb, TrioStore(b.store), feed_b, live=True)
            ended["b"] = stats.reason

        nursery.start_soon(run_b)
        with trio.fail_after(10):
            while key(a) not in b.store.heads() or b.store.heads()[key(a)].seq < 6:
                await trio.sleep(0.05)
        damage(b, 3, "payloads")
        code, text = verify_cli(b, "--repair")
        assert code == 1 and "marked" in text, text
        feed_b.bump()  # as the agent does when another connection commits
        with trio.move_on_after(5):
            while not b.verify().ok:
                await trio.sleep(0.1)
            mended = True
        nursery.cancel_scope.cancel()
    if not mended:  # the fix: b's session ends ("log shrank") and the agent redials
        assert "shrank" in ended.get("b", ""), ended
        with trio.fail_after(10):
            await sync_pair(b, a)
        mended = b.verify().ok
    assert mended, "the running agent never fetched the damaged entry again"


# ------------------------------------------------------------ what a newcomer reads


@pytest.mark.pure
def test_the_protocol_says_a_have_stops_before_a_damaged_entry() -> None:
    """docs/protocol.md §4 still says "A `Have` lists every author of which the
    sender has applied at least one entry: `seq` is its highest applied seq". A
    site with an entry marked damaged now names the entry before it (and leaves
    out an author whose seq 1 is damaged), so a peer sees a Have lower than what
    it knows the site holds; an implementer following the text (or a live
    session, which tracks what the peer holds) will not send those entries again,
    and §5 step 6a describes the mend as part of Want, which is not how it comes."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    start = text.index("A `Have` lists every author")
    paragraph = text[start : text.index("\n\n", start)]
    assert "damaged" in paragraph, paragraph


@pytest.mark.pure
def test_the_readme_tells_how_to_mend_a_damaged_store() -> None:
    """README's command list says verify exits 1 "naming the broken entry", but
    not that ``verify --repair`` exists, what it does to what this site serves, or
    that a sync then mends it."""
    readme = (ROOT / "README.md").read_text()
    assert "--repair" in readme


@pytest.mark.trio_memory
async def test_a_live_session_says_what_a_damaged_own_entry_keeps_back(
    make_db: MakeDb,
) -> None:
    """Live, the site holding entries it cannot send (its own entry 2 marked
    damaged, no copy anywhere) is not "in sync": its session is stuck with the
    reason (what `status`, `peers` and `p2psync sync` through the agent show),
    and a write made meanwhile does not make it in sync either."""
    b, c = make_db("b"), make_db("c")
    own_entry_2_unmendable(b)
    sb, sc = await connect(b, c)
    feed_b = ChangeFeed()
    stuck: list[str] = []
    machines: dict[str, SyncSession] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_session(
                sb,
                TrioStore(b.store),
                feed_b,
                live=True,
                on_stuck=lambda stats: stuck.append(stats.stuck or ""),
                on_start=lambda m, _: machines.update(b=m),
            )
        )
        nursery.start_soon(lambda: run_session(sc, TrioStore(c.store), ChangeFeed(), live=True))
        with trio.fail_after(10):
            while not stuck:
                await trio.sleep(0.02)
        assert "lacks entries 2-4 of" in stuck[0] and "entry 2 of" in stuck[0], stuck
        b.put("stock", "later", 1)
        feed_b.bump()
        await trio.sleep(0.5)
        machine = machines["b"]
        assert not machine.synced
        assert machine.stuck_reason is not None and "entries 2-5" in machine.stuck_reason
        nursery.cancel_scope.cancel()


@pytest.mark.pure
def test_status_says_which_entries_a_damaged_one_keeps_back(make_db: MakeDb) -> None:
    """`p2psync status` (what a clerk reads first) names the damaged entry that
    keeps this site's later entries from every peer, text and JSON alike."""
    b = make_db("b")
    own_entry_2_unmendable(b)
    b.put("stock", "after", 1)
    result = CliRunner().invoke(cli, ["status", "--home", str(b.path)])
    assert result.exit_code == 0, result.output
    assert "entry 2 of" in result.output and "entries 2-5 of" in result.output, result.output
    result = CliRunner().invoke(cli, ["status", "--json", "--home", str(b.path)])
    damaged = json.loads(result.output)["store"]["damaged"]
    assert damaged == [{"author": b.identity.short_id, "seq": 2, "held_to": 5}], damaged
