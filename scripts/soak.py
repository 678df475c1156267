"""p2psync fault battery (issue 13). Run through ``scripts/soak`` (which prepares .venv).

    scripts/soak kill [--side receiver|sender|both] [--runs R] [--records N] [--seed S]
    scripts/soak partition [--writes W] [--shared F] [--runs R]

``kill``: two agent processes on 127.0.0.1, A holding N records (one entry each)
and B empty, paired, start syncing; at a random moment of the sync (uniform over
the duration of a calibration sync measured first) the chosen side gets SIGKILL.
Then:

* the killed side's store verifies (``Database.verify``: every entry decodes,
  its ID, payload digests and chain links hold, its last signature verifies);
* every entry B had committed at the kill (its IDs, read from its store right
  after the kill) is still there at the end: nothing acknowledged is lost;
* the killed side is restarted and the sync completes: B holds exactly N
  entries and N records, each entry once, and both stores verify.

Each run starts from copies of the same two homes (made once), so runs are
independent. The report gives runs, failures (each with its reason), the
distribution of kill points (the share of the N entries B held at the kill, in
tenths), and the time to complete after the restart (median, min, max).

``partition``: two paired agents, A and B, apart (both stopped) while each
writes W records (one entry each); a share F of the keys is written on both
sides, so those records are conflicts once both sides meet. Then both start
(the partition heals) and the time until both hold the same entries, the same
records and the same conflict list is measured. Each run starts from fresh
homes; figures are the median, min and max over the runs.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import p2psync
from p2psync import home as home_mod
from p2psync.agent.process import AgentProcess
from p2psync.cli.main import cli

DONE_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(home: Path, *args: str) -> str:
    from click.testing import CliRunner  # noqa: PLC0415

    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    if result.exit_code != 0:
        raise SystemExit(f"p2psync {' '.join(args)} failed: {result.output}")
    return result.output


def entry_ids(home: Path) -> set[bytes]:
    conn = sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM entries")}
    finally:
        conn.close()


def held(home: Path) -> int:
    """Entries applied, from the authors' heads (cheap enough to poll)."""
    conn = sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT coalesce(sum(head_seq), 0) FROM authors").fetchone()[0])
    finally:
        conn.close()


def counts(home: Path) -> tuple[int, int, int]:
    """Entries, distinct entry IDs, records (of collection ``soak``)."""
    conn = sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        entries, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT id) FROM entries"
        ).fetchone()
        records = conn.execute(
            "SELECT count(*) FROM records WHERE collection = 'soak'"
        ).fetchone()[0]
        return int(entries), int(distinct), int(records)
    finally:
        conn.close()


def verify(home: Path) -> str | None:
    db = p2psync.open(home)
    try:
        report = db.verify()
        return None if report.ok else "; ".join(report.problems[:3])
    finally:
        db.close()


@dataclass
class Template:
    root: Path
    records: int
    port_a: int
    port_b: int


def make_template(root: Path, records: int) -> Template:
    """A (N records) and B (empty), paired and settled, both stopped."""
    a, b = root / "a", root / "b"
    port_a, port_b = free_port(), free_port()
    ida = home_mod.init(a, "a").identity.device_id
    idb = home_mod.init(b, "b").identity.device_id
    run_cli(a, "pair", "add", idb, "--name", "b", "--address", f"127.0.0.1:{port_b}")
    run_cli(b, "pair", "add", ida, "--name", "a", "--address", f"127.0.0.1:{port_a}")
    pa = AgentProcess(a, listen=f"127.0.0.1:{port_a}", args=["--no-discovery"])
    pb = AgentProcess(b, listen=f"127.0.0.1:{port_b}", args=["--no-discovery"])
    pa.start()
    pb.start()
    try:
        deadline = time.monotonic() + 30
        while "in sync" not in run_cli(b, "peers"):
            if time.monotonic() > deadline:
                raise SystemExit("the template pair did not get in step")
            time.sleep(0.1)
    finally:
        pa.stop()
        pb.stop()
    db = p2psync.open(a)
    try:
        db.write(
            [p2psync.Change(p2psync.OpKind.PUT, "soak", f"k{i}", {"i": i, "pad": "x" * 80})]
            for i in range(records)
        )
    finally:
        db.close()
    return Template(root, records, port_a, port_b)


