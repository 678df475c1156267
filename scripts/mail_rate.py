"""How fast the agent's mailbox side makes and consumes envelopes (issue 10).

For N records (~100-byte values, the data of ``scripts/bench.py``) written by A,
paired with B by a rule with route relay, each run measures on one machine:

* **bulk load** — A writes the N records through the API (the local reference);
* **outgoing** — A: what B lacks read, packed into bundles, signed and sealed,
  recorded in the ledger (``Mailer.outgoing``), records/s;
* **incoming** — B: every envelope opened, applied through ingest, and the
  receipts made (``Mailer.incoming`` + ``outgoing(receipts_only)``), records/s;
* **bytes per entry** — the envelopes' wire bytes over N, against what a direct
  sync's ``Entries`` messages carry for the same entries (batches of 2,000 as
  ``net/sync.py`` sends them, plus the 16-byte AEAD tag and 4-byte length of each frame).

    PYTHONPATH=. .venv/bin/python scripts/mail_rate.py [--records 100000] [--runs 3]

Prints the median and the spread (min-max) of the runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import changes

import p2psync
from p2psync import home as home_mod
from p2psync.clock import now_ms
from p2psync.core import messages
from p2psync.core.rules import Route, Terms
from p2psync.mail.mailer import Mailer
from tests.test_mail import pair

SYNC_BATCH = 2000
FRAME_OVERHEAD = 16 + 4


def one_run(base: Path, count: int) -> dict[str, float]:
    home_mod.init(base / "a", "A")
    home_mod.init(base / "b", "B")
    with p2psync.open(base / "a") as a, p2psync.open(base / "b") as b:
        pair(a, b, Terms.make(["*"], route=Route.RELAY))
        peer_b, peer_a = b.identity.public_key, a.identity.public_key
        started = time.perf_counter()
        a.write(changes(count))
        bulk = count / (time.perf_counter() - started)

        started = time.perf_counter()
        out = Mailer(a).outgoing(peer_b, now_ms())
        outgoing = count / (time.perf_counter() - started)
        assert sum(e.entries for e in out) == count

        started = time.perf_counter()
        mailer_b = Mailer(b)
        applied = sum(mailer_b.incoming(e.wire, now_ms()).applied for e in out)
        receipts = mailer_b.outgoing(peer_a, now_ms(), receipts_only=True)
        incoming = count / (time.perf_counter() - started)
        assert applied == count and receipts

        wires = [s.wire for s in a.store.entries_after({peer_a: 0}, count, 1 << 40)]
        direct = sum(
            len(messages.encode(messages.Entries(n, wires[i : i + SYNC_BATCH]))) + FRAME_OVERHEAD
            for n, i in enumerate(range(0, len(wires), SYNC_BATCH), 1)
        )
        mailed = sum(len(e.wire) for e in out)
    return {
        "bulk load, records/s": bulk,
        "outgoing (A: read, pack, sign, seal, ledger), records/s": outgoing,
        "incoming (B: open, apply, receipt), records/s": incoming,
        "outgoing / bulk load": outgoing / bulk,
        "incoming / bulk load": incoming / bulk,
        "envelopes, bytes per entry": mailed / count,
        "direct sync Entries frames, bytes per entry": direct / count,
        "envelope bytes / direct bytes": mailed / direct,
        "envelopes": len(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: list[dict[str, float]] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="mail-rate-") as base:
            results.append(one_run(Path(base), args.records))
    print(f"{args.records:,} records, {args.runs} runs: median (min-max)")
    for name in results[0]:
        values = [r[name] for r in results]
        spread = f"{min(values):,.2f}-{max(values):,.2f}"
        print(f"  {name:<58} {statistics.median(values):>12,.2f}  ({spread})")


if __name__ == "__main__":
    main()
