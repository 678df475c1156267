"""Issue 13, item 4: a home's secrets are its user's alone, whatever the umask and
whether the folder existed: home 0700, the store and its -wal/-shm 0600, the agent's
sockets 0600 in that folder; `p2psync verify` warns about anything looser (an older
home, a copy, a chmod by hand) and repairs nothing silently but the store files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2psync.store.connection import connect
from tests.agents import wait_for

pytestmark = pytest.mark.process


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def p2psync(home: Path, umask: int, *args: str) -> subprocess.Popen[str]:
    code = f"import os, sys; os.umask({umask}); from p2psync.cli.main import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "--home", str(home), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(home: Path, umask: int, *args: str) -> str:
    process = p2psync(home, umask, *args)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out + err


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_an_existing_folder_becomes_a_private_home_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    home = tmp_path / "site"
    home.mkdir(mode=0o775)
    os.chmod(home, 0o775)
    run(home, umask, "init", "--name", "site")
    run(home, umask, "put", "c", "k", "1")
    agent = p2psync(home, umask, "run", "--no-discovery", "--listen", "127.0.0.1:0")
    try:
        wait_for(lambda: (home / "control.sock").exists() and (home / "agent.sock").exists(), 15)
        assert mode(home) == 0o700
        for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm", "identity.key"):
            if (home / name).exists():
                assert mode(home / name) == 0o600, (name, oct(mode(home / name)))
        for name in ("control.sock", "agent.sock"):
            assert mode(home / name) & 0o077 == 0, (name, oct(mode(home / name)))
    finally:
        agent.terminate()
        agent.communicate(timeout=30)


def test_verify_warns_about_loose_permissions(tmp_path: Path) -> None:
    home = tmp_path / "site"
    run(home, 0o022, "init", "--name", "site")
    run(home, 0o022, "put", "c", "k", "1")
    assert "permission" not in run(home, 0o022, "verify").lower()
    os.chmod(home, 0o755)
    os.chmod(home / "agent.json", 0o644) if (home / "agent.json").exists() else None
    out = run(home, 0o022, "verify")
    assert "0755" in out and str(home) in out and "chmod 700" in out, out


def test_a_second_connection_keeps_the_first_ones_locks(tmp_path: Path) -> None:
    """Opening and closing a descriptor on the database drops every POSIX lock this
    process holds on it (SQLite's included): another process then believes it is the
    last one open, checkpoints and deletes the -wal and -shm in use here, and what it
    writes next is never seen by this process (nor what this process writes, kept)."""
    path = tmp_path / "store.sqlite"
    first = connect(path)
    first.execute("CREATE TABLE t (v INTEGER)")
    second = connect(path)  # the agent opens a writer and a reader
    script = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('INSERT INTO t VALUES (1)'); c.commit(); c.close()"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=30)
    assert first.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    assert (tmp_path / "store.sqlite-wal").exists()  # still the one this process uses
    first.close()
    second.close()
