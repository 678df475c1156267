"""The Python API: homes, records, transactions, several processes on one home."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import p2psync
from p2psync import home as home_mod

pytestmark = pytest.mark.pure


def test_open_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(p2psync.HomeError, match="p2psync init"):
        p2psync.open(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(p2psync.HomeError):
        p2psync.open(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_init_never_overwrites_and_protects_the_key(tmp_path: Path) -> None:
    created = home_mod.init(tmp_path / "h", "Branch 1")
    key_file = tmp_path / "h" / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    before = key_file.read_bytes()
    with pytest.raises(p2psync.HomeError, match="never overwritten"):
        home_mod.init(tmp_path / "h")
    assert key_file.read_bytes() == before
    with p2psync.open(tmp_path / "h") as db:
        assert db.device_id == created.identity.device_id
        assert db.home.name == "Branch 1"
    key_file.chmod(0o644)
    with pytest.raises(p2psync.HomeError, match="chmod 600"):
        p2psync.open(tmp_path / "h")


def test_home_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PSYNC_HOME", str(tmp_path / "env"))
    assert home_mod.resolve(None) == tmp_path / "env"
    assert home_mod.resolve(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("P2PSYNC_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert home_mod.resolve(None) == tmp_path / "xdg" / "p2psync"


def test_records(db: p2psync.Database) -> None:
    db.put("vouchers", "V-1001", {"amount": 1200, "party": "ACME"})
    db.put("vouchers", "V-1002", {"amount": 5})
    db.put("vouchers", "W-1", None)
    assert db.get("vouchers", "V-1001") == {"amount": 1200, "party": "ACME"}
    assert db.get("vouchers", "nope") is None
    assert db.exists("vouchers", "W-1") and db.get("vouchers", "W-1") is None
    assert [k for k, _ in db.scan("vouchers", prefix="V-")] == ["V-1001", "V-1002"]
    assert db.delete("vouchers", "V-1002") is True
    assert db.delete("vouchers", "V-1002") is False
    assert db.delete("vouchers", "never") is False
    assert [k for k, _ in db.scan("vouchers")] == ["V-1001", "W-1"]
    assert db.collections() == [("vouchers", 2)]
    with pytest.raises(p2psync.InvalidRecord):
        db.put("bad*name", "k", 1)
    with pytest.raises(p2psync.InvalidRecord):
        db.put("c", "k", {"x": float("nan")})


def test_scan_pages_and_prefix_edges(db: p2psync.Database) -> None:
    db.write([[p2psync.Change(p2psync.OpKind.PUT, "c", f"k{i:05d}", i)] for i in range(2500)])
    db.put("c", "k\U0010ffffz", 1)
    db.put("c", "l", 1)
    keys = [k for k, _ in db.scan("c", prefix="k")]
    assert len(keys) == 2501 and keys == sorted(keys)
    assert [k for k, _ in db.scan("c", prefix="k\U0010ffff")] == ["k\U0010ffffz"]


def test_transaction_is_one_entry_and_atomic(db: p2psync.Database) -> None:
    db.put("drafts", "V-1", {"x": 1})
    with db.transaction() as tx:
        tx.put("ledgers", "ACME", {"balance": 1200})
        tx.delete("drafts", "V-1")
        assert tx.get("drafts", "V-1") is None
        assert tx.get("ledgers", "ACME") == {"balance": 1200}
    entries = list(db.log())
    assert len(entries) == 2 and len(entries[1].ops) == 2
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.put("ledgers", "ACME", {"balance": 0})
        raise RuntimeError("changed my mind")
    assert db.get("ledgers", "ACME") == {"balance": 1200}
    assert len(list(db.log())) == 2


def test_readers_do_not_wait_for_a_writer(db: p2psync.Database) -> None:
    db.put("c", "k", 1)
    writer = sqlite3.connect(db.home.store_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE meta SET value = value WHERE key = 'clock'")
    started = time.monotonic()
    assert db.get("c", "k") == 1
    assert time.monotonic() - started < 0.5
    writer.execute("ROLLBACK")
    writer.close()


WRITER = """
import sys, p2psync
home, who, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with p2psync.open(home) as db:
    for i in range(count):
        db.put("c", f"{who}-{i}", i)
"""


@pytest.mark.process
def test_several_processes_write_one_home(db: p2psync.Database) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(db.path), f"p{n}", "60"])
        for n in range(4)
    ]
    for i in range(60):
        db.put("c", f"main-{i}", i)
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert len(list(db.scan("c"))) == 300
    report = db.verify()
    assert report.ok and report.entries == 300
    assert [a.seq for a in db.authors()] == [300]


def test_key_file_layout(tmp_path: Path) -> None:
    home_mod.init(tmp_path / "h")
    assert sorted(os.listdir(tmp_path / "h"))[:2] == ["config.json", "identity.key"]


def test_opening_and_reading_do_not_wait_for_a_writer(db: p2psync.Database) -> None:
    db.put("c", "k", 1)
    writer = sqlite3.connect(db.home.store_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with p2psync.open(db.path) as other:
            assert other.get("c", "k") == 1
            assert other.conflicts() == []
        assert time.monotonic() - started < 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()


@pytest.mark.parametrize(
    ("collection", "key", "value"),
    [
        ("c", "bad\ud800key", 1),
        ("c\ud800", "k", 1),
        ("c", "k", {"text": "lone \udc00 surrogate"}),
        ("c", "k", {"\ud800": 1}),
    ],
)
def test_strings_that_cannot_be_encoded_are_refused(
    db: p2psync.Database, collection: str, key: str, value: object
) -> None:
    with pytest.raises(p2psync.InvalidRecord):
        db.put(collection, key, value)  # type: ignore[arg-type]
