"""A damaged stored entry (issue 13, fault battery): `p2psync verify` names it and
says how to recover; `verify --repair` marks it, after which this site serves
nothing from it on (a peer would take the damaged bytes for an attack) and shows
that author's log only up to the entry before, so the next sync with a peer that
holds it sends it again and the sound copy mends the stored bytes."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
from click.testing import CliRunner

import p2psync
from p2psync.cli.main import cli
from p2psync.clock import now_ms
from p2psync.core.entry import withhold
from tests.helpers import flip_bit
from tests.test_sync import sync_pair
from tests.test_widen import NARROW, holdings, key, only_stock

MakeDb = Callable[[str], p2psync.Database]


def damage(db: p2psync.Database, seq: int, column: str) -> None:
    """Flip one bit in the middle of ``column`` of the stored entry ``seq``."""
    with sqlite3.connect(db.home.store_path) as conn:
        (blob,) = conn.execute(f"SELECT {column} FROM entries WHERE seq = ?", (seq,)).fetchone()
        conn.execute(
            f"UPDATE entries SET {column} = ? WHERE seq = ?", (flip_bit(blob, len(blob) * 4), seq)
        )


def verify_cli(db: p2psync.Database, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["verify", *args, "--home", str(db.path)])
    return result.exit_code, result.output


@pytest.mark.trio_memory
@pytest.mark.parametrize("column", ["payloads", "signed"])
async def test_a_damaged_entry_is_named_not_served_and_mended_from_a_peer(
    make_db: MakeDb, column: str
) -> None:
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    for i in range(5):
        a.put("stock", f"s{i}", "x" * 50)
    a.put("stock", "s2", "again")  # entry 3's version is gone from b's records
    await sync_pair(b, a)
    records = holdings(b)[1:]
    damage(b, 3, column)

    code, text = verify_cli(b)
    assert code == 1 and "entry 3 of" in text and "verify --repair" in text, text
    code, text = verify_cli(b, "--repair")
    assert code == 1 and "marked" in text, text

    # c, which syncs with b only, gets what b holds sound, and no damaged bytes
    stats_c, stats_b = await sync_pair(c, b)
    assert not stats_c.error and not stats_b.error, (stats_c, stats_b)
    assert [x.seq for x in c.authors() if x.author == key(a)] == [2]

    stats_b, _ = await sync_pair(b, a)  # a holds it sound: b mends
    assert stats_b.synced, stats_b
    assert b.verify().ok and holdings(b)[1:] == records
    assert verify_cli(b)[0] == 0
    await sync_pair(c, b)
    assert holdings(c) == holdings(b) == holdings(a)


@pytest.mark.pure
def test_damage_the_chain_cannot_confirm_says_to_restore(make_db: MakeDb) -> None:
    """The last entry's ID column damaged: nothing confirms which ID it should
    have, so no peer's copy can be matched to it."""
    a = make_db("a")
    a.put("stock", "s", 1)
    with sqlite3.connect(a.home.store_path) as conn:
        conn.execute("UPDATE entries SET id = ?", (b"\x00" * 32,))
    code, text = verify_cli(a, "--repair")
    assert code == 1 and "backup" in text and "marked" not in text, text


@pytest.mark.pure
def test_a_mark_on_a_sound_entry_is_lifted_by_its_copy(make_db: MakeDb) -> None:
    """A mark left on an entry that is sound (the damage was elsewhere, or mended
    by hand) is lifted by the first identical copy: the log shows whole again."""
    a, b = make_db("a"), make_db("b")
    a.put("stock", "s", 1)
    wires = list(a.export(key(a)))
    b.ingest(wires)
    b.store.mark_damaged([(key(a), 1, next(iter(b.log())).id)], now_ms())
    assert key(a) not in b.store.heads()
    b.store.ingest(wires, now_ms(), peer=key(a))
    assert b.store.heads()[key(a)].seq == 1




