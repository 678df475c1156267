"""p2psync benchmarks. Run through ``scripts/bench`` (which prepares .venv).

    scripts/bench local [--records N] [--runs R]

``local`` measures the local core (issue 2): single puts, a bulk load of N
records (one entry each), and ingest of N entries from another author (verify +
apply) with the peak RSS of the ingesting process. Workload: collection
``bench``, key ``k<i>``, a ~100-byte map value. Every figure is the median of R
runs with min and max beside it; each run starts from a fresh home.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import p2psync
from p2psync import home as home_mod

BATCH = 2000  # entries per ingest call (one store transaction each)


def value(i: int) -> dict[str, object]:
    """A ~100-byte record value."""
    return {"i": i, "party": f"party-{i % 977}", "amount": i * 7 % 100_000, "memo": "x" * 40}


def changes(count: int) -> Iterator[list[p2psync.Change]]:
    for i in range(count):
        yield [p2psync.Change(p2psync.OpKind.PUT, "bench", f"k{i}", value(i))]


def fresh_home(base: Path, name: str) -> Path:
    path = base / f"{name}-{time.monotonic_ns()}"
    home_mod.init(path, name)
    return path


def summary(samples: list[float]) -> str:
    return (
        f"{statistics.median(samples):>12,.0f}  (min {min(samples):,.0f}, max {max(samples):,.0f},"
        f" n={len(samples)})"
    )


def bench_single_puts(base: Path, runs: int, count: int = 1000) -> list[float]:
    rates = []
    for _ in range(runs):
        with p2psync.open(fresh_home(base, "puts")) as db:
            started = time.perf_counter()
            for i in range(count):
                db.put("bench", f"k{i}", value(i))
            rates.append(count / (time.perf_counter() - started))
    return rates


def bench_cli_puts(base: Path, runs: int) -> list[float]:
    home = fresh_home(base, "cliputs")
    rates = []
    for i in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "p2psync",
                "--home",
                str(home),
                "put",
                "bench",
                f"k{i}",
                json.dumps(value(i)),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        rates.append(1 / (time.perf_counter() - started))
    return rates


def bench_bulk(base: Path, runs: int, count: int) -> list[float]:
    rates = []
    for _ in range(runs):
        with p2psync.open(fresh_home(base, "bulk")) as db:
            started = time.perf_counter()
            db.write(changes(count))
            rates.append(count / (time.perf_counter() - started))
    return rates


def bench_cli_bulk(base: Path, runs: int, count: int) -> list[float]:
    lines = base / "bulk.jsonl"
    with lines.open("w") as out:
        for i in range(count):
            out.write(json.dumps({"collection": "bench", "key": f"k{i}", "value": value(i)}) + "\n")
    rates = []
    for _ in range(runs):
        home = fresh_home(base, "clibulk")
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "p2psync", "--home", str(home), "put", "--from", str(lines)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        rates.append(count / (time.perf_counter() - started))
    return rates


def write_frames(path: Path, wires: Iterator[bytes]) -> int:
    count = 0
    with path.open("wb") as out:
        for wire in wires:
            out.write(struct.pack(">I", len(wire)))
            out.write(wire)
            count += 1
    return count


def read_frames(path: Path, batch: int) -> Iterator[list[bytes]]:
    with path.open("rb") as source:
        chunk: list[bytes] = []
        while header := source.read(4):
            chunk.append(source.read(struct.unpack(">I", header)[0]))
            if len(chunk) == batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def peak_rss_kb() -> int:
    """Peak resident set of this process (VmHWM: unlike ru_maxrss, reset by exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def ingest_worker(home: str, frames: str) -> None:
    """Runs in a fresh process: ingest every frame, report time and memory."""
    with p2psync.open(home) as db:
        baseline = peak_rss_kb()
        started = time.perf_counter()
        count = 0
        for chunk in read_frames(Path(frames), BATCH):
            result = db.ingest(chunk)
            if result.rejected or result.held:
                raise SystemExit(f"unexpected: {result.rejected[:1]} held={len(result.held)}")
            count += len(result.accepted)
        elapsed = time.perf_counter() - started
    peak = peak_rss_kb()
    print(
        json.dumps({"count": count, "seconds": elapsed, "baseline_kb": baseline, "peak_kb": peak})
    )


def bench_ingest(base: Path, runs: int, count: int) -> tuple[list[float], list[float], list[float]]:
    with p2psync.open(fresh_home(base, "author")) as author:
        author.write(changes(count))
        frames = base / "entries.frames"
        written = write_frames(frames, author.export(author.identity.public_key))
    assert written == count
    rates, peaks, baselines = [], [], []
    for _ in range(runs):
        receiver = fresh_home(base, "receiver")
        out = subprocess.run(
            [sys.executable, __file__, "_ingest_worker", str(receiver), str(frames)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        report = json.loads(out)
        assert report["count"] == count
        rates.append(count / report["seconds"])
        peaks.append(report["peak_kb"] / 1024)
        baselines.append(report["baseline_kb"] / 1024)
        with p2psync.open(receiver) as db:
            verified = db.verify()
            assert verified.ok and verified.entries == count
    return rates, peaks, baselines


def run_local(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-") as tmp:
        base = Path(tmp)
        rows: list[tuple[str, Callable[[], list[float]]]] = [
            (
                "put (API, one committed entry per call), puts/s",
                lambda: bench_single_puts(base, args.runs),
            ),
            ("put (CLI process per call), puts/s", lambda: bench_cli_puts(base, args.runs * 4)),
            (
                f"bulk load {args.records:,} records via API, entries/s",
                lambda: bench_bulk(base, args.runs, args.records),
            ),
            (
                f"bulk load {args.records:,} records via `put --from`, entries/s",
                lambda: bench_cli_bulk(base, args.runs, args.records),
            ),
        ]
        print(f"p2psync local benchmarks — {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        for label, measure in rows:
            print(f"{label:<60} {summary(measure())}", flush=True)
        rates, peaks, baselines = bench_ingest(base, args.runs, args.records)
        label = f"ingest {args.records:,} entries (verify+apply, batches of {BATCH}), entries/s"
        print(f"{label:<60} {summary(rates)}")
        print(f"{'  peak RSS of the ingesting process, MiB':<60} {summary(peaks)}")
        print(
            f"{'  RSS before ingest (interpreter + imports + open), MiB':<60} {summary(baselines)}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_ingest_worker":
        ingest_worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="suite", required=True)
    local = sub.add_parser("local", help="local core: puts, bulk load, ingest")
    local.add_argument("--records", type=int, default=100_000)
    local.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.suite == "local":
        run_local(args)


if __name__ == "__main__":
    main()
