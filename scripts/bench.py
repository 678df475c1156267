"""p2psync benchmarks. Run through ``scripts/bench`` (which prepares .venv).

    scripts/bench local [--records N] [--runs R]
    scripts/bench sync  [--records N] [--runs R] [--live-writes W]
    scripts/bench lan   [--runs R] [--agents N]          (root: builds network namespaces)
    scripts/bench stop  [--runs R]
    scripts/bench relay [--records N] [--runs R] [--no-scale] [--no-mailbox] [--no-splice]
                        [--live-writes W]
    scripts/bench relay --store postgresql [--runs R] [--failover-runs N] [--per-sender M]

``local`` measures the local core (issue 2): single puts, a bulk load of N
records (one entry each), and ingest of N entries from another author (verify +
apply) with the peak RSS of the ingesting process. Workload: collection
``bench``, key ``k<i>``, a ~100-byte map value. Every figure is the median of R
runs with min and max beside it; each run starts from a fresh home.

``sync`` runs two agent processes on 127.0.0.1 (issue 3):

* W1 initial sync of N records from A to an empty B: records/s until B holds
  all N, counted from launching B's agent process and from B listening (so
  without its ~0.2 s start-up), and the peak RSS (VmHWM) of each agent;
* W2 live latency: W single puts at A (API, another process than the agent)
  ~10 ms apart, from the put call to the record readable in B's store;
* W3 no-op resync with N records on both sides: bytes on the wire (handshake
  included) and time from dialling to "in sync".

``lan`` runs agents in a LAN of network namespaces (tests/lan.py):

* start-to-synced: a paired agent is restarted after writing while stopped;
  time from starting its process until its peer holds the new record — with
  the peer's address known, and with it forgotten (found again by mDNS);
* discovery of N agents started together: time until each lists the N-1 others;
* CPU used by an idle agent over 60 s, with discovery on and off.

``stop`` times one agent on 127.0.0.1 from SIGTERM to its exit (issue 8): without
discovery, and with discovery bound to 127.0.0.1 (nothing sent elsewhere) stopped
at once after ``listening on`` (still probing and announcing on mDNS) and once
advertised (3 s after; it sends its goodbye).

``relay`` runs a relay node and agents on 127.0.0.1 (issue 10): N records from A
to B only through the relay (``p2psync sync`` on each side, against the bulk
load), bytes per entry through the relay against a direct sync, and the relay
with 1,000 mailboxes holding envelopes and 50 sessions open while 10 senders
deposit (RSS, deposits/s, fetches/s). See ``scripts/bench_relay.py``.

``relay --store postgresql`` measures the relay's mailbox on PostgreSQL instead
(issue 12): throughput of SQLite, PostgreSQL and two nodes on one database side by
side in each run, and failover to a synchronous standby after kill -9 of the
primary. See ``scripts/bench_pg.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

import p2psync
from p2psync import home as home_mod
from p2psync import pairing
from p2psync.agent.process import AgentProcess
from p2psync.core.canonical import Value
from p2psync.core.rules import Terms

BATCH = 2000  # entries per ingest call (one store transaction each)


def value(i: int) -> Value:
    """A ~100-byte record value."""
    return {"i": i, "party": f"party-{i % 977}", "amount": i * 7 % 100_000, "memo": "x" * 40}


def changes(count: int) -> Iterator[list[p2psync.Change]]:
    for i in range(count):
        yield [p2psync.Change(p2psync.OpKind.PUT, "bench", f"k{i}", value(i))]


def fresh_home(base: Path, name: str) -> Path:
    path = base / f"{name}-{time.monotonic_ns()}"
    home_mod.init(path, name)
    return path


def summary(samples: Sequence[float]) -> str:
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
        if args.ingest_only:
            rows = []
        for label, measure in rows:
            print(f"{label:<60} {summary(measure())}", flush=True)
        rates, peaks, baselines = bench_ingest(base, args.runs, args.records)
        label = f"ingest {args.records:,} entries (verify+apply, batches of {BATCH}), entries/s"
        print(f"{label:<60} {summary(rates)}")
        print(f"{'  peak RSS of the ingesting process, MiB':<60} {summary(peaks)}")
        print(
            f"{'  RSS before ingest (interpreter + imports + open), MiB':<60} {summary(baselines)}"
        )


# ---------------------------------------------------------------- sync


def start_agent(home: Path, *extra: str) -> AgentProcess:
    agent = AgentProcess(home, args=["--no-discovery", "--quiet", *extra])
    agent.start()
    return agent


def head_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(head_seq) FROM authors").fetchone()
    return int(row[0] or 0)


def pair(a: Path, b: Path, b_address: str | None) -> None:
    """``a`` proposes an everything-both-ways rule to ``b`` (both sides doing it is a pair)."""
    with p2psync.open(a) as db_a, p2psync.open(b) as db_b:
        pairing.propose(
            db_a,
            db_b.identity.public_key,
            Terms(),
            name="peer",
            addresses=[b_address] if b_address else [],
        )


def bench_w1(
    base: Path, source: Path, count: int
) -> tuple[float, float, float, float, Path, AgentProcess]:
    """One W1 run; returns records/s counted from launching B's agent process and
    from B listening (its start-up, ~0.2 s, excluded), peak RSS of A and B, B's
    home, A's agent."""
    a_home = base / f"a-{time.monotonic_ns()}"
    shutil.copytree(source, a_home)
    b_home = fresh_home(base, "b")
    pair(a_home, b_home, None)  # before A starts: it trusts B from the first dial
    agent_a = start_agent(a_home)
    pair(b_home, a_home, agent_a.address)
    started = time.perf_counter()
    agent_b = start_agent(b_home)  # dials A at once
    listening = time.perf_counter()
    conn = sqlite3.connect(f"file:{b_home / 'store.sqlite'}?mode=ro", uri=True)
    while head_seq(conn) < count:
        time.sleep(0.01)
        if time.perf_counter() - started > 3600:
            raise SystemExit("W1 did not finish")
    done = time.perf_counter()
    conn.close()
    rss_a, rss_b = agent_a.peak_rss_mib(), agent_b.peak_rss_mib()
    agent_b.stop()
    return count / (done - started), count / (done - listening), rss_a, rss_b, b_home, agent_a


