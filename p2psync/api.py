"""The Python API: open a home, read and write records, ingest entries.

::

    import p2psync
    with p2psync.open(home) as db:
        db.put("vouchers", "V-1001", {"amount": 1200, "party": "ACME"})
        with db.transaction() as tx:          # one entry, atomic everywhere
            tx.put("ledgers", "ACME", {"balance": 1200})
            tx.delete("drafts", "V-1001")
        db.get("vouchers", "V-1001")
        list(db.scan("vouchers", prefix="V-"))
        db.conflicts()
        for change in db.changes(since=last_seen):   # the change feed
            ...

Several processes may open one home at once; reads never wait for writers and
writes are serialised by the store.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from p2psync import clock
from p2psync import home as home_mod
from p2psync.core import canonical, hlc
from p2psync.core.canonical import Value
from p2psync.core.entry import OpKind, check_collection, check_key, decode_stored, wire_form
from p2psync.core.identity import Identity
from p2psync.errors import HomeError, UsageError
from p2psync.net import agentsockets
from p2psync.store import feed
from p2psync.store.feed import RecordChange
from p2psync.store.ingest import IngestResult
from p2psync.store.records import Conflict, VersionInfo
from p2psync.store.store import AuthorState, Change, Store
from p2psync.store.verify import VerifyReport

__all__ = [
    "AuthorState",
    "Change",
    "Conflict",
    "Database",
    "IngestResult",
    "LogEntry",
    "LogOp",
    "RecordChange",
    "Transaction",
    "VerifyReport",
    "VersionInfo",
    "open",
]


@dataclass(frozen=True, slots=True)
class LogOp:
    collection: str
    key: str | None  # None when the payload is withheld from this agent
    kind: OpKind | None
    value: Value
    bases: tuple[bytes, ...]
    digest: bytes


@dataclass(frozen=True, slots=True)
class LogEntry:
    author: bytes
    seq: int
    id: bytes
    prev: bytes | None
    hlc: int
    signature: bytes
    ops: tuple[LogOp, ...]


#: How often :meth:`Database.watch` looks for new changes.
WATCH_POLL_S = 0.05
#: How often a waiting :meth:`Database.watch` checks that its store is still there.
HOME_CHECK_S = 1.0


def _since(since: int) -> int:
    if type(since) is not int or not 0 <= since < 1 << 63:
        raise UsageError(f"a change number is a whole number of 0 or more, not {since!r}")
    return since


def _names(collections: Sequence[str] | None) -> list[str] | None:
    if collections is None:
        return None
    if isinstance(collections, str):
        raise UsageError("collections is a list of names (a single name in a list: [name])")
    return list(collections)


def open(home: str | os.PathLike[str] | None = None) -> Database:
    """Open an initialised home. Creates nothing; a missing home is a HomeError."""
    path = home_mod.resolve(home)
    loaded = home_mod.load(path)
    if not loaded.store_path.exists():
        raise HomeError(f"{path} has an identity but no store; it is damaged or incomplete")
    store = Store(loaded.store_path, clock.now_ms())
    store.max_skew_ms = loaded.max_clock_ahead_ms
    return Database(loaded, store)


class Database:
    """An open home: identity plus store."""

    def __init__(self, home: home_mod.Home, store: Store) -> None:
        self.home = home
        self.store = store
        try:
            found = home.store_path.stat()
            self._file: tuple[int, int] | None = (found.st_dev, found.st_ino)
        except OSError:
            self._file = None

    def _still_here(self) -> None:
        """Raise when the store file this was opened on is gone or replaced (the home
        deleted, moved, or restored under it): a watcher would wait for ever."""
        try:
            found = self.home.store_path.stat()
            here = (found.st_dev, found.st_ino) == self._file or self._file is None
        except OSError:
            here = False
        if not here:
            raise HomeError(
                f"the store at {self.home.store_path} was deleted or replaced while it "
                "was open; open the home again"
            )

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def identity(self) -> Identity:
        return self.home.identity

    @property
    def name(self) -> str:
        """The display name peers see (``config.json``)."""
        return self.home.name

    @property
    def device_id(self) -> str:
        return self.home.identity.device_id

    @property
    def path(self) -> Path:
        return self.home.path

    # ------------------------------------------------------------ writing

    def put(self, collection: str, key: str, value: Value) -> bytes:
        """Write one record as one entry; returns the entry ID."""
        return self.write([[Change(OpKind.PUT, collection, key, value)]])[0]

    def delete(self, collection: str, key: str) -> bool:
        """Delete one record (a tombstone); False when it did not exist."""
        return bool(self.write([[Change(OpKind.DELETE, collection, key)]]))

    def resolve(self, collection: str, key: str, value: Value) -> bytes:
        """Write ``value`` superseding every conflicting version of the record."""
        return self.write([[Change(OpKind.PUT, collection, key, value, resolve=True)]])[0]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Collect changes; on a clean exit they become one entry (atomic everywhere)."""
        tx = Transaction(self)
        yield tx
        if tx.changes:
            self.write([tx.changes])

    def write(
        self,
        transactions: Iterable[Sequence[Change]],
        salt: Callable[[], bytes] | None = None,
    ) -> list[bytes]:
        """One entry per transaction, all committed in one store transaction."""
        written = self.store.write_local(
            self.identity,
            transactions,
            clock.now_ms,
            salt or (lambda: os.urandom(16)),
        )
        if written:
            agentsockets.notify(self.path)  # a running agent pushes them to peers at once
        return written

    def ingest(
        self, wires: Sequence[bytes], *, max_skew_ms: int | None = None
    ) -> IngestResult:
        """Verify and apply entries (wire form) from any author."""
        result = self.store.ingest(wires, clock.now_ms(), max_skew_ms)
        if result.accepted:
            agentsockets.notify(self.path)
        return result

    # ------------------------------------------------------------ reading

    def get(self, collection: str, key: str) -> Value:
        """The record's value, or None when absent or deleted."""
        return self.store.get(collection, key)

    def exists(self, collection: str, key: str) -> bool:
        """True when the record exists and is not deleted (its value may be null)."""
        return self.store.exists(collection, key)

    def in_conflict(self, collection: str, key: str) -> bool:
        """True when the record has concurrent versions that ``resolve`` would end."""
        return self.store.in_conflict(collection, key)

    def scan(
        self, collection: str, prefix: str = "", after: str | None = None
    ) -> Iterator[tuple[str, Value]]:
        """Live records of a collection in key order, optionally by key prefix and
        only those with a key after ``after`` (to page: the last key seen)."""
        return self.store.scan(collection, prefix, after)

    def version(self, collection: str, key: str) -> tuple[VersionInfo, bool] | None:
        """The winning version of a record (a deletion too: ``deleted``), and whether
        it is in conflict; None when the record was never written."""
        return self.store.head(collection, key)

    def collections(self) -> list[tuple[str, int]]:
        return self.store.collections()

    # ------------------------------------------------------------ the change feed

    def last_change(self) -> int:
        """The number of the latest change applied to the store (0: none yet)."""
        return self.store.last_change()

    def changes(
        self, since: int = 0, collections: Sequence[str] | None = None
    ) -> Iterator[RecordChange]:
        """Every record changed after change ``since`` (in ``collections``, if
        given), in change order, each once at its latest state: keep the
        ``change`` of the last one handled and pass it next time to resume exactly
        there (``docs/change-feed.md``). Read a page at a time."""
        since, names = _since(since), _names(collections)
        last = self.store.last_change()
        if since > last:
            raise UsageError(
                f"change {since} is beyond this store's latest ({last}): a number kept "
                "for another home, or this home was restored from a backup; start again "
                "from 0 (or from `last_change()`)"
            )
        while True:
            page = self.store.changes(since, names)
            yield from page
            if len(page) < feed.PAGE:
                return
            since = page[-1].change

    def changes_page(
        self, since: int, collections: Sequence[str] | None = None, limit: int = feed.PAGE
    ) -> list[RecordChange]:
        """One page of :meth:`changes`: at most ``limit`` (1 to 1,000) records
        changed after ``since``; fewer than ``limit`` means none are left."""
        since, names = _since(since), _names(collections)
        if not 1 <= limit <= feed.PAGE:
            raise UsageError(f"limit {limit} is out of range: give 1 to {feed.PAGE}")
        page = self.store.changes(since, names, limit)
        if not page and since > self.store.last_change():
            raise UsageError(
                f"change {since} is beyond this store's latest: a number kept for another "
                "home, or this home was restored from a backup; start again from 0"
            )
        return page

    def feed_page(
        self, since: int, collections: Sequence[str] | None = None, limit: int = feed.PAGE
    ) -> tuple[list[RecordChange], int]:
        """At most ``limit`` records changed after ``since`` (in ``collections``),
        and the number to pass as ``since`` next: after the last one listed or,
        when the page is not full, after every change so far (those of collections
        not followed too, so that they are not read again). What :meth:`watch`,
        ``p2psync watch`` and the HTTP API's feed read a page at a time."""
        since, names = _since(since), _names(collections)
        if not 1 <= limit <= feed.PAGE:
            raise UsageError(f"limit {limit} is out of range: give 1 to {feed.PAGE}")
        top = self.store.last_change()  # every change up to it is committed
        if since > top:
            raise UsageError(
                f"change {since} is beyond this store's latest ({top}): a number kept "
                "for another home, or this home was restored from a backup; start again "
                "from 0 (or from `last_change()`)"
            )
        page = self.store.changes(since, names, limit)
        if len(page) == limit:
            return page, page[-1].change
        return page, max(since, top, page[-1].change if page else 0)

    def watch(
        self,
        since: int = 0,
        collections: Sequence[str] | None = None,
        *,
        poll: float = WATCH_POLL_S,
        timeout: float | None = None,
    ) -> Iterator[RecordChange]:
        """Like :meth:`changes`, then each change as it is applied (by this
        process or another: the store is looked at every ``poll`` seconds), for
        ever, or until ``timeout`` seconds pass with no change."""
        since, names = _since(since), _names(collections)
        quiet_since = time.monotonic()
        while True:
            page, after = self.feed_page(since, names)
            for change in page:
                yield change
                since = change.change
                quiet_since = time.monotonic()
            since = after
            if len(page) == feed.PAGE:
                continue
            if timeout is not None and time.monotonic() - quiet_since >= timeout:
                return
            last = self.store.last_change()
            looked = time.monotonic()
            while last <= since:
                time.sleep(poll)
                if timeout is not None and time.monotonic() - quiet_since >= timeout:
                    return
                if time.monotonic() - looked >= HOME_CHECK_S:
                    looked = time.monotonic()
                    self._still_here()
                last = self.store.last_change()

    async def watch_async(
        self,
        since: int = 0,
        collections: Sequence[str] | None = None,
        *,
        poll: float = WATCH_POLL_S,
    ) -> AsyncIterator[RecordChange]:
        """:meth:`watch` for trio programs: the store is read in a worker thread
        and the wait is a ``trio.sleep``, so other tasks run meanwhile. It runs
        until cancelled (``trio.move_on_after`` for a time limit)."""
        import trio  # noqa: PLC0415 (the command line starts without trio)

        since, names = _since(since), _names(collections)
        while True:
            page, after = await trio.to_thread.run_sync(self.feed_page, since, names)
            for change in page:
                yield change
                since = change.change
            since = after
            if len(page) < feed.PAGE:
                await trio.sleep(poll)

    def conflicts(self) -> list[Conflict]:
        return self.store.conflicts()

    def authors(self) -> list[AuthorState]:
        return self.store.authors()

    def export(self, author: bytes | None = None) -> Iterator[bytes]:
        """Wire forms of stored entries (one author in seq order, or all in clock order)."""
        for stored in self.store.entries(author):
            yield wire_form(stored.signed, stored.payloads)

    def log(
        self,
        author: bytes | None = None,
        *,
        since_ms: int | None = None,
        collections: Sequence[str] = (),
        newest: int | None = None,
    ) -> Iterator[LogEntry]:
        """Decoded entries: one author's in seq order, or everyone's in clock order.

        ``since_ms``: only those stamped at or after this wall time (ms since the
        epoch); ``collections``: only those with an op in a collection matching one
        of these globs; ``newest``: only the newest so many of them (still in
        order). The filters run in the store: only the entries returned are decoded.
        """
        patterns = tuple(collections)
        stored_entries = self.store.log_entries(
            author,
            since_hlc=None if since_ms is None else hlc.from_wall(max(since_ms, 0)),
            covers=(
                (lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns))
                if patterns
                else None
            ),
            newest=newest,
        )
        for stored in stored_entries:
            entry = decode_stored(stored.signed, stored.payloads)
            ops = []
            for collection, digest, op in zip(
                entry.collections, entry.digests, entry.ops, strict=True
            ):
                if op is None:
                    ops.append(LogOp(collection, None, None, None, (), digest))
                else:
                    ops.append(LogOp(collection, op.key, op.kind, op.value, op.bases, digest))
            yield LogEntry(
                entry.author,
                entry.seq,
                entry.id,
                entry.prev,
                entry.hlc,
                entry.signature,
                tuple(ops),
            )

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        return self.store.verify(progress)


class Transaction:
    """Changes collected by :meth:`Database.transaction`; the last change per record wins."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._changes: dict[tuple[str, str], Change] = {}

    @property
    def changes(self) -> list[Change]:
        return list(self._changes.values())

    def put(self, collection: str, key: str, value: Value) -> None:
        check_collection(collection)
        check_key(key)
        canonical.check_value(value)
        self._changes[(collection, key)] = Change(OpKind.PUT, collection, key, value)

    def delete(self, collection: str, key: str) -> None:
        check_collection(collection)
        check_key(key)
        self._changes[(collection, key)] = Change(OpKind.DELETE, collection, key)

    def get(self, collection: str, key: str) -> Value:
        """Read through the pending changes of this transaction."""
        change = self._changes.get((collection, key))
        if change is not None:
            return change.value if change.kind is OpKind.PUT else None
        return self._db.get(collection, key)
