"""kill -9 in the middle of large writes: the store reopens, verifies, and keeps
everything that was committed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest

import p2psync
from p2psync import home as home_mod

pytestmark = [pytest.mark.process, pytest.mark.slow]

INGESTER = """
import sys, cbor2, p2psync
home, source = sys.argv[1], sys.argv[2]
wires = cbor2.loads(open(source, "rb").read())
with p2psync.open(home) as db:
    for start in range(0, len(wires), 500):
        result = db.ingest(wires[start:start + 500])
        assert not result.rejected, result.rejected[:1]
        print(db.authors()[-1].seq if db.authors() else 0, flush=True)
print("done", flush=True)
"""

ENTRIES = 20_000


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("crash")
    home_mod.init(base / "author")
    with p2psync.open(base / "author") as db:
        db.write(
            [p2psync.Change(p2psync.OpKind.PUT, "bench", f"k{i}", {"i": i, "v": "x" * 80})]
            for i in range(ENTRIES)
        )
        wires = list(db.export())
    path = base / "wires.cbor"
    path.write_bytes(cbor2.dumps(wires))
    return path


def applied(home: Path) -> tuple[int, int, p2psync.VerifyReport]:
    with p2psync.open(home) as db:
        seqs = [a.seq for a in db.authors() if a.seq]
        records = sum(count for _, count in db.collections())
        return (seqs[0] if seqs else 0), records, db.verify()


def test_kill_9_during_ingest_loses_nothing_committed(source: Path, tmp_path: Path) -> None:
    home = tmp_path / "receiver"
    home_mod.init(home)
    rng = random.Random(os.getpid())
    kills = 0
    for _round in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", INGESTER, str(home), str(source)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        committed = 0
        deadline = time.monotonic() + rng.uniform(0.3, 1.5)
        line = child.stdout.readline()  # blocks until the first batch is committed
        while line and time.monotonic() < deadline:
            if line.strip() == "done":
                break
            committed = int(line)
            line = child.stdout.readline()
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait()
        child.stdout.close()
        seq, records, report = applied(home)
        assert report.ok, report.problems
        assert seq >= committed, f"committed {committed} but only {seq} survived"
        assert records == seq  # each entry wrote one new record: no half-applied batch
    assert kills >= 3
    # a final uninterrupted run completes the set
    subprocess.run(
        [sys.executable, "-c", INGESTER, str(home), str(source)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seq, records, report = applied(home)
    assert report.ok and seq == ENTRIES and records == ENTRIES


def test_kill_9_during_bulk_load_is_all_or_nothing(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home_mod.init(home)
    lines = tmp_path / "load.jsonl"
    with lines.open("w") as out:
        for i in range(30_000):
            out.write(json.dumps({"collection": "c", "key": f"k{i}", "value": {"i": i}}) + "\n")
    kills = 0
    for delay in (0.4, 0.8, 1.2):
        child = subprocess.Popen(
            [sys.executable, "-m", "p2psync", "--home", str(home), "put", "--from", str(lines)],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(delay)
        if child.poll() is None:
            child.kill()
            kills += 1
        child.wait()
        seq, records, report = applied(home)
        assert report.ok
        assert seq % 30_000 == 0  # one store transaction: all of a load or none of it
        assert records == (30_000 if seq else 0)
    assert kills >= 1
