"""Applying entries to the store inside one write transaction.

:class:`Writer` is the only code that changes ``entries``, ``records``,
``losers``, ``authors``, ``held``, ``forks``, ``incomplete`` and the ops held
without their payload (:mod:`p2psync.store.missing`). Ingested entries
(:mod:`p2psync.store.ingest`) go through :meth:`Writer.try_apply` (which checks
their place in the chain and their dependencies), local ones
(:mod:`p2psync.store.local`) straight to :meth:`Writer.apply`; both merge the
same way. A copy of a held entry that brings payloads the held one lacks is merged
late (:meth:`Writer.fill`).
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from p2psync.core import canonical
from p2psync.core import hlc as hlc_mod
from p2psync.core.entry import Entry, Op, OpKind, payload_digest, payload_list, wire_form
from p2psync.core.identity import short_id
from p2psync.core.merge import Version, merge
from p2psync.core.messages import MAX_AUTHORS
from p2psync.errors import (
    AuthorLimitError,
    ChainError,
    EntryError,
    ForkError,
    FrozenAuthorError,
    WithheldError,
)
from p2psync.store import feed, missing
from p2psync.store.missing import Missing

META_CLOCK = "clock"


@dataclass
class AuthorHead:
    """An author's chain head, as held in this transaction."""

    idx: int | None  # None until the author's first row is needed
    key: bytes
    seq: int
    id: bytes | None
    hlc: int
    frozen: bool
    dirty: bool = False


