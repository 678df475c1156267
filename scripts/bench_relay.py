"""``scripts/bench relay``: the relay mailbox with real processes on 127.0.0.1 (issue 10).

Each run (the runs interleave the three measures) starts from fresh homes:

* **Mailbox W1.** A fresh home A bulk-loads N records (the API's bulk write,
  timed: the local reference), is paired with B by a rule with route relay, and
  both are ``relay add``-ed to a relay process (``relay serve``) that allows
  them. First half: ``p2psync --home A sync`` (A deposits what B lacks, exits);
  second half: ``p2psync --home B sync`` (B fetches, applies, deposits its
  receipt). Each half is timed from launching the process to its exit (so it
  includes ~0.3 s of interpreter start-up); records/s per half and end to end,
  and each half against the bulk load. B must end with the N records.
* **Bytes per entry.** What A deposited (the ``bytes`` of A's delivery ledger,
  checked against ``relay status`` right after A's half) over N, against a
  direct sync of the same N records between two agents: a fresh B' syncs
  in-process (``sync_once``) with A' running ``p2psync run``, counting every
  byte both ways, handshake included.
* **Relay scale.** 1,000 mailboxes hold envelopes (each recipient's signed
  policy allows the 10 senders, who leave 3 small envelopes each mailbox); then
  50 other recipients hold a session open at once while the 10 senders deposit
  concurrently for them (5 recipients each) and each recipient fetches and
  deletes as its ``Arrived`` comes. Clients run in this process (trio, the
  agent's own ``open_relay``), envelopes sealed beforehand; reported: deposits/s
  (first send to last answer), fetch+deletes/s (to the last delete), and the relay
  process's RSS (VmHWM, and VmRSS at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
from bench import changes, fresh_home, pair, start_agent, summary

import p2psync
from p2psync import pairing
from p2psync.agent.process import AgentProcess
from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.envelope import EnvelopeClass, read_header, seal_envelope
from p2psync.core.identity import Identity
from p2psync.core.policy import sign_policy
from p2psync.core.rules import Route, RuleState, Terms
from p2psync.net.relayclient import RelayClient, open_relay
from p2psync.relay import home as relay_home
from p2psync.relay.admission import Admission
from p2psync.store.relays import Relay

RESTING = 1000  # mailboxes holding envelopes, their owners offline
RESTING_ENVELOPES = 3  # per resting mailbox
LIVE = 50  # recipients holding a session open during the measure
SENDERS = 10
PER_SENDER = LIVE // SENDERS  # live recipients each sender deposits for
LIVE_DEPOSITS = 300  # per sender during the measure
PAYLOAD = 200  # bytes; seals into the smallest bucket (1 KiB)
CONNECTING = 4  # sessions in their handshake at once (the relay keeps 8 half-open per address)
DAY_MS = 24 * 3600 * 1000


def cli(home: Path, *args: str, timeout: float = 900) -> str:
    """``p2psync --home HOME ARGS``; a failure ends the benchmark with its output."""
    result = subprocess.run(
        [sys.executable, "-m", "p2psync", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(
            f"p2psync --home {home} {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stderr}{result.stdout}"
        )
    return result.stdout


def timed_cli(home: Path, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    out = cli(home, *args)
    return time.perf_counter() - started, out


def pair_by_rule(a_home: Path, b_home: Path, terms: Terms) -> tuple[str, str]:
    """A proposes ``terms``, B accepts, as if they had met once (tests/relaynode.py)."""
    with p2psync.open(a_home) as a, p2psync.open(b_home) as b:
        ka, kb = a.identity.public_key, b.identity.public_key
        pairing.propose(a, kb, terms, name=b.name)
        pairing.receive(b, ka, a.store.rule_objects(kb), (), a.name)
        proposal = next(r for r in b.store.rules(ka) if r.state is RuleState.PROPOSED)
        pairing.accept(b, proposal)
        pairing.receive(a, kb, b.store.rule_objects(ka))
        return a.identity.device_id, b.identity.device_id


def count_records(home: Path) -> int:
    conn = sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT count(*) FROM records WHERE collection = 'bench'").fetchone()
    finally:
        conn.close()
    return int(row[0])


def deposited(home: Path) -> tuple[int, int, int]:
    """(envelopes, entries, bytes) of the data envelopes in ``home``'s delivery ledger."""
    conn = sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT count(*), sum(entries), sum(bytes) FROM mail_out WHERE cls = ?",
            (EnvelopeClass.DATA.value,),
        ).fetchone()
    finally:
        conn.close()
    return int(row[0]), int(row[1] or 0), int(row[2] or 0)


