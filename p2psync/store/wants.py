"""Payloads asked for through the mailbox (schema version 17): a live session's
``Want`` for sites that only meet by the relay (``docs/relay.md``, "Payloads
wanted").

* ``mail_wanted`` — entries a peer asked us for in a bundle's ``wants``. Only
  entries we hold are kept (an ID we do not hold asks for nothing), at most
  :data:`MAX_WANTED` per peer; our next bundles to it carry them again (their
  payloads withheld as the rules say), and each row names the envelope that
  answers it (``answer``), recorded in the same transaction. The row goes when
  the peer acknowledges that envelope; while it is refused or expired the ask is
  answered again. Asks not done within :data:`WANTED_FOR_MS` go.
* ``mail_asked`` — entries we asked a peer for that way: not asked again for
  :data:`ASK_AGAIN_MS` (the answer takes a relay round trip; a peer that lacks
  the payload too, or is too old to read ``wants``, is not asked at every
  exchange). Once the payloads arrive they are no longer missing, so nothing
  asks for them again.

Functions of an open connection, inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

#: How long an entry asked of a peer through the mailbox is not asked of it again.
ASK_AGAIN_MS = 24 * 3600 * 1000
#: How long an ask we could not answer yet is kept (the asker asks again later).
WANTED_FOR_MS = 7 * 24 * 3600 * 1000
#: Most entries one peer's asks keep waiting here: a peer asking for everything
#: fills no disk (the asker asks for the rest later).
MAX_WANTED = 65_536


def want(conn: sqlite3.Connection, peer: bytes, ids: Sequence[bytes], now_ms: int) -> int:
    """``peer`` asks for ``ids``: keep those we hold, within :data:`MAX_WANTED`;
    how many were kept (new or asked again)."""
    (held,) = conn.execute("SELECT count(*) FROM mail_wanted WHERE peer = ?", (peer,)).fetchone()
    room = MAX_WANTED - int(held)
    kept = 0
    for entry in ids:
        known = conn.execute(
            "SELECT 1 FROM mail_wanted WHERE peer = ? AND entry = ?", (peer, entry)
        ).fetchone()
        if known is None and room <= 0:
            continue
        cursor = conn.execute(  # asked again: answered again, unless an answer is on its way
            "INSERT INTO mail_wanted (peer, entry, at, answer) "
            "SELECT ?, id, ?, NULL FROM entries WHERE id = ? "
            "ON CONFLICT (peer, entry) DO UPDATE SET at = excluded.at, answer = CASE "
            "WHEN (SELECT o.state FROM mail_out o WHERE o.peer = mail_wanted.peer "
            "AND o.seq = mail_wanted.answer) IN ('queued', 'at-relay', 'handed-over') "
            "THEN mail_wanted.answer END",
            (peer, now_ms, entry),
        )
        if cursor.rowcount > 0:
            kept += 1
            if known is None:
                room -= 1
    return kept


def wanted(conn: sqlite3.Connection, peer: bytes, limit: int) -> list[bytes]:
    """The oldest ``limit`` entries ``peer`` asked for that are still to answer:
    not answered yet, or answered by an envelope that was refused or expired (or
    that the ledger no longer holds)."""
    rows = conn.execute(
        "SELECT w.entry FROM mail_wanted w LEFT JOIN mail_out o "
        "ON o.peer = w.peer AND o.seq = w.answer WHERE w.peer = ? "
        "AND (w.answer IS NULL OR o.seq IS NULL OR o.state IN ('refused', 'expired')) "
        "ORDER BY w.at, w.entry LIMIT ?",
        (peer, limit),
    )
    return [row[0] for row in rows]


def answering(conn: sqlite3.Connection, peer: bytes, envelope: int, ids: Iterable[bytes]) -> None:
    """Our envelope ``envelope`` to ``peer`` answers these of its asks."""
    conn.executemany(
        "UPDATE mail_wanted SET answer = ? WHERE peer = ? AND entry = ?",
        [(envelope, peer, e) for e in ids],
    )


def acknowledged(conn: sqlite3.Connection, peer: bytes, envelope: int) -> None:
    """``peer`` acknowledged our envelope ``envelope``: the asks it answers are done."""
    conn.execute("DELETE FROM mail_wanted WHERE peer = ? AND answer = ?", (peer, envelope))


def answered(conn: sqlite3.Connection, peer: bytes, ids: Iterable[bytes]) -> None:
    """These asks of ``peer`` are done without an answer (entries no longer held)."""
    conn.executemany(
        "DELETE FROM mail_wanted WHERE peer = ? AND entry = ?", [(peer, e) for e in ids]
    )


def asked(conn: sqlite3.Connection, peer: bytes, ids: Iterable[bytes], now_ms: int) -> None:
    """We asked ``peer`` for ``ids`` (an envelope carrying the ask is recorded)."""
    conn.executemany(
        "INSERT OR REPLACE INTO mail_asked (peer, entry, at) VALUES (?, ?, ?)",
        [(peer, e, now_ms) for e in ids],
    )


def purge(conn: sqlite3.Connection, now_ms: int) -> None:
    """Forget asks past their time, both ways."""
    conn.execute("DELETE FROM mail_asked WHERE at <= ?", (now_ms - ASK_AGAIN_MS,))
    conn.execute("DELETE FROM mail_wanted WHERE at <= ?", (now_ms - WANTED_FOR_MS,))
