"""The delivery ledger of the relay mailbox: what became of every envelope we made,
and what we received (schema version 10, ``docs/relay.md`` "Delivery ledger").

Per peer and seq, an envelope moves through :class:`State` only as
:data:`MOVES` allows::

    queued ──> at-relay (until T) ──> acknowledged   (a signed receipt: final)
       │  └──> handed-over (file F) ─> refused        (receipt or relay, reason: final)
       │                            ─> superseded     (a direct sync showed it: final)
       └────────────────────────────> expired        (by our clock; its entries go again)
                                         └─> acknowledged (a late signed receipt)

A relay saying "stored" makes a row ``at-relay``, never ``acknowledged``. A pair's
seqs come from one counter per peer for every class (:meth:`Ledger.reserve`,
committed before any envelope with them leaves), so a seq is never reused.

Received: per sender, every seq up to a high-water mark, and the set above it
(at most :data:`MAX_ABOVE`; past that the mark moves up over the oldest gap).
Owed receipts (``mail_due``) are written in the same transaction as the seq is
marked received. Each method is one transaction of the store's connections.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from p2psync.core import canonical
from p2psync.core.messages import Head
from p2psync.errors import StoreError
from p2psync.store import wants as _wants
from p2psync.store.connection import Guard

#: Seqs received above the high-water mark that a pair keeps.
MAX_ABOVE = 4096

_POLICY_KEY = "mail_policy"


class State(Enum):
    QUEUED = "queued"
    AT_RELAY = "at-relay"
    HANDED_OVER = "handed-over"
    ACKNOWLEDGED = "acknowledged"
    EXPIRED = "expired"
    REFUSED = "refused"
    SUPERSEDED = "superseded"


#: Envelopes on their way: their entries count as sent.
IN_FLIGHT = frozenset({State.QUEUED, State.AT_RELAY, State.HANDED_OVER})
_S = State
#: Which state may follow which (a move not listed is ignored).
MOVES: dict[State, frozenset[State]] = {
    _S.QUEUED: frozenset(
        {_S.AT_RELAY, _S.HANDED_OVER, _S.ACKNOWLEDGED, _S.REFUSED, _S.EXPIRED, _S.SUPERSEDED}
    ),
    _S.AT_RELAY: frozenset({_S.AT_RELAY, _S.ACKNOWLEDGED, _S.REFUSED, _S.EXPIRED, _S.SUPERSEDED}),
    _S.HANDED_OVER: frozenset({_S.ACKNOWLEDGED, _S.REFUSED, _S.EXPIRED, _S.SUPERSEDED}),
    _S.EXPIRED: frozenset({_S.ACKNOWLEDGED}),
    _S.ACKNOWLEDGED: frozenset(),
    _S.REFUSED: frozenset(),
    _S.SUPERSEDED: frozenset(),
}


def may_move(old: State, new: State) -> bool:
    return new in MOVES[old]


#: What an envelope carries: per author, the first and last seq of its entries.
Carries = tuple[tuple[bytes, int, int], ...]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    peer: bytes
    seq: int
    cls: int
    state: State
    place: str | None
    entries: int
    size: int  # bytes of the wire form
    until_ms: int | None
    made_ms: int
    done_ms: int | None
    reason: str | None
    carries: Carries
    rules: bytes | None
    #: how many entries it asks the peer for again (its bundle's wants)
    asks: int = 0


@dataclass(frozen=True, slots=True)
class PairState:
    """What the ledger knows of one peer."""

    next_seq: int = 1
    heads: dict[bytes, Head] | None = None  # by its last signed receipt or bundle
    heads_ms: int | None = None
    rules: bytes | None = None  # the rules digest its last bundle named
    rules_ms: int | None = None
    recv_high: int = 0
    recv_above: tuple[int, ...] = ()
    recv_ms: int | None = None

    def received(self, seq: int) -> bool:
        return seq <= self.recv_high or seq in self.recv_above

    def missing(self, limit: int = 100) -> list[int]:
        """Seqs below the highest received that never came (at most ``limit``)."""
        if not self.recv_above:
            return []
        got = set(self.recv_above)
        gaps = (s for s in range(self.recv_high + 1, max(got)) if s not in got)
        return [s for _, s in zip(range(limit), gaps, strict=False)]


_COLUMNS = (
    "peer, seq, cls, state, place, entries, bytes, until_ms, made_ms, done_ms, reason, "
    "carries, rules, asks"
)


def _row(values: Sequence[Any]) -> LedgerRow:
    runs = canonical.decode(values[11], what="carries", max_depth=2)
    carries = tuple((a, first, last) for a, first, last in runs)
    peer, seq, cls, state, place, entries, size, until_ms, made_ms, done_ms, reason = values[:11]
    return LedgerRow(
        peer,
        seq,
        cls,
        State(state),
        place,
        entries,
        size,
        until_ms,
        made_ms,
        done_ms,
        reason,
        carries,
        values[12],
        values[13],
    )


def _encode_heads(heads: Mapping[bytes, Head]) -> bytes:
    return canonical.encode([[a, h.seq, h.head, h.frozen] for a, h in sorted(heads.items())])


def _decode_heads(data: bytes | None) -> dict[bytes, Head] | None:
    if data is None:
        return None
    return {r[0]: Head(r[1], r[2], r[3]) for r in canonical.decode(data, what="heads", max_depth=2)}


class Ledger:
    """The ledger tables, over a store's writing and reading connections."""

    def __init__(self, db: Guard, reader: Guard) -> None:
        self._db, self._reader = db, reader

    # ------------------------------------------------------------ pairs

    def pair(self, peer: bytes) -> PairState:
        with self._reader.reading() as conn:
            return _pair(conn, peer)

    def reserve(self, peer: bytes, count: int) -> int:
        """Take ``count`` seqs of the pair's counter (committed); the first of them."""
        with self._db.writing() as conn:
            first = _pair(conn, peer).next_seq
            conn.execute(
                "INSERT INTO mail_pairs (peer, next_seq) VALUES (?, ?) "
                "ON CONFLICT (peer) DO UPDATE SET next_seq = excluded.next_seq",
                (peer, first + count),
            )
        return first

    def merge_heads(
        self, peer: bytes, heads: Mapping[bytes, Head], now_ms: int, rules: bytes | None = None
    ) -> None:
        """Note what ``peer`` holds (and, given, the digest of its rule objects)."""
        with self._db.writing() as conn:
            _merge_heads(conn, peer, heads, now_ms)
            if rules is not None:
                _note_rules(conn, peer, rules, now_ms)

    # ------------------------------------------------------------ what we made

    def add(
        self,
        rows: Iterable[LedgerRow],
        receipts: Mapping[tuple[bytes, int], Iterable[int]],
        *,
        asked: Mapping[bytes, Sequence[bytes]] | None = None,
        answers: Mapping[tuple[bytes, int], Sequence[bytes]] | None = None,
        gone: Mapping[bytes, Sequence[bytes]] | None = None,
        now_ms: int = 0,
    ) -> None:
        """Record new envelopes, and that the owed receipts for ``receipts`` ((peer,
        receipt envelope's seq) -> seqs) are sealed in them: one transaction. They
        stay owed until that envelope is at a relay or in a file. Per peer, the
        entries these envelopes ask it for (``asked``, at ``now_ms``), per envelope
        the asks of the peer it answers (``answers``), and per peer the asks
        answered with nothing (``gone``: entries no longer held); see
        ``store/wants.py``."""
        values = [
            (
                r.peer,
                r.seq,
                r.cls,
                r.state.value,
                r.place,
                r.entries,
                r.size,
                r.until_ms,
                r.made_ms,
                r.done_ms,
                r.reason,
                canonical.encode([list(c) for c in r.carries]),
                r.rules,
                r.asks,
            )
            for r in rows
        ]
        with self._db.writing() as conn:
            conn.executemany(
                f"INSERT INTO mail_out ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", values
            )
            for (peer, envelope), seqs in receipts.items():
                conn.executemany(
                    "UPDATE mail_due SET receipt = ? WHERE peer = ? AND seq = ?",
                    [(envelope, peer, s) for s in seqs],
                )
            for peer, ids in (asked or {}).items():
                _wants.asked(conn, peer, ids, now_ms)
            for (peer, envelope), ids in (answers or {}).items():
                _wants.answering(conn, peer, envelope, ids)
            for peer, ids in (gone or {}).items():
                _wants.answered(conn, peer, ids)

    def wanted(self, peer: bytes, limit: int) -> list[bytes]:
        """The oldest ``limit`` entries ``peer`` asked us for, still to answer."""
        with self._reader.reading() as conn:
            return _wants.wanted(conn, peer, limit)

    def purge_asks(self, now_ms: int) -> None:
        """Forget asks past their time, both ways (``store/wants.py``)."""
        with self._db.writing() as conn:
            _wants.purge(conn, now_ms)

    def move(
        self,
        peer: bytes,
        seqs: Iterable[int],
        state: State,
        now_ms: int,
        *,
        place: str | None = None,
        until_ms: int | None = None,
        reason: str | None = None,
    ) -> list[LedgerRow]:
        """Move these rows to ``state`` where :data:`MOVES` allows; the rows moved
        (as they were before)."""
        moved = []
        with self._db.writing() as conn:
            for seq in seqs:
                found = conn.execute(
                    f"SELECT {_COLUMNS} FROM mail_out WHERE peer = ? AND seq = ?", (peer, seq)
                ).fetchone()
                if found is None or not may_move(State(found[3]), state):
                    continue
                row = _row(found)
                final = state not in IN_FLIGHT
                conn.execute(
                    "UPDATE mail_out SET state = ?, place = coalesce(?, place), "
                    "until_ms = coalesce(?, until_ms), done_ms = ?, reason = ? "
                    "WHERE peer = ? AND seq = ?",
                    (state.value, place, until_ms, now_ms if final else None, reason, peer, seq),
                )
                if state is State.ACKNOWLEDGED:  # the asks it answers are done
                    _wants.acknowledged(conn, peer, seq)
                if state in (State.AT_RELAY, State.HANDED_OVER):  # its receipts are on their way
                    conn.execute(
                        "DELETE FROM mail_due WHERE peer = ? AND receipt = ?", (peer, seq)
                    )
                moved.append(row)
        return moved

    def rows(
        self, peer: bytes | None = None, states: Iterable[State] | None = None
    ) -> list[LedgerRow]:
        sql, args = f"SELECT {_COLUMNS} FROM mail_out", list[object]()
        wanted = [s.value for s in states] if states is not None else None
        where = []
        if peer is not None:
            where.append("peer = ?")
            args.append(peer)
        if wanted is not None:
            where.append(f"state IN ({','.join('?' * len(wanted))})")
            args.extend(wanted)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._reader.reading() as conn:
            return [_row(r) for r in conn.execute(sql + " ORDER BY peer, seq", args)]

    # ------------------------------------------------------------ what we received

    def receive(
        self,
        peer: bytes,
        seq: int,
        now_ms: int,
        *,
        owe: bool,
        reason: str | None = None,
        heads: Mapping[bytes, Head] | None = None,
        rules: bytes | None = None,
        wants: Sequence[bytes] = (),
    ) -> bool:
        """Mark ``peer``'s ``seq`` received (False if it was already); with ``owe``, a
        receipt is owed for it (applied, or refused for ``reason``). Its heads, rules
        digest and the entries it asks for (a bundle's) are noted in the same
        transaction."""
        with self._db.writing() as conn:
            state = _pair(conn, peer)
            if state.received(seq):
                return False
            high, above = state.recv_high, sorted({*state.recv_above, seq})
            while above and above[0] == high + 1:
                high = above.pop(0)
            if len(above) > MAX_ABOVE:  # the oldest gap is given up
                high = above.pop(0)
                while above and above[0] == high + 1:
                    high = above.pop(0)
            conn.execute(
                "INSERT INTO mail_pairs (peer, recv_high, recv_above, recv_ms) VALUES (?,?,?,?) "
                "ON CONFLICT (peer) DO UPDATE SET recv_high = excluded.recv_high, "
                "recv_above = excluded.recv_above, recv_ms = excluded.recv_ms",
                (peer, high, canonical.encode(above), now_ms),
            )
            if owe:
                conn.execute(
                    "INSERT OR REPLACE INTO mail_due (peer, seq, reason) VALUES (?, ?, ?)",
                    (peer, seq, reason),
                )
            if heads is not None:
                _merge_heads(conn, peer, heads, now_ms)
            if rules is not None:
                _note_rules(conn, peer, rules, now_ms)
            if wants:
                _wants.want(conn, peer, wants, now_ms)
        return True

    def due(self, peer: bytes) -> list[tuple[int, str | None]]:
        """Receipts owed to ``peer``: (seq, None if applied else the reason)."""
        with self._reader.reading() as conn:
            # not sealed yet, or sealed in an envelope the relay refused or that
            # expired before it was deposited
            return conn.execute(
                "SELECT d.seq, d.reason FROM mail_due d LEFT JOIN mail_out o "
                "ON o.peer = d.peer AND o.seq = d.receipt WHERE d.peer = ? "
                "AND (d.receipt IS NULL OR o.seq IS NULL OR o.state IN (?, ?)) ORDER BY d.seq",
                (peer, State.REFUSED.value, State.EXPIRED.value),
            ).fetchall()

    # ------------------------------------------------------------ the mailbox policy

    def policy(self) -> tuple[int, tuple[bytes, ...], bytes] | None:
        """The last mailbox policy signed: version, senders, wire form."""
        with self._reader.reading() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (_POLICY_KEY,)).fetchone()
        if row is None:
            return None
        version, senders, wire = canonical.decode(row[0], what="policy", max_depth=2)
        return version, tuple(senders), wire

    def set_policy(self, version: int, senders: Sequence[bytes], wire: bytes) -> None:
        """Keep a newly signed policy; refused if it is not newer than the last."""
        value = canonical.encode([version, sorted(senders), wire])
        with self._db.writing() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (_POLICY_KEY,)).fetchone()
            if row is not None and canonical.decode(row[0], what="p", max_depth=2)[0] >= version:
                raise StoreError("a newer mailbox policy was signed meanwhile")
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_POLICY_KEY, value)
            )


