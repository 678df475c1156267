"""``scripts/bench http`` (issue 14): the local HTTP API, each figure beside a
baseline measured in the same run.

* **events** — a write at peer B (the Python API, in this process) to the ``change``
  event at site A's SSE client (``GET /events``; agents A and B on 127.0.0.1, live).
  Interleaved with the same path ending in A's store instead (W2's measure: the row
  readable in A's SQLite file), so the figure the HTTP layer adds is the difference.
* **transactions** — records/s written by ``POST /transactions`` in batches of 1,000
  (one entry each, over one keep-alive connection, JSON made by the client), against
  the same batches written by ``db.write`` in-process on a fresh home.
* **idle** — an agent's RSS and CPU seconds over an idle window, started with
  ``--no-http`` and with the HTTP API on and an SSE client connected, alternating.

Prints per run, then median (min-max) and the ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import p2psync
from p2psync import home as home_mod
from p2psync import pairing
from p2psync.agent.process import AgentProcess
from p2psync.core.rules import Terms
from p2psync.net import agentsockets


def _home(base: Path, name: str) -> Path:
    home_mod.init(base / name, name)
    return base / name


def _start(home: Path, *extra: str) -> AgentProcess:
    agent = AgentProcess(home, args=["--no-discovery", "--quiet", *extra])
    agent.start()
    return agent


def _connection(agent: AgentProcess) -> http.client.HTTPConnection:
    assert agent.http_url is not None
    parts = urlsplit(agent.http_url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=60)


def _key(home: Path) -> str:
    return (home / "http.key").read_text().strip()


def _summary(samples: list[float], unit: str = "") -> str:
    return (
        f"median {statistics.median(samples):,.2f}{unit} "
        f"({min(samples):,.2f}-{max(samples):,.2f}, n={len(samples)})"
    )


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# ---------------------------------------------------------------- events


class Listener(threading.Thread):
    """Reads A's event stream; notes when each change event's key arrived."""

    def __init__(self, agent: AgentProcess) -> None:
        super().__init__(daemon=True)
        self.conn = _connection(agent)
        self.conn.request("GET", "/events", headers={"X-API-Key": _key(agent.home)})
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.status
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()
        self.lock = threading.Condition()

    def run(self) -> None:
        try:
            self._read()
        except (OSError, ValueError, AttributeError):
            return  # the connection was closed: the run is over

    def _read(self) -> None:
        kind = ""
        while True:
            line = self.response.readline()
            if not line:
                return
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                kind = text[7:]
                if kind == "hello":
                    self.ready.set()
            elif text.startswith("data: ") and kind == "change":
                at = time.perf_counter()
                key = json.loads(text[6:])["key"]
                with self.lock:
                    self.seen[key] = at
                    self.lock.notify_all()

    def arrived(self, key: str) -> float | None:
        with self.lock:
            return self.seen.get(key)

    def wait_for(self, key: str, timeout: float) -> float | None:
        """When ``key``'s change event arrived (blocking, without holding the GIL
        in a polling loop the reader thread would have to win it from)."""
        with self.lock:
            self.lock.wait_for(lambda: key in self.seen, timeout)
            return self.seen.get(key)


def bench_events(base: Path, writes: int) -> tuple[list[float], list[float]]:
    """Latencies in ms: write at B → change event at A's client; write at B → row
    in A's store (alternating)."""
    a_home, b_home = _home(base, "a"), _home(base, "b")
    a = _start(a_home, "--http", "127.0.0.1:0")
    b = _start(b_home)
    try:
        with p2psync.open(a_home) as da, p2psync.open(b_home) as db_:
            pairing.propose(da, db_.identity.public_key, Terms(), name="b", addresses=[b.address])
            pairing.propose(db_, da.identity.public_key, Terms(), name="a", addresses=[a.address])
        for home in (a_home, b_home):
            agentsockets.notify(home, agentsockets.CHANGED_PEERS)
        listener = Listener(a)
        listener.start()
        listener.ready.wait(10)
        store = sqlite3.connect(f"file:{a_home / 'store.sqlite'}?mode=ro", uri=True)
        query = "SELECT 1 FROM records WHERE collection = 'live' AND key = ?"
        sse: list[float] = []
        rows: list[float] = []
        with p2psync.open(b_home) as db:
            # warm up: connected and in step
            deadline = time.monotonic() + 30
            db.put("live", "warm", 0)
            while listener.arrived("warm") is None:
                if time.monotonic() > deadline:
                    raise SystemExit("events: the peers did not connect within 30 s")
                time.sleep(0.01)
            for i in range(writes):
                key = f"w{i}"
                by_event = i % 2 == 0
                started = time.perf_counter()
                db.put("live", key, {"i": i})
                while True:
                    if by_event:
                        at = listener.wait_for(key, 10)
                        if at is not None:
                            sse.append((at - started) * 1000)
                            break
                    elif store.execute(query, (key,)).fetchone() is not None:
                        rows.append((time.perf_counter() - started) * 1000)
                        break
                    if time.perf_counter() - started > 10:
                        raise SystemExit(f"events: write {key} did not arrive within 10 s")
                    time.sleep(0.0001)
                time.sleep(0.01)
        store.close()
        listener.conn.close()
        return sse, rows
    finally:
        b.stop()
        a.stop()


# ---------------------------------------------------------------- transactions


