"""Writing this site's own entries: local changes signed and applied.

The counterpart of :mod:`p2psync.store.ingest` (entries from elsewhere): each
transaction of :class:`Change` values becomes one entry of this site's own log,
signed, stamped with the next clock value and applied through the same
:class:`~p2psync.store.writer.Writer`, inside the caller's write transaction.

Before writing, the own log must be whole: it must not be forked (its key used
elsewhere), and no peer may claim to hold more of it than this store does (a
store restored from a backup would otherwise reuse sequence numbers and fork
its own log). Such a claim is noted by :func:`note_own_log_claim`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from p2psync.core import hlc as hlc_mod
from p2psync.core.canonical import Value
from p2psync.core.entry import Op, OpKind, check_collection, check_key, make_op, sign_entry
from p2psync.core.identity import Identity, short_id
from p2psync.errors import IntegrityError, InvalidRecord
from p2psync.store import meta
from p2psync.store.writer import Writer

#: Meta key prefix of a peer's claim to hold more of our own log, then its hex key.
OWN_BEHIND = "own_behind:"
#: Transactions whose record heads are read together (see Writer.prefetch).
_WRITE_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Change:
    """One change a local writer asks for."""

    kind: OpKind
    collection: str
    key: str
    value: Value = None
    resolve: bool = False  # supersede every head of the record, ending a conflict


def write(
    conn: sqlite3.Connection,
    identity: Identity,
    transactions: Iterable[Sequence[Change]],
    now_ms: Callable[[], int],
    salt: Callable[[], bytes],
) -> list[bytes]:
    """Sign and apply one entry per transaction, in the open write transaction on
    ``conn``; returns the IDs of the entries written (a transaction whose every
    change was a no-op, such as deleting a missing record, writes none)."""
    written: list[bytes] = []
    writer = Writer(conn, now_ms())
    head = writer.head(identity.public_key)
    if head.frozen:
        raise IntegrityError(
            "this site's own log is forked (its key was used elsewhere); "
            "it must be re-keyed before it can write"
        )
    behind = own_log_behind(conn, head.seq)
    if behind is not None:
        raise IntegrityError(
            f"{behind[0]} holds entries {head.seq + 1}-{behind[1]} of this site's own "
            "log that this store lacks (restored from a backup?); sync with it "
            "(`p2psync sync`) before writing, or new entries would fork the log"
        )
    for chunk in _chunks(transactions, _WRITE_CHUNK):
        for changes in chunk:
            for change in changes:
                check_collection(change.collection)
                check_key(change.key)
            if len({(c.collection, c.key) for c in changes}) != len(changes):
                # Checked here, not only by sign_entry: a delete of a record not
                # yet live is left out below, which would hide a put then a delete.
                raise InvalidRecord("a transaction may change each record only once")
        writer.prefetch((c.collection, c.key) for changes in chunk for c in changes)
        for changes in chunk:
            entry_id = _write_one(writer, identity, changes, now_ms, salt)
            if entry_id is not None:
                written.append(entry_id)
        writer.flush()
    writer.finish()
    return written


def _write_one(
    writer: Writer,
    identity: Identity,
    changes: Sequence[Change],
    now_ms: Callable[[], int],
    salt: Callable[[], bytes],
) -> bytes | None:
    states = {}
    ops: list[Op] = []
    for change in changes:
        heads = writer.record_heads(change.collection, change.key)
        live = bool(heads) and not heads[0].deleted
        if change.kind is OpKind.DELETE and not live and not change.resolve:
            continue
        if change.resolve:
            bases = [version.entry for version in heads]
        else:
            bases = [heads[0].entry] if heads else []
        ops.append(
            make_op(change.kind, change.collection, change.key, change.value, bases, salt())
        )
        states[(change.collection, change.key)] = heads
    if not ops:
        return None
    head = writer.head(identity.public_key)
    stamp = hlc_mod.tick(max(writer.clock, head.hlc), now_ms())
    entry = sign_entry(identity, head.seq + 1, head.id, stamp, ops)
    writer.apply(entry, states)
    return entry.id


def _chunks(items: Iterable[Sequence[Change]], size: int) -> Iterator[list[Sequence[Change]]]:
    chunk: list[Sequence[Change]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- claims on our own log


def note_own_log_claim(conn: sqlite3.Connection, own: bytes, peer: bytes, seq: int) -> bool:
    """Remember that ``peer`` holds our own log (``own``) up to ``seq``, if that is
    beyond what this store holds; True when it is (then local writes are refused
    until our log reaches it, or the peer is removed)."""
    row = conn.execute("SELECT head_seq FROM authors WHERE key = ?", (own,)).fetchone()
    if seq <= (row[0] if row else 0):
        return False
    meta.put(conn, f"{OWN_BEHIND}{peer.hex()}", seq)
    return True


def own_log_behind(conn: sqlite3.Connection, head: int) -> tuple[str, int] | None:
    """(peer short ID, seq) of a claim that our own log goes beyond ``head``."""
    rows = conn.execute(
        "SELECT m.key, m.value FROM meta m WHERE m.key LIKE 'own_behind:%'"
    ).fetchall()
    for key, seq in rows:
        peer = bytes.fromhex(key[len(OWN_BEHIND):])
        removed = conn.execute(
            "SELECT 1 FROM peers WHERE key = ? AND state = 'removed'", (peer,)
        ).fetchone()
        if int(seq) > head and removed is None:
            return short_id(peer), int(seq)
    return None