class Verdict(Enum):
    """What became of one attempt to apply an entry."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    WAIT = "wait"
    REFUSED = "refused"
    FILLED = "filled"  # held already; this copy brought payloads ours lacked


class Attempt(NamedTuple):
    outcome: Verdict
    dep: bytes | None = None
    error: EntryError | None = None


_APPLIED = Attempt(Verdict.APPLIED)
_DUPLICATE = Attempt(Verdict.DUPLICATE)
_FILLED = Attempt(Verdict.FILLED)

_States = dict[tuple[str, str], list[Version]]

_RECORD_COLUMNS = "entry, hlc, author, payload, deleted"
_PREFETCH_CHUNK = 500


class HeldQuota:
    """Room left for held entries in one ingest, in all and per author."""

    def __init__(self, conn: sqlite3.Connection, count: int, size: int, per_author: int) -> None:
        self.conn = conn
        self.count = count
        self.size = size
        self.per_author = per_author
        self._authors: dict[bytes, int] = {}

    def take(self, author: bytes, size: int) -> str | None:
        """Reserve room for one entry, or say why there is none."""
        if author not in self._authors:
            held = self.conn.execute(
                "SELECT count(*) FROM held WHERE author = ?", (author,)
            ).fetchone()[0]
            self._authors[author] = self.per_author - held
        if self._authors[author] <= 0:
            return (
                f"{self.per_author} entries of author {short_id(author)} already wait for "
                "predecessors; refused until those arrive"
            )
        if self.count <= 0 or self.size < size:
            return "the store holds as many entries waiting for predecessors as it may"
        self._authors[author] -= 1
        self.count -= 1
        self.size -= size
        return None


class Writer:
    """Applies entries within one open write transaction on ``conn``."""

    def __init__(self, conn: sqlite3.Connection, now_ms: int) -> None:
        self.conn = conn
        self.now_ms = now_ms
        self.heads: dict[bytes, AuthorHead] = {}
        self._authors: int | None = None
        self.applied: set[bytes] = set()
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (META_CLOCK,)).fetchone()
        self.clock = int(row[0]) if row else 0
        self._clock_start = self.clock
        self.has_held = conn.execute("SELECT EXISTS (SELECT 1 FROM held)").fetchone()[0] == 1
        # Write-back caches, flushed by flush(): record heads as loaded (and whether
        # they had losers in the table), records changed since, entry rows to insert.
        self._records: dict[tuple[str, str], list[Version]] = {}
        self._had_losers: set[tuple[str, str]] = set()
        #: records changed since the last flush, in the order they changed (their
        #: change numbers follow it)
        self._dirty: dict[tuple[str, str], None] = {}
        self._new_entries: list[tuple[int, int, bytes, int, bytes, bytes]] = []
        #: ops applied without their payload (withheld upstream), per (collection, author)
        self._incomplete: dict[tuple[str, bytes], int] = {}
        #: the same ops one by one, and the records where a later op named them
        self.has_missing = missing.any_missing(conn)
        self.has_damaged = bool(
            conn.execute("SELECT EXISTS (SELECT 1 FROM entries_damaged)").fetchone()[0]
        )
        self._missing: list[Missing] = []
        self._missing_here: set[tuple[bytes, str]] = set()  # (entry, collection) of those
        self._superseded: set[tuple[bytes, str, str]] = set()
        #: who sent the entries being ingested, and what it may send here: a copy
        #: asked for that lacks a payload it may send is noted (not asked again soon)
        self.source: tuple[bytes, Callable[[str], bool]] | None = None
        self.lacking: list[tuple[bytes, int]] = []
        #: held entries whose damaged stored bytes a copy mended
        self.mended: list[bytes] = []

    # ------------------------------------------------------------ reading

    def head(self, author: bytes) -> AuthorHead:
        head = self.heads.get(author)
        if head is not None:
            return head
        row = self.conn.execute(
            "SELECT idx, head_seq, head_id, head_hlc, frozen FROM authors WHERE key = ?",
            (author,),
        ).fetchone()
        if row is None:
            head = AuthorHead(None, author, 0, None, 0, False)
        else:
            head = AuthorHead(row[0], author, row[1], row[2], row[3], bool(row[4]))
        self.heads[author] = head
        return head

    def author_count(self) -> int:
        if self._authors is None:
            self._authors = int(self.conn.execute("SELECT count(*) FROM authors").fetchone()[0])
        return self._authors

    def _row(self, head: AuthorHead) -> int:
        """The author's row index, creating the row on first use."""
        if head.idx is None:
            cursor = self.conn.execute("INSERT INTO authors (key) VALUES (?)", (head.key,))
            assert cursor.lastrowid is not None
            head.idx = cursor.lastrowid
            if self._authors is not None:
                self._authors += 1
        return head.idx

    def record_heads(self, collection: str, key: str) -> list[Version]:
        """The record's heads, winner first; empty when the record was never written."""
        cached = self._records.get((collection, key))
        if cached is not None:
            return cached
        self.prefetch([(collection, key)])
        return self._records[(collection, key)]

    def prefetch(self, wanted: Iterable[tuple[str, str]]) -> None:
        """Load the heads of many records with a few queries."""
        by_collection: dict[str, list[str]] = defaultdict(list)
        for record in wanted:
            if record not in self._records:
                by_collection[record[0]].append(record[1])
                self._records[record] = []
        for collection, keys in by_collection.items():
            for start in range(0, len(keys), _PREFETCH_CHUNK):
                chunk = keys[start : start + _PREFETCH_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self.conn.execute(
                    f"SELECT key, {_RECORD_COLUMNS}, conflicted FROM records "
                    f"WHERE collection = ? AND key IN ({marks})",
                    (collection, *chunk),
                ).fetchall()
                for key, entry, hlc, author, payload, deleted, conflicted in rows:
                    heads = [Version(entry, hlc, author, payload, bool(deleted))]
                    if conflicted:
                        self._had_losers.add((collection, key))
                        heads.extend(
                            Version(r[0], r[1], r[2], r[3], bool(r[4]))
                            for r in self.conn.execute(
                                f"SELECT {_RECORD_COLUMNS} FROM losers "
                                "WHERE collection = ? AND key = ?",
                                (collection, key),
                            )
                        )
                    self._records[(collection, key)] = heads

    def has_entry(self, entry_id: bytes) -> bool:
        if entry_id in self.applied:
            return True
        self._flush_entries()
        row = self.conn.execute("SELECT 1 FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return row is not None

    def stored_wire(
        self, head: AuthorHead, seq: int
    ) -> tuple[bytes, bytes, bytes, bytes] | None:
        """``(id, wire, signed, payloads)`` of the stored entry ``seq`` of an author."""
        if head.idx is None:
            return None
        self._flush_entries()
        row = self.conn.execute(
            "SELECT id, signed, payloads FROM entries WHERE author = ? AND seq = ?",
            (head.idx, seq),
        ).fetchone()
        if row is None:
            return None
        return row[0], wire_form(row[1], row[2]), row[1], row[2]

    # ------------------------------------------------------------ applying

    def try_apply(self, entry: Entry, wire: bytes) -> Attempt:
        """Apply an authenticated entry if everything it depends on is applied."""
        head = self.head(entry.author)
        if head.frozen:
            return Attempt(
                Verdict.REFUSED,
                error=FrozenAuthorError(f"author {short_id(entry.author)} is frozen after a fork"),
            )
        if entry.seq <= head.seq:
            stored = self.stored_wire(head, entry.seq)
            if stored is not None and stored[0] == entry.id:
                same = stored[3] == entry.payloads_blob and stored[2] == entry.signed
                if same and not self.has_damaged and (
                    self.source is None or b"\xf6" not in stored[3]
                ):
                    return _DUPLICATE  # (with a null in ours, it may lack what it may send)
                return self.fill(entry, stored[2], stored[3])
            ours = stored[1] if stored is not None else b""
            return self._fork(head, entry.seq, ours, wire)
        if entry.seq > head.seq + 1:
            assert entry.prev is not None
            return Attempt(Verdict.WAIT, dep=entry.prev)
        if head.idx is None and self.author_count() >= MAX_AUTHORS:
            return Attempt(
                Verdict.REFUSED,
                error=AuthorLimitError(
                    f"this store already holds the logs of {MAX_AUTHORS} authors; "
                    f"entries of a new author ({short_id(entry.author)}) are refused"
                ),
            )
        if entry.prev != head.id:
            stored = self.stored_wire(head, head.seq)
            return self._fork(head, head.seq, stored[1] if stored else b"", wire)
        if entry.hlc <= head.hlc:
            return Attempt(
                Verdict.REFUSED,
                error=ChainError(
                    f"entry {entry.seq} of {short_id(entry.author)}: "
                    "clock does not advance on its predecessor"
                ),
            )
        states: _States = {}
        for op in entry.ops:
            if op is None:
                continue
            heads = self.record_heads(op.collection, op.key)
            states[(op.collection, op.key)] = heads
            if op.bases:
                present = {version.entry for version in heads}
                for base in op.bases:
                    if base not in present and not self.has_entry(base):
                        return Attempt(Verdict.WAIT, dep=base)
        self.apply(entry, states)
        return _APPLIED

    def apply(self, entry: Entry, states: _States) -> None:
        """Store ``entry`` and merge its ops; its dependencies must be applied."""
        head = self.head(entry.author)
        self._new_entries.append(
            (self._row(head), entry.seq, entry.id, entry.hlc, entry.signed, entry.payloads_blob)
        )
        for index, (collection, op) in enumerate(zip(entry.collections, entry.ops, strict=True)):
            if op is None:  # its payload was withheld: a collection not for us by that path
                where = (collection, entry.author)
                self._incomplete[where] = self._incomplete.get(where, 0) + 1
                self._missing.append(Missing(entry.id, index, collection, entry.author, entry.seq))
                self._missing_here.add((entry.id, collection))
                self.has_missing = True
                continue
            self._merge(entry, op, states[(op.collection, op.key)])
        head.seq, head.id, head.hlc, head.dirty = entry.seq, entry.id, entry.hlc, True
        self.applied.add(entry.id)
        self.clock = hlc_mod.observe(self.clock, entry.hlc, self.now_ms)

    def _merge(self, entry: Entry, op: Op, old: list[Version], *, superseded: bool = False) -> None:
        """Merge ``op`` of ``entry`` into the record whose heads are ``old``; a
        ``superseded`` op (late, named by one applied before it) only takes the
        versions it names off the heads."""
        record = (op.collection, op.key)
        if superseded:
            kept = [v for v in old if v.entry not in op.bases]
            if len(kept) < len(old) and kept:  # (the op that named it is a head, or
                self._records[record] = kept  # its successor: never empty)
                self._touch(record)
        else:
            version = Version(
                entry.id, entry.hlc, entry.author, op.payload, op.kind is OpKind.DELETE
            )
            if not old or (len(old) == 1 and old[0].entry in op.bases):
                self._records[record] = [version]  # the common case, without merge()
            else:
                self._records[record] = merge(old, version, op.bases)
            self._touch(record)
        if self.has_missing and op.bases:
            present = {v.entry for v in old}
            for base in op.bases:  # a version here that arrives late is superseded
                if base not in present and self._is_missing(base, op.collection):
                    self._superseded.add((base, op.collection, op.key))

    def _touch(self, record: tuple[str, str]) -> None:
        """``record`` changed: it moves to the end of the order of changes."""
        self._dirty.pop(record, None)
        self._dirty[record] = None

    def _is_missing(self, entry: bytes, collection: str) -> bool:
        return (entry, collection) in self._missing_here or missing.missing_in(
            self.conn, entry, collection
        )

    def fill(self, entry: Entry, signed: bytes, held: bytes) -> Attempt:
        """A copy of an entry held here (same ID; ``signed`` and ``held``: the
        stored signed part and payloads). Ops ours lacks that it brings are merged
        late; an op naming a base not held here stays missing (it would break
        causal order) for a copy in a later session. A stored row found damaged
        (``p2psync verify`` names it) is mended from the copy where it can be:
        its records were made when it was sound, so only its bytes change."""
        ours, sound = _stored_payloads(entry, held)
        if ours is None or not all(sound):  # the op indices missing here, from the table
            gaps = missing.ops_of(self.conn, entry.id) if self.has_missing else set()
        else:
            gaps = {i for i, payload in enumerate(ours) if payload is None}
        if not gaps and all(sound) and signed == entry.signed:
            self._sound(entry.id)
            return _DUPLICATE  # (it brings nothing ours lacks)
        for index, op in enumerate(entry.ops):
            if index not in gaps and op is None and not (ours is not None and sound[index]):
                # damaged here, and the copy lacks it (withheld on its way): not
                # mended, and nothing of it merged either
                return Attempt(
                    Verdict.REFUSED,
                    error=WithheldError(
                        f"entry {entry.seq} of {short_id(entry.author)} is damaged in this "
                        f"store and the sender's copy lacks its {entry.collections[index]!r} "
                        "part, so it cannot mend it; a peer that may send that part can"
                    ),
                )
        self._flush_pending_missing()
        new: list[bytes | None] = []
        filled: list[tuple[int, str, str]] = []
        for index, op in enumerate(entry.ops):
            if index in gaps:
                if op is not None and self._fill_op(entry, op):
                    filled.append((index, op.collection, op.key))
                    new.append(op.payload)
                else:
                    new.append(None)
                    if op is None and self.source is not None:
                        may_send = self.source[1]  # it may send it, but lacks it too
                        if may_send(entry.collections[index]):
                            self.lacking.append((entry.id, index))
            elif ours is not None and sound[index]:
                new.append(ours[index])
            else:  # ours damaged: the copy's (it has it: checked above; and on decoding)
                assert op is not None
                new.append(op.payload)
        if self.lacking and self.source is not None:
            missing.lacked(self.conn, self.source[0], self.lacking, self.now_ms)
            self.lacking.clear()
        mended = signed != entry.signed or not all(sound)
        if not filled and not mended:
            return _DUPLICATE
        if filled:
            missing.filled(self.conn, entry.id, filled)
        if mended:
            self.mended.append(entry.id)
        self.conn.execute(
            "UPDATE entries SET signed = ?, payloads = ? WHERE id = ?",
            (entry.signed, canonical.encode(new), entry.id),
        )
        self._sound(entry.id)
        return _FILLED if filled else _DUPLICATE

    def _sound(self, entry_id: bytes) -> None:
        """The stored entry ``entry_id`` is sound (again): served and shown again."""
        if self.has_damaged:
            self.conn.execute("DELETE FROM entries_damaged WHERE entry = ?", (entry_id,))

    def _fill_op(self, entry: Entry, op: Op) -> bool:
        """Merge ``op`` of a held ``entry`` late, if every base it names is held."""
        heads = self.record_heads(op.collection, op.key)
        present = {version.entry for version in heads}
        if any(base not in present and not self.has_entry(base) for base in op.bases):
            return False
        # heads = versions - bases named: what it names goes, whether or not a
        # later op named it (then it is no head itself)
        late = missing.superseded(self.conn, entry.id, op.collection, op.key)
        self._merge(entry, op, heads, superseded=late)
        where = (op.collection, entry.author)
        self._incomplete[where] = self._incomplete.get(where, 0) - 1
        return True

    def _flush_pending_missing(self) -> None:
        self._flush_entries()
        if self._missing:
            missing.add(self.conn, self._missing)
            self._missing.clear()
        if self._superseded:
            missing.add_superseded(self.conn, self._superseded)
            self._superseded.clear()

    def _flush_entries(self) -> None:
        if self._new_entries:
            self.conn.executemany(
                "INSERT INTO entries (author, seq, id, hlc, signed, payloads) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                self._new_entries,
            )
            self._new_entries.clear()

    def flush(self) -> None:
        """Write cached changes to the transaction and empty the caches."""
        self._flush_entries()
        if self._incomplete:
            self.conn.executemany(
                "INSERT INTO incomplete (collection, author, ops) VALUES (?, ?, ?) "
                "ON CONFLICT (collection, author) DO UPDATE SET ops = ops + excluded.ops",
                [(c, a, n) for (c, a), n in self._incomplete.items()],
            )
            if any(n < 0 for n in self._incomplete.values()):  # some were filled
                self.conn.execute("DELETE FROM incomplete WHERE ops <= 0")
            self._incomplete.clear()
        self._flush_pending_missing()
        self._missing_here.clear()
        rows: list[tuple[object, ...]] = []
        loser_keys: list[tuple[str, str]] = []
        loser_rows: list[tuple[object, ...]] = []
        change = feed.last_change(self.conn) if self._dirty else 0
        for record in self._dirty:
            heads = self._records[record]
            winner = heads[0]
            change += 1
            rows.append(
                (
                    *record,
                    winner.entry,
                    winner.hlc,
                    winner.author,
                    winner.payload,
                    winner.deleted,
                    len(heads) > 1,
                    change,
                )
            )
            if len(heads) > 1 or record in self._had_losers:
                loser_keys.append(record)
                loser_rows.extend(
                    (*record, v.entry, v.hlc, v.author, v.payload, v.deleted) for v in heads[1:]
                )
        self.conn.executemany(
            "INSERT OR REPLACE INTO records (collection, key, entry, hlc, author, payload, "
            "deleted, conflicted, change) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        if loser_keys:
            self.conn.executemany("DELETE FROM losers WHERE collection = ? AND key = ?", loser_keys)
            self.conn.executemany(
                f"INSERT INTO losers (collection, key, {_RECORD_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                loser_rows,
            )
        self._records.clear()
        self._had_losers.clear()
        self._dirty.clear()

    def _fork(self, head: AuthorHead, seq: int, ours: bytes, theirs: bytes) -> Attempt:
        self.conn.execute(
            "INSERT OR IGNORE INTO forks (author, seq, ours, theirs, detected) "
            "VALUES (?, ?, ?, ?, ?)",
            (self._row(head), seq, ours, theirs, self.now_ms),
        )
        head.frozen = True
        head.dirty = True
        if self.has_held:  # nothing more will be accepted from this author
            self.conn.execute("DELETE FROM held WHERE author = ?", (head.key,))
        return Attempt(
            Verdict.REFUSED,
            error=ForkError(
                f"author {short_id(head.key)} signed two different entries at seq {seq}; "
                "both kept as proof and the author is frozen"
            ),
        )

    # ------------------------------------------------------------ held entries

    def hold(self, entry: Entry, dep: bytes, wire: bytes) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO held (id, author, seq, dep, wire, received, size) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (entry.id, entry.author, entry.seq, dep, wire, self.now_ms, len(wire)),
        )
        self.has_held = True

    def held_successor(self, entry: Entry) -> bool:
        """True when a held (authenticated) entry of the same author names ``entry``."""
        if not self.has_held:
            return False
        row = self.conn.execute(
            "SELECT 1 FROM held WHERE author = ? AND seq = ? AND dep = ?",
            (entry.author, entry.seq + 1, entry.id),
        ).fetchone()
        return row is not None

    def held_quota(self, max_count: int, per_author: int, max_bytes: int) -> HeldQuota:
        count, size = self.conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM held INDEXED BY held_by_author"
        ).fetchone()
        return HeldQuota(self.conn, max_count - count, max_bytes - size, per_author)

    def expire_held(self, older_than_ms: int) -> None:
        if self.has_held:
            self.conn.execute("DELETE FROM held WHERE received < ?", (self.now_ms - older_than_ms,))

    def take_held(self, dep: bytes) -> list[bytes]:
        """Remove and return the wire forms of held entries waiting for ``dep``."""
        if not self.has_held:
            return []
        rows = self.conn.execute("SELECT id, wire FROM held WHERE dep = ?", (dep,)).fetchall()
        if rows:
            self.conn.executemany("DELETE FROM held WHERE id = ?", [(r[0],) for r in rows])
        return [r[1] for r in rows]

    def drop_held(self, entry_id: bytes) -> None:
        if self.has_held:
            self.conn.execute("DELETE FROM held WHERE id = ?", (entry_id,))

    # ------------------------------------------------------------ finishing

    def finish(self) -> None:
        """Write back every cached change, author heads and the clock."""
        self.flush()
        self.conn.executemany(
            "UPDATE authors SET head_seq = ?, head_id = ?, head_hlc = ?, frozen = ? WHERE idx = ?",
            [(h.seq, h.id, h.hlc, int(h.frozen), h.idx) for h in self.heads.values() if h.dirty],
        )
        if self.clock != self._clock_start:
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (META_CLOCK, self.clock),
            )


def _stored_payloads(entry: Entry, held: bytes) -> tuple[list[bytes | None] | None, list[bool]]:
    """The stored payloads of ``entry`` and, per op, whether ours is sound (absent,
    or hashing to its digest); ``None`` and all unsound when they do not decode."""
    try:
        ours = payload_list(held)
    except EntryError:
        return None, [False] * len(entry.ops)
    if len(ours) != len(entry.ops) or any(type(p) not in (bytes, type(None)) for p in ours):
        return None, [False] * len(entry.ops)
    pairs = zip(ours, entry.digests, strict=True)
    return ours, [p is None or payload_digest(p) == digest for p, digest in pairs]