def bench_w2(a_home: Path, b_home: Path, writes: int) -> list[float]:
    """Live latency in ms, write call at A to readable at B (both agents running)."""
    latencies = []
    conn = sqlite3.connect(f"file:{b_home / 'store.sqlite'}?mode=ro", uri=True)
    query = "SELECT 1 FROM records WHERE collection = 'live' AND key = ?"
    with p2psync.open(a_home) as db:
        for i in range(writes):
            key = f"w{i}-{time.monotonic_ns()}"
            started = time.perf_counter()
            db.put("live", key, value(i))
            while conn.execute(query, (key,)).fetchone() is None:
                time.sleep(0.0001)
                if time.perf_counter() - started > 10:
                    raise SystemExit("W2: a live write did not arrive within 10 s")
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(max(0.0, 0.010 - (time.perf_counter() - started)))
    conn.close()
    return latencies


def bench_w3(b_home: Path, a_key: bytes) -> tuple[int, float]:
    """No-op resync from B (no agent) to A's agent: bytes on the wire, ms."""
    from p2psync.net.oneshot import sync_once  # noqa: PLC0415 - only this suite needs trio

    with p2psync.open(b_home) as db:

        async def timed() -> tuple[int, float]:
            started = trio.current_time()
            [outcome] = await sync_once(db, [a_key], None, timeout=30)
            if not outcome.synced or outcome.received or outcome.sent:
                raise SystemExit(f"W3: not a no-op resync: {outcome}")
            return (
                outcome.bytes_sent + outcome.bytes_received,
                (trio.current_time() - started) * 1000,
            )

        return trio.run(timed)


