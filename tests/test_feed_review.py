"""Review of the change feed (a4532f0, d2bb5cf): each test fails on the code as
reviewed, for the reason its docstring gives (``docs/change-feed.md``)."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import p2psync
from p2psync import home as home_mod
from p2psync.cli.main import cli

MakeDb = Callable[[str], p2psync.Database]

ROOT = Path(__file__).resolve().parent.parent


def _count_reads(db: p2psync.Database) -> list[int]:
    """Counts every feed read of ``db``'s store (``store.changes``)."""
    calls = [0]
    real = db.store.changes

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    db.store.changes = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.pure
def test_watch_with_a_collection_filter_waits_instead_of_spinning(make_db: MakeDb) -> None:
    """Once a change is applied in a collection the watch does not follow,
    ``last_change()`` stays above ``since`` (only a followed change moves it), so
    ``watch`` never sleeps again: it re-reads the feed in a tight loop, a CPU at
    100% (and a full scan of the collection each time) for as long as it runs."""
    db = make_db("a")
    db.put("stock", "k", 1)
    db.put("misc", "m", 1)  # not followed: last_change() is now above since
    reads = _count_reads(db)
    assert list(db.watch(since=1, collections=["stock"], poll=0.05, timeout=0.5)) == []
    # ~0.5 s / 0.05 s = 10 reads expected; allow 5 times that
    assert reads[0] <= 50, f"{reads[0]} reads of the feed in 0.5 s (a busy loop)"


@pytest.mark.pure
def test_a_filtered_read_uses_the_change_index(make_db: MakeDb) -> None:
    """``changes(since, collections)`` is planned as a search of the whole
    collection by primary key and a sort of it (``USE TEMP B-TREE FOR ORDER BY``),
    not a range of ``records_by_change``: every page, and every poll of
    ``watch_async(collections=...)`` (20 a second), costs a read of every record
    of the collection however few changed."""
    db = make_db("a")
    db.write([[p2psync.Change(p2psync.OpKind.PUT, "stock", f"k{i}", i)] for i in range(300)])
    conn = db.store._reader.conn
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        db.store.changes(db.last_change(), ["stock"])
    finally:
        conn.set_trace_callback(None)
    [sql] = [s for s in seen if "change >" in s]
    plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
    assert "TEMP B-TREE" not in plan and "change" in plan, plan


@pytest.mark.pure
def test_a_single_collection_name_is_not_taken_as_its_characters(make_db: MakeDb) -> None:
    """``collections`` is a ``Sequence[str]``, and a ``str`` is one: passing a
    single name (``db.changes(0, "vouchers")``, an easy slip) builds ``IN (?, ?,
    ...)`` of its letters and silently returns nothing (or the records of
    one-letter collections). A name should be refused (UsageError) or taken as
    one collection."""
    db = make_db("a")
    db.put("vouchers", "V-1", 1)
    db.put("v", "x", 2)
    try:
        got = [c.collection for c in db.changes(0, "vouchers")]
    except p2psync.UsageError:
        return
    assert got == ["vouchers"], f"changes(0, 'vouchers') gave {got}"


@pytest.mark.pure
def test_a_since_beyond_the_latest_change_is_refused(make_db: MakeDb) -> None:
    """A ``since`` above ``last_change()`` cannot have come from this store: the
    consumer kept it for another home, or the home was restored from a backup
    (numbers start again lower). It is accepted silently: ``changes`` returns
    nothing and ``watch`` waits, and every change numbered up to ``since`` once
    the store gets there is never delivered."""
    db = make_db("a")
    db.put("stock", "a", 1)
    with pytest.raises(p2psync.UsageError):
        list(db.changes(since=db.last_change() + 5))


@pytest.mark.pure
def test_a_huge_since_is_a_usage_error(make_db: MakeDb, tmp_path: Path) -> None:
    """``since`` of 2**63 or more passes the check (a whole number of 0 or more)
    and reaches SQLite: ``OverflowError`` from the API, and ``p2psync watch
    --since 99999999999999999999`` says 'internal error' instead of a usage
    error (exit 2)."""
    db = make_db("a")
    with pytest.raises(p2psync.UsageError):
        list(db.changes(since=2**63))
    result = CliRunner().invoke(
        cli,
        ["--home", str(tmp_path / "a"), "watch", "--since", "99999999999999999999", "--no-follow"],
    )
    assert result.exit_code == 2 and "internal error" not in result.output, result.output


@pytest.mark.pure
def test_many_collections_are_read_in_chunks(make_db: MakeDb) -> None:
    """The collection filter is one ``?`` per name: more names than SQLite's
    variable limit fail with 'store error ... too many SQL variables' (a
    StoreError that reads like damage), where the writer's own prefetch chunks
    its ``IN`` lists."""
    db = make_db("a")
    db.put("c1", "k", 1)
    conn = db.store._reader.conn
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    names = [f"c{i}" for i in range(limit + 1)]
    assert [c.collection for c in db.changes(0, names)] == ["c1"]


