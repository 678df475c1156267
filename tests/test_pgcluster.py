"""The PostgreSQL test clusters are real: a database per test, a synchronous standby
that has every committed row, and failover after a kill -9 of the primary."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgcluster import PgCluster, multi_host_conninfo, temp_root, unavailable_reason

psycopg = pytest.importorskip("psycopg", reason="psycopg (the postgresql extra) not installed")

pytestmark = pytest.mark.process


@pytest.fixture
def pg_root() -> Iterator[Path]:
    """A directory for this test's own clusters (each destroyed by the test), removed
    after."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    root = temp_root()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _rows(conninfo: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(sql).fetchall()


def _wait_rows(conninfo: str, sql: str, want: list[tuple[object, ...]]) -> None:
    """A synchronous standby has the commit flushed, replayed a moment later."""
    deadline = time.monotonic() + 10
    while (got := _rows(conninfo, sql)) != want:
        assert time.monotonic() < deadline, f"{sql}: {got}, want {want}"
        time.sleep(0.02)


def test_database_per_test(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO item VALUES (1, 'one'), (2, 'två')")
    assert _rows(pg_conninfo, "SELECT id, name FROM item ORDER BY id") == [
        (1, "one"),
        (2, "två"),
    ]


def test_database_is_fresh(pg_conninfo: str) -> None:
    assert _rows(pg_conninfo, "SELECT to_regclass('item') IS NULL") == [(True,)]


def test_sync_standby_failover_after_kill9(pg_root: Path) -> None:
    primary = PgCluster.create(pg_root, "primary", sync_standby="s1")
    standby: PgCluster | None = None
    try:
        primary.start()
        standby = PgCluster.standby_of(primary, pg_root, "s1", application_name="s1")
        assert primary.port != standby.port
        assert primary.psql(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 's1'"
        ) == "sync"
        with psycopg.connect(primary.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
            conn.execute("INSERT INTO item VALUES (1)")
        _wait_rows(standby.conninfo(), "SELECT id FROM item", [(1,)])
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            _rows(standby.conninfo(), "INSERT INTO item VALUES (9) RETURNING id")

        # the last commit acknowledged before the crash is on the standby
        with psycopg.connect(primary.conninfo(), autocommit=True) as conn:
            conn.execute("INSERT INTO item VALUES (2)")
        primary.kill9()
        assert primary.pid is None
        standby.promote()

        both = multi_host_conninfo([primary, standby])
        with psycopg.connect(both, autocommit=True) as conn:
            assert conn.info.host == str(standby.socket_dir)
            rows = conn.execute("SELECT id FROM item ORDER BY id").fetchall()
            assert rows == [(1,), (2,)]
            conn.execute("INSERT INTO item VALUES (3)")
        assert standby.psql("SELECT count(*) FROM item") == "3"
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()
