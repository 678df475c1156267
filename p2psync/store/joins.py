"""Invite codes joined through a relay, on both sides.

``relay_joins`` (the joiner): codes this agent joined through a relay, one row per
(inviter, invite), kept until the inviter's rule arrives (it is then accepted as
is, like a direct join), the inviter's refusal arrives (``refused``: shown by
``pair pending`` until ``pair unjoin`` or :data:`KEPT_MS` after the code's expiry),
or :data:`KEPT_MS` after the code's expiry. Only the join proof is kept, never the
code's secret (:func:`p2psync.pairing.relay_join_proof`: bound to the inviter,
this agent and the invite, it serves no one else).

``join_refusals`` (the inviter): joins with a valid proof that it refused (code
used, expired, withdrawn), owed back to the joiner as an introduction; at most
:data:`MAX_REFUSALS`, each forgotten :data:`KEPT_MS` after it was made.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

#: How long a join is kept after its code expired (an answer signed before the
#: expiry may still be on its way: a relay keeps envelopes up to 7 days), and how
#: long an inviter keeps a refusal it owes.
KEPT_MS = 14 * 24 * 3600 * 1000
#: The most refusals an inviter keeps (a leaked code held by many throwaway keys
#: cannot grow its store): beyond, a refusal is logged and not sent back.
MAX_REFUSALS = 256


@dataclass(frozen=True, slots=True)
class RelayJoin:
    inviter: bytes
    invite: bytes
    terms: bytes  # hash of the terms the code pairs for
    proof: bytes
    relay: bytes
    expires: int
    created: int
    #: the inviter's refusal, once it came back
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class JoinRefusal:
    joiner: bytes
    invite: bytes
    reason: str
    made: int


_COLUMNS = "inviter, invite, terms, proof, relay, expires, created, refused"


def put(conn: sqlite3.Connection, join: RelayJoin) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO relay_joins ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (join.inviter, join.invite, join.terms, join.proof, join.relay, join.expires,
         join.created, join.refused),
    )


def all_joins(conn: sqlite3.Connection, inviter: bytes | None = None) -> list[RelayJoin]:
    if inviter is None:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM relay_joins ORDER BY created, invite")
    else:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM relay_joins WHERE inviter = ? ORDER BY created, invite",
            (inviter,),
        )
    return [RelayJoin(*row) for row in rows.fetchall()]


def refuse(conn: sqlite3.Connection, inviter: bytes, invite: bytes, reason: str) -> bool:
    """The inviter refused our join of ``invite``: keep its reason (once)."""
    return (
        conn.execute(
            "UPDATE relay_joins SET refused = ? WHERE inviter = ? AND invite = ? "
            "AND refused IS NULL",
            (reason, inviter, invite),
        ).rowcount
        > 0
    )


def drop(conn: sqlite3.Connection, inviter: bytes, invite: bytes | None = None) -> int:
    """Forget our joins of ``inviter``'s codes (only ``invite``, if given); how many."""
    if invite is None:
        return conn.execute("DELETE FROM relay_joins WHERE inviter = ?", (inviter,)).rowcount
    return conn.execute(
        "DELETE FROM relay_joins WHERE inviter = ? AND invite = ?", (inviter, invite)
    ).rowcount


def owe_refusal(conn: sqlite3.Connection, refusal: JoinRefusal) -> bool:
    """Keep a refusal owed to a joiner; False when :data:`MAX_REFUSALS` are kept."""
    (count,) = conn.execute("SELECT count(*) FROM join_refusals").fetchone()
    kept = conn.execute(
        "SELECT 1 FROM join_refusals WHERE joiner = ? AND invite = ?",
        (refusal.joiner, refusal.invite),
    ).fetchone()
    if count >= MAX_REFUSALS and kept is None:
        return False
    conn.execute(
        "INSERT OR REPLACE INTO join_refusals (joiner, invite, reason, made) VALUES (?, ?, ?, ?)",
        (refusal.joiner, refusal.invite, refusal.reason, refusal.made),
    )
    return True


def refusals(conn: sqlite3.Connection, joiner: bytes | None = None) -> list[JoinRefusal]:
    columns = "joiner, invite, reason, made"
    if joiner is None:
        rows = conn.execute(f"SELECT {columns} FROM join_refusals ORDER BY made, invite")
    else:
        rows = conn.execute(
            f"SELECT {columns} FROM join_refusals WHERE joiner = ? ORDER BY made, invite",
            (joiner,),
        )
    return [JoinRefusal(*row) for row in rows.fetchall()]


def purge(conn: sqlite3.Connection, now_ms: int) -> int:
    """Forget joins :data:`KEPT_MS` past their code's expiry and refusals owed for
    that long; how many rows went."""
    gone = conn.execute(
        "DELETE FROM relay_joins WHERE expires < ?", (now_ms - KEPT_MS,)
    ).rowcount
    gone += conn.execute("DELETE FROM join_refusals WHERE made < ?", (now_ms - KEPT_MS,)).rowcount
    return gone
