"""kill -9 of a process using the relay's mailbox store (store/mailbox.py) in the
middle of deposits, fetch+delete and the expiry sweep, 20 runs each, as
tests/test_crash.py does for ingest. The relay node does not exist yet, so the
child is a small script driving a :class:`SqliteMailbox` directly.

The child prints each operation before it starts (``d``/``f``/``s``) and its
acknowledgement after the call returned (``D``/``X``/``S``), flushed, to a file
(no pipe to fill). The parent keeps a ledger of what was acknowledged and, after
each kill, reopens the mailbox and checks: every acknowledged deposit is held
(or was deleted or swept, acknowledged), complete, with its T; nothing
acknowledged deleted is served again; every acknowledged sweep's envelopes are
gone and its notices taken exactly once; the one operation in flight at the
kill happened entirely or not at all; the quota tallies are what the held
envelopes add up to (no charge without an envelope, no envelope without its
charge); positions are never reused; ``PRAGMA integrity_check`` is ok.

Seeded delays; about 7 s a test. Checked against two broken stores: a deposit
charging in a second transaction and a sweep dropping one envelope per
transaction each fail on the first kill that lands between the two.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2psync.core.envelope import EnvelopeClass
from p2psync.core.mailbox import Envelope, GiB, Limits, Tally, Usage
from p2psync.store.mailbox import SqliteMailbox

pytestmark = [pytest.mark.process, pytest.mark.slow]

RUNS = 20
NOW = 1_700_000_000_000  # the fake clock's start (deposit and fetch runs stay there)
STEP = 10  # ms of fake time per sweep
LIMITS = Limits(
    mailbox_count=10**9,
    intro_mailbox_count=10**9,
    intro_pair_count=10**9,
    intro_mailbox_bytes=GiB,
    intro_pair_bytes=GiB,
)
CLASSES = (EnvelopeClass.DATA, EnvelopeClass.INTRODUCTION, EnvelopeClass.RECEIPT)

CHILD = """
import hashlib, random, sys
from pathlib import Path
from p2psync.core.envelope import EnvelopeClass
from p2psync.core.mailbox import GiB, Deposit, Duplicate, Limits, MailboxPolicy, Stored
from p2psync.store.mailbox import SqliteMailbox

path, mode, seq, clock, seed = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
rng = random.Random(seed)
LIMITS = Limits(mailbox_count=10**9, intro_mailbox_count=10**9, intro_pair_count=10**9,
                intro_mailbox_bytes=GiB, intro_pair_bytes=GiB)
CLASSES = (EnvelopeClass.DATA, EnvelopeClass.INTRODUCTION, EnvelopeClass.RECEIPT)
RECIPIENTS = [bytes([0x10 + i]) * 32 for i in range(3)]
SENDERS = [bytes([0x20 + i]) * 32 for i in range(3)]

