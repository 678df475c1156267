"""Reading change logs out of the store: authors and their heads, entries to
send a peer, the entries a user asks to see, forks and held entries."""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from p2psync.core.entry import MAX_SEQ, stored_collections, wire_form
from p2psync.core.messages import Head


@dataclass(frozen=True, slots=True)
class AuthorState:
    author: bytes
    seq: int
    head: bytes | None
    hlc: int
    frozen: bool


@dataclass(frozen=True, slots=True)
class StoredEntry:
    author: bytes
    seq: int
    id: bytes
    hlc: int
    signed: bytes
    payloads: bytes


class Outgoing(NamedTuple):
    """One stored entry ready to send."""

    hlc: int
    author: bytes
    seq: int
    id: bytes
    wire: bytes


def authors(conn: sqlite3.Connection) -> list[AuthorState]:
    rows = conn.execute(
        "SELECT key, head_seq, head_id, head_hlc, frozen FROM authors ORDER BY key"
    ).fetchall()
    return [AuthorState(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]


def heads(conn: sqlite3.Connection) -> dict[bytes, Head]:
    """What this store holds of every author: applied head and frozen flag; of an
    author with an entry found damaged, only up to the one before it (a peer then
    sends the rest again, and the damaged one mends: ``entries_damaged``)."""
    return local_state(conn)[0]


def local_state(
    conn: sqlite3.Connection,
) -> tuple[dict[bytes, Head], dict[bytes, tuple[int, int]]]:
    """:func:`heads`, and per author with an entry marked damaged ``(first damaged
    seq, seq held)``: from the damaged entry on, this store holds entries it
    cannot send (the session says so rather than "in sync" with a peer that
    lacks them)."""
    rows = conn.execute(
        "SELECT key, head_seq, head_id, frozen FROM authors WHERE head_seq > 0"
    ).fetchall()
    held = {key: Head(seq, head, bool(frozen)) for key, seq, head, frozen in rows}
    held_back = {}
    for author, seq in damaged(conn).items():
        head = held.get(author)
        if head is None or seq > head.seq:
            continue
        held_back[author] = (seq, head.seq)
        before = conn.execute(
            "SELECT e.id FROM entries e JOIN authors a ON a.idx = e.author "
            "WHERE a.key = ? AND e.seq = ?",
            (author, seq - 1),
        ).fetchone()
        if before is None:
            del held[author]  # (seq 1: nothing of it to show)
        else:
            held[author] = Head(seq - 1, before[0], head.frozen)
    return held, held_back


def damaged(conn: sqlite3.Connection) -> dict[bytes, int]:
    """Per author, the first seq found damaged and not mended yet."""
    rows = conn.execute("SELECT author, min(seq) FROM entries_damaged GROUP BY author")
    return dict(rows.fetchall())


#: Rows read at a time while an author's stream is under the byte budget.
_CHUNK = 64


def entries_after(
    conn: sqlite3.Connection,
    after: Mapping[bytes, int],
    max_entries: int,
    max_bytes: int,
) -> list[Outgoing]:
    """Entries following ``after[author]`` for each author, merged in clock order.

    Clock order is a causal order: an entry's predecessor and bases all have
    smaller clocks. At most ``max_entries`` entries and about ``max_bytes``
    bytes (at least one entry) are returned.
    """
    streams = []
    stops = damaged(conn)  # nothing from a damaged entry on is sent
    for author, seq in after.items():
        row = conn.execute("SELECT idx FROM authors WHERE key = ?", (author,)).fetchone()
        if row is None:
            continue
        cursor = conn.execute(
            "SELECT hlc, seq, id, signed, payloads FROM entries "
            "WHERE author = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (row[0], seq, stops[author] - 1 if author in stops else MAX_SEQ, max_entries),
        )
        stream: list[Outgoing] = []
        read = 0
        while read <= max_bytes and (chunk := cursor.fetchmany(_CHUNK)):
            for r in chunk:
                stream.append(Outgoing(r[0], author, r[1], r[2], wire_form(r[3], r[4])))
                read += len(stream[-1].wire)
        cursor.close()  # no author's stream is read far past what one call returns
        streams.append(stream)
    merged = streams[0] if len(streams) == 1 else heapq.merge(*streams)
    out: list[Outgoing] = []
    size = 0
    for item in merged:
        if out and (len(out) >= max_entries or size + len(item.wire) > max_bytes):
            break
        out.append(item)
        size += len(item.wire)
    return out


def entry_at(conn: sqlite3.Connection, author: bytes, seq: int) -> Outgoing | None:
    row = conn.execute(
        "SELECT e.hlc, e.id, e.signed, e.payloads FROM entries e "
        "JOIN authors a ON a.idx = e.author WHERE a.key = ? AND e.seq = ?",
        (author, seq),
    ).fetchone()
    if row is None:
        return None
    return Outgoing(row[0], author, seq, row[1], wire_form(row[2], row[3]))


def entries_by_id(
    conn: sqlite3.Connection, ids: Sequence[bytes], max_bytes: int
) -> tuple[list[bytes], int]:
    """Wire forms of the entries ``ids`` names that are held, in that order, until
    ``max_bytes`` (at least one); and how many IDs that took (those not held
    included)."""
    wires: list[bytes] = []
    size = taken = 0
    damage = conn.execute("SELECT EXISTS (SELECT 1 FROM entries_damaged)").fetchone()[0]
    for entry in ids:
        row = conn.execute("SELECT signed, payloads FROM entries WHERE id = ?", (entry,)).fetchone()
        if damage and row is not None and _is_damaged(conn, entry):
            row = None  # not sent: found damaged here
        if row is not None:
            wire = wire_form(row[0], row[1])
            if wires and size + len(wire) > max_bytes:
                break
            wires.append(wire)
            size += len(wire)
        taken += 1
    return wires, taken


def entries_with_ids(
    conn: sqlite3.Connection, ids: Sequence[bytes], max_bytes: int
) -> tuple[list[Outgoing], int]:
    """The entries ``ids`` names that are held and not found damaged, in clock
    order, until ``max_bytes`` of wire forms (at least one); and how many IDs that
    took (those not held included)."""
    found: list[Outgoing] = []
    damage = conn.execute("SELECT EXISTS (SELECT 1 FROM entries_damaged)").fetchone()[0]
    size = taken = 0
    for entry in ids:
        row = conn.execute(
            "SELECT e.hlc, a.key, e.seq, e.signed, e.payloads FROM entries e "
            "JOIN authors a ON a.idx = e.author WHERE e.id = ?",
            (entry,),
        ).fetchone()
        if row is not None and not (damage and _is_damaged(conn, entry)):
            wire = wire_form(row[3], row[4])
            if found and size + len(wire) > max_bytes:
                break
            found.append(Outgoing(row[0], row[1], row[2], entry, wire))
            size += len(wire)
        taken += 1
    found.sort(key=lambda item: (item.hlc, item.author))
    return found, taken


def _is_damaged(conn: sqlite3.Connection, entry: bytes) -> bool:
    row = conn.execute("SELECT 1 FROM entries_damaged WHERE entry = ?", (entry,)).fetchone()
    return row is not None


def entries(conn: sqlite3.Connection, author: bytes | None) -> list[StoredEntry]:
    """Stored entries: one author's in seq order, or everyone's in clock order."""
    sql = (
        "SELECT a.key, e.seq, e.id, e.hlc, e.signed, e.payloads "
        "FROM entries e JOIN authors a ON a.idx = e.author "
    )
    if author is None:
        sql += "ORDER BY e.hlc, a.key"
        args: tuple[object, ...] = ()
    else:
        sql += "WHERE a.key = ? ORDER BY e.seq"
        args = (author,)
    return [StoredEntry(*row) for row in conn.execute(sql, args).fetchall()]


_LOG_SELECT = (
    "SELECT a.key, e.seq, e.id, e.hlc, e.signed, e.payloads "
    "FROM entries e JOIN authors a ON a.idx = e.author"
)


def log_rows(
    conn: sqlite3.Connection,
    author: bytes | None,
    since_hlc: int | None,
    covers: Callable[[str], bool] | None,
    newest: int | None,
) -> list[tuple[Any, ...]]:
    """Rows ``(author, seq, id, hlc, signed, payloads)`` of the entries asked for:
    one author's in seq order, or everyone's in clock order; only those stamped at
    or after ``since_hlc``; only those with an op in a collection ``covers`` accepts
    (read from the signed body, payloads untouched); only the ``newest`` of them.

    With ``newest``, rows are read newest first (by index) and reading stops once
    enough were found.
    """
    where: list[str] = []
    args: list[object] = []
    if author is not None:
        where.append("a.key = ?")
        args.append(author)
    if since_hlc is not None:
        where.append("e.hlc >= ?")
        args.append(since_hlc)
    sql = _LOG_SELECT + (" WHERE " + " AND ".join(where) if where else "")
    order = ["e.seq"] if author is not None else ["e.hlc", "a.key"]
    if newest is None:
        rows = conn.execute(sql + " ORDER BY " + ", ".join(order), args)
        return [row for row in rows if covers is None or _matches(row[4], covers)]
    sql += " ORDER BY " + ", ".join(f"{column} DESC" for column in order)
    if covers is None:
        found = conn.execute(sql + " LIMIT ?", [*args, newest]).fetchall()
    else:
        found = []
        for row in conn.execute(sql, args):
            if _matches(row[4], covers):
                found.append(row)
                if len(found) >= newest:
                    break
    found.reverse()
    return found


def _matches(signed: bytes, covers: Callable[[str], bool]) -> bool:
    return any(covers(collection) for collection in stored_collections(signed))


def forks(conn: sqlite3.Connection) -> list[tuple[bytes, int, bytes, bytes]]:
    """``(author, seq, ours, theirs)`` for every fork on record."""
    return conn.execute(
        "SELECT a.key, f.seq, f.ours, f.theirs FROM forks f "
        "JOIN authors a ON a.idx = f.author ORDER BY a.key, f.seq"
    ).fetchall()


def held_count(conn: sqlite3.Connection) -> int:
    """Entries waiting for a predecessor or base."""
    return int(conn.execute("SELECT count(*) FROM held").fetchone()[0])
