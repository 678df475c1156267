"""`p2psync bundle export/import/ledger` as real processes: A's file applied on B,
B's receipt file acknowledging on A; repeats, tampering and files not for us."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import p2psync
from p2psync import home as home_mod
from p2psync.core.rules import Route, Terms
from tests.test_mail import pair

pytestmark = pytest.mark.process


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(home), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def ok(home: Path, *args: str) -> str:
    result = cli(home, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, Path, Path]:
    paths = [tmp_path / n for n in ("a", "b", "c")]
    for path, name in zip(paths, ("Head office", "Branch 1", "Other"), strict=True):
        home_mod.init(path, name)
    with p2psync.open(paths[0]) as a, p2psync.open(paths[1]) as b:
        pair(a, b, Terms.make(["*"], route=Route.RELAY))
        a.write([p2psync.Change(p2psync.OpKind.PUT, "c", f"k{i}", {"i": i})] for i in range(300))
    return paths[0], paths[1], paths[2]


def test_export_import_and_the_receipt_back(homes: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, b, _ = homes
    bundle = tmp_path / "to-branch.p2p"
    said = ok(a, "bundle", "export", "Branch 1", str(bundle))
    assert said.startswith("wrote 1 envelope (300 entries,") and said.rstrip().endswith(str(bundle))
    ledger = json.loads(ok(a, "bundle", "ledger", "--json"))
    assert [r["state"] for r in ledger["rows"]] == ["handed-over"]
    assert ledger["rows"][0]["where"] == bundle.name
    said = ok(b, "bundle", "import", str(bundle))
    assert "from Head office: 1 envelope, 300 entries applied, 0 held, 0 refused" in said
    receipt = tmp_path / "to-branch.p2p.receipt"
    assert f"wrote 1 receipt to {receipt}" in said
    assert json.loads(ok(b, "get", "c", "k299")) == {"i": 299}
    again = ok(b, "bundle", "import", str(bundle))
    assert again.startswith("nothing new in") and "receipt" not in again
    said = ok(a, "bundle", "import", str(receipt))
    assert "from Branch 1: 1 envelope acknowledged" in said
    assert "acknowledged" in ok(a, "bundle", "ledger", "Branch 1")
    assert ok(a, "bundle", "import", str(receipt)).startswith("nothing new in")
    said = ok(a, "bundle", "export", "Branch 1", str(tmp_path / "again.p2p"))
    assert said.startswith("nothing to send to Branch 1")
    assert not (tmp_path / "again.p2p").exists()


def test_tampered_foreign_and_other_files_are_refused(
    homes: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    a, b, c = homes
    bundle = tmp_path / "x.p2p"
    ok(a, "bundle", "export", "Branch 1", str(bundle))
    data = bundle.read_bytes()
    for where in (0, 25, len(data) // 2, len(data) - 1):
        changed = bytearray(data)
        changed[where] ^= 0x01
        bad = tmp_path / f"bad-{where}.p2p"
        bad.write_bytes(bytes(changed))
        result = cli(b, "bundle", "import", str(bad))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    result = cli(b, "bundle", "import", str(other))
    assert result.returncode == 1 and "not a p2psync bundle file" in result.stderr
    result = cli(c, "bundle", "import", str(bundle))
    assert result.returncode == 1 and "not for this agent" in result.stderr
    result = cli(b, "bundle", "import", str(tmp_path / "missing.p2p"))
    assert result.returncode == 1 and "cannot read" in result.stderr
    with p2psync.open(b) as db:
        assert list(db.scan("c")) == []  # nothing applied by any of them
    assert "300 entries applied" in ok(b, "bundle", "import", str(bundle))
