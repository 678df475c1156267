"""``scripts/bench relay --store postgresql``: the relay's mailbox on PostgreSQL (issue 12).

    scripts/bench relay --store postgresql [--runs R] [--failover-runs N]

Throwaway PostgreSQL clusters come from the test suite's ``tests/pgcluster.py``
(Unix sockets only; as root the server runs as the ``postgres`` user): this
script puts the repository root on ``sys.path`` to import it. Relay nodes are
``p2psync relay serve`` processes on 127.0.0.1, stopped by PID; the agents are
relay clients in this process (trio, the agent's own ``open_relay``).

**Throughput** (R runs, each interleaving the three set-ups, fresh homes and a
fresh database each): 10 senders (each its own identity and session) deposit M
envelopes each (~1 KiB sealed, sealed beforehand) round robin to 10 recipients,
each of whom allows the 10 senders by a signed policy, holds a session open, and
fetches and deletes as its ``Arrived`` comes until it has everything addressed to
it. Set-ups: (a) one node on SQLite, (b) one node on PostgreSQL, (c) two nodes on
one PostgreSQL database, senders and recipients split half and half between them
(so half the deliveries cross nodes: told by ``LISTEN``/``NOTIFY``). Reported:
deposits/s (first send to the last ``Stored``), deposit+fetch completions/s (to
the last delete), and b/a and c/a within each run. Every envelope must be fetched
exactly once. A recipient that waits 2 s with envelopes still missing fetches
anyway; such fetches that found something (a missed ``Arrived``) are counted.

**Failover** (N runs, fresh clusters each): a primary with a synchronous standby,
one relay node on ``multi_host_conninfo([primary, standby])``, 4 depositors
depositing continuously for one recipient (a ``Refused(busy)`` or a lost session
is retried with the same envelope), counting every acknowledged (``Stored`` or
``Duplicate``) envelope. The primary is killed (SIGKILL) 1-3 s in at random and the
standby promoted right after (as an operator or Patroni would); the deposits go
on. The kill is a SIGKILL of the postmaster: its backends notice and exit on
their own, and may still commit meanwhile (the standby's walsender is one of
them), so "resumed" counts only a deposit *sent once every process of the
primary had exited* (``PgCluster.kill9`` returned). Reported per run: envelopes
acknowledged before the kill (and between the kill and the primary's last exit),
seconds from the kill to the first ``Stored`` of such a deposit, how long the
primary took to go and the promotion took, and lost (acknowledged but not fetched
afterwards: must be 0); then the median and range of the resume time and the
total lost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.envelope import EnvelopeClass, read_header, seal_envelope
from p2psync.core.identity import Identity
from p2psync.core.policy import sign_policy
from p2psync.errors import P2PSyncError
from p2psync.net.relayclient import RelayClient, open_relay
from p2psync.relay import home as relay_home
from p2psync.relay.backend import SharedAdmission, open_admission, open_mailbox
from p2psync.store.relays import Relay

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.pgcluster import (  # the test suite's throwaway clusters
    PgCluster,
    multi_host_conninfo,
    temp_root,
    unavailable_reason,
)

CLIENTS = 10  # senders, and recipients
PER_SENDER = 200  # envelopes each sender deposits in a throughput run
PAYLOAD = 200  # bytes; seals into the smallest bucket (1 KiB)
CONNECTING = 4  # sessions in their handshake at once (the relay keeps 8 half-open per address)
DAY_MS = 24 * 3600 * 1000
FALLBACK_S = 2.0  # a recipient missing envelopes fetches anyway after this long
DEPOSITORS = 4  # failover: concurrent depositors
AFTER_KILL_S = 3.0  # failover: deposits go on this long after the first resumed one
SETUPS = ("a", "b", "c")
LABELS = {
    "a": "(a) one node, SQLite",
    "b": "(b) one node, PostgreSQL",
    "c": "(c) two nodes, one PostgreSQL database",
}


# ---------------------------------------------------------------- relay processes


class RelayProcess:
    """One ``p2psync relay serve`` on 127.0.0.1 (port chosen by the kernel), stopped by PID."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.log = home.parent / f"{home.name}.log"
        self.address = ""
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> RelayProcess:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "p2psync", "--home", str(self.home), "relay", "serve",
                 "--listen", "127.0.0.1:0", "--quiet"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise SystemExit(f"the relay did not start:\n{self.log.read_text()[-2000:]}")
        self.address = line.split()[-1]
        return self

    def cpu_seconds(self) -> float:
        if self.process is None:
            return 0.0
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def make_relay(path: Path, store: str | None, allowed: Sequence[bytes]) -> relay_home.RelayHome:
    """A fresh relay home (mailbox in SQLite, or ``store``, a libpq conninfo) admitting
    ``allowed``."""
    home = relay_home.init(path, "bench-relay", store=store)
    if store is not None:
        open_mailbox(home, 1).close()  # the schema, as `relay init --store` makes it
    admission = open_admission(home)
    try:
        now = now_ms()
        for key in allowed:
            admission.allow(key, now)
    finally:
        if isinstance(admission, SharedAdmission):
            admission.pool.close()
    return home


