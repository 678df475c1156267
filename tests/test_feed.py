"""The change feed (issue 14): every record change applied to the store, local or
received, numbered; a consumer that keeps the last number it handled resumes
exactly after it, whatever happened meanwhile (``docs/change-feed.md``)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import p2psync
from p2psync import home as home_mod
from p2psync.core.entry import withhold
from p2psync.core.flow import Flow
from p2psync.core.rules import Permissions, Terms
from p2psync.store import schema

MakeDb = Callable[[str], p2psync.Database]


def feed(db: p2psync.Database, since: int = 0) -> list[tuple[int, str, str, object, bool]]:
    return [(c.change, c.collection, c.key, c.value, c.conflict) for c in db.changes(since)]


@pytest.mark.pure
def test_each_record_is_listed_once_at_its_latest_change(make_db: MakeDb) -> None:
    db = make_db("a")
    assert db.last_change() == 0 and feed(db) == []
    db.put("stock", "a", 1)
    db.put("stock", "b", 2)
    with db.transaction() as tx:  # one entry, two changes, in the order written
        tx.put("misc", "z", "z")
        tx.put("stock", "a", 10)
    db.delete("stock", "b")
    assert feed(db) == [
        (3, "misc", "z", "z", False),
        (4, "stock", "a", 10, False),
        (5, "stock", "b", None, False),
    ]
    [deleted] = list(db.changes(4))
    assert deleted.deleted and deleted.author == db.identity.public_key
    assert feed(db, 5) == [] and db.last_change() == 5
    assert [c.key for c in db.changes(0, ["misc"])] == ["z"]
    with pytest.raises(p2psync.UsageError, match="change number"):
        list(db.changes(-1))


@pytest.mark.pure
def test_a_feed_page_says_where_the_next_one_starts(make_db: MakeDb) -> None:
    """``feed_page`` (watch, watch_async and the HTTP API's /changes and /events
    read through it): after the last change listed when the page is full, else
    after every change so far, those of collections not followed too."""
    db = make_db("a")
    for key in "abc":
        db.put("stock", key, 1)
    db.put("misc", "m", 1)  # change 4, not followed below
    page, after = db.feed_page(0, ["stock"], limit=2)
    assert [c.key for c in page] == ["a", "b"] and after == 2
    page, after = db.feed_page(after, ["stock"], limit=2)
    assert [c.key for c in page] == ["c"] and after == 4  # past misc/m
    assert db.feed_page(after, ["stock"]) == ([], 4)
    with pytest.raises(p2psync.UsageError, match="beyond this store's latest"):
        db.feed_page(5)
    with pytest.raises(p2psync.UsageError, match="out of range"):
        db.feed_page(0, limit=0)


@pytest.mark.pure
def test_received_changes_conflicts_and_late_payloads_are_changes_too(make_db: MakeDb) -> None:
    a, b = make_db("a"), make_db("b")
    a.put("stock", "k", "a's")
    with b.transaction() as tx:
        tx.put("stock", "k", "b's")  # concurrent with a's: a conflict at a
        tx.put("misc", "m", "withheld at first")
    narrow = Flow(Permissions(send=(Terms(),), receive=(Terms.make(["stock"]),)))
    wires = list(b.export(b.identity.public_key))
    only_stock = [withhold(w, lambda c: c == "stock") for w in wires]
    a.store.ingest(only_stock, p2psync.clock.now_ms(), flow=narrow)
    [change] = list(a.changes(1))
    assert (change.key, change.conflict) == ("k", True)
    assert change.author in (a.identity.public_key, b.identity.public_key)
    before = a.last_change()
    a.store.ingest(wires, p2psync.clock.now_ms())  # the full copy: the 'misc' op, late
    assert feed(a, before) == [(before + 1, "misc", "m", "withheld at first", False)]


@pytest.mark.pure
def test_a_store_from_before_the_feed_numbers_its_records_in_clock_order(
    make_db: MakeDb, tmp_path: Path
) -> None:
    db = make_db("a")
    for key in ("x", "y", "z"):
        db.put("stock", key, key)
    db.put("stock", "x", "x again")
    path = db.home.store_path
    db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER records_numbered")
        conn.execute("DROP INDEX records_by_change")
        conn.execute("ALTER TABLE records DROP COLUMN change")
        conn.execute("DELETE FROM schema_migrations WHERE version >= 18")
    with p2psync.open(tmp_path / "a") as again:
        assert [c.key for c in again.changes()] == ["y", "z", "x"]
        assert again.last_change() == 3
        again.put("stock", "w", "w")
        assert feed(again, 3) == [(4, "stock", "w", "w", False)]
    assert schema.LATEST >= 18


# ------------------------------------------------------------ resuming


STEP = st.one_of(
    st.tuples(st.just("local"), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 9))),
    st.tuples(st.just("remote"), st.integers(0, 3), st.integers(0, 9)),
    st.tuples(st.just("consume"), st.integers(1, 4)),
    st.tuples(st.just("crash"), st.integers(1, 4)),
    st.tuples(st.just("restart")),
)
KEYS = [("stock", "a"), ("stock", "b"), ("misc", "a"), ("misc", "b")]


class Consumer:
    """A program fed by the feed: it commits what it handled and the last number
    together (here: to a dict standing for its own database), and on a crash
    loses whatever it read since its last commit."""

    def __init__(self) -> None:
        self.last = 0
        self.view: dict[tuple[str, str], object] = {}
        self.seen: list[int] = []  # change numbers committed, in order

    def read(self, db: p2psync.Database, count: int, *, commit: bool) -> None:
        taken = []
        for change in db.changes(self.last):
            taken.append(change)
            if len(taken) == count:
                break
        if not commit:  # crashed after reading: nothing of it was committed
            return
        for change in taken:
            record = (change.collection, change.key)
            if change.deleted:
                self.view.pop(record, None)
            else:
                self.view[record] = change.value
            self.seen.append(change.change)
            self.last = change.change


@pytest.mark.pure
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(STEP, max_size=30))
def test_a_consumer_that_crashes_and_restarts_sees_each_change_once(
    steps: list[tuple[object, ...]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for name in ("a", "b"):
            home_mod.init(base / name, name)
        a, b = p2psync.open(base / "a"), p2psync.open(base / "b")
        consumer = Consumer()
        try:
            for step in steps:
                if step[0] == "local":
                    collection, key = KEYS[int(step[1])]  # type: ignore[call-overload]
                    if step[2] is None:
                        a.delete(collection, key)
                    else:
                        a.put(collection, key, step[2])  # type: ignore[arg-type]
                elif step[0] == "remote":  # b writes, a receives b's log
                    collection, key = KEYS[int(step[1])]  # type: ignore[call-overload]
                    b.put(collection, key, step[2])  # type: ignore[arg-type]
                    a.store.ingest(list(b.export(b.identity.public_key)), p2psync.clock.now_ms())
                elif step[0] in ("consume", "crash"):
                    consumer.read(a, int(step[1]), commit=step[0] == "consume")  # type: ignore[call-overload]
                else:  # the consumer's and the store's process restart
                    a.close()
                    a = p2psync.open(base / "a")
            consumer.read(a, 10**9, commit=True)
            assert consumer.seen == sorted(set(consumer.seen)), "a change seen twice"
            held = {
                (collection, key): a.get(collection, key)
                for collection, key in KEYS
                if a.get(collection, key) is not None
            }
            assert consumer.view == held, "the consumer's view differs from the store"
            assert consumer.last == a.last_change()
        finally:
            a.close()
            b.close()


# ------------------------------------------------------------ p2psync watch


@pytest.mark.process
def test_watch_prints_a_change_made_by_another_process(tmp_path: Path) -> None:
    home = tmp_path / "a"
    home_mod.init(home, "a")
    base = [sys.executable, "-m", "p2psync", "--home", str(home)]
    subprocess.run([*base, "put", "stock", "before", "1"], check=True, capture_output=True)
    watcher = subprocess.Popen(
        [*base, "watch", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.0)  # it starts from the latest change: 'before' is not shown
        subprocess.run([*base, "put", "stock", "after", '{"qty": 2}'], check=True)
        assert watcher.stdout is not None
        line = watcher.stdout.readline()
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
    assert '"key":"after"' in line and '"value":{"qty":2}' in line and '"change":2' in line
    everything = subprocess.run(
        [*base, "watch", "--since", "0", "--no-follow"], check=True, capture_output=True, text=True
    )
    assert everything.stdout.splitlines()[0].startswith("#1 stock/before = 1 by ")
    bad = subprocess.run(
        [*base, "watch", "--since", "-3"], check=False, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.trio_memory
async def test_watch_async_yields_changes_as_they_are_applied(make_db: MakeDb) -> None:
    db = make_db("a")
    db.put("stock", "before", 0)
    seen: list[tuple[int, str]] = []

    async def consume() -> None:
        async for change in db.watch_async(since=db.last_change(), poll=0.01):
            seen.append((change.change, change.key))
            if len(seen) == 2:
                return

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.sleep(0.05)
            db.put("stock", "x", 1)
            await trio.sleep(0.05)
            db.put("stock", "y", 2)
    assert seen == [(2, "x"), (3, "y")]
    with pytest.raises(p2psync.UsageError):
        async for _ in db.watch_async(since=-1):
            pass