@dataclass
class Outcome:
    side: str
    held_at_kill: int
    kill_at: float
    finish_s: float = 0.0
    failure: str | None = None


@dataclass
class Battery:
    template: Template
    sync_s: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)

    def fresh(self, work: Path) -> tuple[AgentProcess, AgentProcess]:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(self.template.root / "a", work / "a", symlinks=True)
        shutil.copytree(self.template.root / "b", work / "b", symlinks=True)
        log = work / "agents.log"
        pa = AgentProcess(
            work / "a", listen=f"127.0.0.1:{self.template.port_a}", args=["--no-discovery"], log=log
        )
        pb = AgentProcess(
            work / "b", listen=f"127.0.0.1:{self.template.port_b}", args=["--no-discovery"], log=log
        )
        return pa, pb

    def wait_done(self, b: Path) -> None:
        deadline = time.monotonic() + DONE_TIMEOUT
        while held(b) < self.template.records:
            if time.monotonic() > deadline:
                raise TimeoutError(f"B held {held(b)} entries after {DONE_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def calibrate(self, work: Path) -> None:
        pa, pb = self.fresh(work)
        pa.start()
        started = time.monotonic()
        pb.start()
        try:
            self.wait_done(work / "b")
            self.sync_s = time.monotonic() - started
        finally:
            pb.stop()
            pa.stop()

    def run(self, work: Path, side: str, rng: random.Random) -> Outcome:
        pa, pb = self.fresh(work)
        victim = pb if side == "receiver" else pa
        kill_at = rng.uniform(0.0, self.sync_s)
        outcome = Outcome(side, 0, kill_at)
        try:
            pa.start()
            started = time.monotonic()
            pb.start()
            time.sleep(max(0.0, kill_at - (time.monotonic() - started)))
            victim.kill9()
            held = entry_ids(work / "b")
            outcome.held_at_kill = len(held)
            problem = verify(victim.home)
            if problem is not None:
                outcome.failure = f"after the kill the {side}'s store does not verify: {problem}"
                return outcome
            restarted = time.monotonic()
            victim.start()
            self.wait_done(work / "b")
            outcome.finish_s = time.monotonic() - restarted
            pa.stop()
            pb.stop()
            entries, distinct, records = counts(work / "b")
            final = entry_ids(work / "b")
            if (entries, distinct, records) != (self.template.records,) * 3:
                outcome.failure = (
                    f"B holds {entries} entries ({distinct} distinct), {records} records"
                )
            elif not held <= final:
                outcome.failure = f"{len(held - final)} entries committed at the kill are gone"
            else:
                for who in (work / "a", work / "b"):
                    problem = verify(who)
                    if problem is not None:
                        outcome.failure = f"{who.name}'s store does not verify: {problem}"
        except Exception as exc:  # a failed run is reported, the battery goes on
            outcome.failure = f"{type(exc).__name__}: {exc}"
        finally:
            for process in (pa, pb):
                if process.running:
                    process.stop()
        return outcome


def report(battery: Battery, records: int) -> None:
    for side in ("receiver", "sender"):
        runs = [o for o in battery.outcomes if o.side == side]
        if not runs:
            continue
        failures = [o for o in runs if o.failure]
        tenths = [0] * 10
        for o in runs:
            tenths[min(9, o.held_at_kill * 10 // records)] += 1
        finish = [o.finish_s for o in runs if not o.failure]
        print(f"\nkill -9 of the {side}: {len(runs)} runs, {len(failures)} failures")
        print("  kill points (share of the entries B held at the kill):")
        for i, n in enumerate(tenths):
            print(f"    {i * 10:3d}-{i * 10 + 10:3d} %: {n}")
        if finish:
            print(
                f"  restart to complete: median {statistics.median(finish):.2f} s "
                f"(min {min(finish):.2f}, max {max(finish):.2f})"
            )
        for o in failures:
            print(f"  FAILED (killed at {o.kill_at:.2f} s, B held {o.held_at_kill}): {o.failure}")


def snapshot(home: Path) -> tuple[int, list[tuple[str, str, bytes]], list[tuple[str, str, bytes]]]:
    """Entries held, every record's winning version, and the conflict list."""
    conn = sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        entries = int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])
        records = conn.execute(
            "SELECT collection, key, entry FROM records ORDER BY collection, key"
        ).fetchall()
        losers = conn.execute(
            "SELECT collection, key, entry FROM losers ORDER BY collection, key, entry"
        ).fetchall()
        return entries, records, losers
    finally:
        conn.close()


def partition_run(root: Path, writes: int, shared: float) -> tuple[float, int, int]:
    """One heal: seconds to converge, entries each side holds, conflicts."""
    template = make_template(root, 0)
    a, b = root / "a", root / "b"
    common = int(writes * shared)
    for home, side in ((a, "a"), (b, "b")):
        db = p2psync.open(home)
        try:
            db.write(
                [
                    p2psync.Change(
                        p2psync.OpKind.PUT,
                        "soak",
                        f"k{i}" if i < common else f"{side}{i}",
                        {"side": side, "i": i},
                    )
                ]
                for i in range(writes)
            )
        finally:
            db.close()
    pa = AgentProcess(a, listen=f"127.0.0.1:{template.port_a}", args=["--no-discovery"])
    pb = AgentProcess(b, listen=f"127.0.0.1:{template.port_b}", args=["--no-discovery"])
    started = time.monotonic()
    pa.start()
    pb.start()
    try:
        deadline = started + DONE_TIMEOUT
        while held(a) < 2 * writes or held(b) < 2 * writes:
            if time.monotonic() > deadline:
                raise SystemExit(f"not converged after {DONE_TIMEOUT:.0f} s")
            time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        pa.stop()
        pb.stop()
    at_a, at_b = snapshot(a), snapshot(b)
    if at_a != at_b:
        raise SystemExit("the two sides differ after healing: records or conflicts")
    for home in (a, b):
        problem = verify(home)
        if problem is not None:
            raise SystemExit(f"{home.name}'s store does not verify: {problem}")
    return took, at_a[0], len({(c, k) for c, k, _ in at_a[2]})


def partition(args: argparse.Namespace) -> int:
    times = []
    for n in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="p2psync-soak-") as tmp:
            took, entries, conflicts = partition_run(Path(tmp), args.writes, args.shared)
        times.append(took)
        print(
            f"run {n + 1}/{args.runs}: {args.writes:,} writes each side, healed in {took:.2f} s: "
            f"both hold {entries:,} entries, the same records and the same {conflicts:,} "
            "conflicts",
            flush=True,
        )
    print(
        f"\ntime to converge: median {statistics.median(times):.2f} s "
        f"(min {min(times):.2f}, max {max(times):.2f}) over {len(times)} runs"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    kill = sub.add_parser("kill", help="kill -9 of an agent mid-sync, then restart")
    kill.add_argument("--side", choices=["receiver", "sender", "both"], default="both")
    kill.add_argument("--runs", type=int, default=200)
    kill.add_argument("--records", type=int, default=100_000)
    kill.add_argument("--seed", type=int, default=None)
    part = sub.add_parser("partition", help="writes on both sides of a partition, then heal")
    part.add_argument("--writes", type=int, default=50_000)
    part.add_argument("--shared", type=float, default=0.1)
    part.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.what == "partition":
        return partition(args)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    sides = ["receiver", "sender"] if args.side == "both" else [args.side]
    with tempfile.TemporaryDirectory(prefix="p2psync-soak-") as tmp:
        root = Path(tmp)
        print(f"seed {seed}; template: {args.records:,} records at A, B empty", flush=True)
        template = make_template(root / "template", args.records)
        battery = Battery(template)
        battery.calibrate(root / "work")
        print(f"calibration sync: {battery.sync_s:.2f} s for {args.records:,} records", flush=True)
        started = time.monotonic()
        for side in sides:
            for n in range(args.runs):
                outcome = battery.run(root / "work", side, rng)
                battery.outcomes.append(outcome)
                state = "FAILED: " + outcome.failure if outcome.failure else "ok"
                print(
                    f"{side} run {n + 1}/{args.runs}: killed at {outcome.kill_at:.2f} s, "
                    f"B held {outcome.held_at_kill:,}; {state}",
                    flush=True,
                )
        print(f"\n{len(battery.outcomes)} runs in {time.monotonic() - started:.0f} s")
        report(battery, args.records)
    return 1 if any(o.failure for o in battery.outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
