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

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from p2psync.core.entry import decode_stored
from p2psync.core.identity import short_id
from p2psync.errors import EntryError


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

    @property
    def ok(self) -> bool:
        return not self.problems and not self.forks


def verify(conn: sqlite3.Connection, progress: Callable[[int], None] | None = None) -> VerifyReport:
    report = VerifyReport()
    authors = conn.execute(
        "SELECT idx, key, head_seq, head_id, frozen FROM authors ORDER BY key"
    ).fetchall()
    for idx, key, head_seq, head_id, frozen in authors:
        problem = _verify_author(conn, idx, key, head_seq, head_id, report, progress)
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
    report.held = int(conn.execute("SELECT count(*) FROM held").fetchone()[0])
    return report


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
        where = f"entry {seq} of {who} ({stored_id.hex()[:16]})"
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
    entry's link (the next must decode for that)."""
    if seq == head_seq:
        return head_id == stored_id
    row = conn.execute(
        "SELECT signed, payloads FROM entries WHERE author = ? AND seq = ?", (idx, seq + 1)
    ).fetchone()
    if row is None:
        return False
    try:
        return decode_stored(row[0], row[1]).prev == stored_id
    except EntryError:
        return False