def _pair(conn: sqlite3.Connection, peer: bytes) -> PairState:
    row = conn.execute(
        "SELECT next_seq, heads, heads_ms, rules, rules_ms, recv_high, recv_above, recv_ms "
        "FROM mail_pairs WHERE peer = ?",
        (peer,),
    ).fetchone()
    if row is None:
        return PairState()
    above = tuple(canonical.decode(row[6], what="seqs", max_depth=1)) if row[6] else ()
    return PairState(row[0], _decode_heads(row[1]), row[2], row[3], row[4], row[5], above, row[7])


def _merge_heads(
    conn: sqlite3.Connection, peer: bytes, heads: Mapping[bytes, Head], now_ms: int
) -> None:
    """Per author the furthest seq either names (frozen if either says so)."""
    merged = dict(_pair(conn, peer).heads or {})
    for author, head in heads.items():
        known = merged.get(author)
        if known is None or head.seq > known.seq:
            merged[author] = Head(head.seq, head.head, head.frozen or bool(known and known.frozen))
        elif head.frozen and not known.frozen:
            merged[author] = Head(known.seq, known.head, True)
    conn.execute(
        "INSERT INTO mail_pairs (peer, heads, heads_ms) VALUES (?, ?, ?) "
        "ON CONFLICT (peer) DO UPDATE SET heads = excluded.heads, heads_ms = excluded.heads_ms",
        (peer, _encode_heads(merged), now_ms),
    )


def _note_rules(conn: sqlite3.Connection, peer: bytes, rules: bytes, now_ms: int) -> None:
    conn.execute(
        "INSERT INTO mail_pairs (peer, rules, rules_ms) VALUES (?, ?, ?) ON CONFLICT (peer) "
        "DO UPDATE SET rules = excluded.rules, rules_ms = excluded.rules_ms",
        (peer, rules, now_ms),
    )