@pytest.mark.pure
def test_a_row_written_without_a_number_still_reaches_the_feed(make_db: MakeDb) -> None:
    """An agent started before the upgrade keeps running the old writer after a
    newer command migrated the store to 18: its ``INSERT OR REPLACE INTO records``
    names no ``change``, so the row gets the column default 0, and the record
    (even one listed before, at a higher number) drops out of the feed for good.
    (The statement below is the writer's of 4e66177, the parent commit.)"""
    db = make_db("a")
    db.put("stock", "k", 1)
    before = db.last_change()
    entry, hlc, author, payload = db.store._reader.conn.execute(
        "SELECT entry, hlc, author, payload FROM records WHERE key = 'k'"
    ).fetchone()
    with db.store._db.writing() as conn:  # what the running pre-18 agent does
        conn.execute(
            "INSERT OR REPLACE INTO records (collection, key, entry, hlc, author, payload, "
            "deleted, conflicted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("stock", "k2", entry, hlc + 1, author, payload, 0, 0),
        )
    assert [c.key for c in db.changes(before)] == ["k2"], "a record outside the feed"


@pytest.mark.pure
def test_the_python_example_of_the_doc_handles_each_change_once(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/change-feed.md's example loads ``last`` once, then runs
    ``db.changes(since=last)`` and ``db.watch(since=last)`` with that same value:
    ``watch`` starts again from the first change, so everything ``changes`` handled
    is handled a second time (README's example updates ``last_seen``; this one
    does not)."""
    doc = (ROOT / "docs" / "change-feed.md").read_text()
    [example] = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "db.watch" in b]
    db = make_db("a")
    for key in ("a", "b", "c"):
        db.put("stock", key, key)
    home = db.home.path
    db.close()
    real_watch = p2psync.Database.watch

    def watch_briefly(self: p2psync.Database, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return real_watch(self, *args, timeout=0.3, **kwargs)  # the doc's blocks for ever

    monkeypatch.setattr(p2psync.Database, "watch", watch_briefly)
    handled: list[int] = []
    saved: list[int] = []
    names = {
        "p2psync": p2psync,
        "home": home,
        "load_last_number": lambda: 0,
        "apply": lambda change: handled.append(change.change),
        "save_last_number": saved.append,
    }
    exec(example.replace("        ...", "        apply(change)"), names)
    assert handled == [1, 2, 3], f"changes handled: {handled}"


@pytest.mark.xfail(
    strict=True, reason="by design: watch_async has no timeout (the doc says trio.move_on_after)"
)
@pytest.mark.pure
def test_watch_async_takes_the_timeout_the_doc_says_it_shares(make_db: MakeDb) -> None:
    """The doc: "``async for change in db.watch_async(since=...)`` - the same [as
    watch] for trio programs"; ``watch`` has ``timeout``, ``watch_async`` has not
    (a TypeError)."""
    assert "timeout" in inspect.signature(p2psync.Database.watch_async).parameters


@pytest.mark.pure
def test_the_latest_number_can_be_read_from_the_command_line(tmp_path: Path) -> None:
    """A script fed by ``p2psync watch --json`` that starts "from now" needs the
    number to keep before a change arrives: ``status --json`` gives it (``store``,
    ``last_change``), and ``status`` says it."""
    home = tmp_path / "a"
    home_mod.init(home, "a")
    with p2psync.open(home) as db:
        db.put("stock", "a", 1)
        db.put("stock", "b", 2)
    result = CliRunner().invoke(cli, ["--home", str(home), "status", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["store"].get("last_change") == 2


@pytest.mark.process
def test_watch_stops_when_its_home_is_deleted(tmp_path: Path) -> None:
    """``p2psync watch`` polls the store through a connection that keeps the
    deleted file open: once the home is removed (or moved and re-created) it
    must say the home is gone and exit, not wait for ever (it checks every
    second that its store file is still the one it opened)."""
    home = tmp_path / "a"
    home_mod.init(home, "a")
    base = [sys.executable, "-m", "p2psync", "--home", str(home)]
    subprocess.run([*base, "put", "stock", "a", "1"], check=True, capture_output=True)
    watcher = subprocess.Popen(
        [*base, "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.0)
        shutil.rmtree(home)
        try:
            code = watcher.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        if watcher.poll() is None:
            watcher.kill()
        watcher.wait(timeout=10)
        assert watcher.stderr is not None
        stderr = watcher.stderr.read()
        assert watcher.stdout is not None
        watcher.stdout.close()
        watcher.stderr.close()
    assert code is not None, "watch still running 10 s after its home was deleted"
    assert code != 0 and "Traceback" not in stderr, stderr
    assert "deleted or replaced" in stderr, stderr
