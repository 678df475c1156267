"""One conformance suite for every mailbox backend: SQLite (store/mailbox.py) and
PostgreSQL (store/pgmailbox.py) run the same tests.

* a round trip through every call, and the answer a second node (a second
  store object on the same database) gives;
* a hypothesis state machine driving the backend and the reference model
  (tests/mailbox_model.py) side by side on virtual time;
* races between two "nodes" (two store objects on one database, each in its own
  threads): deposits at a quota's edge never exceed it, however they interleave;
  concurrent sweeps give one notice per expiry between them; concurrent
  deliveries of notices hand each out once; a deposit racing with itself is
  stored once.

kill -9 during deposits, fetch+delete and sweeps: tests/test_mailbox_crash.py
(SQLite) and tests/test_pg_relay.py (PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from p2psync.core.envelope import EnvelopeClass
from p2psync.core.mailbox import (
    DAY_MS,
    Deposit,
    Duplicate,
    ExpiryNotice,
    Limits,
    MailboxPolicy,
    MailboxStore,
    Quota,
    Refused,
    Stored,
    Tally,
    Usage,
)
from p2psync.errors import StoreError, UsageError
from p2psync.store.mailbox import SqliteMailbox
from tests.mailbox_model import ModelMailbox

A, B, C = (bytes([n]) * 32 for n in (1, 2, 3))
NOW = 1_000_000
DATA, INTRO, RECEIPT = EnvelopeClass.DATA, EnvelopeClass.INTRODUCTION, EnvelopeClass.RECEIPT
ALLOW_A = MailboxPolicy(1, frozenset({A}))

#: A backend: make(limits) opens one more store on the test's database (a "node").
Opener = Callable[[Limits | None], MailboxStore]


def _close(box: MailboxStore) -> None:
    box.close()


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.pure),
        pytest.param("postgresql", marks=pytest.mark.process),
    ]
)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    opened: list[MailboxStore] = []
    if request.param == "sqlite":
        def make(limits: Limits | None = None) -> MailboxStore:
            box = SqliteMailbox(tmp_path / "relay.db", limits)
            opened.append(box)
            return box
    else:
        from p2psync.store.pgmailbox import PgMailbox  # noqa: PLC0415

        conninfo = request.getfixturevalue("pg_conninfo")

        def make(limits: Limits | None = None) -> MailboxStore:
            box = PgMailbox(conninfo, limits, connections=8)
            opened.append(box)
            return box
    yield make
    for box in opened:
        _close(box)


def dep(
    sender: bytes = A, seq: int = 1, cls: EnvelopeClass = DATA, expiry: int = 0, size: int = 10
) -> Deposit:
    return Deposit(B, sender, seq, cls, expiry, size)


# ---------------------------------------------------------------- round trip


def test_round_trip_and_a_second_node_sees_the_same(opener: Opener) -> None:
    box = opener(None)
    assert box.set_policy(B, ALLOW_A) and not box.set_policy(B, MailboxPolicy(1))
    stored = box.deposit(dep(), b"0123456789", NOW)
    assert stored == Stored(NOW + 7 * DAY_MS) and isinstance(stored, Stored)
    assert stored.position == 1
    assert box.deposit(dep(), b"0123456789", NOW + 1) == Duplicate(NOW + 7 * DAY_MS)
    with pytest.raises(UsageError):
        box.deposit(dep(seq=9), b"short", NOW)
    other = opener(None)  # another node on the same database (SQLite: the same file)
    [envelope] = other.fetch(B, 0, 10, NOW)
    assert (envelope.position, envelope.blob, envelope.header) == (1, b"0123456789", dep())
    assert other.policy(B) == ALLOW_A
    assert other.usage(B, A) == Usage(Tally(1, 10), Tally(1, 10), Tally(1, 10))
    assert other.retract(C, B, [1]) == 0 and other.delete(A, [(A, 1)]) == 0  # not theirs
    assert box.deposit(dep(seq=2, expiry=NOW + 5), b"x" * 10, NOW) == Stored(NOW + 5)
    assert [e.header.seq for e in other.fetch(B, 1, 10, NOW + 4)] == [2]
    assert other.fetch(B, 1, 10, NOW + 5) == []  # T has come: never served again
    assert other.sweep(NOW + 5) == [ExpiryNotice(A, B, 2, NOW + 5)]
    assert box.take_notices(A) == [ExpiryNotice(A, B, 2, NOW + 5)] and box.take_notices(A) == []
    assert other.delete(B, [(A, 1)]) == 1 and box.usage(B, A) == Usage()
    assert box.position(B) == 2 and other.summary(NOW).envelopes == 0


def test_the_fetch_budget_and_a_large_blob(opener: Opener) -> None:
    box = opener(None)
    box.set_policy(B, ALLOW_A)
    big = bytes(range(256)) * 4096  # 1 MiB, every byte value
    for seq in (1, 2, 3):
        assert isinstance(box.deposit(dep(seq=seq, size=len(big)), big, NOW), Stored)
    first = box.fetch(B, 0, 10, NOW, max_bytes=len(big) + 1)
    assert [e.position for e in first] == [1] and first[0].blob == big
    assert [e.position for e in box.fetch(B, 1, 10, NOW, max_bytes=10)] == [2]  # always one
    assert len(box.fetch(B, 0, 10, NOW)) == 3


# ---------------------------------------------------------------- the model


KEYS = (A, B, C)
SMALL = Limits(
    mailbox_count=6,
    mailbox_bytes=400,
    pair_count=4,
    pair_bytes=250,
    sender_bytes=500,
    intro_mailbox_count=3,
    intro_mailbox_bytes=100,
    intro_pair_count=2,
    intro_pair_bytes=60,
    max_envelope_bytes=150,
    ttl_default_ms=1_000,
    ttl_max_ms=3_000,
)
keys = st.sampled_from(KEYS)


class MailboxMachine(RuleBasedStateMachine):
    """The same operations on a backend and the model, on virtual time."""

    def __init__(self, make: Callable[[], MailboxStore]) -> None:
        super().__init__()
        self.sql = make()
        self.model = ModelMailbox(SMALL)
        self.now = NOW
        self.gone: set[tuple[bytes, int]] = set()  # (recipient, position) deleted/expired
        self.notified: set[ExpiryNotice] = set()
        self.versions = dict.fromkeys(KEYS, 0)

    def teardown(self) -> None:
        _close(self.sql)

    def _position(self, recipient: bytes, sender: bytes, seq: int) -> int | None:
        held = self.model.held.get((recipient, sender, seq))
        return None if held is None else held.position

    @rule(
        sender=keys,
        recipient=keys,
        seq=st.integers(1, 4),
        cls=st.sampled_from(EnvelopeClass),
        expiry=st.one_of(st.just(0), st.integers(-500, 5_000)),
        size=st.integers(0, 170),
        fill=st.integers(0, 255),
    )
    def deposit(
        self,
        sender: bytes,
        recipient: bytes,
        seq: int,
        cls: EnvelopeClass,
        expiry: int,
        size: int,
        fill: int,
    ) -> None:
        header = Deposit(recipient, sender, seq, cls, expiry and max(0, self.now + expiry), size)
        blob = bytes([fill]) * size
        verdict = self.sql.deposit(header, blob, self.now)
        model = self.model.deposit(header, blob, self.now)
        assert verdict == model
        if isinstance(verdict, Stored):
            assert isinstance(model, Stored) and verdict.position == model.position
        if isinstance(verdict, (Stored, Duplicate)):  # idempotent: the same answer again
            assert self.sql.deposit(header, blob, self.now) == Duplicate(verdict.until_ms)
            assert self.model.deposit(header, blob, self.now) == Duplicate(verdict.until_ms)
        if isinstance(verdict, Stored):
            assert verdict.until_ms > self.now

    @rule(
        recipient=keys,
        after=st.integers(0, 12),
        limit=st.integers(1, 5),
        budget=st.one_of(st.none(), st.integers(0, 400)),
    )
    def fetch(self, recipient: bytes, after: int, limit: int, budget: int | None) -> None:
        got = self.sql.fetch(recipient, after, limit, self.now, max_bytes=budget)
        assert got == self.model.fetch(recipient, after, limit, self.now, max_bytes=budget)
        if budget is not None and len(got) > 1:
            assert sum(e.header.size for e in got) <= budget
        assert [e.position for e in got] == sorted(e.position for e in got)

    @rule(recipient=keys, which=st.lists(st.tuples(keys, st.integers(1, 4)), max_size=4))
    def delete(self, recipient: bytes, which: list[tuple[bytes, int]]) -> None:
        for sender, seq in which:
            if (position := self._position(recipient, sender, seq)) is not None:
                self.gone.add((recipient, position))
        assert self.sql.delete(recipient, which) == self.model.delete(recipient, which)

    @rule(sender=keys, recipient=keys, seqs=st.lists(st.integers(1, 4), max_size=3))
    def retract(self, sender: bytes, recipient: bytes, seqs: list[int]) -> None:
        for seq in seqs:
            if (position := self._position(recipient, sender, seq)) is not None:
                self.gone.add((recipient, position))
        assert self.sql.retract(sender, recipient, seqs) == self.model.retract(
            sender, recipient, seqs
        )

    @rule(recipient=keys, step=st.integers(-1, 2), senders=st.frozensets(keys))
    def set_policy(self, recipient: bytes, step: int, senders: frozenset[bytes]) -> None:
        policy = MailboxPolicy(max(0, self.versions[recipient] + step), senders)
        took = self.sql.set_policy(recipient, policy)
        assert took == self.model.set_policy(recipient, policy) == (step > 0)
        if took:
            self.versions[recipient] = policy.version
        assert self.sql.policy(recipient) == self.model.policy(recipient)

    @rule(ms=st.integers(1, 2_500))
    def advance(self, ms: int) -> None:
        self.now += ms

    @precondition(lambda self: bool(self.model.held))
    @rule()
    def advance_to_the_next_expiry(self) -> None:
        self.now = max(self.now, min(e.until_ms for e in self.model.held.values()))

    @rule()
    def sweep(self) -> None:
        due = {k: e for k, e in self.model.held.items() if e.until_ms <= self.now}
        notices = self.sql.sweep(self.now)
        assert notices == self.model.sweep(self.now)
        assert sorted((n.recipient, n.sender, n.seq) for n in notices) == sorted(due)
        for notice in notices:  # exactly one notice per expiry
            assert notice not in self.notified
            self.notified.add(notice)
            self.gone.add(
                (notice.recipient, due[(notice.recipient, notice.sender, notice.seq)].position)
            )

    @rule(recipient=keys)
    def purge(self, recipient: bytes) -> None:
        for (to, _sender, _seq), envelope in self.model.held.items():
            if to == recipient:
                self.gone.add((recipient, envelope.position))
        assert self.sql.purge(recipient, self.now) == self.model.purge(recipient, self.now)
        assert self.sql.policy(recipient) == self.model.policy(recipient)
        self.versions[recipient] = 0

    @rule(sender=keys, limit=st.integers(1, 3))
    def take_notices(self, sender: bytes, limit: int) -> None:
        assert self.sql.take_notices(sender, limit) == self.model.take_notices(sender, limit)

    @invariant()
    def same_mailboxes_nothing_gone_or_expired_served(self) -> None:
        for recipient in KEYS:
            served = self.sql.fetch(recipient, 0, 100, self.now)
            assert served == self.model.fetch(recipient, 0, 100, self.now)
            for envelope in served:
                assert (recipient, envelope.position) not in self.gone
                assert envelope.until_ms > self.now

    @invariant()
    def same_summary_and_positions(self) -> None:
        assert self.sql.summary(self.now) == self.model.summary(self.now)
        for recipient in KEYS:
            assert self.sql.position(recipient) == self.model.position(recipient)

    @invariant()
    def same_usage_within_quotas(self) -> None:
        for recipient in KEYS:
            for sender in KEYS:
                usage = self.sql.usage(recipient, sender)
                assert usage == self.model.usage(recipient, sender)
                assert usage.mailbox.count <= SMALL.mailbox_count
                assert usage.mailbox.bytes <= SMALL.mailbox_bytes
                assert usage.pair.bytes <= SMALL.pair_bytes
                assert usage.pair.count <= SMALL.pair_count
                assert usage.sender.bytes <= SMALL.sender_bytes
                assert usage.intro_mailbox.count <= SMALL.intro_mailbox_count
                assert usage.intro_mailbox.bytes <= SMALL.intro_mailbox_bytes
                assert usage.intro_pair.count <= SMALL.intro_pair_count
                assert usage.intro_pair.bytes <= SMALL.intro_pair_bytes


def _fresh(opener: Opener, tmp_path: Path) -> Callable[[], MailboxStore]:
    """A store on an empty database for each hypothesis example."""
    counter = [0]

    def make() -> MailboxStore:
        box = opener(SMALL)
        if isinstance(box, SqliteMailbox):
            _close(box)
            counter[0] += 1
            box = SqliteMailbox(tmp_path / f"example-{counter[0]}.db", SMALL)
        else:
            box.pool.transaction(  # type: ignore[attr-defined]
                lambda conn: conn.execute(
                    "TRUNCATE mailboxes, policy_senders, envelopes, quotas, notices"
                )
            )
        return box

    return make


def test_the_backend_agrees_with_the_model(opener: Opener, tmp_path: Path) -> None:
    make = _fresh(opener, tmp_path)
    run_state_machine_as_test(
        lambda: MailboxMachine(make),
        settings=settings(max_examples=50, stateful_step_count=30, deadline=None),
    )


# ---------------------------------------------------------------- two nodes racing


def _race(workers: list[Callable[[], None]]) -> None:
    """Run the workers in threads, released at once; re-raise the first failure."""
    start = threading.Barrier(len(workers))
    failures: list[BaseException] = []

    def run(work: Callable[[], None]) -> None:
        try:
            start.wait()
            work()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


@pytest.mark.parametrize("quota", ["mailbox-count", "mailbox-bytes", "sender-bytes"])
def test_racing_deposits_from_two_nodes_never_exceed_a_quota(opener: Opener, quota: str) -> None:
    """Eight senders (four through each node) deposit at once into mailboxes that
    have room for fewer than all of them: exactly the room is used, never more,
    and every refusal names the full quota."""
    senders = [bytes([10 + n]) * 32 for n in range(8)]
    if quota == "sender-bytes":  # one sender, eight threads, eight mailboxes, room for 5
        limits = Limits(sender_bytes=500, pair_bytes=1000, mailbox_bytes=1000)
        recipients = [bytes([40 + n]) * 32 for n in range(8)]
        plan = [(senders[0], r, 1) for r in recipients for _ in range(1)]
        room, size = 5, 100
    else:
        limits = (
            Limits(mailbox_count=5) if quota == "mailbox-count" else Limits(mailbox_bytes=500)
        )
        recipients = [B]
        plan = [(s, B, seq) for s in senders for seq in (1, 2)]
        room, size = 5, 100
    nodes = [opener(limits), opener(limits)]
    for recipient in recipients:
        nodes[0].set_policy(recipient, MailboxPolicy(1, frozenset(senders)))
    verdicts: list[object] = []
    lock = threading.Lock()

    def worker(index: int) -> Callable[[], None]:
        def work() -> None:
            node = nodes[index % 2]
            for sender, recipient, seq in plan[index::8]:
                verdict = node.deposit(
                    Deposit(recipient, sender, seq, DATA, 0, size), b"z" * size, NOW
                )
                with lock:
                    verdicts.append(verdict)

        return work

    for _ in range(3):  # three rounds: each a fresh race for the same edge
        _race([worker(i) for i in range(8)])
        stored = [v for v in verdicts if isinstance(v, Stored)]
        refused = [v for v in verdicts if isinstance(v, Refused)]
        assert len(stored) == room, verdicts
        assert len(stored) + len(refused) == len(plan)
        assert {v.quota for v in refused} == {Quota(quota)}
        summary = nodes[1].summary(NOW)
        assert (summary.envelopes, summary.bytes) == (room, room * size)
        if quota == "sender-bytes":
            assert nodes[0].usage(recipients[0], senders[0]).sender == Tally(room, room * size)
        else:
            assert nodes[0].usage(B, senders[0]).mailbox == Tally(room, room * size)
        # empty the mailboxes again for the next round
        for recipient in recipients:
            held = nodes[1].fetch(recipient, 0, 100, NOW)
            nodes[1].delete(recipient, [(e.header.sender, e.header.seq) for e in held])
        assert nodes[0].summary(NOW).envelopes == 0
        verdicts.clear()
        plan = [(s, r, seq + 2) for s, r, seq in plan]


def test_the_same_deposit_racing_on_two_nodes_is_stored_once(opener: Opener) -> None:
    nodes = [opener(None), opener(None)]
    nodes[0].set_policy(B, ALLOW_A)
    verdicts: list[object] = []

    def work(node: MailboxStore) -> Callable[[], None]:
        return lambda: verdicts.extend(
            node.deposit(dep(seq=seq), b"q" * 10, NOW) for seq in range(1, 41)
        )

    _race([work(nodes[0]), work(nodes[1]), work(nodes[0]), work(nodes[1])])
    assert sum(isinstance(v, Stored) for v in verdicts) == 40
    assert sum(isinstance(v, Duplicate) for v in verdicts) == 120
    assert nodes[0].usage(B, A).pair == Tally(40, 400)
    assert sorted(e.position for e in nodes[1].fetch(B, 0, 100, NOW)) == list(range(1, 41))


def test_concurrent_sweeps_on_two_nodes_give_one_notice_per_expiry(opener: Opener) -> None:
    senders = [bytes([10 + n]) * 32 for n in range(4)]
    nodes = [opener(None), opener(None)]
    for recipient in (A, B, C):
        nodes[0].set_policy(recipient, MailboxPolicy(1, frozenset(senders)))
    expected = set()
    for n in range(600):
        sender, recipient = senders[n % 4], (A, B, C)[n % 3]
        seq = n + 1
        expiry = NOW + 10 + n % 7
        nodes[n % 2].deposit(Deposit(recipient, sender, seq, DATA, expiry, 8), b"e" * 8, NOW)
        expected.add(ExpiryNotice(sender, recipient, seq, expiry))
    notices: list[ExpiryNotice] = []
    lock = threading.Lock()

    def sweep(node: MailboxStore) -> Callable[[], None]:
        def work() -> None:
            got = node.sweep(NOW + 100)
            with lock:
                notices.extend(got)

        return work

    _race([sweep(nodes[0]), sweep(nodes[1]), sweep(nodes[0]), sweep(nodes[1])])
    assert len(notices) == len(set(notices)) == 600 and set(notices) == expected
    taken: list[ExpiryNotice] = []

    def take(node: MailboxStore, sender: bytes) -> Callable[[], None]:
        def work() -> None:
            while got := node.take_notices(sender, 7):
                with lock:
                    taken.extend(got)

        return work

    _race([take(nodes[i % 2], senders[i % 4]) for i in range(8)])
    assert len(taken) == len(set(taken)) == 600 and set(taken) == expected
    summary = nodes[0].summary(NOW + 100)
    assert (summary.envelopes, summary.bytes, summary.notices) == (0, 0, 0)
    for sender in senders:
        assert nodes[1].usage(A, sender) == Usage()


def test_a_mailbox_of_a_newer_schema_is_refused_not_touched(opener: Opener) -> None:
    box = opener(None)
    box.set_policy(B, ALLOW_A)
    box.deposit(dep(), b"0123456789", NOW)
    if isinstance(box, SqliteMailbox):
        with box.guard.writing() as conn:
            conn.execute("UPDATE mailbox_schema SET version = 99")
    else:
        box.pool.transaction(  # type: ignore[attr-defined]
            lambda conn: conn.execute("UPDATE mailbox_schema SET version = 99")
        )
    with pytest.raises(StoreError, match="schema version 99"):
        opener(None)
    assert len(box.fetch(B, 0, 10, NOW)) == 1  # what it holds is still there
