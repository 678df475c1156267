"""A few PostgreSQL connections for the relay's worker threads, and one
transaction at a time on each (psycopg 3, synchronous API).

:class:`Pool` hands a worker thread a connection of its own (made on demand, at
most ``size``), runs one transaction on it and takes it back; a connection that
failed is closed rather than returned, so after a failover the next call connects
afresh, to whichever host the connection string names accepts writes
(``target_session_attrs=read-write``). :meth:`Pool.transaction` retries what is
safe to retry (a deadlock, a serialization failure, a connection lost) a few
times with a short pause; every other database error, and a retry that still
fails, is a :class:`~p2psync.errors.StoreError` with one sentence for the log.

Retrying after a connection lost *during* COMMIT can run a transaction twice;
most of the mailbox's writes are idempotent (a deposit's second run finds its
key held and answers ``Duplicate`` with the same T), so that is safe for them;
the others say ``idempotent=False`` and get a :class:`StoreError` instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from p2psync.errors import StoreError, UsageError

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

#: Attempts of one transaction (a deadlock, a serialization failure, a lost
#: connection), and the pause between them (doubled each time).
ATTEMPTS = 4
PAUSE_S = 0.05
#: Seconds to wait for a free connection when all ``size`` are in use.
WAIT_S = 10.0
#: libpq's own connect timeout (seconds per host) unless the string sets one.
CONNECT_TIMEOUT_S = 3


def _psycopg() -> object:
    try:
        import psycopg  # noqa: PLC0415 - an optional dependency
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise UsageError(
            "the PostgreSQL backend needs psycopg: pip install 'p2psync[postgresql]'"
        ) from exc
    return psycopg


def check_conninfo(conninfo: str) -> None:
    """A :class:`UsageError` unless libpq can read ``conninfo`` (its own parser).
    The error never quotes the string: libpq's would, password and all."""
    _psycopg()
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    try:
        conninfo_to_dict(conninfo)
    except Exception:
        raise UsageError(
            "libpq cannot read this PostgreSQL connection string (quote values with "
            "spaces as 'a b' in key=value form; percent-encode %, @, / and : in a URI)"
        ) from None


def describe(exc: BaseException) -> str:
    """One line for a psycopg error: its first line, without libpq's details."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Pool:
    """At most ``size`` connections to the database ``conninfo`` names (a libpq
    ``key=value`` string or a ``postgresql://`` URI; empty: the ``PG*`` variables)."""

    def __init__(self, conninfo: str, size: int = 4) -> None:
        self.psycopg = _psycopg()
        self.conninfo = conninfo
        self.size = size
        self._idle: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._made = 0
        self._cond = threading.Condition()
        self._closed = False

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg  # noqa: PLC0415

        kwargs: dict[str, object] = {"autocommit": True}
        if "connect_timeout" not in self.conninfo:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
        return psycopg.connect(self.conninfo, **kwargs)  # type: ignore[arg-type]

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A connection for this thread alone; closed, not kept, if anything failed."""
        with self._cond:
            deadline = time.monotonic() + WAIT_S
            while not self._idle and self._made >= self.size:
                if self._closed or not self._cond.wait(deadline - time.monotonic()):
                    raise StoreError("every database connection is busy")
            if self._closed:
                raise StoreError("the database pool is closed")
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                self._made += 1
        ok = False
        try:
            if conn is None:
                conn = self._connect()
            yield conn
            ok = True
        finally:
            keep = ok and conn is not None and not conn.closed and not self._closed
            if conn is not None and not keep:
                conn.close()
            with self._cond:
                if keep and conn is not None:
                    self._idle.append(conn)
                else:
                    self._made -= 1
                self._cond.notify()

    def transaction(
        self, work: Callable[[psycopg.Connection[tuple[Any, ...]]], T], *, idempotent: bool = True
    ) -> T:
        """``work(conn)`` inside one transaction, committed when it returns;
        retried as the module says. A transaction that is not ``idempotent`` is
        not run again once ``work`` returned (the failure was at COMMIT, whose
        outcome is unknown): a :class:`StoreError` says so instead."""
        import psycopg  # noqa: PLC0415
        from psycopg import errors  # noqa: PLC0415

        pause = PAUSE_S
        for attempt in range(ATTEMPTS):
            ran = False
            try:
                with self.connection() as conn, conn.transaction():
                    result = work(conn)
                    ran = True
                return result
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                failure: psycopg.Error = exc
            except psycopg.OperationalError as exc:  # the connection (or the server) went
                failure = exc
            except psycopg.Error as exc:
                raise StoreError(f"the relay's database: {describe(exc)}") from exc
            if ran and not idempotent:
                raise StoreError(
                    f"the relay's database went during a commit: {describe(failure)}"
                ) from failure
            if attempt + 1 < ATTEMPTS:
                time.sleep(pause)
                pause *= 2
        raise StoreError(f"the relay's database: {describe(failure)}") from failure

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for conn in idle:
            conn.close()
