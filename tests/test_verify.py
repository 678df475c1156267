"""verify: any single changed bit in a stored entry, payload or signature is found."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import p2psync
from p2psync import home as home_mod
from p2psync.core.entry import entry_id
from tests.helpers import flip_bit

pytestmark = pytest.mark.pure


@pytest.fixture(scope="module")
def template() -> Iterator[Path]:
    """A home with two authors' entries, copied fresh for every example."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        home_mod.init(a)
        home_mod.init(b)
        with p2psync.open(b) as other:
            for i in range(3):
                other.put("c", f"b{i}", {"v": i})
            wires = list(other.export())
        with p2psync.open(a) as db:
            db.ingest(wires)
            for i in range(3):
                db.put("c", f"a{i}", {"v": "x" * i})
            with db.transaction() as tx:
                tx.put("c", "t1", 1)
                tx.put("d", "t2", [1, 2])
        yield a


def corrupt(home: Path, rowid: int, column: str, bit: int) -> bytes:
    conn = sqlite3.connect(home / "store.sqlite")
    try:
        rows = conn.execute(
            f"SELECT author, seq, {column} FROM entries ORDER BY author, seq"
        ).fetchall()
        author, seq, data = rows[rowid % len(rows)]
        damaged = flip_bit(data, bit % (len(data) * 8))
        conn.execute(
            f"UPDATE entries SET {column} = ? WHERE author = ? AND seq = ?", (damaged, author, seq)
        )
        conn.commit()
        return damaged
    finally:
        conn.close()


def test_clean_store_verifies(template: Path) -> None:
    with p2psync.open(template) as db:
        report = db.verify()
    assert report.ok and report.entries == 7 and report.authors == 2


@given(st.integers(0, 100), st.sampled_from(["signed", "payloads", "id"]), st.integers(0, 10_000))
@settings(max_examples=150, deadline=None)
def test_any_single_bit_flip_is_detected(template: Path, row: int, column: str, bit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "h"
        shutil.copytree(template, home)
        corrupt(home, row, column, bit)
        with p2psync.open(home) as db:
            report = db.verify()
    assert not report.ok, f"flip of bit {bit} in {column} of row {row} went unnoticed"


def test_consistently_rewritten_last_entry_fails_its_signature(
    template: Path, tmp_path: Path
) -> None:
    """Flip a signature bit and fix up the stored ID and head to match: only the
    signature check can notice."""
    home = tmp_path / "h"
    shutil.copytree(template, home)
    conn = sqlite3.connect(home / "store.sqlite")
    author, seq, signed = conn.execute(
        "SELECT author, seq, signed FROM entries ORDER BY author, seq DESC LIMIT 1"
    ).fetchone()
    damaged = flip_bit(signed, len(signed) * 8 - 1)
    new_id = entry_id(damaged)
    conn.execute(
        "UPDATE entries SET signed = ?, id = ? WHERE author = ? AND seq = ?",
        (damaged, new_id, author, seq),
    )
    conn.execute("UPDATE authors SET head_id = ? WHERE idx = ?", (new_id, author))
    conn.commit()
    conn.close()
    with p2psync.open(home) as db:
        report = db.verify()
    assert not report.ok and "signature does not verify" in report.problems[0]
