"""The relay mailbox's SQLite store alone (no relay, no network): deposits of
4 KiB envelopes (one transaction each) and fetch+delete (one fetch, then one
delete transaction per envelope), per second; the median of R runs, each on a
fresh file. A first figure for the relay benchmark.

    PYTHONPATH=. .venv/bin/python scripts/mailbox_rate.py [N] [R]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from p2psync.core.envelope import EnvelopeClass
from p2psync.core.mailbox import Deposit, MailboxPolicy, Stored
from p2psync.store.mailbox import SqliteMailbox

SIZE = 4096
RECIPIENT, SENDER = bytes([1]) * 32, bytes([2]) * 32
NOW = 1_700_000_000_000


def one_run(n: int) -> tuple[float, float]:
    """(deposits/s, fetch+deletes/s) of one run of ``n`` envelopes."""
    with tempfile.TemporaryDirectory() as tmp:
        box = SqliteMailbox(Path(tmp) / "mailbox.db")
        try:
            box.set_policy(RECIPIENT, MailboxPolicy(1, frozenset({SENDER})))
            blob = bytes(SIZE)
            start = time.perf_counter()
            for seq in range(1, n + 1):
                deposit = Deposit(RECIPIENT, SENDER, seq, EnvelopeClass.DATA, 0, SIZE)
                assert isinstance(box.deposit(deposit, blob, NOW), Stored)
            deposits = n / (time.perf_counter() - start)
            start = time.perf_counter()
            done = 0
            while batch := box.fetch(RECIPIENT, 0, 100, NOW):
                for envelope in batch:
                    done += box.delete(RECIPIENT, [(envelope.header.sender, envelope.header.seq)])
            assert done == n
            fetch_deletes = n / (time.perf_counter() - start)
        finally:
            box.close()
    return deposits, fetch_deletes


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    results = [one_run(n) for _ in range(runs)]
    for name, figures in zip(("deposit", "fetch+delete"), zip(*results, strict=True), strict=True):
        print(
            f"{name:13} {statistics.median(figures):8.0f} envelopes/s "
            f"(median of {runs}; min {min(figures):.0f}, max {max(figures):.0f}; "
            f"{n} x {SIZE} B, one transaction each)"
        )


if __name__ == "__main__":
    main()
