"""Payloads asked for through the mailbox (schema version 17): a live session's
``Want`` for sites that only meet by the relay (``docs/relay.md``, "Payloads
wanted").

* ``mail_wanted`` — entries a peer asked us for in a bundle's ``wants``. Only
  entries we hold are kept (an ID we do not hold asks for nothing), at most
  :data:`MAX_WANTED` per peer; our next bundles to it carry them again (their
  payloads withheld as the rules say), and the rows go in the transaction that
  records those envelopes. Asks nobody answered within :data:`WANTED_FOR_MS` go.
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
        cursor = conn.execute(
            "INSERT OR REPLACE INTO mail_wanted (peer, entry, at) "
            "SELECT ?, id, ? FROM entries WHERE id = ?",
            (peer, now_ms, entry),
        )
        if cursor.rowcount > 0:
            kept += 1
            if known is None:
                room -= 1
    return kept


def wanted(conn: sqlite3.Connection, peer: bytes, limit: int) -> list[bytes]:
    """The oldest ``limit`` entries ``peer`` asked for that are still to answer."""
    rows = conn.execute(
        "SELECT entry FROM mail_wanted WHERE peer = ? ORDER BY at, entry LIMIT ?", (peer, limit)
    )
    return [row[0] for row in rows]


def answered(conn: sqlite3.Connection, peer: bytes, ids: Iterable[bytes]) -> None:
    """These asks of ``peer`` are answered (an envelope carrying them is recorded)."""
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