@pytest.mark.pure
def test_a_copy_that_cannot_mend_says_why(make_db: MakeDb) -> None:
    """The sender's copy lacks the damaged part (its rules withhold it): the entry
    is refused with the reason (shown where the pair is stuck), not passed over in
    silence as a duplicate."""
    a, b = make_db("a"), make_db("b")
    a.put("stock", "s", "x" * 50)
    wire = next(iter(a.export(key(a))))
    b.ingest([wire])
    damage(b, 1, "payloads")
    b.store.mark_damaged(b.verify().mendable, now_ms())
    result = b.store.ingest([withhold(wire, lambda _: False)], now_ms(), peer=key(a))
    assert [r.error for r in result.rejected if "cannot mend" in str(r.error)], result
    assert not b.verify().ok


def damage_entry(db: p2psync.Database, entry_id: bytes, column: str, bit: int) -> None:
    """Flip bit ``bit`` of ``column`` of the stored entry ``entry_id``."""
    with sqlite3.connect(db.home.store_path) as conn:
        (blob,) = conn.execute(
            f"SELECT {column} FROM entries WHERE id = ?", (entry_id,)
        ).fetchone()
        conn.execute(
            f"UPDATE entries SET {column} = ? WHERE id = ?", (flip_bit(blob, bit), entry_id)
        )