def at(home: relay_home.RelayHome, node: RelayProcess) -> Relay:
    return Relay(home.identity.public_key, (node.address,))


@contextlib.contextmanager
def serving(nodes: list[RelayProcess]) -> Iterator[list[RelayProcess]]:
    """Start ``nodes`` in turn; stop every one started (by PID), whatever happens."""
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def identity(i: int, kind: int) -> Identity:
    return Identity(kind.to_bytes(2, "big") + i.to_bytes(4, "big") + os.urandom(26))


def sealed(sender: Identity, recipient: bytes, seq: int, expiry: int) -> bytes:
    return seal_envelope(
        sender, recipient, seq, EnvelopeClass.DATA, expiry, os.urandom(PAYLOAD), os.urandom(32)
    )


async def connect(
    stack: contextlib.AsyncExitStack, owner: Identity, relay: Relay, gate: trio.Semaphore
) -> RelayClient:
    """A session held open until ``stack`` closes; at most ``CONNECTING`` handshakes at once."""
    async with gate:
        return await stack.enter_async_context(open_relay(owner, "bench", relay))


# ---------------------------------------------------------------- throughput


@dataclass
class Recipient:
    expected: int
    got: list[tuple[bytes, int]] = field(default_factory=list)
    done_at: float = 0.0
    rescued: int = 0  # fetches after FALLBACK_S without an Arrived that found something


@dataclass
class Throughput:
    deposits: float  # per second
    completed: float  # deposit+fetch+delete completions per second
    relay_cpu: float  # relay processes' CPU seconds over the measure's wall time
    rescued: int


