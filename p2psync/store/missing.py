"""Ops held without their payload, and the late merge that fills them.

An entry may arrive with the payload of an op withheld (``null``): the rules of
the path it came by do not carry that collection here (``docs/entry-format.md``
§3.4). The entry is applied without that op. When a rule widens, or a peer that
may send the collection appears, the agent asks that peer for the entry again
(``Want``, ``docs/protocol.md`` §5) and merges the op *late*.

A late op must leave the record exactly as if it had come on time. The heads of a
record are every version minus every base named (:mod:`p2psync.core.merge`), so
what a late op needs is: the bases it names (in its payload, now known), and
whether an op applied meanwhile named *it* as a base. The second cannot be read
from the records (they keep heads only), so it is kept as it happens: an op
naming, on a record, an entry that holds a missing op in that collection leaves a
row in ``missing_superseded``; the late op of that entry on that record is then
a version already superseded, and changes no head.

Tables (schema version 16): ``payloads_missing`` (entry, op index, collection,
author, seq), ``missing_superseded`` (entry, collection, key), and
``missing_lacked`` (entry, op index, peer, when): a peer asked for an op that sent
a copy without it too is not asked for it again for :data:`LACKED_FOR_MS`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from p2psync.core.entry import decode_stored
from p2psync.errors import EntryError

#: How long a peer that lacked a payload when asked is not asked for it again: it
#: may get it meanwhile (a rule of its own widens), but an unchanged pair must not
#: send the same entries again at every session.
LACKED_FOR_MS = 24 * 3600 * 1000


class Missing(NamedTuple):
    """An op applied without its payload: which entry, which op, where."""

    entry: bytes
    op: int
    collection: str
    author: bytes
    seq: int


def any_missing(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM payloads_missing)").fetchone()
    return bool(row[0])


def missing_in(conn: sqlite3.Connection, entry: bytes, collection: str) -> bool:
    """``entry`` holds an op in ``collection`` whose payload is missing here."""
    row = conn.execute(
        "SELECT 1 FROM payloads_missing WHERE entry = ? AND collection = ?",
        (entry, collection),
    ).fetchone()
    return row is not None


def ops_of(conn: sqlite3.Connection, entry: bytes) -> set[int]:
    """The indices of ``entry``'s ops held without payload."""
    return {i for (i,) in conn.execute("SELECT op FROM payloads_missing WHERE entry = ?", (entry,))}


def superseded(conn: sqlite3.Connection, entry: bytes, collection: str, key: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM missing_superseded WHERE entry = ? AND collection = ? AND key = ?",
        (entry, collection, key),
    ).fetchone()
    return row is not None


def add(conn: sqlite3.Connection, rows: Iterable[Missing]) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO payloads_missing (entry, op, collection, author, seq) "
        "VALUES (?, ?, ?, ?, ?)",
        rows,
    )


def add_superseded(conn: sqlite3.Connection, rows: Iterable[tuple[bytes, str, str]]) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO missing_superseded (entry, collection, key) VALUES (?, ?, ?)",
        rows,
    )


def filled(conn: sqlite3.Connection, entry: bytes, ops: Iterable[tuple[int, str, str]]) -> None:
    """Ops ``(index, collection, key)`` of ``entry`` now hold their payload."""
    for index, collection, key in ops:
        conn.execute("DELETE FROM payloads_missing WHERE entry = ? AND op = ?", (entry, index))
        conn.execute("DELETE FROM missing_lacked WHERE entry = ? AND op = ?", (entry, index))
        conn.execute(
            "DELETE FROM missing_superseded WHERE entry = ? AND collection = ? AND key = ?",
            (entry, collection, key),
        )
    left = conn.execute("SELECT 1 FROM payloads_missing WHERE entry = ?", (entry,)).fetchone()
    if left is None:  # what later ops named of it matters no more
        conn.execute("DELETE FROM missing_superseded WHERE entry = ?", (entry,))