def start_relay(base: Path, allowed: Sequence[bytes] = ()) -> tuple[AgentProcess, str]:
    """A fresh relay home allowing ``allowed``, served; the process and its device ID."""
    path = base / f"relay-{time.monotonic_ns()}"
    home = relay_home.init(path, "bench-relay")
    admission = Admission(path)
    now = now_ms()
    for key in allowed:
        admission.allow(key, now)
    node = AgentProcess(path, command=("relay", "serve"), log=base / f"{path.name}.log")
    node.start()
    return node, home.identity.device_id


# ---------------------------------------------------------------- mailbox W1


@dataclass
class MailboxRun:
    bulk: float  # records/s
    first: float  # seconds: A's sync
    second: float  # seconds: B's sync
    envelopes: int
    relay_bytes: int  # what relay status said the mailbox held after A's half
    ledger_bytes: int
    direct_bytes: int
    relay_rss_first: float  # MiB, VmHWM of the relay after A's half
    relay_rss: float  # and after B's


def mailbox_run(base: Path, count: int, source: Path) -> MailboxRun:
    a_home, b_home = fresh_home(base, "a"), fresh_home(base, "b")
    with p2psync.open(a_home) as db:
        started = time.perf_counter()
        db.write(changes(count))
        bulk = count / (time.perf_counter() - started)
    pair_by_rule(a_home, b_home, Terms.make(["*"], route=Route.RELAY))
    with p2psync.open(a_home) as a, p2psync.open(b_home) as b:
        keys = [a.identity.public_key, b.identity.public_key]
    relay, relay_id = start_relay(base, keys)
    try:
        for home in (a_home, b_home):
            added = cli(home, "relay", "add", relay_id, "--address", relay.address)
            if "admitted" not in added or "did not admit" in added:
                raise SystemExit(f"relay add for {home.name}: {added}")
        first, out_a = timed_cli(a_home, "sync", "--timeout", "600")
        rss_first = relay.peak_rss_mib()
        status = json.loads(cli(relay.home, "relay", "status", "--json"))
        second, out_b = timed_cli(b_home, "sync", "--timeout", "600")
        rss = relay.peak_rss_mib()
    finally:
        relay.stop()
    held = count_records(b_home)
    if held != count:
        raise SystemExit(
            f"mailbox W1: B holds {held:,} records, not {count:,}\n"
            f"A's sync said: {out_a}\nB's sync said: {out_b}"
        )
    envelopes, entries, ledger_bytes = deposited(a_home)
    if entries != count:
        raise SystemExit(f"mailbox W1: A's ledger counts {entries:,} entries deposited")
    direct = direct_bytes(base, source, count)
    for home in (a_home, b_home):
        shutil.rmtree(home)
    shutil.rmtree(relay.home)
    return MailboxRun(
        bulk,
        first,
        second,
        envelopes,
        status["mailbox"]["bytes"],
        ledger_bytes,
        direct,
        rss_first,
        rss,
    )


def direct_bytes(base: Path, source: Path, count: int) -> int:
    """Bytes both ways (handshake included) of a direct initial sync of ``source``'s
    ``count`` records to a fresh home, in-process, against its agent."""
    from p2psync.net.oneshot import sync_once  # noqa: PLC0415 - as bench.py's W3

    a_home = base / f"direct-a-{time.monotonic_ns()}"
    shutil.copytree(source, a_home)
    b_home = fresh_home(base, "direct-b")
    pair(a_home, b_home, None)
    agent = start_agent(a_home)
    try:
        pair(b_home, a_home, agent.address)
        with p2psync.open(b_home) as db, p2psync.open(a_home) as src:
            a_key = src.identity.public_key

        with p2psync.open(b_home) as db:

            async def one() -> int:
                [outcome] = await sync_once(db, [a_key], None, timeout=600)
                if not outcome.synced or outcome.received != count:
                    raise SystemExit(f"direct sync: {outcome}")
                return outcome.bytes_sent + outcome.bytes_received

            size = trio.run(one)
    finally:
        agent.stop()
    shutil.rmtree(a_home)
    shutil.rmtree(b_home)
    return size


# ---------------------------------------------------------------- relay scale


@dataclass
class ScaleRun:
    setup: float  # seconds to fill the resting mailboxes
    deposits: float  # per second
    fetches: float  # fetch+deletes per second
    peak_rss: float  # MiB, VmHWM of the relay
    rss: float  # MiB, VmRSS of the relay at the end
    relay_cpu: float  # relay CPU seconds during the measure / its wall time
    client_cpu: float  # this process's (the 60 clients') CPU seconds / wall time
    held: int  # envelopes the relay held at the end
    mailboxes: int  # mailboxes holding them


@dataclass
class Counters:
    fetched: int = 0
    done: trio.Event = field(default_factory=trio.Event)


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def identity(i: int, kind: int) -> Identity:
    return Identity(kind.to_bytes(2, "big") + i.to_bytes(4, "big") + bytes(26))


