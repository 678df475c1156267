"""Verifying every stored chain.

For each author, walk the stored entries in seq order and check: strict
decoding, the stored ID against the hash of the signed bytes, seq continuity
from 1, each ``prev`` link, a strictly advancing clock, every payload against
its digest, the author head row; then the signature of the last entry, which
vouches for all before it through the links. Any single changed bit in a
stored entry, payload or signature fails one of these checks. Forks on record
are reported apart (``forks``): they are an author's misbehaviour, not damage;
either makes the report not ``ok``.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from p2psync.core import canonical
from p2psync.core.entry import (
    decode_stored,
    entry_id,
    payload_digest,
    payload_list,
    stored_prev,
    stored_refs,
)
from p2psync.core.identity import short_id
from p2psync.errors import EntryError
from p2psync.store import missing


@dataclass
class VerifyReport:
    entries: int = 0
    authors: int = 0
    held: int = 0
    problems: list[str] = field(default_factory=list)  # damage: the store is corrupt
    #: damaged entries whose stored ID the chain confirms (the next entry's link, or
    #: the author's head): ``(author, seq, ID)``, which a sound copy from a peer mends
    mendable: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    forks: list[str] = field(default_factory=list)  # authors that signed two histories
    #: damage to the SQLite file itself (pages, indexes), beside any entry's
    file: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.forks


def verify(conn: sqlite3.Connection, progress: Callable[[int], None] | None = None) -> VerifyReport:
    report = VerifyReport()
    report.file = file_damage(conn)
    if report.file:
        report.problems.append("the store file is damaged (" + "; ".join(report.file) + ")")
    try:
        authors = conn.execute(
            "SELECT idx, key, head_seq, head_id, frozen FROM authors ORDER BY key"
        ).fetchall()
    except sqlite3.DatabaseError:
        return report  # (named above)
    for idx, key, head_seq, head_id, frozen in authors:
        try:
            problem = _verify_author(conn, idx, key, head_seq, head_id, report, progress)
        except sqlite3.DatabaseError as exc:
            problem = f"the entries of author {short_id(key)} cannot all be read ({exc})"
        if problem:
            report.problems.append(problem)
        elif head_seq:
            report.authors += 1
        if frozen:
            for (seq,) in conn.execute("SELECT seq FROM forks WHERE author = ?", (idx,)):
                report.forks.append(
                    f"author {short_id(key)} forked at seq {seq} (proof kept); "
                    "nothing more is accepted from it"
                )
    with contextlib.suppress(sqlite3.DatabaseError):
        report.held = int(conn.execute("SELECT count(*) FROM held").fetchone()[0])
    return report


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def file_damage(conn: sqlite3.Connection) -> list[str]:
    """What is wrong with the SQLite file itself, below the entries: SQLite's own
    check of every page and index (``PRAGMA quick_check``), and, where it finds
    damage or cannot run, which tables cannot be read whole. Empty when sound."""
    try:
        lines = [str(row[0]) for row in conn.execute("PRAGMA quick_check(100)")]
    except sqlite3.DatabaseError as exc:
        lines = [f"SQLite cannot check it ({exc})"]
    if lines == ["ok"]:
        return []
    lines = [line for part in lines for line in part.splitlines() if not line.startswith("***")]
    found = [f"SQLite finds {_plural(len(lines), 'problem')}, first: {lines[0]}"]
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = [row[0] for row in rows]
    except sqlite3.DatabaseError as exc:
        return [*found, f"its list of tables cannot be read ({exc})"]
    unreadable = []
    for table in tables:
        try:
            for _ in conn.execute(f'SELECT * FROM "{table}"'):
                pass
        except sqlite3.DatabaseError:
            unreadable.append(table)
    if unreadable:
        found.append("tables that cannot be read whole: " + ", ".join(unreadable))
    elif owners := _owners(conn, lines):
        # a damaged page that a whole read happens not to touch: name its table
        found.append("damaged pages belong to: " + ", ".join(owners))
    return found


def _owners(conn: sqlite3.Connection, lines: list[str]) -> list[str]:
    """The tables or indexes holding the pages SQLite's check names (by the
    ``dbstat`` table, where this SQLite has it); empty when that cannot be read."""
    pages = sorted({int(m) for line in lines for m in re.findall(r"page (\d+)", line)})
    owners: list[str] = []
    try:
        for page in pages[:100]:
            row = conn.execute("SELECT name FROM dbstat WHERE pageno = ?", (page,)).fetchone()
            if row is not None and row[0] not in owners:
                owners.append(str(row[0]))
    except sqlite3.DatabaseError:
        return owners
    return owners


def _verify_author(
    conn: sqlite3.Connection,
    idx: int,
    key: bytes,
    head_seq: int,
    head_id: bytes | None,
    report: VerifyReport,
    progress: Callable[[int], None] | None,
) -> str | None:
    who = short_id(key)
    expected_seq = 1
    prev_id: bytes | None = None
    prev_hlc = -1
    last = None
    rows = conn.execute(
        "SELECT seq, id, hlc, signed, payloads FROM entries WHERE author = ? ORDER BY seq",
        (idx,),
    )
    for seq, stored_id, hlc, signed, payloads in rows:
        where = f"entry {seq} of {who} ({_short_hex(stored_id)})"
        damage: str | None = None
        try:
            entry = decode_stored(signed, payloads)
        except EntryError as exc:
            damage = f"{where} is damaged: {exc}"
        else:
            if entry.id != stored_id and entry.seq == seq:
                damage = f"{where}: stored ID does not match its signed bytes"
        if damage is not None:
            if seq == expected_seq and _confirmed(conn, idx, seq, stored_id, head_seq, head_id):
                report.mendable.append((key, seq, stored_id))
            return damage
        if entry.author != key:
            return f"{where} names another author"
        if seq != expected_seq or entry.seq != seq:
            return f"{where}: sequence broken (expected {expected_seq})"
        if entry.prev != prev_id:
            return f"{where}: does not link to entry {seq - 1}"
        if entry.hlc != hlc or entry.hlc <= prev_hlc:
            return f"{where}: clock does not advance"
        expected_seq, prev_id, prev_hlc, last = seq + 1, entry.id, entry.hlc, entry
        report.entries += 1
        if progress is not None and report.entries % 10_000 == 0:
            progress(report.entries)
    if expected_seq - 1 != head_seq or prev_id != head_id:
        return f"author {who}: head says seq {head_seq}, entries end at {expected_seq - 1}"
    if last is not None and not last.signature_valid():
        return f"entry {last.seq} of {who} ({last.id.hex()[:16]}): signature does not verify"
    return None


def _confirmed(
    conn: sqlite3.Connection,
    idx: int,
    seq: int,
    stored_id: bytes,
    head_seq: int,
    head_id: bytes | None,
) -> bool:
    """The chain names ``stored_id`` at ``seq``: the author's head, or the next
    entry's link, where the next is sound, or is damaged only in its payloads
    (its signed part still hashes to its own stored ID) and is itself confirmed
    so, up to a sound entry or the head."""
    expected = stored_id
    while True:
        if seq == head_seq:
            return head_id == expected
        row = conn.execute(
            "SELECT id, signed, payloads FROM entries WHERE author = ? AND seq = ?",
            (idx, seq + 1),
        ).fetchone()
        if row is None:
            return False
        next_id, signed, payloads = row
        if not _hashes_to(signed, next_id):
            return False  # its signed part is damaged (or its ID): it confirms nothing
        try:
            if stored_prev(signed) != expected:
                return False
        except EntryError:
            return False
        try:
            decode_stored(signed, payloads)
        except EntryError:
            expected, seq = next_id, seq + 1  # its payloads damaged too: on to the next
            continue
        return True


def _hashes_to(signed: object, stored_id: object) -> bool:
    """A stored signed part hashes to the stored ID (both read back as bytes)."""
    return type(signed) is bytes and type(stored_id) is bytes and entry_id(signed) == stored_id


def _short_hex(value: object) -> str:
    """The first 16 hex digits of a stored ID, whatever type it read back as."""
    return value.hex()[:16] if isinstance(value, bytes) else repr(value)[:16]


def copy_from_records(
    conn: sqlite3.Connection, author: bytes, seq: int
) -> tuple[bytes, bytes, bytes] | None:
    """``(ID, signed, payloads)``: the damaged entry ``seq`` of ``author`` made
    sound from this store's own rows, if they still hold it: the signed part must
    be sound (it hashes to the stored ID), and every op payload that no longer
    hashes to its digest must still be a version of its record (``records`` or
    ``losers`` keep the op payload of every head, byte for byte). An op held
    without its payload stays without. None when that is not enough: a peer's
    copy must mend it. (:meth:`Store.mend_from_records` checks the result in full
    before it writes it.)"""
    row = conn.execute(
        "SELECT e.id, e.signed, e.payloads FROM entries e JOIN authors a ON a.idx = e.author "
        "WHERE a.key = ? AND e.seq = ?",
        (author, seq),
    ).fetchone()
    if row is None:
        return None
    stored_id, signed, blob = row
    if not _hashes_to(signed, stored_id):
        return None  # the signed part itself is damaged
    try:
        refs = stored_refs(signed)
    except EntryError:
        return None
    ours: list[object] = []
    if type(blob) is bytes:
        with contextlib.suppress(EntryError):
            ours = list(payload_list(blob))
    if len(ours) != len(refs):
        ours = [b""] * len(refs)  # none of ours can be told apart: look each up
    withheld = missing.ops_of(conn, stored_id)
    payloads: list[bytes | None] = []
    for index, ((collection, digest), payload) in enumerate(zip(refs, ours, strict=True)):
        if type(payload) is bytes and payload_digest(payload) == digest:
            payloads.append(payload)
            continue
        if payload is None and index in withheld:
            payloads.append(None)
            continue
        found = _version_payload(conn, collection, stored_id, digest)
        if found is None:
            if index in withheld:
                payloads.append(None)
                continue
            return None
        payloads.append(found)
    return stored_id, signed, canonical.encode(payloads)


def _version_payload(
    conn: sqlite3.Connection, collection: str, entry: bytes, digest: bytes
) -> bytes | None:
    """The op payload of ``entry`` in ``collection`` that hashes to ``digest``, from
    a record version that still holds it (a head, or a conflict's loser)."""
    for table in ("records", "losers"):
        rows = conn.execute(
            f"SELECT payload FROM {table} WHERE collection = ? AND entry = ?",
            (collection, entry),
        )
        for (payload,) in rows:
            if type(payload) is bytes and payload_digest(payload) == digest:
                return payload
    return None


def damage_of(
    conn: sqlite3.Connection, entry: bytes
) -> tuple[str, tuple[bytes, int, bytes] | None] | None:
    """Whether the stored entry ``entry`` (one a session sent, that the peer never
    acknowledged) is damaged: what is wrong, and ``(author, seq, ID)`` when the
    chain confirms its ID (it can be mended or marked); None when it is sound or
    not held."""
    row = conn.execute(
        "SELECT a.idx, a.key, a.head_seq, a.head_id, e.seq, e.signed, e.payloads "
        "FROM entries e JOIN authors a ON a.idx = e.author WHERE e.id = ?",
        (entry,),
    ).fetchone()
    if row is None:
        return None
    idx, author, head_seq, head_id, seq, signed, payloads = row
    where = f"entry {seq} of {short_id(author)} ({entry.hex()[:16]})"
    try:
        decoded = decode_stored(signed, payloads)
    except EntryError as exc:
        damage = f"{where} is damaged: {exc}"
    else:
        if decoded.id == entry and decoded.seq == seq and decoded.author == author:
            return None
        damage = f"{where}: stored ID does not match its signed bytes"
    if _confirmed(conn, idx, seq, entry, head_seq, head_id):
        return damage, (author, seq, entry)
    return damage, None
