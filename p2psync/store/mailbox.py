"""The relay's mailbox in one SQLite file: the default
:class:`~p2psync.core.mailbox.MailboxStore` backend.

The decisions are the pure core's (:mod:`p2psync.core.mailbox`); this module
reads what they need and writes what they decide, each call one transaction on
a connection opened as the store opens its own (WAL, ``synchronous=FULL``,
``BEGIN IMMEDIATE``): a :class:`~p2psync.core.mailbox.Stored` answer is on disk
before it is returned. Blobs are stored as given; nothing here reads them.

Tables (``mailbox_schema`` records the version):

``mailboxes``       one row per recipient seen: the last fetch position handed out,
                    and the version of its policy in force (0: none).
``policy_senders``  the senders the policy in force lets deposit data and receipts.
``envelopes``       held envelopes: the outer header, the mailbox position, T
                    (``until_ms``), the blob. Key (recipient, sender, seq).
``quotas``          what is charged, by kind (``mailbox``, ``pair``, ``sender``,
                    ``intro_mailbox``, ``intro_pair``), principal and peer (empty
                    when the kind has none); charged on store, refunded when an
                    envelope goes; rows at zero are dropped.
``notices``         expiry notices queued for their sender.

The SQL is meant to run unchanged on PostgreSQL (a later backend): upserts are
``INSERT ... ON CONFLICT``, positions come from ``UPDATE ... RETURNING`` rather
than ``AUTOINCREMENT``. What differs is confined to :data:`SCHEMA` (``BLOB`` is
``BYTEA`` there) and the parameter style (``?`` here, ``%s`` in psycopg).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from p2psync.core.envelope import EnvelopeClass
from p2psync.core.mailbox import (
    MAX_FETCH,
    MAX_INT,
    MAX_NOTICES,
    NO_POLICY,
    Deposit,
    Envelope,
    ExpiryNotice,
    Limits,
    MailboxPolicy,
    Stored,
    Summary,
    Tally,
    Usage,
    Verdict,
    admit,
    expired,
    newer,
)
from p2psync.errors import StoreError, UsageError
from p2psync.store.connection import Guard, connect

VERSION = 1

SCHEMA = """
CREATE TABLE mailbox_schema (version INTEGER NOT NULL);
CREATE TABLE mailboxes (
    recipient      BLOB PRIMARY KEY,
    last_position  BIGINT NOT NULL,
    policy_version BIGINT NOT NULL
);
CREATE TABLE policy_senders (
    recipient BLOB NOT NULL,
    sender    BLOB NOT NULL,
    PRIMARY KEY (recipient, sender)
);
CREATE TABLE envelopes (
    recipient BLOB NOT NULL,
    sender    BLOB NOT NULL,
    seq       BIGINT NOT NULL,
    position  BIGINT NOT NULL,
    cls       INTEGER NOT NULL,
    asked_ms  BIGINT NOT NULL,
    size      BIGINT NOT NULL,
    stored_ms BIGINT NOT NULL,
    until_ms  BIGINT NOT NULL,
    blob      BLOB NOT NULL,
    PRIMARY KEY (recipient, sender, seq)
);
CREATE UNIQUE INDEX envelopes_by_position ON envelopes (recipient, position);
CREATE INDEX envelopes_by_until ON envelopes (until_ms);
CREATE TABLE quotas (
    kind      TEXT NOT NULL,
    principal BLOB NOT NULL,
    peer      BLOB NOT NULL,
    count     BIGINT NOT NULL,
    bytes     BIGINT NOT NULL,
    PRIMARY KEY (kind, principal, peer)
);
CREATE TABLE notices (
    sender    BLOB NOT NULL,
    recipient BLOB NOT NULL,
    seq       BIGINT NOT NULL,
    until_ms  BIGINT NOT NULL,
    PRIMARY KEY (sender, recipient, seq, until_ms)
)
"""

_COLUMNS = "recipient, sender, seq, position, cls, asked_ms, size, until_ms"

_BLOB = "SELECT blob FROM envelopes WHERE recipient = ? AND position = ?"

#: The sweep's last step, on both backends (``?`` becomes ``%s`` on PostgreSQL):
#: notices older than the maximum TTL go; a sender keeps its newest MAX_NOTICES.
TRIM_NOTICES = (
    "DELETE FROM notices WHERE until_ms <= ?",
    "SELECT sender FROM notices GROUP BY sender HAVING COUNT(*) > ?",
    "DELETE FROM notices WHERE sender = ? AND (recipient, seq, until_ms) NOT IN "
    "(SELECT recipient, seq, until_ms FROM notices WHERE sender = ? "
    "ORDER BY until_ms DESC, recipient DESC, seq DESC LIMIT ?)",
)

Row = TypeVar("Row", bound=Sequence[Any])


def within_budget(rows: Iterable[Row], max_bytes: int | None) -> list[Row]:
    """The first rows (a size at index 6) that fit in ``max_bytes``, always the
    first: what a fetch serves, its blobs read only for these."""
    chosen: list[Row] = []
    total = 0
    for row in rows:
        total += row[6]
        if max_bytes is not None and chosen and total > max_bytes:
            break
        chosen.append(row)
    return chosen
_NONE = b""


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise UsageError(f"a mailbox {name} is {low} to {high}")


def _quota_rows(
    recipient: bytes, sender: bytes, cls: EnvelopeClass
) -> list[tuple[str, bytes, bytes]]:
    """The quota rows an envelope from ``sender`` to ``recipient`` is charged to."""
    rows = [("mailbox", recipient, _NONE), ("pair", recipient, sender), ("sender", sender, _NONE)]
    if cls is EnvelopeClass.INTRODUCTION:
        rows += [("intro_mailbox", recipient, _NONE), ("intro_pair", recipient, sender)]
    return rows


def _envelope(row: tuple[bytes, bytes, int, int, int, int, int, int], blob: bytes) -> Envelope:
    recipient, sender, seq, position, cls, asked, size, until = row
    header = Deposit(recipient, sender, seq, EnvelopeClass(cls), asked, size)
    return Envelope(position, header, until, blob)


class SqliteMailbox:
    """The mailbox in the SQLite file at ``path`` (created when absent)."""

    def __init__(self, path: Path, limits: Limits | None = None) -> None:
        self.path = path
        self.limits = limits or Limits()
        self.guard = Guard(connect(path), path)
        try:
            self._migrate()
        except BaseException:
            self.guard.close()
            raise

    def _migrate(self) -> None:
        with self.guard.writing() as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mailbox_schema'"
            ).fetchone()
            if found is None:
                for statement in SCHEMA.split(";"):
                    conn.execute(statement)
                conn.execute("INSERT INTO mailbox_schema (version) VALUES (?)", (VERSION,))
                return
            (version,) = conn.execute("SELECT version FROM mailbox_schema").fetchone()
            if version != VERSION:
                raise StoreError(
                    f"{self.path} holds a mailbox of schema version {version}, this relay "
                    f"knows {VERSION}; use the relay that wrote it"
                )

    def close(self) -> None:
        self.guard.close()

    # ------------------------------------------------------------ reading helpers

    @staticmethod
    def _tally(conn: sqlite3.Connection, kind: str, principal: bytes, peer: bytes) -> Tally:
        row = conn.execute(
            "SELECT count, bytes FROM quotas WHERE kind = ? AND principal = ? AND peer = ?",
            (kind, principal, peer),
        ).fetchone()
        return Tally() if row is None else Tally(row[0], row[1])

    def _usage(self, conn: sqlite3.Connection, recipient: bytes, sender: bytes) -> Usage:
        return Usage(
            mailbox=self._tally(conn, "mailbox", recipient, _NONE),
            pair=self._tally(conn, "pair", recipient, sender),
            sender=self._tally(conn, "sender", sender, _NONE),
            intro_mailbox=self._tally(conn, "intro_mailbox", recipient, _NONE),
            intro_pair=self._tally(conn, "intro_pair", recipient, sender),
        )

    @staticmethod
    def _policy(conn: sqlite3.Connection, recipient: bytes) -> MailboxPolicy:
        row = conn.execute(
            "SELECT policy_version FROM mailboxes WHERE recipient = ?", (recipient,)
        ).fetchone()
        if row is None or row[0] == 0:
            return NO_POLICY
        senders = conn.execute(
            "SELECT sender FROM policy_senders WHERE recipient = ?", (recipient,)
        ).fetchall()
        return MailboxPolicy(row[0], frozenset(bytes(s) for (s,) in senders))

    # ------------------------------------------------------------ writing helpers

    @staticmethod
    def _charge(conn: sqlite3.Connection, header: Deposit, sign: int) -> None:
        """Charge (+1) or refund (-1) one envelope on its quota rows."""
        for kind, principal, peer in _quota_rows(header.recipient, header.sender, header.cls):
            conn.execute(
                "INSERT INTO quotas (kind, principal, peer, count, bytes) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, principal, peer) DO UPDATE SET "
                "count = quotas.count + excluded.count, bytes = quotas.bytes + excluded.bytes",
                (kind, principal, peer, sign, sign * header.size),
            )
            if sign < 0:
                conn.execute(
                    "DELETE FROM quotas WHERE kind = ? AND principal = ? AND peer = ? "
                    "AND count = 0",
                    (kind, principal, peer),
                )

    def _drop(self, conn: sqlite3.Connection, recipient: bytes, sender: bytes, seq: int) -> bool:
        """Delete one envelope and refund it; whether it was held."""
        row = conn.execute(
            "DELETE FROM envelopes WHERE recipient = ? AND sender = ? AND seq = ? "
            "RETURNING cls, size",
            (recipient, sender, seq),
        ).fetchone()
        if row is None:
            return False
        self._charge(conn, Deposit(recipient, sender, seq, EnvelopeClass(row[0]), 0, row[1]), -1)
        return True

    # ------------------------------------------------------------ MailboxStore

    def deposit(self, deposit: Deposit, blob: bytes, now_ms: int) -> Verdict:
        if len(blob) != deposit.size:
            raise UsageError(f"a deposit of {len(blob)} bytes claims {deposit.size}")
        with self.guard.writing() as conn:
            held = conn.execute(
                "SELECT until_ms FROM envelopes WHERE recipient = ? AND sender = ? AND seq = ?",
                deposit.key,
            ).fetchone()
            verdict = admit(
                deposit,
                self._usage(conn, deposit.recipient, deposit.sender),
                self._policy(conn, deposit.recipient),
                self.limits,
                now_ms,
                held_until_ms=None if held is None else held[0],
            )
            if not isinstance(verdict, Stored):
                return verdict
            (position,) = conn.execute(
                "INSERT INTO mailboxes (recipient, last_position, policy_version) "
                "VALUES (?, 1, 0) ON CONFLICT (recipient) DO UPDATE SET "
                "last_position = mailboxes.last_position + 1 RETURNING last_position",
                (deposit.recipient,),
            ).fetchone()
            inserted = conn.execute(
                f"INSERT INTO envelopes ({_COLUMNS}, stored_ms, blob) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (recipient, sender, seq) DO NOTHING",
                (
                    *deposit.key,
                    position,
                    deposit.cls.value,
                    deposit.expiry_ms,
                    deposit.size,
                    verdict.until_ms,
                    now_ms,
                    blob,
                ),
            ).rowcount
            if inserted != 1:  # a concurrent writer took the key (cannot happen on SQLite)
                raise StoreError("the envelope was stored concurrently; deposit it again")
            self._charge(conn, deposit, +1)
        return Stored(verdict.until_ms, position)

    def fetch(
        self, recipient: bytes, after: int, limit: int, now_ms: int, max_bytes: int | None = None
    ) -> list[Envelope]:
        _check_int("cursor", after, 0, MAX_INT)
        _check_int("fetch limit", limit, 1, MAX_FETCH)
        with self.guard.snapshot() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM envelopes "
                "WHERE recipient = ? AND position > ? AND until_ms > ? "
                "ORDER BY position LIMIT ?",
                (recipient, after, now_ms, limit),
            ).fetchall()
            chosen = within_budget(rows, max_bytes)
            return [
                _envelope(row, bytes(conn.execute(_BLOB, (recipient, row[3])).fetchone()[0]))
                for row in chosen
            ]

    def delete(self, recipient: bytes, keys: Iterable[tuple[bytes, int]]) -> int:
        keys = set(keys)
        for _, seq in keys:
            _check_int("seq", seq, 1, MAX_INT)
        with self.guard.writing() as conn:
            return sum(self._drop(conn, recipient, sender, seq) for sender, seq in set(keys))

    def retract(self, sender: bytes, recipient: bytes, seqs: Iterable[int]) -> int:
        seqs = set(seqs)
        for seq in seqs:
            _check_int("seq", seq, 1, MAX_INT)
        with self.guard.writing() as conn:
            return sum(self._drop(conn, recipient, sender, seq) for seq in set(seqs))

    def sweep(self, now_ms: int) -> list[ExpiryNotice]:
        with self.guard.writing() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM envelopes WHERE until_ms <= ?", (now_ms,)
            ).fetchall()
            notices = expired((_envelope(row, b"") for row in rows), now_ms)
            for n in notices:
                self._drop(conn, n.recipient, n.sender, n.seq)
                conn.execute(
                    "INSERT INTO notices (sender, recipient, seq, until_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",  # the same notice twice (a clock stepped back)
                    (n.sender, n.recipient, n.seq, n.until_ms),
                )
            # advice nobody took: bounded in time and per sender
            stale, over, keep = TRIM_NOTICES
            conn.execute(stale, (now_ms - self.limits.ttl_max_ms,))
            for (sender,) in conn.execute(over, (MAX_NOTICES,)).fetchall():
                conn.execute(keep, (sender, sender, MAX_NOTICES))
        return notices

    def take_notices(self, sender: bytes, limit: int = MAX_FETCH) -> list[ExpiryNotice]:
        _check_int("notice limit", limit, 1, MAX_FETCH)
        with self.guard.writing() as conn:
            rows = conn.execute(
                "DELETE FROM notices WHERE sender = ? AND (recipient, seq, until_ms) IN "
                "(SELECT recipient, seq, until_ms FROM notices WHERE sender = ? "
                "ORDER BY until_ms, recipient, seq LIMIT ?) RETURNING recipient, seq, until_ms",
                (sender, sender, limit),
            ).fetchall()
        notices = [ExpiryNotice(sender, bytes(r), q, u) for r, q, u in rows]
        return sorted(notices, key=lambda n: (n.until_ms, n.recipient, n.seq))

    def usage(self, recipient: bytes, sender: bytes) -> Usage:
        with self.guard.snapshot() as conn:
            return self._usage(conn, recipient, sender)

    def policy(self, recipient: bytes) -> MailboxPolicy:
        with self.guard.snapshot() as conn:
            return self._policy(conn, recipient)

    def set_policy(self, recipient: bytes, policy: MailboxPolicy) -> bool:
        with self.guard.writing() as conn:
            if not newer(self._policy(conn, recipient), policy):
                return False
            conn.execute(
                "INSERT INTO mailboxes (recipient, last_position, policy_version) "
                "VALUES (?, 0, ?) ON CONFLICT (recipient) DO UPDATE SET "
                "policy_version = excluded.policy_version",
                (recipient, policy.version),
            )
            conn.execute("DELETE FROM policy_senders WHERE recipient = ?", (recipient,))
            conn.executemany(
                "INSERT INTO policy_senders (recipient, sender) VALUES (?, ?)",
                [(recipient, sender) for sender in sorted(policy.senders)],
            )
        return True

    def position(self, recipient: bytes) -> int:
        with self.guard.snapshot() as conn:
            row = conn.execute(
                "SELECT last_position FROM mailboxes WHERE recipient = ?", (recipient,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def purge(self, recipient: bytes, now_ms: int) -> int:
        with self.guard.writing() as conn:
            rows = conn.execute(
                "SELECT sender, seq FROM envelopes WHERE recipient = ?", (recipient,)
            ).fetchall()
            for sender, seq in rows:
                self._drop(conn, recipient, bytes(sender), seq)
                conn.execute(
                    "INSERT INTO notices (sender, recipient, seq, until_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (sender, recipient, seq, now_ms),
                )
            conn.execute("DELETE FROM policy_senders WHERE recipient = ?", (recipient,))
            conn.execute(
                "UPDATE mailboxes SET policy_version = 0 WHERE recipient = ?", (recipient,)
            )
        return len(rows)

    def summary(self, now_ms: int) -> Summary:
        del now_ms  # what is held, expired or not (the sweep drops the expired)
        with self.guard.snapshot() as conn:
            count, size, oldest = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(until_ms) FROM envelopes"
            ).fetchone()
            mailboxes, fullest_count, fullest_bytes = conn.execute(
                "SELECT COUNT(*), COALESCE(MAX(count), 0), COALESCE(MAX(bytes), 0) "
                "FROM quotas WHERE kind = 'mailbox' AND count > 0"
            ).fetchone()
            (notices,) = conn.execute("SELECT COUNT(*) FROM notices").fetchone()
        return Summary(mailboxes, count, size, oldest, notices, fullest_count, fullest_bytes)
