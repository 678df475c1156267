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
from tests.test_widen import holdings, key

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
