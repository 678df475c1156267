"""Test helpers: authors that build entries by hand, including hostile ones."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2psync.core import canonical, hlc
from p2psync.core.entry import Entry, Op, OpKind, make_op, sign_entry
from p2psync.core.identity import Identity

NOW_MS = 1_790_000_000_000  # a fixed "now" (2026-09) for pure tests


@dataclass
class Author:
    """Builds a chain of entries for one identity, outside any store."""

    identity: Identity = field(default_factory=lambda: Identity(os.urandom(32)))
    seq: int = 0
    prev: bytes | None = None
    clock: int = hlc.from_wall(NOW_MS)

    @property
    def key(self) -> bytes:
        return self.identity.public_key

    def op(
        self,
        collection: str,
        key: str,
        value: canonical.Value = None,
        *,
        delete: bool = False,
        bases: Sequence[bytes] = (),
    ) -> Op:
        kind = OpKind.DELETE if delete else OpKind.PUT
        return make_op(kind, collection, key, value, bases, os.urandom(16))

    def write(self, *ops: Op, stamp: int | None = None) -> Entry:
        """Sign the next entry of this author's chain."""
        self.clock = stamp if stamp is not None else self.clock + 1
        entry = sign_entry(self.identity, self.seq + 1, self.prev, self.clock, list(ops))
        self.seq, self.prev = entry.seq, entry.id
        return entry

    def put(
        self, collection: str, key: str, value: canonical.Value, bases: Sequence[bytes] = ()
    ) -> Entry:
        return self.write(self.op(collection, key, value, bases=bases))

    def chain(self, count: int, collection: str = "c") -> list[Entry]:
        return [self.put(collection, f"k{i}", {"i": i}) for i in range(count)]


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def undo_from_16(conn: sqlite3.Connection) -> None:
    """Take a store back to schema version 15: drop what versions 16 (the ops held
    without payload, damaged entries), 17 (asks through the mailbox) and 18 (the
    change feed) added."""
    undo_17_18(conn)
    for table in ("payloads_missing", "missing_superseded", "missing_lacked", "entries_damaged"):
        conn.execute(f"DROP TABLE {table}")  # version 16
    conn.execute("DELETE FROM schema_migrations WHERE version >= 16")


def undo_17_18(conn: sqlite3.Connection) -> None:
    """Drop what versions 17 (asks through the mailbox) and 18 (the change feed's
    numbers) added; the caller deletes the migrations' rows."""
    conn.execute("DROP TRIGGER records_numbered")  # version 18
    conn.execute("DROP INDEX records_by_change")  # version 18
    conn.execute("ALTER TABLE records DROP COLUMN change")  # version 18
    conn.execute("DROP TABLE mail_wanted")  # version 17
    conn.execute("DROP TABLE mail_asked")  # version 17
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'mail_out'").fetchone():
        conn.execute("ALTER TABLE mail_out DROP COLUMN asks")  # (a test dropped it whole)