def _batches(records: int, size: int, tag: str) -> list[list[dict[str, Any]]]:
    return [
        [
            {"collection": "stock", "key": f"{tag}-{n:08d}", "value": {"qty": n, "bin": "A-1"}}
            for n in range(start, min(start + size, records))
        ]
        for start in range(0, records, size)
    ]


def bench_transactions(base: Path, records: int, run: int) -> tuple[float, float]:
    """records/s: POST /transactions; db.write of the same batches in-process."""
    batches = _batches(records, 1000, f"r{run}")
    home = _home(base, f"tx{run}")
    agent = _start(home, "--http", "127.0.0.1:0")
    try:
        conn = _connection(agent)
        key = _key(home)
        started = time.perf_counter()
        for batch in batches:
            body = json.dumps({"changes": batch})
            conn.request(
                "POST",
                "/transactions",
                body=body,
                headers={"X-API-Key": key, "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                raise SystemExit(f"transactions: {response.status} {answer[:200]!r}")
        http_rate = records / (time.perf_counter() - started)
        conn.close()
    finally:
        agent.stop()
    local = _home(base, f"local{run}")
    with p2psync.open(local) as db:
        started = time.perf_counter()
        for batch in batches:
            db.write(
                [[p2psync.Change(p2psync.OpKind.PUT, c["collection"], c["key"], c["value"])
                  for c in batch]]
            )
        local_rate = records / (time.perf_counter() - started)
    return http_rate, local_rate


# ---------------------------------------------------------------- idle


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_idle(base: Path, run: int, seconds: float, http_on: bool) -> tuple[float, float]:
    """RSS (MiB) after start-up and CPU seconds over ``seconds`` idle."""
    home = _home(base, f"idle{run}{'h' if http_on else 'n'}")
    agent = _start(home, *(["--http", "127.0.0.1:0"] if http_on else []))
    listener = None
    try:
        if http_on:
            listener = Listener(agent)
            listener.start()
            listener.ready.wait(10)
        time.sleep(2.0)  # settled
        cpu = agent.cpu_seconds()
        time.sleep(seconds)
        used = agent.cpu_seconds() - cpu
        rss = _rss_mib(agent.pid)
        return rss, used
    finally:
        if listener is not None:
            listener.conn.close()
        agent.stop()


# ---------------------------------------------------------------- the suite


def run_http(args: argparse.Namespace) -> None:
    print(
        f"p2psync HTTP API benchmarks — {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}, agents on 127.0.0.1"
    )
    with tempfile.TemporaryDirectory(prefix="p2psync-bench-http-") as tmp:
        base = Path(tmp)
        sse: list[float] = []
        rows: list[float] = []
        if args.writes:
            for run in range(args.runs):
                got_sse, got_rows = bench_events(base / f"ev{run}", args.writes)
                sse += got_sse
                rows += got_rows
                print(
                    f"run {run + 1}: write at B -> SSE event at A: median "
                    f"{statistics.median(got_sse):.2f} ms; -> row in A's store: median "
                    f"{statistics.median(got_rows):.2f} ms"
                )
        rates: list[tuple[float, float]] = []
        if args.records:
            for run in range(args.runs):
                rates.append(bench_transactions(base, args.records, run))
                http_rate, local_rate = rates[-1]
                print(
                    f"run {run + 1}: POST /transactions {http_rate:,.0f} records/s; "
                    f"db.write in-process {local_rate:,.0f} records/s; "
                    f"ratio {http_rate / local_rate:.2f}"
                )
        idle: list[tuple[float, float, float, float]] = []
        if args.idle_seconds:
            for run in range(args.runs):
                order = [False, True] if run % 2 == 0 else [True, False]
                got = {on: bench_idle(base, run, args.idle_seconds, on) for on in order}
                idle.append((got[False][0], got[True][0], got[False][1], got[True][1]))
                print(
                    f"run {run + 1}: RSS {got[False][0]:.1f} MiB without HTTP, "
                    f"{got[True][0]:.1f} with (+{got[True][0] - got[False][0]:.1f}); CPU over "
                    f"{args.idle_seconds:g} s idle {got[False][1]:.2f} s without, "
                    f"{got[True][1]:.2f} s with"
                )
        print()
        if sse:
            print(
                f"{'write at B -> SSE change event at A, ms':<52} {_summary(sse)}, "
                f"p99 {_p99(sse):.2f}"
            )
            print(
                f"{'write at B -> row in A store (baseline), ms':<52} {_summary(rows)}, "
                f"p99 {_p99(rows):.2f}"
            )
        if rates:
            print(f"{'POST /transactions, records/s':<52} {_summary([r[0] for r in rates])}")
            print(f"{'db.write in-process (baseline), records/s':<52} "
                  f"{_summary([r[1] for r in rates])}")
            print(f"{'ratio HTTP / in-process':<52} {_summary([r[0] / r[1] for r in rates])}")
        if idle:
            print(f"{'RSS without HTTP, MiB':<52} {_summary([i[0] for i in idle])}")
            print(f"{'RSS with HTTP + an SSE client, MiB':<52} {_summary([i[1] for i in idle])}")
            print(f"{'RSS added, MiB':<52} {_summary([i[1] - i[0] for i in idle])}")
            print(f"{'idle CPU s without HTTP':<52} {_summary([i[2] for i in idle])}")
            print(f"{'idle CPU s with HTTP + an SSE client':<52} {_summary([i[3] for i in idle])}")
