"""The change feed: every record change applied to the store, local or received,
numbered (schema version 18, ``docs/change-feed.md``).

Each row of ``records`` carries ``change``: the number of the last change applied
to it. Numbers increase with every flush of the writer, one per record changed, in
the order the records changed; records are never deleted (a deletion is a
tombstone), so a number is never given twice. Reading the records whose
``change`` is above N gives every record changed since a consumer saw N, each
once, at its latest state: a record changed twice between two reads is listed
once, at its second change (as CouchDB's ``_changes`` does). A consumer that keeps
the last number it handled resumes exactly there after a crash.

Functions of an open connection; the writer calls :func:`last_change` inside its
transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from p2psync.core.canonical import Value
from p2psync.store.records import payload_value

#: Changes one read returns at most.
PAGE = 1000


@dataclass(frozen=True, slots=True)
class RecordChange:
    """A record as a change left it: its value (None once deleted), who wrote the
    version that wins, and whether other versions are kept (a conflict)."""

    change: int
    collection: str
    key: str
    value: Value
    deleted: bool
    author: bytes
    entry: bytes
    hlc: int
    conflict: bool


def last_change(conn: sqlite3.Connection) -> int:
    """The number of the latest change (0: none yet)."""
    row = conn.execute("SELECT max(change) FROM records").fetchone()
    return int(row[0] or 0)


def changes_after(
    conn: sqlite3.Connection,
    since: int,
    collections: Sequence[str] | None = None,
    limit: int = PAGE,
) -> list[RecordChange]:
    """The records changed after ``since`` (in ``collections``, if given), in
    change order, at most ``limit``."""
    # read along the change index (never a scan of a whole collection), the
    # collections filtered as it goes
    sql = (
        "SELECT change, collection, key, payload, deleted, author, entry, hlc, conflicted "
        "FROM records INDEXED BY records_by_change WHERE change > ?"
    )
    wanted = None if collections is None else frozenset(collections)
    if wanted is not None and len(wanted) <= MAX_NAMED:
        sql += f" AND collection IN ({','.join('?' * len(wanted))})"
        found = _rows(conn, sql, [since, *sorted(wanted)], limit)
        return found
    found = []
    while len(found) < limit:  # many names: filtered here, a page at a time
        page = _rows(conn, sql, [since], PAGE)
        found += [c for c in page if wanted is None or c.collection in wanted]
        if len(page) < PAGE:
            break
        since = page[-1].change
    return found[:limit]


#: Collections named in the query at most (beyond, they are filtered as read).
MAX_NAMED = 500


def _rows(
    conn: sqlite3.Connection, sql: str, args: list[object], limit: int
) -> list[RecordChange]:
    return [
        RecordChange(
            number,
            collection,
            key,
            None if deleted else payload_value(payload),
            bool(deleted),
            author,
            entry,
            hlc,
            bool(conflicted),
        )
        for number, collection, key, payload, deleted, author, entry, hlc, conflicted in (
            conn.execute(sql + " ORDER BY change LIMIT ?", [*args, limit])
        )
    ]


def number(conn: sqlite3.Connection) -> None:
    """Number the records of a store from before version 18, in clock order, and
    make the trigger that numbers a row written without a number (a writer from
    before version 18, still running, names no ``change``): the migration."""
    conn.execute(
        "CREATE TRIGGER records_numbered AFTER INSERT ON records WHEN NEW.change = 0 "
        "BEGIN UPDATE records SET change = (SELECT max(change) FROM records) + 1 "
        "WHERE collection = NEW.collection AND key = NEW.key; END"
    )
    conn.execute(
        "UPDATE records SET change = n.num FROM (SELECT collection, key, "
        "row_number() OVER (ORDER BY hlc, collection, key) AS num FROM records) AS n "
        "WHERE records.collection = n.collection AND records.key = n.key"
    )