@pytest.mark.pure
def test_damaged_payloads_still_held_as_records_are_mended_by_repair_alone(
    make_db: MakeDb,
) -> None:
    """Each record version keeps its op payload byte for byte (a head in
    ``records``, a conflict's loser in ``losers``), so `verify --repair` mends a
    damaged payload from this site's own rows, with no peer: this site's own
    entry (no other copy may exist anywhere), another author's, both sides of a
    conflict, and an entry with an op withheld here (which stays withheld)."""
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    a.put("stock", "k", "from a")
    c.put("stock", "k", "from c")  # concurrent: one wins at b, the other is a loser
    with a.transaction() as tx:
        tx.put("misc", "m", "withheld from b")
        tx.put("stock", "s", "x" * 40)
    b.store.ingest(list(c.export(key(c))), now_ms())
    b.store.ingest([withhold(w, only_stock) for w in a.export(key(a))], now_ms(), flow=NARROW)
    b.put("stock", "own", "y" * 40)
    assert b.conflicts() and b.store.incomplete() == {"misc": 1}
    before = holdings(b)
    targets = [e.id for e in b.log()]
    assert len(targets) == 4
    for entry_id in targets:  # a bit in the last payload of each
        with sqlite3.connect(b.home.store_path) as conn:
            (blob,) = conn.execute(
                "SELECT payloads FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
        damage_entry(b, entry_id, "payloads", (len(blob) - 8) * 8)
    assert not b.verify().ok

    code, text = verify_cli(b, "--repair")
    assert code == 0, text
    assert "4 damaged entries mended from this site's own records" in text, text
    assert b.verify().ok and holdings(b) == before
    assert b.store.heads()[key(b)].seq == 1


@pytest.mark.pure
def test_damage_the_records_cannot_mend_is_marked_for_a_peer(make_db: MakeDb) -> None:
    """What the rows no longer hold is left to a peer's copy: a damaged signed
    part (the ID is a hash of it), and a payload whose version was superseded."""
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    a.put("stock", "s1", "x" * 40)
    a.put("stock", "s1", "again")  # entry 1's version is superseded
    c.put("stock", "s2", "x" * 40)
    c.put("stock", "s3", "x" * 40)
    b.store.ingest([*a.export(key(a)), *c.export(key(c))], now_ms())
    damage_entry(b, next(iter(a.log())).id, "payloads", 200)
    damage_entry(b, next(iter(c.log())).id, "signed", 200)
    code, text = verify_cli(b, "--repair")
    assert code == 1 and "2 damaged entries marked" in text and "mended" not in text, text
    assert b.store.heads() == {}  # nothing of a or c shown: a peer sends both again
    b.store.ingest(list(c.export(key(c))), now_ms(), peer=key(c))
    b.store.ingest(list(a.export(key(a))), now_ms(), peer=key(a))
    assert b.verify().ok, b.verify().problems  # a's copies mend both


@pytest.mark.trio_memory
async def test_damage_found_by_a_peer_is_marked_by_the_site_that_sent_it(
    make_db: MakeDb, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody ran `verify`: b serves a's entry 3 with a bit flipped, c finds it
    invalid and ends the session (as it would at every session, for ever). b
    re-checks what c never acknowledged, marks the damaged entry (as `verify
    --repair` would) and says so in its log; the next session gets c what b holds
    sound, and once a's copy mends b, c gets the rest from b."""
    a, b, c = make_db("a"), make_db("b"), make_db("c")
    for i in range(5):
        a.put("stock", f"s{i}", "x" * 50)
    a.put("stock", "s2", "again")  # entry 3's version is gone from b's records
    await sync_pair(b, a)
    damage(b, 3, "payloads")

    stats_c, stats_b = await sync_pair(c, b)
    assert "invalid entry" in stats_c.reason, stats_c
    assert "entry 3 of" in caplog.text and "no longer sent" in caplog.text, caplog.text
    assert b.store.held_back() == {key(a): (3, 6)}

    stats_c, stats_b = await sync_pair(c, b)  # no longer ends in error
    assert not stats_c.error, stats_c
    assert [x.seq for x in c.authors() if x.author == key(a)] == [2]
    stats_b, _ = await sync_pair(b, a)  # a's copy mends b
    assert stats_b.synced and b.verify().ok
    stats_c, _ = await sync_pair(c, b)
    assert stats_c.synced and holdings(c) == holdings(a)


@pytest.mark.pure
def test_a_peer_that_leaves_batches_unacknowledged_marks_nothing_sound(
    make_db: MakeDb,
) -> None:
    """A hostile peer can end sessions with our batches unacknowledged at will:
    the re-check then finds sound entries sound and marks nothing."""
    a = make_db("a")
    for i in range(3):
        a.put("stock", f"s{i}", i)
    ids = [entry.id for entry in a.log()]
    assert a.store.check_sent([*ids, b"\x01" * 32], now_ms()) == []
    assert a.store.held_back() == {} and a.store.heads()[key(a)].seq == 3


@pytest.mark.pure
def test_an_id_read_back_as_text_is_named_as_damage(make_db: MakeDb) -> None:
    """A damaged SQLite record header can make a BLOB read back as TEXT: verify
    names the entry (it printed the ID with bytes.hex: AttributeError)."""
    a = make_db("a")
    a.put("stock", "s", 1)
    a.put("stock", "t", 2)
    with sqlite3.connect(a.home.store_path) as conn:
        conn.execute("UPDATE entries SET id = 'not a blob' WHERE seq = 1")
    code, text = verify_cli(a, "--repair")
    assert code == 1 and "entry 1 of" in text and "internal error" not in text, text


@pytest.mark.pure
def test_a_damaged_page_of_the_store_file_is_named_with_the_way_out(make_db: MakeDb) -> None:
    """Issue 13: "a corrupted store page: `p2psync verify` names it". A page of the
    records table overwritten on disk: the entries still verify, but verify ran
    only through them and said the store was sound while `ls` failed on it. Now
    SQLite's own check runs first: verify names the damaged table and says what
    to do (a backup, or a new home synced from a peer); nothing crashes."""
    a = make_db("a")
    with a.transaction() as tx:
        for i in range(3000):
            tx.put("stock", f"k{i:05d}", "x" * 60)
    path = a.home.store_path
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        (page,) = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf' "
            "ORDER BY pageno LIMIT 1 OFFSET 3"
        ).fetchone()
    a.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size + 40)
        f.write(b"\xff" * 64)
    code, text = verify_cli(a)
    assert code == 1, text
    assert "store file is damaged" in text and "records" in text and "backup" in text, text
    assert "Traceback" not in text and "internal error" not in text