def run_sync(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-") as tmp:
        base = Path(tmp)
        source = fresh_home(base, "source")
        with p2psync.open(source) as db:
            db.write(changes(args.records))
            a_key = db.identity.public_key
        print(
            f"p2psync sync benchmarks — {os.cpu_count()} CPUs, Python "
            f"{sys.version.split()[0]}, {args.records:,} records, two agents on 127.0.0.1"
        )
        rates, rates_up, rss_a, rss_b, w2, w3_bytes, w3_ms = [], [], [], [], [], [], []
        for run in range(args.runs):
            rate, rate_up, peak_a, peak_b, b_home, agent_a = bench_w1(
                base, source, args.records
            )
            rates.append(rate)
            rates_up.append(rate_up)
            rss_a.append(peak_a)
            rss_b.append(peak_b)
            try:
                for _ in range(3):
                    size, ms = bench_w3(b_home, a_key)
                    w3_bytes.append(size)
                    w3_ms.append(ms)
                if run == 0 and args.live_writes:
                    agent_b = start_agent(b_home)
                    time.sleep(1.0)  # connected and in sync
                    try:
                        w2 = bench_w2(agent_a.home, b_home, args.live_writes)
                    finally:
                        agent_b.stop()
            finally:
                agent_a.stop()
            shutil.rmtree(b_home)
        print(f"{'W1 initial sync, records/s (from launching B)':<60} {summary(rates)}")
        print(f"{'W1 initial sync, records/s (from B listening)':<60} {summary(rates_up)}")
        print(f"{'W1 peak RSS of the sending agent (A), MiB':<60} {summary(rss_a)}")
        print(f"{'W1 peak RSS of the receiving agent (B), MiB':<60} {summary(rss_b)}")
        if w2:
            ordered = sorted(w2)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            print(
                f"{f'W2 live latency over {len(w2)} writes, ms':<60} median "
                f"{statistics.median(w2):.2f}, p99 {p99:.2f}, min {min(w2):.2f}, "
                f"max {max(w2):.2f}"
            )
        print(f"{'W3 no-op resync, bytes on the wire':<60} {summary(w3_bytes)}")
        print(
            f"{'W3 no-op resync, ms to in sync':<60} "
            f"{statistics.median(w3_ms):>12.1f}  (min {min(w3_ms):.1f}, max {max(w3_ms):.1f},"
            f" n={len(w3_ms)})"
        )


# ---------------------------------------------------------------- lan


class LanAgent:
    def __init__(self, lan: Any, i: int, base: Path, name: str) -> None:
        self.lan, self.i, self.home, self.name = lan, i, base / name, name
        self.device_id = self.cli("init", "--name", name).splitlines()[0]
        self.agent = AgentProcess(
            self.home,
            listen="0.0.0.0:7717",
            args=["--quiet"],
            prefix=["ip", "netns", "exec", lan.host(i)],
        )

    def cli(self, *args: str) -> str:
        result = self.lan.p2psync(self.i, self.home, *args)
        if result.returncode != 0:
            raise SystemExit(f"{self.name}: p2psync {' '.join(args)}: {result.stderr}")
        return str(result.stdout)

    def start(self, *extra: str) -> float:
        """Start; returns the perf_counter at which the process was started."""
        started = time.perf_counter()
        self.agent.start(*extra)
        return started

    def stop(self) -> None:
        self.agent.stop()

    def cpu_seconds(self) -> float:
        return self.agent.cpu_seconds()

    def has(self, collection: str, key: str) -> bool:
        conn = sqlite3.connect(f"file:{self.home / 'store.sqlite'}?mode=ro", uri=True)
        try:
            row = conn.execute(
                "SELECT 1 FROM records WHERE collection = ? AND key = ?", (collection, key)
            ).fetchone()
        finally:
            conn.close()
        return row is not None

    def discovered(self) -> int:
        rows = json.loads(self.cli("peers", "--json"))
        return sum(1 for row in rows if row["state"].startswith("discovered") or row["connected"])


def wait_until(check: Any, timeout: float) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise SystemExit("a LAN benchmark step did not finish in time")
        time.sleep(0.01)
    return time.perf_counter()


def run_lan(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.lan import Lan, unavailable  # noqa: PLC0415 - the test suite's LAN builder

    reason = unavailable()
    if reason:
        raise SystemExit(f"cannot build a LAN here: {reason}")
    print(f"p2psync LAN benchmarks — {os.cpu_count()} CPUs, agents in network namespaces")
    known: list[float] = []
    rediscovered: list[float] = []
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-") as tmp:
        lan = Lan(2)
        try:
            a, b = LanAgent(lan, 1, Path(tmp), "a"), LanAgent(lan, 2, Path(tmp), "b")
            a.start()
            b.start()
            code = a.cli("pair", "invite").splitlines()[-1]
            b.cli("pair", "join", code)
            for run in range(args.runs * 2):
                forget = run % 2 == 1
                b.stop()
                key = f"r{run}"
                b.cli("put", "bench", key, "1")
                if forget:  # as if b's address had changed: a must find it by mDNS
                    with p2psync.open(b.home) as db:
                        db.store.forget_peer_address(a_key(a), lan.ip(1) + ":7717")
                    a.stop()
                    a.start()
                    time.sleep(2.5)  # a has announced itself and settled
                started = b.start()
                done = wait_until(lambda k=key: a.has("bench", k), 30)
                (rediscovered if forget else known).append((done - started) * 1000)
        finally:
            lan.close()
    print(f"{'start to peer holding the new record, address known, ms':<60} {summary(known)}")
    print(
        f"{'start to peer holding the new record, found by mDNS, ms':<60} {summary(rediscovered)}"
    )
    discover: list[float] = []
    idle_on: list[float] = []
    idle_off: list[float] = []
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-") as tmp:
        lan = Lan(args.agents)
        try:
            agents = [LanAgent(lan, i, Path(tmp), f"h{i}") for i in range(1, args.agents + 1)]
            starts = [agent.start() for agent in agents]
            for agent, started in zip(agents, starts, strict=True):
                done = wait_until(lambda x=agent: x.discovered() >= args.agents - 1, 30)
                discover.append((done - started) * 1000)
            time.sleep(5)
            for label, samples in (("on", idle_on), ("off", idle_off)):
                if label == "off":
                    for agent in agents[:3]:
                        agent.stop()
                        agent.start("--no-discovery")
                    time.sleep(5)
                before = [agent.cpu_seconds() for agent in agents[:3]]
                time.sleep(60)
                after = [agent.cpu_seconds() for agent in agents[:3]]
                samples.extend(100 * (y - x) / 60 for x, y in zip(before, after, strict=True))
        finally:
            lan.close()
    print(
        f"{f'discovery of {args.agents} agents started together, ms until each sees all':<60} "
        f"{summary(discover)}"
    )
    print(
        f"{'idle agent CPU with discovery on, % of one core':<60} "
        f"{statistics.median(idle_on):>12.3f}  (min {min(idle_on):.3f}, max {max(idle_on):.3f},"
        f" n={len(idle_on)})"
    )
    print(
        f"{'idle agent CPU with discovery off, % of one core':<60} "
        f"{statistics.median(idle_off):>12.3f}  (min {min(idle_off):.3f}, "
        f"max {max(idle_off):.3f}, n={len(idle_off)})"
    )


# ---------------------------------------------------------------- stop


def time_stop(home: Path, after: float, *extra: str) -> float:
    """Seconds from SIGTERM to the exit of an agent signalled ``after`` s after it listens."""
    agent = AgentProcess(home, args=["--quiet", *extra])
    agent.start()
    try:
        time.sleep(after)
        assert agent.process is not None
        signalled = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait()  # blocking: a timeout would poll, in steps of up to 50 ms
        return time.monotonic() - signalled
    finally:
        agent.stop()


def run_stop(args: argparse.Namespace) -> None:
    cases = [
        ("no discovery, stopped 3 s after listening", 3.0, ["--no-discovery"]),
        ("discovery on 127.0.0.1, stopped at once", 0.0, ["--discovery-interface", "127.0.0.1"]),
        ("discovery on 127.0.0.1, stopped after 3 s", 3.0, ["--discovery-interface", "127.0.0.1"]),
    ]
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-") as tmp:
        home = fresh_home(Path(tmp), "stop")
        print(f"p2psync stop benchmark — {os.cpu_count()} CPUs, SIGTERM to exit, {args.runs} runs")
        for label, after, extra in cases:
            ms = [1000 * time_stop(home, after, *extra) for _ in range(args.runs)]
            print(f"{label + ', ms':<60} {summary(ms)}")


def run_relay(args: argparse.Namespace) -> None:
    if args.store == "postgresql":
        from bench_pg import run_pg  # noqa: PLC0415 - its own module (scripts/)

        run_pg(args)
        return
    if args.failover_runs is not None or args.per_sender is not None:
        raise SystemExit("--failover-runs and --per-sender go with --store postgresql")
    from bench_relay import run_relay as run  # noqa: PLC0415 - its own module (scripts/)

    run(args)


def a_key(agent: LanAgent) -> bytes:
    with p2psync.open(agent.home) as db:
        return db.identity.public_key


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
    local.add_argument(
        "--ingest-only",
        action="store_true",
        help="only the ingest benchmark (without the disk writes of the others before it)",
    )
    sync = sub.add_parser("sync", help="two agents: initial sync, live latency, no-op resync")
    sync.add_argument("--records", type=int, default=100_000)
    sync.add_argument("--runs", type=int, default=5)
    sync.add_argument("--live-writes", type=int, default=200)
    lan = sub.add_parser("lan", help="agents in network namespaces: start-to-synced, discovery")
    lan.add_argument("--runs", type=int, default=5)
    lan.add_argument("--agents", type=int, default=10)
    stop = sub.add_parser("stop", help="one agent: SIGTERM to exit, with and without discovery")
    stop.add_argument("--runs", type=int, default=9)
    relay = sub.add_parser("relay", help="relay node: mailbox sync, bytes per entry, scale")
    relay.add_argument("--records", type=int, default=100_000)
    relay.add_argument("--runs", type=int, default=3)
    relay.add_argument("--no-scale", action="store_true", help="skip the relay scale measure")
    relay.add_argument("--no-mailbox", action="store_true", help="skip the mailbox measures")
    relay.add_argument("--no-splice", action="store_true", help="skip the live splice measures")
    relay.add_argument("--live-writes", type=int, default=300, help="W2 writes per splice run")
    relay.add_argument(
        "--store",
        choices=["postgresql"],
        help="postgresql: the mailbox on PostgreSQL instead (scripts/bench_pg.py: SQLite"
        " against PostgreSQL against two nodes, and failover; --runs and the options below)",
    )
    relay.add_argument(
        "--failover-runs", type=int, default=None, help="with --store postgresql (default 10)"
    )
    relay.add_argument(
        "--per-sender",
        type=int,
        default=None,
        help="with --store postgresql: deposits per sender per throughput run (default 200)",
    )
    relay.add_argument(
        "--seed", type=int, default=None, help="with --store postgresql: the kill moments' seed"
    )
    widen = sub.add_parser("widen", help="payloads fetched after a rule widens vs a fresh pair")
    widen.add_argument("--records", type=int, default=20_000)
    widen.add_argument("--runs", type=int, default=5)
    widen.add_argument(
        "--via",
        choices=["session", "mailbox"],
        default="session",
        help="a live session over TCP, or envelopes through the mailbox path",
    )
    web = sub.add_parser("http", help="HTTP API: write-to-SSE latency, transactions, idle cost")
    web.add_argument("--runs", type=int, default=3)
    web.add_argument("--writes", type=int, default=200, help="latency samples per run (0: skip)")
    web.add_argument("--records", type=int, default=100_000, help="per transactions run (0: skip)")
    web.add_argument(
        "--idle-seconds", type=float, default=30, help="idle window per agent (0: skip)"
    )
    args = parser.parse_args()
    if args.suite == "http":
        from bench_http import run_http  # noqa: PLC0415 - its own module (scripts/)

        run_http(args)
    elif args.suite == "widen":
        from bench_widen import run_widen  # noqa: PLC0415 - its own module (scripts/)

        run_widen(args)
    elif args.suite == "relay":
        run_relay(args)
    elif args.suite == "local":
        run_local(args)
    elif args.suite == "sync":
        run_sync(args)
    elif args.suite == "stop":
        run_stop(args)
    else:
        run_lan(args)


if __name__ == "__main__":
    main()
