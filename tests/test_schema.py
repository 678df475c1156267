"""Schema migrations: an older store is brought forward on open, data intact; a
store from a newer p2psync is refused with a clear message."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

import p2psync
from p2psync import pairing
from p2psync.core.rules import Terms
from p2psync.store import schema
from tests.helpers import undo_17_18

pytestmark = pytest.mark.pure

MakeDb = Callable[[str], p2psync.Database]


def test_a_version_3_store_is_brought_forward_with_its_data(
    make_db: MakeDb, tmp_path: Path
) -> None:
    db = make_db("a")
    db.put("vouchers", "V-1", {"amount": 10})
    path = db.home.store_path
    db.close()
    with sqlite3.connect(path) as conn:  # as a version 3 store left it
        conn.execute("DROP TABLE rule_objects")
        conn.execute("DROP TABLE invites")
        conn.execute("DROP INDEX entries_by_hlc")
        conn.execute("DROP TABLE incomplete")  # version 9
        for table in ("mail_out", "mail_pairs", "mail_due", "relay_joins", "join_refusals"):
            conn.execute(f"DROP TABLE {table}")  # versions 10, 12, 13
        for table in ("payloads_missing", "missing_superseded", "missing_lacked"):
            conn.execute(f"DROP TABLE {table}")  # version 16
        conn.execute("DROP TABLE entries_damaged")  # version 16
        undo_17_18(conn)
        conn.execute("DELETE FROM schema_migrations WHERE version >= 4")
        conn.execute(
            "INSERT INTO peers (key, name, state, added) VALUES (?, 'hq', 'trusted', 0)",
            (bytes(32),),
        )
    reopened = p2psync.open(tmp_path / "a")
    try:
        assert reopened.get("vouchers", "V-1") == {"amount": 10}
        assert reopened.verify().ok
    finally:
        reopened.close()
    with sqlite3.connect(path) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
        states = [s for (s,) in conn.execute("SELECT state FROM peers")]
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert versions == list(range(1, schema.LATEST + 1))
    assert states == ["known"]
    assert {"rule_objects", "invites"} <= tables


def test_a_store_from_a_newer_p2psync_is_refused(make_db: MakeDb, tmp_path: Path) -> None:
    db = make_db("a")
    path = db.home.store_path
    db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (schema.LATEST + 1,))
    with pytest.raises(p2psync.P2PSyncError, match="upgrade p2psync"):
        p2psync.open(tmp_path / "a")


def test_a_development_store_at_version_5_opens(make_db: MakeDb, tmp_path: Path) -> None:
    """Version 5 briefly added a `withheld` table; such stores open and move on."""
    db = make_db("a")
    db.put("vouchers", "V-1", {"amount": 10})
    path = db.home.store_path
    db.close()
    with sqlite3.connect(path) as conn:
        for index in ("rule_objects_by_signer", "rule_objects_by_proposal", "rule_objects_by_kind"):
            conn.execute(f"DROP INDEX {index}")
        conn.execute("CREATE INDEX rule_objects_by_peer ON rule_objects (peer)")
        conn.execute("CREATE TABLE withheld (entry BLOB, op INTEGER, collection TEXT)")
        conn.execute("DROP INDEX entries_by_hlc")
        conn.execute("ALTER TABLE invites DROP COLUMN withdrawn")
        conn.execute("DROP TABLE incomplete")  # version 9
        conn.execute("ALTER TABLE invites DROP COLUMN relay")  # version 13
        for table in ("mail_out", "mail_pairs", "mail_due", "relay_joins", "join_refusals"):
            conn.execute(f"DROP TABLE {table}")  # versions 10, 12, 13
        undo_14_on(conn)
        conn.execute("DELETE FROM schema_migrations WHERE version >= 6")
    reopened = p2psync.open(tmp_path / "a")
    try:
        assert reopened.get("vouchers", "V-1") == {"amount": 10}
    finally:
        reopened.close()
    with sqlite3.connect(path) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == list(range(1, schema.LATEST + 1))


def test_a_version_6_store_gains_the_clock_index_and_withdrawable_invites(
    make_db: MakeDb, tmp_path: Path
) -> None:
    db = make_db("a")
    for i in range(3):
        db.put("vouchers", f"V-{i}", i)
    code = pairing.parse_invite(pairing.create_invite(db, Terms(), 600, []))
    path = db.home.store_path
    db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX entries_by_hlc")
        conn.execute("ALTER TABLE invites DROP COLUMN withdrawn")
        conn.execute("DROP TABLE incomplete")  # version 9
        conn.execute("ALTER TABLE invites DROP COLUMN relay")  # version 13
        for table in ("mail_out", "mail_pairs", "mail_due", "relay_joins", "join_refusals"):
            conn.execute(f"DROP TABLE {table}")  # versions 10, 12, 13
        undo_14_on(conn)
        conn.execute("DELETE FROM schema_migrations WHERE version >= 7")
        # version 7 kept the invite code a site was joining; version 8 forgets it
        conn.execute("INSERT INTO meta (key, value) VALUES ('join:ab', x'00')")
    reopened = p2psync.open(tmp_path / "a")
    try:
        assert reopened.store.get_meta("join:ab") is None
        assert [e.seq for e in reopened.log(newest=2)] == [2, 3]
        [invite] = reopened.store.invites()
        assert invite.id == code.invite and invite.withdrawn is None
        pairing.withdraw_invite(reopened, code.invite)
        assert reopened.store.invite(code.invite) is None
    finally:
        reopened.close()
    with sqlite3.connect(path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT a.key, e.seq FROM entries e JOIN authors a "
            "ON a.idx = e.author WHERE e.hlc >= 0 ORDER BY e.hlc DESC, a.key DESC LIMIT 5"
        ).fetchall()
    assert any("entries_by_hlc" in str(step) for step in plan)


def test_a_version_12_store_keeps_its_joins_and_gains_refusals(
    make_db: MakeDb, tmp_path: Path
) -> None:
    """Version 13 re-keys ``relay_joins`` by (inviter, invite): a join kept by a
    version 12 store survives, with no refusal; invites gain their relay."""
    db = make_db("a")
    path = db.home.store_path
    db.close()
    row = (b"i" * 32, b"c" * 8, b"t" * 8, b"p" * 32, b"r" * 32, 5, 4)
    with sqlite3.connect(path) as conn:  # as version 12 left it
        conn.execute("ALTER TABLE invites DROP COLUMN relay")
        conn.execute("DROP TABLE join_refusals")
        conn.execute("DROP TABLE relay_joins")
        conn.execute(
            "CREATE TABLE relay_joins (inviter BLOB PRIMARY KEY, invite BLOB NOT NULL, "
            "terms BLOB NOT NULL, proof BLOB NOT NULL, relay BLOB NOT NULL, "
            "expires INTEGER NOT NULL, created INTEGER NOT NULL) WITHOUT ROWID"
        )
        conn.execute("INSERT INTO relay_joins VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        undo_14_on(conn)
        conn.execute("DELETE FROM schema_migrations WHERE version >= 13")
    reopened = p2psync.open(tmp_path / "a")
    try:
        (join,) = reopened.store.relay_joins()
        assert (join.inviter, join.invite, join.expires, join.refused) == (
            row[0], row[1], 5, None
        )
        assert reopened.store.join_refusals() == []
    finally:
        reopened.close()


def undo_14_on(conn: sqlite3.Connection) -> None:
    """Take ``rule_objects`` back to before version 14 (its size, its indexes), and
    drop what versions 16-18 added (the ops held without payload, the asks
    through the mailbox, the change feed's numbers)."""
    undo_17_18(conn)
    conn.execute("DROP TABLE payloads_missing")  # version 16
    conn.execute("DROP TABLE missing_superseded")  # version 16
    conn.execute("DROP TABLE missing_lacked")  # version 16
    conn.execute("DROP TABLE entries_damaged")  # version 16
    conn.execute("DROP INDEX rule_objects_by_expiry")  # version 15
    conn.execute("DROP INDEX rule_objects_by_size")  # version 14
    conn.execute("ALTER TABLE rule_objects DROP COLUMN size")
