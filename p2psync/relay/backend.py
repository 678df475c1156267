"""Where a relay keeps its mailbox and admission list: the SQLite file in its home
(the default), or a PostgreSQL database that several relay nodes share.

``--store`` (``relay init``, ``relay serve``) takes ``sqlite``, a
``postgresql://`` (or ``postgres://``) URI, ``postgresql:`` followed by a libpq
``key=value`` string, or ``postgresql`` alone (the ``PG*`` environment variables).
The choice is recorded in ``relay.json`` so that every command on the home
(``allow``, ``deny``, ``token``, ``purge``, ``status``) acts where ``serve`` does.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from p2psync.core.mailbox import MailboxStore
from p2psync.errors import HomeError, StoreError, UsageError
from p2psync.relay.admission import Admission
from p2psync.relay.home import ADMISSION_FILE, RelayHome
from p2psync.store.pgpool import ATTEMPTS, PAUSE_S, Pool, check_conninfo, describe

SQLITE = "sqlite"


def parse_store(text: str) -> str | None:
    """The store ``--store`` names: None for SQLite, else a libpq connection string."""
    value = text.strip()
    if value.lower() == SQLITE:
        return None
    if value.lower() in ("postgresql", "postgres"):
        return ""  # libpq reads PGHOST, PGDATABASE, ...
    if re.match(r"(?i)postgres(ql)?://", value):
        check_conninfo(value)
        return value
    if value.lower().startswith("postgresql:"):
        conninfo = value[len("postgresql:"):].strip()
        check_conninfo(conninfo)
        return conninfo
    raise UsageError(
        f"--store {text!r}: give sqlite, a postgresql://... URI, postgresql:KEY=VALUE..., "
        "or postgresql (the PG* environment variables)"
    )


def shown(store: str | None) -> str:
    """The store for logs and ``relay status``: never its password (libpq's own
    parser reads it, in whichever form it is given)."""
    if store is None:
        return SQLITE
    if not store:
        return "postgresql (PG* environment variables)"
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: PLC0415

        params = conninfo_to_dict(store)
    except Exception:  # psycopg missing, or a string libpq cannot read
        return "postgresql (a connection string libpq cannot read)"
    if "password" in params:
        params["password"] = "***"
    return "postgresql:" + make_conninfo(**params)  # type: ignore[arg-type]


def open_mailbox(home: RelayHome, connections: int = 4) -> MailboxStore:
    if home.store is None:
        from p2psync.store.mailbox import SqliteMailbox  # noqa: PLC0415

        return SqliteMailbox(home.mailbox_path, home.limits)
    from p2psync.store.pgmailbox import PgMailbox  # noqa: PLC0415

    return PgMailbox(home.store, home.limits, connections)


def open_admission(home: RelayHome, pool: Pool | None = None) -> Admission:
    """The home's admission list: its file, or the shared database's row."""
    if home.store is None:
        return Admission(home.path)
    return SharedAdmission(home, pool or Pool(home.store, 1))


class SharedAdmission(Admission):
    """The admission list in the database the relay's nodes share (one JSON
    document, the file's format, in ``relay_admission``): ``allow`` or ``deny`` on
    any node's home holds for every node; a token's uses are counted once for all.
    Each change is a read-modify-write under the row's lock. The first node to
    use it seeds it from its home's ``admission.json``, if any."""

    #: the node re-reads it every tick (no file time to watch)
    watch_by_file = False

    def __init__(self, home: RelayHome, pool: Pool) -> None:
        super().__init__(home.path)
        self.pool = pool

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        import psycopg  # noqa: PLC0415

        seed = super()._read() if (self.home / ADMISSION_FILE).exists() else None
        for attempt in range(ATTEMPTS):
            entered = False  # a connection lost before the caller ran is retried
            try:
                with self.pool.connection() as conn, conn.transaction():
                    conn.execute(
                        "INSERT INTO relay_admission (one, doc) VALUES (1, %s) "
                        "ON CONFLICT (one) DO NOTHING",
                        (json.dumps(seed or {"allowed": {}, "denied": [], "tokens": {}}),),
                    )
                    (doc,) = conn.execute(  # type: ignore[misc]
                        "SELECT doc FROM relay_admission WHERE one = 1 FOR UPDATE"
                    ).fetchone()
                    data = _checked(json.loads(doc))
                    before = repr(data)
                    entered = True
                    yield data
                    if repr(data) != before:
                        conn.execute(
                            "UPDATE relay_admission SET doc = %s WHERE one = 1",
                            (json.dumps(data, sort_keys=True),),
                        )
                return
            except psycopg.OperationalError as exc:
                if entered or attempt + 1 == ATTEMPTS:
                    raise HomeError(f"the relay's database: {describe(exc)}") from exc
                time.sleep(PAUSE_S * 2**attempt)
            except psycopg.Error as exc:
                raise HomeError(f"the relay's database: {describe(exc)}") from exc
            except (StoreError, ValueError) as exc:
                raise HomeError(f"the relay's admission list in its database: {exc}") from exc


def _checked(data: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for key, kind in (("allowed", dict), ("denied", list), ("tokens", dict)):
        if not isinstance(data.setdefault(key, kind()), kind):
            raise ValueError(f"{key} is not a JSON {kind.__name__}")
    return data