def blob(r, s, q, size):
    return (hashlib.sha256(bytes([r, s]) + q.to_bytes(8, "big")).digest() * (size // 32 + 1))[:size]

def say(*words):
    print(*words, flush=True)

box = SqliteMailbox(Path(path), LIMITS)
for recipient in RECIPIENTS:
    box.set_policy(recipient, MailboxPolicy(1, frozenset(SENDERS)))
acked = []

def deposit(r, s, q, expiry, now):
    cls, size = (q + s) % 3, 50 + (q * 389 + s * 97) % 1500
    say("d", r, s, q, cls, expiry, size)
    header = Deposit(RECIPIENTS[r], SENDERS[s], q, CLASSES[cls], expiry, size)
    verdict = box.deposit(header, blob(r, s, q, size), now)
    if not isinstance(verdict, Stored):
        say("BUG", "deposit", r, s, q, verdict)
        sys.exit(3)
    say("D", r, s, q, verdict.until_ms)
    acked.append((header, blob(r, s, q, size), verdict.until_ms))

def duplicate(now):
    header, data, until = rng.choice(acked)
    say("u", header.recipient[0] - 0x10, header.sender[0] - 0x20, header.seq)
    verdict = box.deposit(header, data, now)
    if verdict != Duplicate(until):
        say("BUG", "duplicate", header.seq, verdict)
        sys.exit(3)
    say("U")

def held():
    return sum(len(box.fetch(r, 0, 1000, clock)) for r in RECIPIENTS)

def top_up(target):
    global seq
    while held() < target:
        for s in range(3):
            for r in range(3):
                deposit(r, s, seq, 0, clock)
        seq += 1

if mode == "fetch":
    top_up(600)
say("ready")
r = 0
while True:
    if mode == "deposit":
        for s in range(3):
            for r in range(3):
                deposit(r, s, seq, 0, clock)
        seq += 1
        if rng.random() < 0.3:
            duplicate(clock)
    elif mode == "fetch":
        r = (r + 1) % 3
        envelopes = box.fetch(RECIPIENTS[r], 0, 3, clock)
        if not envelopes:
            top_up(90)
            continue
        chosen = rng.sample(envelopes, rng.randint(1, len(envelopes)))
        keys = [f"{e.header.sender[0] - 0x20}:{e.header.seq}" for e in chosen]
        say("f", r, *keys)
        n = box.delete(RECIPIENTS[r], [(e.header.sender, e.header.seq) for e in chosen])
        say("X", r, n, *keys)
    else:
        clock += STEP
        say("s", clock)
        notices = box.sweep(clock)
        say("S", clock, *(f"{n.recipient[0] - 0x10}:{n.sender[0] - 0x20}:{n.seq}:{n.until_ms}"
                          for n in notices))
        for _ in range(rng.randint(1, 2)):
            expiry = 0 if rng.random() < 0.1 else clock + STEP * rng.randint(1, 4)
            deposit(rng.randrange(3), rng.randrange(3), seq, expiry, clock)
            seq += 1
""".replace("STEP", str(STEP))

RECIPIENTS = [bytes([0x10 + i]) * 32 for i in range(3)]
SENDERS = [bytes([0x20 + i]) * 32 for i in range(3)]

Key = tuple[int, int, int]  # recipient index, sender index, seq


def blob(r: int, s: int, q: int, size: int) -> bytes:
    digest = hashlib.sha256(bytes([r, s]) + q.to_bytes(8, "big")).digest()
    return (digest * (size // 32 + 1))[:size]


def named(r: int, words: list[str]) -> set[Key]:
    """The keys a child's line names as ``sender:seq`` in mailbox ``r``."""
    return {(r, int(s), int(q)) for s, q in (w.split(":") for w in words)}


def notice(word: str) -> tuple[int, int, int, int]:
    """A notice a child's line names as ``recipient:sender:seq:T``."""
    r, s, q, t = map(int, word.split(":"))
    return (r, s, q, t)


@dataclass
class Held:
    cls: int
    size: int
    until: int
    order: int  # deposit order (positions must follow it)


@dataclass
class Ledger:
    """What the children acknowledged, and what the store must then hold."""

    held: dict[Key, Held] = field(default_factory=dict)
    deleted: set[Key] = field(default_factory=set)
    swept: set[Key] = field(default_factory=set)
    pending_notices: set[tuple[int, int, int, int]] = field(default_factory=set)
    taken_notices: set[tuple[int, int, int, int]] = field(default_factory=set)
    top_position: dict[int, int] = field(default_factory=dict)
    seen: set[Key] = field(default_factory=set)  # held at an earlier check
    next_seq: int = 1
    clock: int = NOW
    deposits: int = 0
    in_flight: Counter[str] = field(default_factory=Counter)

    def expected_until(self, expiry: int, now: int) -> int:
        latest = now + LIMITS.ttl_max_ms
        return min(now + LIMITS.ttl_default_ms, latest) if expiry == 0 else min(expiry, latest)

    def replay(self, lines: list[str]) -> list[str] | None:
        """Apply the acknowledged operations; the one in flight at the kill, if any."""
        pending: list[str] | None = None
        for line in lines:
            word, *rest = line.split()
            assert word != "BUG", line
            if word in ("d", "u", "f", "s"):
                assert pending is None, (pending, line)
                pending = [word, *rest]
                if word == "d":
                    self.next_seq = max(self.next_seq, int(rest[2]) + 1)
                elif word == "s":
                    self.clock = int(rest[0])
                elif word == "f":
                    keys = named(int(rest[0]), rest[1:])
                    served = keys & self.deleted
                    assert not served, f"served again after an acknowledged delete: {served}"
                    assert keys <= self.held.keys(), keys - self.held.keys()
                continue
            assert pending is not None, line
            if word == "D":
                r, s, q, until = map(int, rest)
                _, *p = pending
                assert (int(p[0]), int(p[1]), int(p[2])) == (r, s, q)
                assert until == self.expected_until(int(p[4]), self.clock), line
                self.held[(r, s, q)] = Held(int(p[3]), int(p[5]), until, self.deposits)
                self.deposits += 1
            elif word == "U":
                key = (int(pending[1]), int(pending[2]), int(pending[3]))
                assert key in self.held
            elif word == "X":
                r, n = int(rest[0]), int(rest[1])
                keys = named(r, rest[2:])
                assert n == len(keys), line  # every key named was held
                for key in keys:
                    del self.held[key]
                self.deleted |= keys
            elif word == "S":
                t = int(rest[0])
                notices = {notice(n) for n in rest[1:]}
                assert len(notices) == len(rest) - 1, "a notice reported twice"
                assert notices == self.due(t), line
                self.forget_swept(notices)
            pending = None
        return pending

    def due(self, t: int) -> set[tuple[int, int, int, int]]:
        return {(*key, h.until) for key, h in self.held.items() if h.until <= t}

    def forget_swept(self, notices: set[tuple[int, int, int, int]]) -> None:
        for r, s, q, _ in notices:
            del self.held[(r, s, q)]
            self.swept.add((r, s, q))
        assert not notices & self.taken_notices
        self.pending_notices |= notices


def everything(box: SqliteMailbox, now: int = 0) -> dict[Key, Envelope]:
    """Every envelope fetch serves at ``now`` (0: every one held, expired or not),
    over all recipients."""
    found: dict[Key, Envelope] = {}
    for r, recipient in enumerate(RECIPIENTS):
        after = 0
        while batch := box.fetch(recipient, after, 1000, now):
            for e in batch:
                found[(r, e.header.sender[0] - 0x20, e.header.seq)] = e
            after = batch[-1].position
    return found


def recount(found: dict[Key, Envelope]) -> dict[tuple[str, bytes, bytes], Tally]:
    """The quota rows the held envelopes add up to (rows at zero absent)."""
    sums: dict[tuple[str, bytes, bytes], Tally] = {}
    for e in found.values():
        h = e.header
        rows = [("mailbox", h.recipient, b""), ("pair", h.recipient, h.sender)]
        rows.append(("sender", h.sender, b""))
        if h.cls is EnvelopeClass.INTRODUCTION:
            rows += [("intro_mailbox", h.recipient, b""), ("intro_pair", h.recipient, h.sender)]
        for row in rows:
            sums[row] = sums.get(row, Tally()).plus(h.size)
    return sums


def check(path: Path, ledger: Ledger, pending: list[str] | None) -> None:
    """Reopen the mailbox after the kill and hold it to the ledger."""
    box = SqliteMailbox(path, LIMITS)
    try:
        found = everything(box)
        if pending is not None:
            settle(ledger, pending, found)
        missing = ledger.held.keys() - found.keys()
        assert not missing, f"acknowledged deposits lost: {sorted(missing)[:5]}"
        extra = found.keys() - ledger.held.keys()
        assert not extra, f"held but never acknowledged: {sorted(extra)[:5]}"
        for key, e in found.items():
            h = ledger.held[key]
            assert e.header.cls is CLASSES[h.cls] and e.header.size == h.size, key
            assert e.until_ms == h.until, key
            assert e.blob == blob(*key, h.size), f"{key} is not whole"
        live = {k for k, h in ledger.held.items() if h.until > ledger.clock}
        assert everything(box, ledger.clock).keys() == live, "not served while T > now"
        for r in range(3):
            mine = sorted((e.position, ledger.held[k].order) for k, e in found.items() if k[0] == r)
            assert [o for _, o in mine] == sorted(o for _, o in mine), "positions out of order"
        # notices: every acknowledged sweep's, exactly once
        taken: list[tuple[int, int, int, int]] = []
        for s, sender in enumerate(SENDERS):
            for n in box.take_notices(sender):
                taken.append((n.recipient[0] - 0x10, s, n.seq, n.until_ms))
        assert len(taken) == len(set(taken)), "a notice queued twice"
        assert set(taken) == ledger.pending_notices, set(taken) ^ ledger.pending_notices
        assert not set(taken) & ledger.taken_notices, "a notice handed out again"
        ledger.taken_notices |= set(taken)
        ledger.pending_notices = set()
        assert all(not box.take_notices(sender) for sender in SENDERS)
        # quotas: what the held envelopes add up to, row by row
        expected = recount(found)
        rows = box.guard.conn.execute(
            "SELECT kind, principal, peer, count, bytes FROM quotas"
        ).fetchall()
        charged = {(k, bytes(p), bytes(q)): Tally(c, b) for k, p, q, c, b in rows}
        assert charged == expected, {
            key: (charged.get(key), expected.get(key))
            for key in charged.keys() | expected.keys()
            if charged.get(key) != expected.get(key)
        }
        for recipient in RECIPIENTS:
            for sender in SENDERS:
                z = Tally()
                assert box.usage(recipient, sender) == Usage(
                    mailbox=expected.get(("mailbox", recipient, b""), z),
                    pair=expected.get(("pair", recipient, sender), z),
                    sender=expected.get(("sender", sender, b""), z),
                    intro_mailbox=expected.get(("intro_mailbox", recipient, b""), z),
                    intro_pair=expected.get(("intro_pair", recipient, sender), z),
                )
        # positions are never reused: the new envelopes come after all seen before
        for r in range(3):
            positions = [e.position for k, e in found.items() if k[0] == r]
            old = ledger.top_position.get(r, 0)
            fresh = [e.position for k, e in found.items() if k[0] == r and k not in ledger.seen]
            assert all(p > old for p in fresh), f"a position reused in mailbox {r}"
            ledger.top_position[r] = max([old, *positions])
        ledger.seen |= found.keys()
        (last,) = box.guard.conn.execute(
            "SELECT coalesce(max(last_position), 0) FROM mailboxes"
        ).fetchone()
        assert last >= max(ledger.top_position.values(), default=0)
    finally:
        box.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def settle(ledger: Ledger, pending: list[str], found: dict[Key, Envelope]) -> None:
    """The operation in flight at the kill: entirely done or not at all."""
    word, *rest = pending
    ledger.in_flight[word] += 1
    if word == "d":
        r, s, q, cls, expiry, size = map(int, rest)
        if (r, s, q) in found:  # committed, not acknowledged: must be whole (checked after)
            until = ledger.expected_until(expiry, ledger.clock)
            ledger.held[(r, s, q)] = Held(cls, size, until, ledger.deposits)
            ledger.deposits += 1
            ledger.in_flight["d-committed"] += 1
    elif word == "f":
        keys = named(int(rest[0]), rest[1:])
        present = keys & found.keys()
        assert present in (set(), keys), f"half a delete: {present} of {keys}"
        if not present:
            for key in keys:
                del ledger.held[key]
            ledger.deleted |= keys
            ledger.in_flight["f-committed"] += 1
    elif word == "s":
        due = ledger.due(int(rest[0]))
        remain = {n for n in due if n[:3] in found}
        assert remain in (set(), due), f"half a sweep: {len(remain)} of {len(due)} remain"
        if due and not remain:
            ledger.forget_swept(due)
            ledger.in_flight["s-committed"] += 1


def run_kills(tmp_path: Path, mode: str, seed: int, delay: tuple[float, float]) -> Ledger:
    path = tmp_path / "mailbox.db"
    rng = random.Random(seed)
    ledger = Ledger()
    for run in range(RUNS):
        out = tmp_path / f"out{run}.txt"
        numbers = (str(ledger.next_seq), str(ledger.clock), str(rng.randrange(2**32)))
        with out.open("w") as stdout, (tmp_path / f"err{run}.txt").open("w") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(path), mode, *numbers],
                stdout=stdout,
                stderr=stderr,
            )
        try:
            deadline = time.monotonic() + 20
            while "ready\n" not in out.read_text() and child.poll() is None:
                assert time.monotonic() < deadline, "the child never got ready"
                time.sleep(0.005)
            time.sleep(rng.uniform(*delay))
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait()
        assert child.returncode == -signal.SIGKILL, (tmp_path / f"err{run}.txt").read_text()
        text = out.read_text()
        lines = text.splitlines()
        if not text.endswith("\n"):  # a line cut by the kill (not seen, but possible)
            lines = lines[:-1]
        pending = ledger.replay([line for line in lines if line != "ready"])
        check(path, ledger, pending)
    return ledger


def test_kill_9_during_deposits_loses_nothing_acknowledged(tmp_path: Path) -> None:
    ledger = run_kills(tmp_path, "deposit", 101, (0.01, 0.15))
    assert ledger.deposits > 200
    assert ledger.in_flight["d"] + ledger.in_flight["u"] >= RUNS // 2, ledger.in_flight


def test_kill_9_during_fetch_and_delete_serves_nothing_deleted(tmp_path: Path) -> None:
    ledger = run_kills(tmp_path, "fetch", 102, (0.005, 0.06))
    assert len(ledger.deleted) > 500
    assert ledger.in_flight["f"] >= RUNS // 2, ledger.in_flight


def test_kill_9_during_sweeps_keeps_notices_and_quotas_exact(tmp_path: Path) -> None:
    ledger = run_kills(tmp_path, "sweep", 103, (0.01, 0.15))
    assert len(ledger.swept) > 100 and ledger.taken_notices
    assert ledger.in_flight["s"] >= 3, ledger.in_flight