def sealed(sender: Identity, recipient: bytes, seq: int, expiry: int) -> bytes:
    return seal_envelope(
        sender, recipient, seq, EnvelopeClass.DATA, expiry, os.urandom(PAYLOAD), os.urandom(32)
    )


async def scale_async(
    relay: Relay,
    senders: list[Identity],
    resting: list[Identity],
    live: list[Identity],
    node: AgentProcess,
) -> ScaleRun:
    now = now_ms()
    expiry = now + DAY_MS
    sender_keys = [s.public_key for s in senders]
    gate = trio.Semaphore(CONNECTING)

    async def hand_policy(owner: Identity) -> None:
        async with gate, open_relay(owner, "r", relay) as client:
            answer = await client.set_policy(sign_policy(owner, 1, sender_keys, now))
            if not isinstance(answer, wire.Done):
                raise SystemExit(f"relay scale: the policy was not taken: {answer}")

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for owner in [*resting, *live]:
            nursery.start_soon(hand_policy, owner)

    async def fill(index: int, sender: Identity) -> None:
        wires = [
            sealed(sender, owner.public_key, seq, expiry)
            for owner in resting[index::SENDERS]
            for seq in range(1, RESTING_ENVELOPES + 1)
        ]
        async with contextlib.AsyncExitStack() as stack:
            client = await connect(stack, sender, relay, gate)
            check(await client.deposit_all(wires), len(wires))

    async with trio.open_nursery() as nursery:
        for index, who in enumerate(senders):
            nursery.start_soon(fill, index, who)
    setup = time.perf_counter() - started

    # the measure: 50 recipients online, 10 senders depositing for 5 each
    plans = [
        [
            sealed(
                who,
                live[index * PER_SENDER + n % PER_SENDER].public_key,
                RESTING_ENVELOPES + 1 + n // PER_SENDER,
                expiry,
            )
            for n in range(LIVE_DEPOSITS)
        ]
        for index, who in enumerate(senders)
    ]
    total = SENDERS * LIVE_DEPOSITS
    counters = Counters()
    deposited_at: list[float] = []
    ready = trio.Semaphore(0)
    go = trio.Event()

    async def fetcher(owner: Identity, task_status: trio.TaskStatus[None]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            client = await connect(stack, owner, relay, gate)
            task_status.started()
            await drain(client, counters, total)

    async def depositor(index: int, owner: Identity) -> None:
        async with contextlib.AsyncExitStack() as stack:
            client = await connect(stack, owner, relay, gate)
            ready.release()
            await go.wait()
            check(await client.deposit_all(plans[index]), LIVE_DEPOSITS)
            deposited_at.append(time.perf_counter())
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for owner in live:
            await nursery.start(fetcher, owner)
        for index, owner in enumerate(senders):
            nursery.start_soon(depositor, index, owner)
        for _ in senders:
            await ready.acquire()
        cpu_before, client_before = node.cpu_seconds(), time.process_time()
        began = time.perf_counter()
        go.set()
        with trio.fail_after(600):
            await counters.done.wait()
        ended = time.perf_counter()
        cpu = node.cpu_seconds() - cpu_before
        client = time.process_time() - client_before
        nursery.cancel_scope.cancel()
    return ScaleRun(
        setup,
        total / (max(deposited_at) - began),
        total / (ended - began),
        node.peak_rss_mib(),
        vm_rss_mib(node.pid),
        cpu / (ended - began),
        client / (ended - began),
        0,
        0,
    )


async def connect(
    stack: contextlib.AsyncExitStack, owner: Identity, relay: Relay, gate: trio.Semaphore
) -> RelayClient:
    """A session held open until ``stack`` closes; at most ``CONNECTING`` handshakes at once."""
    async with gate:
        return await stack.enter_async_context(open_relay(owner, "bench", relay))


async def drain(client: RelayClient, counters: Counters, total: int) -> None:
    """Fetch and delete what arrives for ``client`` until ``total`` were fetched in all."""
    cursor = 0
    while True:
        batch = [held async for held in client.fetch_all(cursor)]
        if batch:
            cursor = batch[-1].position
            headers = [read_header(held.envelope) for held in batch]
            await client.delete([(h.sender, h.seq) for h in headers])
            counters.fetched += len(batch)
            if counters.fetched >= total:
                counters.done.set()
        await client.wait_arrived(cursor)


def check(answers: Sequence[object], expected: int) -> None:
    stored = sum(isinstance(a, wire.Stored) for a in answers)
    if stored != expected:
        odd = [a for a in answers if not isinstance(a, wire.Stored)][:3]
        raise SystemExit(f"relay scale: {stored} of {expected} deposits stored: {odd}")


def scale_run(base: Path) -> ScaleRun:
    senders = [identity(i, 1) for i in range(SENDERS)]
    resting = [identity(i, 2) for i in range(RESTING)]
    live = [identity(i, 3) for i in range(LIVE)]
    node, _ = start_relay(base, [x.public_key for x in (*senders, *resting, *live)])
    try:
        relay = Relay(_key_of(node.home), (node.address,))
        result = trio.run(scale_async, relay, senders, resting, live, node)
        status = json.loads(cli(node.home, "relay", "status", "--json"))
        result.held = int(status["mailbox"]["envelopes"])
        result.mailboxes = int(status["mailbox"]["mailboxes"])
    finally:
        node.stop()
    shutil.rmtree(node.home)
    return result


def _key_of(path: Path) -> bytes:
    return relay_home.load(path).identity.public_key


# ---------------------------------------------------------------- report


def line(label: str, samples: Sequence[float], digits: int = 0) -> None:
    if digits == 0:
        print(f"{label:<64} {summary(samples)}", flush=True)
        return
    print(
        f"{label:<64} {statistics.median(samples):>12.{digits}f}  (min {min(samples):.{digits}f},"
        f" max {max(samples):.{digits}f}, n={len(samples)})",
        flush=True,
    )


def run_relay(args: argparse.Namespace) -> None:
    from bench_splice import PathRun, path_run, summarize  # noqa: PLC0415 - imports this one

    n = args.records
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-") as tmp:
        base = Path(tmp)
        source = fresh_home(base, "source")  # the direct sync's sender
        with p2psync.open(source) as db:
            db.write(changes(n))
        print(
            f"p2psync relay benchmarks — {os.cpu_count()} CPUs, Python {sys.version.split()[0]},"
            f" {n:,} records, relay and agents on 127.0.0.1, {args.runs} runs"
        )
        mail: list[MailboxRun] = []
        scale: list[ScaleRun] = []
        direct: list[PathRun] = []
        spliced: list[PathRun] = []
        for _ in range(args.runs):
            if not args.no_mailbox:
                mail.append(mailbox_run(base, n, source))
            if not args.no_scale:
                scale.append(scale_run(base))
            if not args.no_splice:
                direct.append(path_run(base, source, n, args.live_writes, splice=False))
                spliced.append(path_run(base, source, n, args.live_writes, splice=True))
    if direct:
        print(f"live splice against direct, interleaved, {args.live_writes} W2 writes a run")
        for label, samples, digits in summarize(direct, spliced):
            line(f"  {label}", samples, digits)
    if not mail:
        return
    line("bulk load (API, fresh home), records/s", [m.bulk for m in mail])
    line("A `sync` deposits (first half), records/s", [n / m.first for m in mail])
    line("B `sync` fetches+applies+receipt (second half), records/s", [n / m.second for m in mail])
    line("end to end (both halves), records/s", [n / (m.first + m.second) for m in mail])
    line("first half / bulk load", [n / m.first / m.bulk for m in mail], 3)
    line("second half / bulk load", [n / m.second / m.bulk for m in mail], 3)
    line("envelopes A deposited", [m.envelopes for m in mail])
    line("bytes per entry, through the relay (A's ledger)", [m.ledger_bytes / n for m in mail], 1)
    line("bytes per entry, relay status after A's half", [m.relay_bytes / n for m in mail], 1)
    line("bytes per entry, direct sync (both ways)", [m.direct_bytes / n for m in mail], 1)
    line(
        "relay bytes / direct bytes (target <= 1.15)",
        [m.ledger_bytes / m.direct_bytes for m in mail],
        3,
    )
    line("relay peak RSS (VmHWM) after A's half, MiB", [m.relay_rss_first for m in mail], 1)
    line("relay peak RSS (VmHWM) after B's half, MiB", [m.relay_rss for m in mail], 1)
    if scale:
        print(
            f"relay scale: {RESTING:,} mailboxes holding {RESTING_ENVELOPES} envelopes each,"
            f" then {LIVE} recipients online, {SENDERS} senders x {LIVE_DEPOSITS} deposits"
            f" of {PAYLOAD}-byte payloads (1 KiB sealed)"
        )
        line("  filling the resting mailboxes, s", [s.setup for s in scale], 1)
        line("  deposits/s, 10 concurrent senders", [s.deposits for s in scale])
        line("  fetch+deletes/s, 50 recipients online", [s.fetches for s in scale])
        line("  relay CPU during the measure, cores", [s.relay_cpu for s in scale], 2)
        line("  the 60 clients' CPU (this process), cores", [s.client_cpu for s in scale], 2)
        line("  relay peak RSS (VmHWM), MiB (target <= 150)", [s.peak_rss for s in scale], 1)
        line("  relay RSS at the end (VmRSS), MiB", [s.rss for s in scale], 1)
        line("  envelopes the relay held at the end", [s.held for s in scale])
        line("  mailboxes holding them", [s.mailboxes for s in scale])
