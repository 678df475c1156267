"""The relay's mailbox on PostgreSQL: a :class:`~p2psync.core.mailbox.MailboxStore`
that several relay nodes share (``docs/relay.md``, "Several relay nodes").

The tables and the decisions are the SQLite backend's (:mod:`p2psync.store.mailbox`,
:mod:`p2psync.core.mailbox`); each call is one transaction (:class:`~p2psync.store.
pgpool.Pool`), and a :class:`~p2psync.core.mailbox.Stored` answer is returned only
after COMMIT came back, which with ``synchronous_standby_names`` set means the
standby has it too. What SQLite gets from its single writer, PostgreSQL gets from
locks, because deposits from several nodes run at once:

* a deposit first takes two transaction-scoped advisory locks, on its recipient's
  mailbox and on its sender (in a fixed order): every quota a deposit is charged
  against belongs to one of the two, so two deposits that could together exceed
  a quota run one after the other, and the second reads what the first charged
  (``READ COMMITTED`` gives each statement a fresh snapshot);
* the insert is ``ON CONFLICT DO NOTHING``, positions come from ``UPDATE ...
  RETURNING`` on the mailbox row;
* the sweep takes expired envelopes ``FOR UPDATE SKIP LOCKED``, in batches, so
  several nodes sweep at once and each envelope (and its notice) goes once;
* quota rows are charged and refunded in one sorted order in every transaction,
  so two transactions never wait for each other's rows (a deadlock PostgreSQL
  still finds is retried by the pool).

Besides the mailbox, the database holds what the relay nodes share
(:mod:`p2psync.relay.cluster`): ``relay_nodes`` (each node's addresses and
last heartbeat), ``relay_sessions`` (which node holds which device's sessions),
``relay_invites`` (splice invitations handed to another node) and
``relay_admission`` (the admission list, one JSON document). Schema
versions go forward only (:data:`MIGRATIONS`); a node that finds a newer one
refuses to start.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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
from p2psync.store.mailbox import SCHEMA as SQLITE_SCHEMA
from p2psync.store.mailbox import (
    TRIM_NOTICES,
    _check_int,
    _envelope,
    _quota_rows,
    within_budget,
)
from p2psync.store.pgpool import Pool

if TYPE_CHECKING:
    import psycopg

    Conn = psycopg.Connection[tuple[Any, ...]]

#: The channel a stored deposit is announced on (payload: recipient hex ":" position).
ARRIVED_CHANNEL = "p2psync_arrived"
#: Envelopes one sweep transaction takes at most.
SWEEP_BATCH = 500

#: The SQLite backend's tables (BYTEA for BLOB), and what the relay nodes share.
_V1 = ";".join(
    statement.replace("BLOB", "BYTEA")
    for statement in SQLITE_SCHEMA.split(";")
    if "mailbox_schema" not in statement  # made before any migration, below
) + """;
CREATE TABLE relay_nodes (
    node       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    addresses  TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    seen_ms    BIGINT NOT NULL
);
CREATE TABLE relay_sessions (
    device   BYTEA NOT NULL,
    node     TEXT NOT NULL,
    since_ms BIGINT NOT NULL,
    PRIMARY KEY (device, node)
);
CREATE TABLE relay_invites (
    node       TEXT NOT NULL,
    asker      BYTEA NOT NULL,
    target     BYTEA NOT NULL,
    asker_key  BYTEA NOT NULL,
    target_key BYTEA PRIMARY KEY,
    expires_ms BIGINT NOT NULL
);
CREATE TABLE relay_admission (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    doc  TEXT NOT NULL
)
"""

#: Forward migrations: the statements that take schema version N-1 to N.
MIGRATIONS: dict[int, str] = {1: _V1}
VERSION = max(MIGRATIONS)

_COLUMNS = "recipient, sender, seq, position, cls, asked_ms, size, until_ms"
_NONE = b""
#: pg_advisory_xact_lock keys are 64-bit; one namespace for the schema itself.
_SCHEMA_LOCK = 0x7032_7073_796E_6331


def _lock_key(kind: bytes, key: bytes) -> int:
    digest = hashlib.blake2b(kind + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _row_envelope(row: tuple[Any, ...], blob: bytes) -> Envelope:
    recipient, sender, *rest = row
    return _envelope((bytes(recipient), bytes(sender), *rest), blob)


class PgMailbox:
    """The mailbox in the PostgreSQL database ``conninfo`` names; ``connections``:
    the most used at once (the relay's worker threads for it)."""

    def __init__(self, conninfo: str, limits: Limits | None = None, connections: int = 4) -> None:
        self.conninfo = conninfo
        self.limits = limits or Limits()
        self.pool = Pool(conninfo, connections)
        try:
            self.pool.transaction(self._migrate)
        except BaseException:
            self.pool.close()
            raise

    @staticmethod
    def _migrate(conn: Conn) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))  # nodes starting at once
        (exists,) = conn.execute("SELECT to_regclass('mailbox_schema') IS NOT NULL").fetchone()  # type: ignore[misc]
        version = 0
        if exists:
            (version,) = conn.execute("SELECT version FROM mailbox_schema").fetchone()  # type: ignore[misc]
        else:
            conn.execute("CREATE TABLE mailbox_schema (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO mailbox_schema (version) VALUES (0)")
        if version > VERSION:
            raise StoreError(
                f"the relay's database holds schema version {version}, this relay knows "
                f"{VERSION}; upgrade this relay node"
            )
        for step in range(version + 1, VERSION + 1):
            for statement in MIGRATIONS[step].split(";"):
                conn.execute(statement.encode())
            conn.execute("UPDATE mailbox_schema SET version = %s", (step,))

    def close(self) -> None:
        self.pool.close()

    # ------------------------------------------------------------ reading helpers

    @staticmethod
    def _tallies(conn: Conn, recipient: bytes, sender: bytes) -> Usage:
        wanted = {
            (kind, principal, peer)
            for kind, principal, peer in _quota_rows(recipient, sender, EnvelopeClass.INTRODUCTION)
        }
        rows = conn.execute(
            "SELECT kind, principal, peer, count, bytes FROM quotas "
            "WHERE (principal = %s AND peer IN (%s, %s)) OR (principal = %s AND peer = %s)",
            (recipient, _NONE, sender, sender, _NONE),
        ).fetchall()
        found = {
            (kind, bytes(principal), bytes(peer)): Tally(count, size)
            for kind, principal, peer, count, size in rows
            if (kind, bytes(principal), bytes(peer)) in wanted
        }

        def get(kind: str, principal: bytes, peer: bytes) -> Tally:
            return found.get((kind, principal, peer), Tally())

        return Usage(
            mailbox=get("mailbox", recipient, _NONE),
            pair=get("pair", recipient, sender),
            sender=get("sender", sender, _NONE),
            intro_mailbox=get("intro_mailbox", recipient, _NONE),
            intro_pair=get("intro_pair", recipient, sender),
        )

    @staticmethod
    def _read_for_deposit(
        conn: Conn, deposit: Deposit
    ) -> tuple[int | None, Usage, MailboxPolicy]:
        """In one statement: the T of the envelope held under the deposit's key (if
        any), the tallies it would be charged against, and the recipient's policy."""
        recipient, sender = deposit.recipient, deposit.sender
        row = conn.execute(
            "SELECT (SELECT until_ms FROM envelopes "
            "        WHERE recipient = %(r)s AND sender = %(s)s AND seq = %(q)s), "
            "(SELECT policy_version FROM mailboxes WHERE recipient = %(r)s), "
            "(SELECT COALESCE(array_agg(sender), '{}') FROM policy_senders "
            "        WHERE recipient = %(r)s), "
            "(SELECT COALESCE(json_agg(json_build_array(kind, encode(principal, 'hex'), "
            "        encode(peer, 'hex'), count, bytes)), '[]') FROM quotas "
            "        WHERE (principal = %(r)s AND peer IN (%(n)s, %(s)s)) "
            "        OR (principal = %(s)s AND peer = %(n)s))",
            {"r": recipient, "s": sender, "q": deposit.seq, "n": _NONE},
        ).fetchone()
        assert row is not None
        held, version, senders, quotas = row
        found = {
            (kind, bytes.fromhex(principal), bytes.fromhex(peer)): Tally(count, size)
            for kind, principal, peer, count, size in quotas
        }

        def get(kind: str, principal: bytes, peer: bytes) -> Tally:
            return found.get((kind, principal, peer), Tally())

        usage = Usage(
            mailbox=get("mailbox", recipient, _NONE),
            pair=get("pair", recipient, sender),
            sender=get("sender", sender, _NONE),
            intro_mailbox=get("intro_mailbox", recipient, _NONE),
            intro_pair=get("intro_pair", recipient, sender),
        )
        policy = (
            NO_POLICY
            if not version
            else MailboxPolicy(version, frozenset(bytes(x) for x in senders))
        )
        return held, usage, policy

    @staticmethod
    def _policy(conn: Conn, recipient: bytes) -> MailboxPolicy:
        row = conn.execute(
            "SELECT policy_version FROM mailboxes WHERE recipient = %s", (recipient,)
        ).fetchone()
        if row is None or row[0] == 0:
            return NO_POLICY
        senders = conn.execute(
            "SELECT sender FROM policy_senders WHERE recipient = %s", (recipient,)
        ).fetchall()
        return MailboxPolicy(row[0], frozenset(bytes(s) for (s,) in senders))

    # ------------------------------------------------------------ writing helpers

    @staticmethod
    def _charge(conn: Conn, charges: Counter[tuple[str, bytes, bytes]],
                sizes: Counter[tuple[str, bytes, bytes]], notify: str | None = None) -> None:
        """Add ``charges`` (envelopes) and ``sizes`` (bytes) to their quota rows, in
        one sorted order, in one statement (negative: a refund; rows back at zero
        are dropped); with ``notify``, announce an arrival in the same statement."""
        rows = [r for r in sorted(set(charges) | set(sizes)) if charges[r] or sizes[r]]
        if not rows:
            return
        columns = (
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
            [charges[r] for r in rows], [sizes[r] for r in rows],
        )
        conn.execute(
            "WITH q AS (INSERT INTO quotas (kind, principal, peer, count, bytes) "
            "SELECT * FROM unnest(%s::text[], %s::bytea[], %s::bytea[], %s::bigint[], "
            "%s::bigint[]) ON CONFLICT (kind, principal, peer) DO UPDATE SET "
            "count = quotas.count + excluded.count, bytes = quotas.bytes + excluded.bytes "
            "RETURNING 1) "
            "SELECT (SELECT COUNT(*) FROM q), "
            "CASE WHEN %s THEN pg_notify(%s, %s) END",  # sent at COMMIT, if any
            (*columns, notify is not None, ARRIVED_CHANNEL, notify or ""),
        )
        if any(charges[r] < 0 for r in rows):
            conn.execute(
                "DELETE FROM quotas WHERE count = 0 AND (kind, principal, peer) IN "
                "(SELECT * FROM unnest(%s::text[], %s::bytea[], %s::bytea[]))",
                columns[:3],
            )

    @staticmethod
    def _refund(conn: Conn, gone: Iterable[tuple[bytes, bytes, int, int]]) -> None:
        """Refund the envelopes ``gone`` (recipient, sender, cls, size)."""
        charges: Counter[tuple[str, bytes, bytes]] = Counter()
        sizes: Counter[tuple[str, bytes, bytes]] = Counter()
        for recipient, sender, cls, size in gone:
            for row in _quota_rows(recipient, sender, EnvelopeClass(cls)):
                charges[row] -= 1
                sizes[row] -= size
        PgMailbox._charge(conn, charges, sizes)

    @staticmethod
    def _drop(conn: Conn, recipient: bytes, pairs: list[tuple[bytes, int]]) -> int:
        """Delete the recipient's envelopes (sender, seq) and refund them; how many
        were held. Rows are taken in key order (two deletes never wait in a cycle)."""
        gone: list[tuple[bytes, bytes, int, int]] = []
        for sender, seq in sorted(pairs):
            row = conn.execute(
                "DELETE FROM envelopes WHERE recipient = %s AND sender = %s AND seq = %s "
                "RETURNING cls, size",
                (recipient, sender, seq),
            ).fetchone()
            if row is not None:
                gone.append((recipient, sender, row[0], row[1]))
        PgMailbox._refund(conn, gone)
        return len(gone)

    # ------------------------------------------------------------ MailboxStore

    def deposit(self, deposit: Deposit, blob: bytes, now_ms: int) -> Verdict:
        if len(blob) != deposit.size:
            raise UsageError(f"a deposit of {len(blob)} bytes claims {deposit.size}")

        def work(conn: Conn) -> Verdict:
            locks = sorted({_lock_key(b"mailbox", deposit.recipient),
                            _lock_key(b"sender", deposit.sender)})
            conn.execute(  # in the array's order: the same for every deposit
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (locks,)
            )
            held, usage, policy = self._read_for_deposit(conn, deposit)
            verdict = admit(
                deposit,
                usage,
                policy,
                self.limits,
                now_ms,
                held_until_ms=held,
            )
            if not isinstance(verdict, Stored):
                return verdict
            row = conn.execute(
                "WITH p AS (INSERT INTO mailboxes (recipient, last_position, policy_version) "
                "VALUES (%s, 1, 0) ON CONFLICT (recipient) DO UPDATE SET "
                "last_position = mailboxes.last_position + 1 RETURNING last_position) "
                f"INSERT INTO envelopes ({_COLUMNS}, stored_ms, blob) "
                "SELECT %s, %s, %s, p.last_position, %s, %s, %s, %s, %s, %s FROM p "
                "ON CONFLICT (recipient, sender, seq) DO NOTHING RETURNING position",
                (
                    deposit.recipient,
                    *deposit.key,
                    deposit.cls.value,
                    deposit.expiry_ms,
                    deposit.size,
                    verdict.until_ms,
                    now_ms,
                    blob,
                ),
            ).fetchone()
            if row is None:  # the locks make this impossible; never answer Stored then
                raise StoreError("the envelope was stored concurrently; deposit it again")
            position = int(row[0])
            charges: Counter[tuple[str, bytes, bytes]] = Counter()
            sizes: Counter[tuple[str, bytes, bytes]] = Counter()
            for quota in _quota_rows(deposit.recipient, deposit.sender, deposit.cls):
                charges[quota] += 1
                sizes[quota] += deposit.size
            self._charge(conn, charges, sizes, notify=f"{deposit.recipient.hex()}:{position}")
            return Stored(verdict.until_ms, position)

        return self.pool.transaction(work)

    def fetch(
        self, recipient: bytes, after: int, limit: int, now_ms: int, max_bytes: int | None = None
    ) -> list[Envelope]:
        _check_int("cursor", after, 0, MAX_INT)
        _check_int("fetch limit", limit, 1, MAX_FETCH)

        def work(conn: Conn) -> list[Envelope]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM envelopes "
                "WHERE recipient = %s AND position > %s AND until_ms > %s "
                "ORDER BY position LIMIT %s",
                (recipient, after, now_ms, limit),
            ).fetchall()
            chosen = within_budget(rows, max_bytes)
            if not chosen:
                return []
            blobs: dict[int, bytes] = dict(
                conn.execute(
                    "SELECT position, blob FROM envelopes "
                    "WHERE recipient = %s AND position = ANY(%s)",
                    (recipient, [row[3] for row in chosen]),
                ).fetchall()
            )
            # a row deleted between the two reads is not served
            return [_row_envelope(row, bytes(blobs[row[3]])) for row in chosen if row[3] in blobs]

        return self.pool.transaction(work)

    def delete(self, recipient: bytes, keys: Iterable[tuple[bytes, int]]) -> int:
        pairs = sorted(set(keys))
        for _, seq in pairs:
            _check_int("seq", seq, 1, MAX_INT)
        return self.pool.transaction(lambda conn: self._drop(conn, recipient, pairs))

    def retract(self, sender: bytes, recipient: bytes, seqs: Iterable[int]) -> int:
        pairs = sorted((sender, seq) for seq in set(seqs))
        for _, seq in pairs:
            _check_int("seq", seq, 1, MAX_INT)
        return self.pool.transaction(lambda conn: self._drop(conn, recipient, pairs))

    def _sweep_batch(self, conn: Conn, now_ms: int) -> list[ExpiryNotice]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM envelopes WHERE until_ms <= %s "
            "ORDER BY recipient, position LIMIT %s FOR UPDATE SKIP LOCKED",
            (now_ms, SWEEP_BATCH),
        ).fetchall()
        envelopes = [_row_envelope(row, b"") for row in rows]
        notices = expired(envelopes, now_ms)
        gone = []
        for e in envelopes:
            h = e.header
            conn.execute(
                "DELETE FROM envelopes WHERE recipient = %s AND sender = %s AND seq = %s",
                h.key,
            )
            gone.append((h.recipient, h.sender, h.cls.value, h.size))
        self._refund(conn, gone)
        for n in notices:
            conn.execute(
                "INSERT INTO notices (sender, recipient, seq, until_ms) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",  # the same notice twice (a clock stepped back)
                (n.sender, n.recipient, n.seq, n.until_ms),
            )
        return notices

    def _trim_notices(self, conn: Conn, now_ms: int) -> None:
        """Advice nobody took: bounded in time and per sender."""
        stale, over, keep = (sql.replace("?", "%s") for sql in TRIM_NOTICES)
        conn.execute(stale, (now_ms - self.limits.ttl_max_ms,))
        for (sender,) in conn.execute(over, (MAX_NOTICES,)).fetchall():
            conn.execute(keep, (sender, sender, MAX_NOTICES))

    def sweep(self, now_ms: int) -> list[ExpiryNotice]:
        """As the interface says, in batches of :data:`SWEEP_BATCH` (each batch one
        transaction, envelopes another node is sweeping skipped): several nodes
        sweeping at once give one notice per expiry between them."""
        notices: list[ExpiryNotice] = []
        while True:
            batch = self.pool.transaction(lambda conn: self._sweep_batch(conn, now_ms))
            notices += batch
            if len(batch) < SWEEP_BATCH:
                break
        self.pool.transaction(lambda conn: self._trim_notices(conn, now_ms))
        return notices  # each batch the first due in (recipient, position) order

    def take_notices(self, sender: bytes, limit: int = MAX_FETCH) -> list[ExpiryNotice]:
        _check_int("notice limit", limit, 1, MAX_FETCH)

        def work(conn: Conn) -> list[tuple[Any, ...]]:
            return conn.execute(
                "DELETE FROM notices WHERE sender = %s AND (recipient, seq, until_ms) IN "
                "(SELECT recipient, seq, until_ms FROM notices WHERE sender = %s "
                "ORDER BY until_ms, recipient, seq LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING recipient, seq, until_ms",
                (sender, sender, limit),
            ).fetchall()

        # not run again after a lost COMMIT: the notices it took are gone then, as
        # when the answer is lost on its way (advice: the sender's ledger expires
        # its envelopes by its own clock)
        taken = self.pool.transaction(work, idempotent=False)
        notices = [ExpiryNotice(sender, bytes(r), q, u) for r, q, u in taken]
        return sorted(notices, key=lambda n: (n.until_ms, n.recipient, n.seq))

    def usage(self, recipient: bytes, sender: bytes) -> Usage:
        return self.pool.transaction(lambda conn: self._tallies(conn, recipient, sender))

    def policy(self, recipient: bytes) -> MailboxPolicy:
        return self.pool.transaction(lambda conn: self._policy(conn, recipient))

    def set_policy(self, recipient: bytes, policy: MailboxPolicy) -> bool:
        def work(conn: Conn) -> bool:
            conn.execute(
                "INSERT INTO mailboxes (recipient, last_position, policy_version) "
                "VALUES (%s, 0, 0) ON CONFLICT (recipient) DO NOTHING",
                (recipient,),
            )
            conn.execute(
                "SELECT 1 FROM mailboxes WHERE recipient = %s FOR UPDATE", (recipient,)
            )
            if not newer(self._policy(conn, recipient), policy):
                return False
            conn.execute(
                "UPDATE mailboxes SET policy_version = %s WHERE recipient = %s",
                (policy.version, recipient),
            )
            conn.execute("DELETE FROM policy_senders WHERE recipient = %s", (recipient,))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO policy_senders (recipient, sender) VALUES (%s, %s)",
                    [(recipient, sender) for sender in sorted(policy.senders)],
                )
            return True

        # run again after a lost COMMIT, it would find itself in force: "not newer"
        return self.pool.transaction(work, idempotent=False)

    def position(self, recipient: bytes) -> int:
        row = self.pool.transaction(
            lambda conn: conn.execute(
                "SELECT last_position FROM mailboxes WHERE recipient = %s", (recipient,)
            ).fetchone()
        )
        return 0 if row is None else int(row[0])

    def purge(self, recipient: bytes, now_ms: int) -> int:
        def work(conn: Conn) -> int:
            # as a deposit does: no deposit into this mailbox runs meanwhile
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (_lock_key(b"mailbox", recipient),)
            )
            rows = conn.execute(
                "SELECT sender, seq FROM envelopes WHERE recipient = %s ORDER BY sender, seq",
                (recipient,),
            ).fetchall()
            pairs = [(bytes(sender), seq) for sender, seq in rows]
            self._drop(conn, recipient, pairs)
            for sender, seq in pairs:
                conn.execute(
                    "INSERT INTO notices (sender, recipient, seq, until_ms) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (sender, recipient, seq, now_ms),
                )
            conn.execute("DELETE FROM policy_senders WHERE recipient = %s", (recipient,))
            conn.execute(
                "UPDATE mailboxes SET policy_version = 0 WHERE recipient = %s", (recipient,)
            )
            return len(pairs)

        return self.pool.transaction(work)

    def summary(self, now_ms: int) -> Summary:
        del now_ms

        def work(conn: Conn) -> Summary:
            count, size, oldest = conn.execute(  # type: ignore[misc]
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(until_ms) FROM envelopes"
            ).fetchone()
            mailboxes, fullest_count, fullest_bytes = conn.execute(  # type: ignore[misc]
                "SELECT COUNT(*), COALESCE(MAX(count), 0), COALESCE(MAX(bytes), 0) "
                "FROM quotas WHERE kind = 'mailbox' AND count > 0"
            ).fetchone()
            (notices,) = conn.execute("SELECT COUNT(*) FROM notices").fetchone()  # type: ignore[misc]
            return Summary(
                int(mailboxes), int(count), int(size), oldest, int(notices),
                int(fullest_count), int(fullest_bytes),
            )

        return self.pool.transaction(work)
