"""Reading records and conflicts out of the store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import cbor2

from p2psync.core.canonical import Value

SCAN_PAGE = 1000


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version of a record as shown to users."""

    value: Value
    deleted: bool
    author: bytes
    hlc: int
    entry: bytes


@dataclass(frozen=True, slots=True)
class Conflict:
    """A record written concurrently: the applied winner and the kept losers."""

    collection: str
    key: str
    winner: VersionInfo
    losers: tuple[VersionInfo, ...]


def payload_value(payload: bytes) -> Value:
    """The value inside a stored op payload (validated when it was stored)."""
    value: Value = cbor2.loads(payload)[3]
    return value


def _info(row: tuple[bytes, int, bytes, bytes, int]) -> VersionInfo:
    entry, hlc, author, payload, deleted = row
    return VersionInfo(payload_value(payload), bool(deleted), author, hlc, entry)


def get(conn: sqlite3.Connection, collection: str, key: str) -> Value:
    row = conn.execute(
        "SELECT payload, deleted FROM records WHERE collection = ? AND key = ?",
        (collection, key),
    ).fetchone()
    if row is None or row[1]:
        return None
    return payload_value(row[0])


def head(conn: sqlite3.Connection, collection: str, key: str) -> tuple[VersionInfo, bool] | None:
    """The version of a record that wins (a deletion too), and whether other
    versions are kept (a conflict); None when the record was never written."""
    row = conn.execute(
        "SELECT entry, hlc, author, payload, deleted, conflicted FROM records "
        "WHERE collection = ? AND key = ?",
        (collection, key),
    ).fetchone()
    if row is None:
        return None
    return _info(row[:5]), bool(row[5])


def in_conflict(conn: sqlite3.Connection, collection: str, key: str) -> bool:
    row = conn.execute(
        "SELECT conflicted FROM records WHERE collection = ? AND key = ?", (collection, key)
    ).fetchone()
    return row is not None and bool(row[0])


def exists(conn: sqlite3.Connection, collection: str, key: str) -> bool:
    row = conn.execute(
        "SELECT deleted FROM records WHERE collection = ? AND key = ?", (collection, key)
    ).fetchone()
    return row is not None and not row[0]


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            following = last + 1 if last + 1 != 0xD800 else 0xE000  # skip surrogates
            return prefix[:-1] + chr(following)
        prefix = prefix[:-1]
    return None


def scan_page(
    conn: sqlite3.Connection, collection: str, prefix: str, after: str | None
) -> list[tuple[str, bytes]]:
    """Up to :data:`SCAN_PAGE` live ``(key, payload)`` rows after ``after``, in key order."""
    # A cursor below the prefix (a stored one, or any key) starts at the prefix:
    # the page keeps to it. Python's str order is UTF-8 byte order, SQLite's.
    if after is not None and after >= prefix:
        low, low_op = after, ">"
    else:
        low, low_op = prefix, ">="
    end = _prefix_end(prefix)
    sql = (
        f"SELECT key, payload FROM records WHERE collection = ? AND key {low_op} ? AND deleted = 0"
    )
    args: list[object] = [collection, low]
    if end is not None:
        sql += " AND key < ?"
        args.append(end)
    sql += f" ORDER BY key LIMIT {SCAN_PAGE}"
    return conn.execute(sql, args).fetchall()


def has_collection(conn: sqlite3.Connection, collection: str) -> bool:
    """A record of ``collection`` was ever written here (deleted ones count)."""
    row = conn.execute(
        "SELECT 1 FROM records WHERE collection = ? LIMIT 1", (collection,)
    ).fetchone()
    return row is not None


def collections(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """Every collection with its number of live records."""
    rows = conn.execute(
        "SELECT collection, sum(deleted = 0) FROM records GROUP BY collection ORDER BY collection"
    ).fetchall()
    return [(name, int(count)) for name, count in rows]


def conflicts(conn: sqlite3.Connection) -> Iterator[Conflict]:
    rows = conn.execute(
        "SELECT collection, key, entry, hlc, author, payload, deleted FROM records "
        "WHERE conflicted = 1 ORDER BY collection, key"
    ).fetchall()
    for collection, key, *winner in rows:
        losers = conn.execute(
            "SELECT entry, hlc, author, payload, deleted FROM losers "
            "WHERE collection = ? AND key = ? ORDER BY hlc DESC, author DESC",
            (collection, key),
        ).fetchall()
        yield Conflict(
            collection,
            key,
            _info(tuple(winner)),
            tuple(_info(row) for row in losers),
        )


def incomplete(conn: sqlite3.Connection) -> dict[str, int]:
    """Per collection, the ops applied here without their payload (withheld
    upstream by a path that does not carry that collection)."""
    rows = conn.execute(
        "SELECT collection, sum(ops) FROM incomplete GROUP BY collection"
    ).fetchall()
    return {collection: int(ops) for collection, ops in rows}
