"""The ``meta`` table: small named values of the store (``self``, ``clock``,
claims on our own log; see :mod:`p2psync.store.schema`)."""

from __future__ import annotations

import sqlite3


def get(conn: sqlite3.Connection, key: str) -> object:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def put(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
