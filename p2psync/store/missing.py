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
author, seq) and ``missing_superseded`` (entry, collection, key).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from typing import NamedTuple

from p2psync.core.entry import decode_stored
from p2psync.errors import EntryError


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
        conn.execute(
            "DELETE FROM missing_superseded WHERE entry = ? AND collection = ? AND key = ?",
            (entry, collection, key),
        )
    left = conn.execute("SELECT 1 FROM payloads_missing WHERE entry = ?", (entry,)).fetchone()
    if left is None:  # what later ops named of it matters no more
        conn.execute("DELETE FROM missing_superseded WHERE entry = ?", (entry,))


def wanted(
    conn: sqlite3.Connection, may_receive: Callable[[str], bool], limit: int
) -> list[Missing]:
    """Ops missing here whose collection ``may_receive`` says a peer may send, in
    causal order per author (at most ``limit``)."""
    collections = [
        c
        for (c,) in conn.execute("SELECT DISTINCT collection FROM payloads_missing")
        if may_receive(c)
    ]
    if not collections:
        return []
    marks = ",".join("?" * len(collections))
    rows = conn.execute(
        "SELECT entry, op, collection, author, seq FROM payloads_missing "
        f"WHERE collection IN ({marks}) ORDER BY author, seq, op LIMIT ?",
        (*collections, limit),
    ).fetchall()
    return [Missing(*row) for row in rows]


def rebuild(conn: sqlite3.Connection) -> None:
    """Read ``payloads_missing`` and ``missing_superseded`` from the entries held
    (migration to schema 16). Entries with no ``null`` byte in their payloads hold
    every payload; only stores that hold some missing read every entry's bases."""
    rows: list[Missing] = []
    cursor = conn.execute(
        "SELECT a.key, e.seq, e.signed, e.payloads FROM entries e "
        "JOIN authors a ON a.idx = e.author WHERE instr(e.payloads, x'f6') > 0"
    )
    for author, seq, signed, payloads in cursor:
        try:
            entry = decode_stored(signed, payloads)
        except EntryError:
            continue  # damaged: `p2psync verify` names it
        rows.extend(
            Missing(entry.id, index, collection, author, seq)
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
