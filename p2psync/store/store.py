"""The store: one SQLite file holding change logs, records and conflicts.

Reads never wait for the writer (WAL). Every write is one ``BEGIN IMMEDIATE``
transaction, so several processes on one home (agent, CLI, API) serialise
safely; a crash at any instant leaves the last committed state.

:class:`Store` is the facade the rest of p2psync uses: each method takes the
reading or the writing connection and calls the module of its noun — records,
logs, peers, rules, meta — or, to write entries, :mod:`~p2psync.store.local`
(our own) and :mod:`~p2psync.store.ingest` (from elsewhere).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from p2psync.core import hlc as hlc_mod
from p2psync.core.canonical import Value
from p2psync.core.entry import decode_stored
from p2psync.core.flow import Flow
from p2psync.core.identity import Identity
from p2psync.core.messages import Head
from p2psync.core.rules import Mode, Rule, Terms
from p2psync.errors import EntryError, StoreError
from p2psync.store import feed, joins, local, logs, meta, missing, peers, records, schema
from p2psync.store import rules as rules_mod
from p2psync.store.connection import Guard, connect, data_version
from p2psync.store.gcpause import fewer_collections
from p2psync.store.ingest import IngestResult, decode_batch, ingest
from p2psync.store.ledger import Ledger
from p2psync.store.local import Change
from p2psync.store.logs import AuthorState, StoredEntry
from p2psync.store.peers import PeerState
from p2psync.store.verify import VerifyReport, copy_from_records, damage_of, verify
from p2psync.store.writer import Writer

__all__ = ["STORE_FILE", "AuthorState", "Change", "SentDamage", "Store", "StoredEntry"]

STORE_FILE = "store.sqlite"
#: Most ops held without their payload one session asks a peer for (Wants of
#: :data:`~p2psync.core.messages.MAX_WANT_IDS` each); the rest, at the next.
MAX_ASKED_PER_SESSION = 100_000


class SentDamage(NamedTuple):
    """Damage found among entries a session sent (:meth:`Store.check_sent`)."""

    what: str
    outcome: str  # mended here, marked (a peer's copy mends it), or neither


class Store:
    """The SQLite store of one home."""

    def __init__(self, path: Path, now_ms: int, *, create: bool = False) -> None:
        if not create and not path.exists():
            raise StoreError(f"no store at {path}")
        self.path = path
        #: how far ahead of now an ingested entry's clock may be (the home's setting)
        self.max_skew_ms = hlc_mod.DEFAULT_MAX_SKEW_MS
        conn = connect(path)
        try:
            schema.migrate(conn, now_ms)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot prepare the store at {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._db = Guard(conn, path)
        # Reads get their own connection: in WAL mode they then never wait for,
        # or hold up, a write transaction on the other one (sync reads what to
        # send while it ingests what it receives).
        try:
            self._reader = Guard(connect(path), path)
        except BaseException:
            self._db.close()
            raise

    @property
    def ledger(self) -> Ledger:
        """The relay mailbox's delivery ledger (:mod:`p2psync.store.ledger`)."""
        return Ledger(self._db, self._reader)

    def close(self) -> None:
        self._reader.close()
        self._db.close()

    # ------------------------------------------------------------ meta

    def get_meta(self, key: str) -> object:
        with self._reader.reading() as conn:
            return meta.get(conn, key)

    def set_meta(self, key: str, value: object) -> None:
        with self._db.writing() as conn:
            meta.put(conn, key, value)

    # ------------------------------------------------------------ records

    def get(self, collection: str, key: str) -> Value:
        with self._reader.reading() as conn:
            return records.get(conn, collection, key)

    def exists(self, collection: str, key: str) -> bool:
        with self._reader.reading() as conn:
            return records.exists(conn, collection, key)

    def in_conflict(self, collection: str, key: str) -> bool:
        with self._reader.reading() as conn:
            return records.in_conflict(conn, collection, key)

    def head(self, collection: str, key: str) -> tuple[records.VersionInfo, bool] | None:
        with self._reader.reading() as conn:
            return records.head(conn, collection, key)

    def scan(
        self, collection: str, prefix: str = "", after: str | None = None
    ) -> Iterator[tuple[str, Value]]:
        while True:
            with self._reader.reading() as conn:
                page = records.scan_page(conn, collection, prefix, after)
            for key, payload in page:
                yield key, records.payload_value(payload)
            if len(page) < records.SCAN_PAGE:
                return
            after = page[-1][0]

    def has_collection(self, collection: str) -> bool:
        with self._reader.reading() as conn:
            return records.has_collection(conn, collection)

    def collections(self) -> list[tuple[str, int]]:
        with self._reader.reading() as conn:
            return records.collections(conn)

    def changes(
        self, since: int, collections: Sequence[str] | None = None, limit: int = feed.PAGE
    ) -> list[feed.RecordChange]:
        """Records changed after change ``since`` (see :mod:`p2psync.store.feed`)."""
        with self._reader.reading() as conn:
            return feed.changes_after(conn, since, collections, limit)

    def last_change(self) -> int:
        with self._reader.reading() as conn:
            return feed.last_change(conn)

    def conflicts(self) -> list[records.Conflict]:
        with self._reader.snapshot() as conn:  # winners and losers from one snapshot
            return list(records.conflicts(conn))

    def incomplete(self) -> dict[str, int]:
        """Per collection, the ops applied here without their payload (withheld
        upstream by a path that does not carry that collection)."""
        with self._reader.reading() as conn:
            return records.incomplete(conn)

    # ------------------------------------------------------------ logs

    def authors(self) -> list[AuthorState]:
        with self._reader.reading() as conn:
            return logs.authors(conn)

    def entries(self, author: bytes | None = None) -> Iterator[StoredEntry]:
        """Stored entries: one author's in seq order, or everyone's in clock order."""
        with self._reader.reading() as conn:
            stored = logs.entries(conn, author)
        yield from stored

    def log_entries(
        self,
        author: bytes | None = None,
        *,
        since_hlc: int | None = None,
        covers: Callable[[str], bool] | None = None,
        newest: int | None = None,
    ) -> list[StoredEntry]:
        """Stored entries as :meth:`entries` orders them, filtered in the store: see
        :func:`p2psync.store.logs.log_rows`."""
        with self._reader.snapshot() as conn:  # however many rows are read
            rows = logs.log_rows(conn, author, since_hlc, covers, newest)
        return [StoredEntry(*row) for row in rows]

    def forks(self) -> list[tuple[bytes, int, bytes, bytes]]:
        """``(author, seq, ours, theirs)`` for every fork on record."""
        with self._reader.reading() as conn:
            return logs.forks(conn)

    def held_count(self) -> int:
        with self._reader.reading() as conn:
            return logs.held_count(conn)

    # ------------------------------------------------------------ sync

    def heads(self) -> dict[bytes, Head]:
        with self._reader.reading() as conn:
            return logs.heads(conn)

    def held_back(self) -> dict[bytes, tuple[int, int]]:
        """Per author with an entry marked damaged: ``(first damaged seq, seq
        held)`` (see :func:`logs.local_state`)."""
        return self.local_state()[1]

    def local_state(self) -> tuple[dict[bytes, Head], dict[bytes, tuple[int, int]]]:
        """:meth:`heads` and :meth:`held_back`, read together."""
        with self._reader.reading() as conn:
            return logs.local_state(conn)

    def entries_after(
        self, after: Mapping[bytes, int], max_entries: int, max_bytes: int
    ) -> list[logs.Outgoing]:
        with self._reader.snapshot() as conn:  # one snapshot across the per-author reads
            return logs.entries_after(conn, after, max_entries, max_bytes)

    def entries_by_id(self, ids: Sequence[bytes], max_bytes: int) -> tuple[list[bytes], int]:
        """Wire forms of the entries ``ids`` names that are held, in order, up to
        ``max_bytes`` (at least one), and how many IDs that took."""
        with self._reader.snapshot() as conn:
            return logs.entries_by_id(conn, ids, max_bytes)

    def entries_with_ids(
        self, ids: Sequence[bytes], max_bytes: int
    ) -> tuple[list[logs.Outgoing], int]:
        """The entries ``ids`` names that are held (and not found damaged), in
        clock order, up to ``max_bytes`` (at least one), and how many IDs that
        took: what a peer asked for again through the mailbox."""
        with self._reader.snapshot() as conn:
            return logs.entries_with_ids(conn, ids, max_bytes)

    def payloads_missing(
        self,
        may_receive: Callable[[str], bool],
        peer: bytes | None = None,
        now_ms: int = 0,
        limit: int = MAX_ASKED_PER_SESSION,
        asked_since: int | None = None,
        authors: Mapping[bytes, int] | None = None,
    ) -> list[missing.Missing]:
        """Ops held without their payload in collections ``may_receive`` accepts,
        but those ``peer`` lacked too when last asked (and, given ``asked_since``,
        those asked of it through the mailbox since; given ``authors``, only
        theirs up to those seqs; see :func:`missing.to_ask`)."""
        with self._reader.reading() as conn:
            return missing.to_ask(conn, may_receive, limit, peer, now_ms, asked_since, authors)

    def entry_at(self, author: bytes, seq: int) -> logs.Outgoing | None:
        with self._reader.reading() as conn:
            return logs.entry_at(conn, author, seq)

    def note_peer_heads(self, peer: bytes, heads: Mapping[bytes, Head]) -> int | None:
        """Remember if ``peer`` says it holds more of *our own* log than we do (the
        store was restored from a backup, say): until we have it back, new local
        writes would reuse sequence numbers and fork our own log. Returns that seq.

        The claim is the peer's word: call this only for peers allowed to send to
        us (so they can prove it by sending); it is forgotten once our log reaches
        it or the peer is removed.
        """
        own = self.get_meta("self")
        if not isinstance(own, bytes) or own not in heads:
            return None
        theirs = heads[own].seq
        with self._db.writing() as conn:
            noted = local.note_own_log_claim(conn, own, peer, theirs)
        return theirs if noted else None

    def data_version(self) -> int:
        """Changes whenever another connection commits (see PRAGMA data_version)."""
        with self._reader.reading() as conn:
            return data_version(conn)

    # ------------------------------------------------------------ peers

    def add_peer(
        self, key: bytes, name: str | None, addresses: Sequence[str], now_ms: int
    ) -> peers.Peer:
        with self._db.writing() as conn:
            return peers.add(conn, key, name, addresses, now_ms)

    def forget_peer_address(self, key: bytes, address: str) -> None:
        with self._db.writing() as conn:
            peers.forget_address(conn, key, address)

    def peer(self, key: bytes) -> peers.Peer | None:
        with self._reader.reading() as conn:
            return peers.get(conn, key)

    def peers(self) -> list[peers.Peer]:
        with self._reader.reading() as conn:
            return peers.all_peers(conn)

    def record_peer(
        self,
        key: bytes,
        *,
        seen: int | None = None,
        synced: int | None = None,
        error: str | None = None,
        clear_error: bool = False,
        address: str | None = None,
        heads: Mapping[bytes, int] | None = None,
    ) -> None:
        with self._db.writing() as conn:
            peers.record(
                conn,
                key,
                seen=seen,
                synced=synced,
                error=error,
                clear_error=clear_error,
                address=address,
            )
            if heads is not None:
                peers.set_heads(conn, key, heads)

    def peer_heads(self, key: bytes) -> dict[bytes, int]:
        with self._reader.reading() as conn:
            return peers.heads_of(conn, key)

    # ------------------------------------------------------------ rules and invites

    def add_rule_objects(
        self,
        me: bytes,
        signed: Sequence[bytes],
        now_ms: int,
        peer_only: bytes | None = None,
        *,
        expected: bool = False,
    ) -> int:
        """Verify and keep rule objects concerning ``me``; returns how many were new
        (``expected``: we presented an invite code of ``peer_only``)."""
        with self._db.writing() as conn:
            return len(
                rules_mod.add_objects(conn, me, signed, now_ms, peer_only, expected=expected)
            )

    def rule_objects(self, peer: bytes | None) -> list[bytes]:
        with self._reader.reading() as conn:
            return rules_mod.objects_with(conn, peer)

    def expire_requests(self, me: bytes, now_ms: int) -> list[bytes]:
        """Forget strangers' requests with nothing new for
        :data:`~p2psync.store.rules.REQUEST_TTL_MS`; returns the strangers' keys."""
        with self._db.writing() as conn:
            return rules_mod.expire_requests(conn, me, now_ms)

    def rules_version(self) -> int:
        """Grows whenever a rule object is added or deleted."""
        with self._reader.reading() as conn:
            return rules_mod.version(conn)

    def peers_in_force(self) -> set[bytes]:
        """Peers with a rule in force with this agent (read under the reader's lock,
        decoded and folded after it, so other reads do not wait)."""
        return set(self.peers_in_force_modes())

    def peers_in_force_modes(self, *, direct: bool = False) -> dict[bytes, set[Mode]]:
        """Peers with a rule in force, and the modes of those rules; ``direct``: only
        rules a direct connection carries (route ``direct`` or ``auto``)."""
        with self._reader.reading() as conn:
            objects = rules_mod.answered_objects(conn)
        return rules_mod.in_force(objects, direct=direct)

    def rule_objects_order(self, ids: Sequence[bytes]) -> dict[bytes, int]:
        """The order in which this store took in each of these rule objects (its own
        count: a later message, or a later object of one message, comes after; in a
        message proposals come before the answers to them)."""
        with self._reader.reading() as conn:
            return rules_mod.intake_order(conn, ids)

    def latest_signed(self, me: bytes) -> dict[bytes, int]:
        with self._reader.reading() as conn:
            return rules_mod.latest_signed(conn, me)

    def rule_objects_versioned(self, peer: bytes) -> tuple[list[bytes], int]:
        """The rule objects shared with ``peer``, and the rules version they are as of."""
        with self._reader.reading() as conn:
            return rules_mod.objects_with(conn, peer), rules_mod.version(conn)

    def peers_asked(self, me: bytes) -> set[bytes]:
        """Agents ``me`` has an open proposal to."""
        with self._reader.reading() as conn:
            return rules_mod.asking(conn, me)

    def peers_proposed_to(self, me: bytes) -> set[bytes]:
        with self._reader.reading() as conn:
            return rules_mod.proposed_to(conn, me)

    def not_strangers(self, me: bytes) -> set[bytes]:
        """Peers that are no strangers (``store/rules.py``): an acceptance ever in
        the pair, or a proposal of ours."""
        with self._reader.reading() as conn:
            accepted = conn.execute("SELECT DISTINCT peer FROM rule_objects WHERE kind = 'accept'")
            return {peer for (peer,) in accepted} | rules_mod.proposed_to(conn, me)

    def rules(self, peer: bytes | None = None) -> list[Rule]:
        with self._reader.reading() as conn:
            return rules_mod.rules_with(conn, peer)

    def add_invite(
        self,
        invite: bytes,
        secret: bytes,
        terms: Terms,
        expires: int,
        now_ms: int,
        relay: bytes | None = None,
    ) -> None:
        with self._db.writing() as conn:
            rules_mod.add_invite(conn, invite, secret, terms, expires, now_ms, relay)

    def invite(self, invite: bytes) -> rules_mod.Invite | None:
        """The invite with this ID, unless it was withdrawn."""
        with self._reader.reading() as conn:
            return rules_mod.get_invite(conn, invite)

    def invites(self) -> list[rules_mod.Invite]:
        """Every invite this agent made, withdrawn ones too."""
        with self._reader.reading() as conn:
            return rules_mod.all_invites(conn)

    def withdraw_invite(self, invite: bytes, now_ms: int) -> bool:
        with self._db.writing() as conn:
            return rules_mod.withdraw_invite(conn, invite, now_ms)

    def use_invite(self, invite: bytes, by: bytes) -> bool:
        with self._db.writing() as conn:
            return rules_mod.use_invite(conn, invite, by)

    def add_relay_join(self, join: joins.RelayJoin) -> None:
        """Keep an invite code joined through a relay (one per inviter and invite:
        joining the same code again replaces it) until the inviter answers."""
        with self._db.writing() as conn:
            joins.put(conn, join)

    def relay_joins(self, inviter: bytes | None = None) -> list[joins.RelayJoin]:
        """Our joins through a relay (of ``inviter``'s codes only, if given), oldest first."""
        with self._reader.reading() as conn:
            return joins.all_joins(conn, inviter)

    def relay_join(self, inviter: bytes, invite: bytes | None = None) -> joins.RelayJoin | None:
        """Our join of ``invite`` (any, if None) of ``inviter``'s codes, if kept."""
        found = self.relay_joins(inviter)
        return next((j for j in found if invite is None or j.invite == invite), None)

    def refuse_relay_join(self, inviter: bytes, invite: bytes, reason: str) -> bool:
        with self._db.writing() as conn:
            return joins.refuse(conn, inviter, invite, reason)

    def drop_relay_join(self, inviter: bytes, invite: bytes | None = None) -> int:
        with self._db.writing() as conn:
            return joins.drop(conn, inviter, invite)

    def owe_join_refusal(self, refusal: joins.JoinRefusal) -> bool:
        with self._db.writing() as conn:
            return joins.owe_refusal(conn, refusal)

    def join_refusals(self, joiner: bytes | None = None) -> list[joins.JoinRefusal]:
        with self._reader.reading() as conn:
            return joins.refusals(conn, joiner)

    def purge_joins(self, now_ms: int) -> int:
        with self._db.writing() as conn:
            return joins.purge(conn, now_ms)

    def set_peer_state(self, key: bytes, state: PeerState) -> None:
        with self._db.writing() as conn:
            peers.set_state(conn, key, state)

    # ------------------------------------------------------------ checking

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        with self._reader.snapshot() as conn:
            return verify(conn, progress)

    def mend_from_records(
        self, found: Sequence[tuple[bytes, int, bytes]], now_ms: int
    ) -> list[bytes]:
        """Mend damaged entries ``(author, seq, ID)`` from this store's own rows
        where they still hold them (:func:`~p2psync.store.verify.copy_from_records`):
        each rebuilt entry is decoded and checked in full (payload digests, ID,
        signature) before its stored payloads are replaced; records are not touched
        (they were made when it was sound). Any author, a frozen one too. The IDs
        mended."""
        mended = []
        with self._db.writing() as conn:
            for author, seq, _ in found:
                copy = copy_from_records(conn, author, seq)
                if copy is None:
                    continue
                entry_id, signed, payloads = copy
                try:
                    entry = decode_stored(signed, payloads)
                except EntryError:
                    continue
                if entry.id != entry_id or entry.author != author or not entry.signature_valid():
                    continue
                conn.execute("UPDATE entries SET payloads = ? WHERE id = ?", (payloads, entry_id))
                conn.execute("DELETE FROM entries_damaged WHERE entry = ?", (entry_id,))
                mended.append(entry_id)
        return mended

    def check_sent(self, sent: Sequence[bytes], now_ms: int) -> list[SentDamage]:
        """Re-verify entries a session sent that the peer never acknowledged (their
        IDs): a peer that finds one invalid ends the session, and would at every
        session while this store serves it. Damage the chain confirms is mended
        from this store's records where they hold it, else marked as `verify
        --repair` marks it (not served; fetched again from a peer). What was found
        and done, in words."""
        with self._reader.snapshot() as conn:
            found = [f for f in (damage_of(conn, entry) for entry in dict.fromkeys(sent)) if f]
        marks = [mark for _, mark in found if mark is not None]
        mended = set(self.mend_from_records(marks, now_ms)) if marks else set()
        rest = [mark for mark in marks if mark[2] not in mended]
        if rest:
            self.mark_damaged(rest, now_ms)
        said = []
        for what, mark in found:
            if mark is None:
                outcome = (
                    "the chain does not confirm its ID, so no peer's copy can be matched "
                    "to it and it is still sent; run `p2psync verify` (a backup may be "
                    "needed)"
                )
            elif mark[2] in mended:
                outcome = "mended from this site's own records"
            else:
                outcome = (
                    "it is no longer sent, and the next sync with a peer that holds it "
                    "mends it (`p2psync verify` checks the whole store)"
                )
            said.append(SentDamage(what, outcome))
        return said

    def mark_damaged(self, found: Sequence[tuple[bytes, int, bytes]], now_ms: int) -> None:
        """Entries ``(author, seq, ID)`` found damaged: until a sound copy mends
        them, not served, and this store says it holds their authors' logs only up
        to the entry before, so that a peer sends them again."""
        with self._db.writing() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO entries_damaged (author, seq, entry, found) "
                "VALUES (?, ?, ?, ?)",
                [(author, seq, entry, now_ms) for author, seq, entry in found],
            )

    # ------------------------------------------------------------ writing

    def write_local(
        self,
        identity: Identity,
        transactions: Iterable[Sequence[Change]],
        now_ms: Callable[[], int],
        salt: Callable[[], bytes],
    ) -> list[bytes]:
        """Sign and apply one entry per transaction, all in one store transaction
        (see :func:`p2psync.store.local.write`); returns the IDs written."""
        with self._db.writing() as conn:
            return local.write(conn, identity, transactions, now_ms, salt)

    def ingest(
        self,
        wires: Sequence[bytes],
        now_ms: int,
        max_skew_ms: int | None = None,
        flow: Flow | None = None,
        peer: bytes | None = None,
    ) -> IngestResult:
        """Verify and apply entries from elsewhere, in one transaction (``flow``:
        what the sender may send here, see :func:`~p2psync.store.ingest.decode_batch`;
        ``peer``: the sender, noted when a copy it was asked for lacks a payload it
        may send)."""
        result = IngestResult()
        skew = self.max_skew_ms if max_skew_ms is None else max_skew_ms
        with fewer_collections():  # the batch's objects are freed before it ends
            self._ingest(wires, now_ms, skew, flow, result, peer)
        return result

    def _ingest(
        self,
        wires: Sequence[bytes],
        now_ms: int,
        max_skew_ms: int,
        flow: Flow | None,
        result: IngestResult,
        peer: bytes | None = None,
    ) -> None:
        items = decode_batch(wires, now_ms, max_skew_ms, result, flow)
        if items:
            with self._db.writing(visible_first=True) as conn:
                writer = Writer(conn, now_ms)
                if peer is not None:
                    writer.source = (peer, (flow or Flow()).may_receive)
                ingest(writer, items, result)
                writer.finish()
                result.mended = list(writer.mended)
