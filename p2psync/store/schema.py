"""SQLite schema of the store, as forward migrations.

``schema_migrations`` records every migration applied. Opening a store runs
the missing ones in one transaction; a store written by a newer p2psync is
refused rather than guessed at.

Tables (version 1):

``meta``        key/value: ``self`` (this agent's public key), ``clock`` (HLC);
                later also ``own_behind:<peer>`` (see :mod:`p2psync.store.local`).
``authors``     one row per author seen: compact index, key, head (seq, id, hlc),
                ``frozen`` after a fork.
``entries``     every applied entry, exactly as signed (``signed``) plus the
                payloads held (``payloads``, a canonical CBOR array).
``records``     the winning version of each record; ``payload`` is the op
                payload (value inside), ``deleted`` marks a tombstone,
                ``conflicted`` says the ``losers`` table holds other heads.
``losers``      the other heads of conflicted records.
``held``        authenticated entries waiting for a predecessor or base (``dep``).
``forks``       proof of forks: the two entries the author signed.

Version 10 adds the delivery ledger of the relay mailbox (:mod:`p2psync.store.ledger`):

``mail_out``    every envelope this agent made, per peer and seq: class, state
                (queued, at-relay, handed-over, acknowledged, expired, refused,
                superseded), where (relay device ID or file name), entries, bytes,
                until when, when made and done, the reason, and what it carries
                (``carries``: CBOR ``[[author, first seq, last seq], ...]``; ``rules``:
                the digest of the rule objects it carried, if any).
``mail_pairs``  per peer: our next seq to it (never reused), its heads by its last
                signed receipt or bundle (CBOR), the rules digest its last bundle
                named, and what we received from it: every seq up to ``recv_high``,
                and ``recv_above`` (CBOR list, bounded) above it.
``mail_due``    receipts we owe: the peer's seqs we applied (``reason`` NULL) or refused,
                and the seq of the receipt envelope they were sealed in (until it
                is at a relay or in a file; refused or expired, they are owed again).

Version 12 adds ``relay_joins``: invite codes this agent joined through a relay
(invite ID, terms hash, the join proof, the relay, the code's
expiry), kept until the inviter's proposal with those terms arrives and is
accepted (:mod:`p2psync.store.joins`). Unlike the rows version 8 deleted, they hold
no secret: the proof is bound to the inviter, this agent and the invite.

Version 13 lets one inviter have several joins (``relay_joins`` keyed by inviter
and invite) and keeps the inviter's refusal with the join (``refused``); adds
``join_refusals``, the refusals an inviter owes to sites whose join (with a valid
proof) it refused, sent back as introductions and forgotten after
:data:`p2psync.store.joins.KEPT_MS`; and gives ``invites`` a ``relay`` column: the relay
key a code names, which the agent visits while the code is open.

Version 14 gives ``rule_objects`` a ``size`` column (``length(signed)``) and an
index by (peer, signer, size), so what a peer holds (its quotas, the strangers'
budget) is read from the index; rule objects of strangers are deleted when their
requests expire (:func:`p2psync.store.rules.expire_requests`), and ``meta``
``rules_floor`` keeps the rules version moving forward when they are. Version 15
indexes them by (peer, kind, signer, received): the expiry sweep reads that index
alone.

Version 16 keeps the ops applied without their payload one by one
(``payloads_missing``: entry, op index, collection, author, seq) and, for each, the
records on which a later op named it as a base (``missing_superseded``), and the
peers that lacked it too when asked (``missing_lacked``): when a peer
that may send the payload appears (a rule widened, another path), the agent asks it
for the entry again and merges the op late, as a version those later ops
superseded (:mod:`p2psync.store.missing`). The migration reads them from the
entries already held. ``entries_damaged`` holds the entries ``p2psync verify
--repair`` found damaged (author, seq, stored ID): until a sound copy mends them,
the store says it holds that author's log only up to the one before, so that it
serves nothing from there and a peer sends the rest again.

Version 17 carries ``Want`` through the mailbox (:mod:`p2psync.store.wants`):
``mail_wanted`` holds the entries a peer asked us for in a bundle's ``wants``
(peer, entry, when, and the seq of our envelope that answers it, until the peer
acknowledges that one); ``mail_asked`` the entries we asked a peer for that way
(peer, entry, when), not asked again for
:data:`p2psync.store.wants.ASK_AGAIN_MS`; ``mail_out`` gains ``asks``: how many
entries an envelope asks for.

Version 18 gives ``records`` a ``change`` column, indexed: the number of the
last change applied to the record, increasing across the store (the change feed,
:mod:`p2psync.store.feed`); records held before are numbered in clock order, and a
trigger numbers a row written without one (a writer from before version 18 still
running).

Version 9 adds ``incomplete``: per collection and author, how many ops were
applied without their payload (it was withheld upstream: a collection the
sending path does not carry); ``status`` and ``peers`` say so when a rule would let
them arrive (version 16 keeps them one by one, to fetch them).

Version 8 deletes the ``join:<inviter>`` meta rows earlier versions kept for an
invite code being joined: the code now lives only in the joining process.

Version 7 indexes ``entries`` by clock (``entries_by_hlc``), so ``p2psync log``
can read the newest entries, or those since a time, without reading them all;
and gives ``invites`` a ``withdrawn`` column: when ``pair uninvite`` withdrew
the code (NULL while it stands), after which it works no more.

Version 6 indexes ``rule_objects`` by (peer, signer), proposal and kind, so the
quota checks run for each pairing request read a few rows, not the table.
Version 5 drops a ``withheld`` table that development builds briefly had.

Version 4 adds sync rules and invites (and peers are ``known`` rather than
``trusted``: the rules decide what flows):

``rule_objects`` every signed rule object (proposal, acceptance, rejection,
                revocation) shared with a peer, exactly as signed.
``invites``     invite codes this agent issued: secret, rule terms, expiry, and
                the agent that used it (a code works once).

Version 3 gives ``held`` a ``size`` column and an index by author: the quotas on
held entries (in all, per author, in bytes) are read from the index alone.

Version 2 adds peers:

``peers``       agents this one knows: key, display name, state, addresses to
                dial (JSON list of ``host:port``), when last seen / synced, the
                last error.
``peer_heads``  what each peer held of each author when last heard from, for
                "entries behind / ahead" without a connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from p2psync.errors import StoreError
from p2psync.store import feed, missing

MIGRATIONS: dict[int, str] = {  # statements separated by ";" (none contains one)
    1: """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB
    );
    CREATE TABLE authors (
        idx      INTEGER PRIMARY KEY,
        key      BLOB NOT NULL UNIQUE,
        head_seq INTEGER NOT NULL DEFAULT 0,
        head_id  BLOB,
        head_hlc INTEGER NOT NULL DEFAULT 0,
        frozen   INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE entries (
        author   INTEGER NOT NULL,
        seq      INTEGER NOT NULL,
        id       BLOB NOT NULL,
        hlc      INTEGER NOT NULL,
        signed   BLOB NOT NULL,
        payloads BLOB NOT NULL,
        PRIMARY KEY (author, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX entries_by_id ON entries (id);
    CREATE TABLE records (
        collection TEXT NOT NULL,
        key        TEXT NOT NULL,
        entry      BLOB NOT NULL,
        hlc        INTEGER NOT NULL,
        author     BLOB NOT NULL,
        payload    BLOB NOT NULL,
        deleted    INTEGER NOT NULL,
        conflicted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (collection, key)
    ) WITHOUT ROWID;
    CREATE INDEX records_conflicted ON records (collection, key) WHERE conflicted = 1;
    CREATE TABLE losers (
        collection TEXT NOT NULL,
        key        TEXT NOT NULL,
        entry      BLOB NOT NULL,
        hlc        INTEGER NOT NULL,
        author     BLOB NOT NULL,
        payload    BLOB NOT NULL,
        deleted    INTEGER NOT NULL,
        PRIMARY KEY (collection, key, entry)
    ) WITHOUT ROWID;
    CREATE TABLE held (
        id       BLOB PRIMARY KEY,
        author   BLOB NOT NULL,
        seq      INTEGER NOT NULL,
        dep      BLOB NOT NULL,
        wire     BLOB NOT NULL,
        received INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX held_by_dep ON held (dep);
    CREATE TABLE forks (
        author   INTEGER NOT NULL,
        seq      INTEGER NOT NULL,
        ours     BLOB NOT NULL,
        theirs   BLOB NOT NULL,
        detected INTEGER NOT NULL,
        PRIMARY KEY (author, seq)
    );
    """,
    2: """
    CREATE TABLE peers (
        key        BLOB PRIMARY KEY,
        name       TEXT,
        state      TEXT NOT NULL,
        addresses  TEXT NOT NULL DEFAULT '[]',
        added      INTEGER NOT NULL,
        last_seen  INTEGER,
        last_sync  INTEGER,
        last_error TEXT
    );
    CREATE TABLE peer_heads (
        peer   BLOB NOT NULL,
        author BLOB NOT NULL,
        seq    INTEGER NOT NULL,
        PRIMARY KEY (peer, author)
    ) WITHOUT ROWID;
    """,
    3: """
    ALTER TABLE held ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
    UPDATE held SET size = length(wire);
    CREATE INDEX held_by_author ON held (author, size)
    """,
    4: """
    CREATE TABLE rule_objects (
        id       BLOB PRIMARY KEY,
        proposal BLOB NOT NULL,
        kind     TEXT NOT NULL,
        signer   BLOB NOT NULL,
        peer     BLOB NOT NULL,
        signed   BLOB NOT NULL,
        received INTEGER NOT NULL
    );
    CREATE INDEX rule_objects_by_peer ON rule_objects (peer);
    UPDATE peers SET state = 'known' WHERE state = 'trusted';
    CREATE TABLE invites (
        id      BLOB PRIMARY KEY,
        secret  BLOB NOT NULL,
        terms   BLOB NOT NULL,
        expires INTEGER NOT NULL,
        used_by BLOB,
        created INTEGER NOT NULL
    )
    """,
    # 5 briefly added a "withheld" table (development builds only); it is gone
    5: """
    DROP TABLE IF EXISTS withheld
    """,
    # quota checks and reloads stay cheap however many requests strangers send
    6: """
    DROP INDEX rule_objects_by_peer;
    CREATE INDEX rule_objects_by_signer ON rule_objects (peer, signer);
    CREATE INDEX rule_objects_by_proposal ON rule_objects (proposal);
    CREATE INDEX rule_objects_by_kind ON rule_objects (kind, peer)
    """,
    # the log's newest entries, or those since a time, without a full scan;
    # invites can be withdrawn
    7: """
    CREATE INDEX entries_by_hlc ON entries (hlc);
    ALTER TABLE invites ADD COLUMN withdrawn INTEGER
    """,
    # invite codes being joined are no longer stored (a refused code must not linger
    # and be presented again at every connection): forget those earlier versions kept
    8: """
    DELETE FROM meta WHERE key LIKE 'join:%'
    """,
    # ops applied without their payload, counted, so status can say what is missing
    9: """
    CREATE TABLE incomplete (
        collection TEXT NOT NULL,
        author     BLOB NOT NULL,
        ops        INTEGER NOT NULL,
        PRIMARY KEY (collection, author)
    ) WITHOUT ROWID
    """,
    # the relay mailbox's delivery ledger (store/ledger.py)
    10: """
    CREATE TABLE mail_out (
        peer     BLOB NOT NULL,
        seq      INTEGER NOT NULL,
        cls      INTEGER NOT NULL,
        state    TEXT NOT NULL,
        place    TEXT,
        entries  INTEGER NOT NULL,
        bytes    INTEGER NOT NULL,
        until_ms INTEGER,
        made_ms  INTEGER NOT NULL,
        done_ms  INTEGER,
        reason   TEXT,
        carries  BLOB NOT NULL,
        rules    BLOB,
        PRIMARY KEY (peer, seq)
    ) WITHOUT ROWID;
    CREATE INDEX mail_out_by_state ON mail_out (state, peer);
    CREATE TABLE mail_pairs (
        peer        BLOB PRIMARY KEY,
        next_seq    INTEGER NOT NULL DEFAULT 1,
        heads       BLOB,
        heads_ms    INTEGER,
        rules       BLOB,
        rules_ms    INTEGER,
        recv_high   INTEGER NOT NULL DEFAULT 0,
        recv_above  BLOB,
        recv_ms     INTEGER
    ) WITHOUT ROWID;
    CREATE TABLE mail_due (
        peer   BLOB NOT NULL,
        seq    INTEGER NOT NULL,
        reason TEXT,
        PRIMARY KEY (peer, seq)
    ) WITHOUT ROWID
    """,
    # an owed receipt stays owed until the envelope carrying it is at a relay or in a
    # file: ``receipt`` is that envelope's seq (NULL: not sealed yet)
    11: """
    ALTER TABLE mail_due ADD COLUMN receipt INTEGER
    """,
    # invite codes joined through a relay, until the inviter's rule arrives
    # (store/joins.py): the proof, not the code's secret
    12: """
    CREATE TABLE relay_joins (
        inviter BLOB PRIMARY KEY,
        invite  BLOB NOT NULL,
        terms   BLOB NOT NULL,
        proof   BLOB NOT NULL,
        relay   BLOB NOT NULL,
        expires INTEGER NOT NULL,
        created INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # several codes of one inviter may be joined; a refusal the inviter sent back is
    # kept with the join (``refused``); the inviter keeps the refusals it owes
    # (``join_refusals``) and the relay its codes name (``invites.relay``)
    13: """
    CREATE TABLE relay_joins_13 (
        inviter BLOB NOT NULL,
        invite  BLOB NOT NULL,
        terms   BLOB NOT NULL,
        proof   BLOB NOT NULL,
        relay   BLOB NOT NULL,
        expires INTEGER NOT NULL,
        created INTEGER NOT NULL,
        refused TEXT,
        PRIMARY KEY (inviter, invite)
    ) WITHOUT ROWID;
    INSERT INTO relay_joins_13 (inviter, invite, terms, proof, relay, expires, created)
        SELECT inviter, invite, terms, proof, relay, expires, created FROM relay_joins;
    DROP TABLE relay_joins;
    ALTER TABLE relay_joins_13 RENAME TO relay_joins;
    CREATE TABLE join_refusals (
        joiner BLOB NOT NULL,
        invite BLOB NOT NULL,
        reason TEXT NOT NULL,
        made   INTEGER NOT NULL,
        PRIMARY KEY (joiner, invite)
    ) WITHOUT ROWID;
    ALTER TABLE invites ADD COLUMN relay BLOB
    """,
    14: """
    ALTER TABLE rule_objects ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
    UPDATE rule_objects SET size = length(signed);
    CREATE INDEX rule_objects_by_size ON rule_objects (peer, signer, size)
    """,
    15: """
    CREATE INDEX rule_objects_by_expiry ON rule_objects (peer, kind, signer, received)
    """,
    # ops applied without their payload, one by one, so that a peer that may send
    # them later is asked for them (store/missing.py); filled by FILLS[16] from the
    # entries already held
    16: """
    CREATE TABLE payloads_missing (
        entry      BLOB NOT NULL,
        op         INTEGER NOT NULL,
        collection TEXT NOT NULL,
        author     BLOB NOT NULL,
        seq        INTEGER NOT NULL,
        PRIMARY KEY (entry, op)
    ) WITHOUT ROWID;
    CREATE INDEX payloads_missing_by_collection ON payloads_missing (collection, author, seq, op);
    CREATE TABLE missing_superseded (
        entry      BLOB NOT NULL,
        collection TEXT NOT NULL,
        key        TEXT NOT NULL,
        PRIMARY KEY (entry, collection, key)
    ) WITHOUT ROWID;
    CREATE TABLE missing_lacked (
        entry BLOB NOT NULL,
        op    INTEGER NOT NULL,
        peer  BLOB NOT NULL,
        at    INTEGER NOT NULL,
        PRIMARY KEY (entry, op, peer)
    ) WITHOUT ROWID;
    CREATE TABLE entries_damaged (
        author BLOB NOT NULL,
        seq    INTEGER NOT NULL,
        entry  BLOB NOT NULL,
        found  INTEGER NOT NULL,
        PRIMARY KEY (author, seq)
    ) WITHOUT ROWID
    """,
    # payloads asked for and asked of us through the mailbox (store/wants.py)
    17: """
    CREATE TABLE mail_wanted (
        peer   BLOB NOT NULL,
        entry  BLOB NOT NULL,
        at     INTEGER NOT NULL,
        answer INTEGER,
        PRIMARY KEY (peer, entry)
    ) WITHOUT ROWID;
    ALTER TABLE mail_out ADD COLUMN asks INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX mail_wanted_by_time ON mail_wanted (peer, at, entry);
    CREATE INDEX mail_wanted_by_answer ON mail_wanted (peer, answer);
    CREATE TABLE mail_asked (
        peer  BLOB NOT NULL,
        entry BLOB NOT NULL,
        at    INTEGER NOT NULL,
        PRIMARY KEY (peer, entry)
    ) WITHOUT ROWID
    """,
    # the change feed (store/feed.py): the number of each record's last change;
    # numbered by FILLS[18] for records already held
    18: """
    ALTER TABLE records ADD COLUMN change INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX records_by_change ON records (change)
    """,
}

#: Migrations that need more than SQL: run after the statements of their version,
#: in the same transaction.
FILLS: dict[int, Callable[[sqlite3.Connection], None]] = {
    16: missing.rebuild,
    18: feed.number,
}

LATEST = max(MIGRATIONS)


def current_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, now_ms: int) -> None:
    """Bring the schema up to :data:`LATEST`, all in one transaction.

    An up-to-date store is only read: opening a store never waits for a writer.
    """
    if current_version(conn) == LATEST:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = current_version(conn)
        if version > LATEST:
            raise StoreError(
                f"this store has schema version {version}, newer than this p2psync "
                f"understands ({LATEST}); upgrade p2psync"
            )
        if version == 0:
            conn.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER)"
            )
        for number in range(version + 1, LATEST + 1):
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            if number in FILLS:
                FILLS[number](conn)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (number, now_ms))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