async def throughput_async(
    relays: list[Relay], senders: list[Identity], recipients: list[Identity], per_sender: int
) -> tuple[Throughput, dict[bytes, Recipient]]:
    """Senders and recipients are split over ``relays`` by halves (all on one when one)."""
    def relay_of(index: int) -> Relay:
        return relays[index * len(relays) // CLIENTS]

    expiry = now_ms() + DAY_MS
    sender_keys = [s.public_key for s in senders]
    gate = trio.Semaphore(CONNECTING)
    plans = [
        [
            sealed(who, recipients[n % CLIENTS].public_key, n + 1, expiry)
            for n in range(per_sender)
        ]
        for who in senders
    ]
    total = CLIENTS * per_sender
    state = {
        r.public_key: Recipient(sum(1 for n in range(per_sender) if n % CLIENTS == i) * CLIENTS)
        for i, r in enumerate(recipients)
    }
    stored_at: list[float] = []
    ready = trio.Semaphore(0)
    go = trio.Event()
    all_done = trio.Event()
    finished = [0]

    async def recipient(
        index: int, owner: Identity, task_status: trio.TaskStatus[None]
    ) -> None:
        mine = state[owner.public_key]
        async with contextlib.AsyncExitStack() as stack:
            client = await connect(stack, owner, relay_of(index), gate)
            answer = await client.set_policy(sign_policy(owner, 1, sender_keys, now_ms()))
            if not isinstance(answer, wire.Done):
                raise SystemExit(f"throughput: the policy was not taken: {answer}")
            task_status.started()
            cursor = 0
            polled = False
            while len(mine.got) < mine.expected:
                batch = [held async for held in client.fetch_all(cursor)]
                if batch:
                    cursor = batch[-1].position
                    keys = [(h.sender, h.seq) for h in (read_header(b.envelope) for b in batch)]
                    mine.got.extend(keys)
                    mine.rescued += polled
                    deleted = await client.delete(keys)
                    if deleted != len(keys):
                        raise SystemExit(f"throughput: {deleted} of {len(keys)} deleted")
                if len(mine.got) >= mine.expected:
                    break
                polled = True
                with trio.move_on_after(FALLBACK_S):
                    await client.wait_arrived(cursor)
                    polled = False
            mine.done_at = time.perf_counter()
            finished[0] += 1
            if finished[0] == CLIENTS:
                all_done.set()
            await trio.sleep_forever()  # the session stays open until every one is done

    async def sender(index: int, owner: Identity) -> None:
        async with contextlib.AsyncExitStack() as stack:
            client = await connect(stack, owner, relay_of(index), gate)
            ready.release()
            await go.wait()
            answers = await client.deposit_all(plans[index])
            stored_at.append(time.perf_counter())
            stored = sum(isinstance(a, wire.Stored) for a in answers)
            if stored != len(plans[index]):
                odd = [a for a in answers if not isinstance(a, wire.Stored)][:3]
                raise SystemExit(f"throughput: {stored} of {len(plans[index])} stored: {odd}")
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for index, owner in enumerate(recipients):
            await nursery.start(recipient, index, owner)
        for index, owner in enumerate(senders):
            nursery.start_soon(sender, index, owner)
        for _ in senders:
            await ready.acquire()
        began = time.perf_counter()
        go.set()
        with trio.fail_after(600):
            await all_done.wait()
        while len(stored_at) < CLIENTS:  # every delete done implies every Stored came
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    ended = max(r.done_at for r in state.values())
    result = Throughput(
        total / (max(stored_at) - began),
        total / (ended - began),
        0.0,
        sum(r.rescued for r in state.values()),
    )
    return result, state


def check_exactly_once(
    state: dict[bytes, Recipient], senders: list[Identity], recipients: list[Identity],
    per_sender: int,
) -> None:
    for i, owner in enumerate(recipients):
        expected = sorted(
            (s.public_key, n + 1) for s in senders for n in range(per_sender) if n % CLIENTS == i
        )
        got = sorted(state[owner.public_key].got)
        if got != expected:
            twice = len(got) - len(set(got))
            missing = len(set(expected) - set(got))
            extra = len(set(got) - set(expected))
            raise SystemExit(
                f"throughput: recipient {i} fetched {len(got)} of {len(expected)}:"
                f" {missing} missing, {twice} twice, {extra} not addressed to it"
            )


def throughput_run(
    base: Path, cluster: PgCluster | None, setup: str, run: int, per_sender: int
) -> Throughput:
    senders = [identity(i, 1) for i in range(CLIENTS)]
    recipients = [identity(i, 2) for i in range(CLIENTS)]
    allowed = [x.public_key for x in (*senders, *recipients)]
    where = base / f"{setup}{run}-{time.monotonic_ns()}"
    where.mkdir()
    dbname = f"bench_{setup}{run}_{time.monotonic_ns()}"
    try:
        if setup == "a":
            home = make_relay(where / "node1", None, allowed)
            nodes = [RelayProcess(home.path)]
        else:
            assert cluster is not None
            conninfo = cluster.create_database(dbname)
            home = make_relay(where / "node1", conninfo, allowed)
            nodes = [RelayProcess(home.path)]
            if setup == "c":
                relay_home.init(where / "node2", "bench-relay", like=home.path)
                nodes.append(RelayProcess(where / "node2"))
        with serving(nodes):
            relays = [at(home, node) for node in nodes]
            cpu_before = sum(n.cpu_seconds() for n in nodes)
            started = time.perf_counter()
            result, state = trio.run(throughput_async, relays, senders, recipients, per_sender)
            wall = time.perf_counter() - started
            result.relay_cpu = (sum(n.cpu_seconds() for n in nodes) - cpu_before) / wall
        check_exactly_once(state, senders, recipients, per_sender)
        return result
    finally:
        shutil.rmtree(where, ignore_errors=True)
        if cluster is not None and setup != "a":
            cluster.drop_database(dbname)


# ---------------------------------------------------------------- failover


@dataclass
class Failover:
    before_kill: int  # envelopes acknowledged before the kill
    while_dying: int  # acknowledged after the SIGKILL, before the primary's last process exited
    dying: float  # seconds from the SIGKILL until every process of the primary had exited
    promoting: float  # seconds `pg_ctl promote -w` took
    resume: float  # seconds from the kill to the first Stored of a deposit sent once it was gone
    acked: int
    fetched: int
    lost: int  # acknowledged, not fetched
    unacked_stored: int  # fetched, never acknowledged (in flight at the kill)
    refusals: int  # Refused(busy) answers
    reconnects: int  # sessions reopened


async def failover_async(
    relay: Relay,
    primary: PgCluster,
    standby: PgCluster,
    kill_after: float,
    depositors: list[Identity],
    owner: Identity,
) -> Failover:
    async with open_relay(owner, "bench", relay) as client:
        keys = [d.public_key for d in depositors]
        answer = await client.set_policy(sign_policy(owner, 1, keys, now_ms()))
        if not isinstance(answer, wire.Done):
            raise SystemExit(f"failover: the policy was not taken: {answer}")
    acked: set[tuple[bytes, int]] = set()
    acked_at: list[float] = []
    killed_at: list[float] = []
    gone_at: list[float] = []
    promoted_at: list[float] = []
    resumed: list[float] = []
    counts = {"refusals": 0, "reconnects": 0}
    stop = trio.Event()
    expiry = now_ms() + DAY_MS

    async def depositor(who: Identity) -> None:
        seq = 1
        envelope = sealed(who, owner.public_key, seq, expiry)
        while not stop.is_set():
            try:
                async with open_relay(who, "bench", relay, timeout=5) as session:
                    while not stop.is_set():
                        sent = trio.current_time()
                        answer = await session.deposit(envelope)
                        if isinstance(answer, wire.Refused):
                            if answer.code is not wire.RefusalCode.BUSY:
                                raise SystemExit(f"failover: refused: {answer}")
                            counts["refusals"] += 1
                            await trio.sleep(0.02)
                            continue
                        now = trio.current_time()
                        acked.add((who.public_key, seq))
                        acked_at.append(now)
                        if gone_at and sent > gone_at[0] and isinstance(answer, wire.Stored):
                            resumed.append(now)
                        seq += 1
                        envelope = sealed(who, owner.public_key, seq, expiry)
            except P2PSyncError:  # the session broke (or could not open): again
                counts["reconnects"] += 1
                await trio.sleep(0.05)

    async def operator() -> None:
        await trio.sleep(kill_after)
        pid = primary.pid
        if pid is None:
            raise SystemExit("failover: the primary is not running")
        os.kill(pid, signal.SIGKILL)  # the postmaster; its backends notice and exit
        killed_at.append(trio.current_time())
        await trio.to_thread.run_sync(primary.kill9)  # waits until every one has exited
        gone_at.append(trio.current_time())
        await trio.to_thread.run_sync(standby.promote)
        promoted_at.append(trio.current_time())
        with trio.fail_after(120):
            while not resumed:
                await trio.sleep(0.005)
        await trio.sleep(AFTER_KILL_S)
        stop.set()

    async with trio.open_nursery() as nursery:
        for who in depositors:
            nursery.start_soon(depositor, who)
        nursery.start_soon(operator)
    before = sum(1 for t in acked_at if t < killed_at[0])
    orphaned = sum(1 for t in acked_at if killed_at[0] <= t < gone_at[0])
    fetched: set[tuple[bytes, int]] = set()
    with trio.fail_after(60):
        async with open_relay(owner, "bench", relay) as client:
            async for held in client.fetch_all():
                header = read_header(held.envelope)
                fetched.add((header.sender, header.seq))
    return Failover(
        before,
        orphaned,
        gone_at[0] - killed_at[0],
        promoted_at[0] - gone_at[0],
        min(resumed) - killed_at[0],
        len(acked),
        len(fetched),
        len(acked - fetched),
        len(fetched - acked),
        counts["refusals"],
        counts["reconnects"],
    )


def failover_run(base: Path, rng: random.Random) -> Failover:
    root = temp_root("pgc-bench-")
    clusters: list[PgCluster] = []
    where = base / f"failover-{time.monotonic_ns()}"
    where.mkdir()
    node: RelayProcess | None = None
    try:
        primary = PgCluster.create(root, "primary", sync_standby="standby1")
        clusters.append(primary)
        primary.start()
        standby = PgCluster.standby_of(primary, root, "standby", application_name="standby1")
        clusters.append(standby)
        conninfo = multi_host_conninfo([primary, standby], "postgres")
        depositors = [identity(i, 3) for i in range(DEPOSITORS)]
        owner = identity(0, 4)
        home = make_relay(where / "node", conninfo, [x.public_key for x in (*depositors, owner)])
        node = RelayProcess(home.path)
        with serving([node]):
            return trio.run(
                failover_async,
                at(home, node),
                primary,
                standby,
                rng.uniform(1.0, 3.0),
                depositors,
                owner,
            )
    finally:
        if node is not None:
            node.stop()
        for cluster in reversed(clusters):
            cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(where, ignore_errors=True)


# ---------------------------------------------------------------- report


def spread(samples: Sequence[float], digits: int) -> str:
    return (
        f"{statistics.median(samples):>10,.{digits}f}  (min {min(samples):,.{digits}f},"
        f" max {max(samples):,.{digits}f}, n={len(samples)})"
    )


def run_pg(args: argparse.Namespace) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot make PostgreSQL clusters here: {reason}")
    per_sender = PER_SENDER if args.per_sender is None else args.per_sender
    failover_runs = 10 if args.failover_runs is None else args.failover_runs
    print(
        f"p2psync relay on PostgreSQL — {os.cpu_count()} CPUs, Python {sys.version.split()[0]},"
        f" relay nodes and clients on 127.0.0.1, PostgreSQL on Unix sockets (fsync on,"
        f" synchronous_commit on)",
        flush=True,
    )
    results: dict[str, list[Throughput]] = {s: [] for s in SETUPS}
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-") as tmp:
        base = Path(tmp)
        if args.runs > 0:
            print(
                f"throughput: {CLIENTS} senders x {per_sender} deposits ({PAYLOAD}-byte payloads,"
                f" 1 KiB sealed) round robin to {CLIENTS} recipients online, fetching and"
                f" deleting as they arrive; {args.runs} runs, each a, b, c in turn",
                flush=True,
            )
            root = temp_root("pgc-bench-")
            cluster = PgCluster.create(root, "main")
            try:
                cluster.start()
                for run in range(args.runs):
                    row = []
                    for setup in SETUPS:
                        got = throughput_run(base, cluster, setup, run, per_sender)
                        results[setup].append(got)
                        row.append(
                            f"{setup}: {got.deposits:,.0f} dep/s, {got.completed:,.0f} done/s"
                            f" (relay CPU {got.relay_cpu:.2f})"
                        )
                    a, b, c = (results[s][-1] for s in SETUPS)
                    print(
                        f"  run {run + 1}: {'; '.join(row)}; b/a {b.deposits / a.deposits:.2f}"
                        f" / {b.completed / a.completed:.2f}, c/a {c.deposits / a.deposits:.2f}"
                        f" / {c.completed / a.completed:.2f} (deposits / completions)",
                        flush=True,
                    )
            finally:
                cluster.destroy()
                shutil.rmtree(root, ignore_errors=True)
            for setup in SETUPS:
                got_runs = results[setup]
                print(f"  {LABELS[setup]}")
                print(f"    {'deposits/s':<44}{spread([g.deposits for g in got_runs], 0)}")
                print(
                    f"    {'deposit+fetch+delete completions/s':<44}"
                    f"{spread([g.completed for g in got_runs], 0)}"
                )
                print(
                    f"    {'relay CPU (all its nodes), cores':<44}"
                    f"{spread([g.relay_cpu for g in got_runs], 2)}"
                )
                rescued = sum(g.rescued for g in got_runs)
                if rescued:
                    print(f"    fetches that found envelopes without an Arrived: {rescued}")
            for setup in ("b", "c"):
                for what in ("deposits", "completed"):
                    ratios = [
                        getattr(x, what) / getattr(a, what)
                        for x, a in zip(results[setup], results["a"], strict=True)
                    ]
                    name = "deposits/s" if what == "deposits" else "completions/s"
                    print(f"  {setup}/a {name + ', per run':<41}{spread(ratios, 2)}")
            print("  every envelope fetched exactly once in every run", flush=True)
        if failover_runs:
            print(
                f"failover: primary + synchronous standby, one relay node on both (multi-host"
                f" conninfo), {DEPOSITORS} depositors; kill -9 of the primary 1-3 s in, standby"
                f" promoted at once; {failover_runs} runs",
                flush=True,
            )
            rng = random.Random(args.seed)
            runs: list[Failover] = []
            for run in range(failover_runs):
                got_f = failover_run(base, rng)
                runs.append(got_f)
                print(
                    f"  run {run + 1:>2}: acknowledged before the kill {got_f.before_kill:>5},"
                    f" resumed after {got_f.resume:6.3f} s (primary gone after"
                    f" {got_f.dying:.3f} s, {got_f.while_dying} acknowledged meanwhile;"
                    f" promote {got_f.promoting:.3f} s), acknowledged {got_f.acked:>5},"
                    f" fetched {got_f.fetched:>5}, lost {got_f.lost}"
                    f" (stored unacknowledged {got_f.unacked_stored},"
                    f" busy refusals {got_f.refusals}, reconnects {got_f.reconnects})",
                    flush=True,
                )
            print(f"  {'seconds from kill -9 to the first deposit stored':<52}"
                  f"{spread([r.resume for r in runs], 3)}")
            print(f"  {'seconds from kill -9 to the primary all gone':<52}"
                  f"{spread([r.dying for r in runs], 3)}")
            print(f"  {'seconds pg_ctl promote -w took':<52}"
                  f"{spread([r.promoting for r in runs], 3)}")
            print(f"  {'acknowledged before the kill':<52}"
                  f"{spread([r.before_kill for r in runs], 0)}")
            print(f"  total lost (acknowledged, not fetched): {sum(r.lost for r in runs)}")
            if any(r.lost for r in runs):
                raise SystemExit("failover lost acknowledged envelopes")