def to_ask(
    conn: sqlite3.Connection,
    may_receive: Callable[[str], bool],
    limit: int,
    peer: bytes | None = None,
    now_ms: int = 0,
    asked_since: int | None = None,
    authors: Mapping[bytes, int] | None = None,
) -> list[Missing]:
    """Ops missing here whose collection ``may_receive`` says ``peer`` may send,
    leaving out those ``peer`` lacked too when last asked (within
    :data:`LACKED_FOR_MS`) and, given ``asked_since``, those asked of it through
    the mailbox since then (``store/wants.py``), and, given ``authors``, all but
    those of these authors up to these seqs (what the peer holds): at most
    ``limit``, by collection, author and seq."""
    rows: list[Missing] = []
    sql = (
        "SELECT m.entry, m.op, m.collection, m.author, m.seq FROM payloads_missing m "
        "WHERE m.collection = ? AND NOT EXISTS (SELECT 1 FROM missing_lacked l "
        "WHERE l.entry = m.entry AND l.op = m.op AND l.peer = ? AND l.at > ?) "
    )
    if asked_since is not None:
        sql += (
            "AND NOT EXISTS (SELECT 1 FROM mail_asked k "
            "WHERE k.peer = ? AND k.entry = m.entry AND k.at > ?) "
        )
    if authors is not None:
        sql += "AND m.author = ? AND m.seq <= ? "
    sql += "ORDER BY m.collection, m.author, m.seq, m.op LIMIT ?"
    bounds: list[tuple[object, ...]] = (
        [()] if authors is None else [(a, seq) for a, seq in sorted(authors.items())]
    )
    for collection in _collections(conn):
        if len(rows) >= limit or not may_receive(collection):
            continue
        args: list[object] = [collection, peer or b"", now_ms - LACKED_FOR_MS]
        if asked_since is not None:
            args += [peer or b"", asked_since]
        for bound in bounds:  # (one index range per author: none is starved)
            if len(rows) >= limit:
                break
            rows.extend(
                Missing(*row) for row in conn.execute(sql, [*args, *bound, limit - len(rows)])
            )
    return rows


def _collections(conn: sqlite3.Connection) -> list[str]:
    """The collections with ops missing: a skip scan of the index, one step per
    collection, however many ops are missing (and no statement with a parameter
    per collection: an author may write in as many as it likes)."""
    found: list[str] = []
    row = conn.execute("SELECT min(collection) FROM payloads_missing").fetchone()
    while row is not None and row[0] is not None:
        found.append(row[0])
        row = conn.execute(
            "SELECT min(collection) FROM payloads_missing WHERE collection > ?", (row[0],)
        ).fetchone()
    return found


def lacked(
    conn: sqlite3.Connection, peer: bytes, ops: Iterable[tuple[bytes, int]], now_ms: int
) -> None:
    """``peer``, asked for these ops (entry, index), sent copies without them too."""
    conn.executemany(
        "INSERT OR REPLACE INTO missing_lacked (entry, op, peer, at) VALUES (?, ?, ?, ?)",
        [(entry, index, peer, now_ms) for entry, index in ops],
    )


def rebuild(conn: sqlite3.Connection) -> None:
    """Read ``payloads_missing`` and ``missing_superseded`` from the entries held
    (migration to schema 16). Entries with no ``null`` byte in their payloads hold
    every payload; only stores that hold some missing read every entry's bases."""
    rows: list[Missing] = []
    cursor = conn.execute(
        "SELECT e.id, a.key, e.seq, e.signed, e.payloads FROM entries e "
        "JOIN authors a ON a.idx = e.author WHERE instr(e.payloads, x'f6') > 0"
    )
    for entry_id, author, seq, signed, payloads in cursor:
        try:
            entry = decode_stored(signed, payloads)
        except EntryError:
            continue  # damaged: `p2psync verify` names it
        rows.extend(  # by the ID the store holds it under (what a peer knows it by)
            Missing(entry_id, index, collection, author, seq)
            for index, (collection, op) in enumerate(zip(entry.collections, entry.ops, strict=True))
            if op is None
        )
    if not rows:
        return
    add(conn, rows)
    where = {(m.entry, m.collection) for m in rows}
    named: list[tuple[bytes, str, str]] = []
    for signed, payloads in conn.execute("SELECT signed, payloads FROM entries"):
        try:
            entry = decode_stored(signed, payloads)
        except EntryError:
            continue
        for op in entry.ops:
            if op is None:
                continue
            named.extend(
                (base, op.collection, op.key) for base in op.bases if (base, op.collection) in where
            )
    add_superseded(conn, named)
