"""The ``relay_joins`` table: invite codes this agent joined through a relay, kept
until the inviter's rule arrives (it is then accepted as is, like a direct join)
or the code's expiry passes. Only the join proof is kept, never the code's secret
(:func:`p2psync.pairing.relay_join_proof`: bound to the inviter, this agent and the
invite, it serves no one else)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RelayJoin:
    inviter: bytes
    invite: bytes
    terms: bytes  # hash of the terms the code pairs for
    proof: bytes
    relay: bytes
    expires: int
    created: int


_COLUMNS = "inviter, invite, terms, proof, relay, expires, created"


def put(conn: sqlite3.Connection, join: RelayJoin) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO relay_joins ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (join.inviter, join.invite, join.terms, join.proof, join.relay, join.expires,
         join.created),
    )


def all_joins(conn: sqlite3.Connection) -> list[RelayJoin]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM relay_joins ORDER BY created").fetchall()
    return [RelayJoin(*row) for row in rows]


def drop(conn: sqlite3.Connection, inviter: bytes) -> bool:
    return conn.execute("DELETE FROM relay_joins WHERE inviter = ?", (inviter,)).rowcount > 0
