"""The relay's mailbox: the pure decisions (core/mailbox.py), and the SQLite
backend (store/mailbox.py) driven side by side with the reference model
(tests/mailbox_model.py) by a hypothesis state machine on virtual time.

kill -9 during deposits, fetch+delete and sweeps: tests/test_mailbox_crash.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2psync.core.envelope import EnvelopeClass
from p2psync.core.mailbox import (
    DAY_MS,
    NO_POLICY,
    Deposit,
    Duplicate,
    ExpiryNotice,
    GiB,
    Limits,
    MailboxPolicy,
    MailboxStore,
    MiB,
    Quota,
    Refusal,
    Refused,
    Stored,
    Tally,
    Usage,
    admit,
    charge,
    expired,
    until_ms,
)
from p2psync.errors import UsageError
from p2psync.store.mailbox import SqliteMailbox
from tests.mailbox_model import ModelMailbox

pytestmark = pytest.mark.pure

A, B, C = (bytes([n]) * 32 for n in (1, 2, 3))
NOW = 1_000_000
DATA, INTRO, RECEIPT = EnvelopeClass.DATA, EnvelopeClass.INTRODUCTION, EnvelopeClass.RECEIPT
LIMITS = Limits()
ALLOW_A = MailboxPolicy(1, frozenset({A}))


def dep(
    sender: bytes = A, seq: int = 1, cls: EnvelopeClass = DATA, expiry: int = 0, size: int = 10
) -> Deposit:
    return Deposit(B, sender, seq, cls, expiry, size)


# ---------------------------------------------------------------- the pure decisions


def test_the_defaults_are_the_issues() -> None:
    assert (LIMITS.mailbox_bytes, LIMITS.mailbox_count) == (1 * GiB, 10_000)
    assert (LIMITS.pair_bytes, LIMITS.sender_bytes) == (256 * MiB, 2 * GiB)
    assert LIMITS.ttl_default_ms == LIMITS.ttl_max_ms == 7 * DAY_MS
    assert (LIMITS.intro_mailbox_count, LIMITS.intro_mailbox_bytes) == (64, 1 * MiB)


def test_stored_until_the_default_ttl_or_the_asked_expiry_clamped_to_the_max() -> None:
    assert admit(dep(), Usage(), ALLOW_A, LIMITS, NOW) == Stored(NOW + 7 * DAY_MS)
    assert admit(dep(expiry=NOW + 5), Usage(), ALLOW_A, LIMITS, NOW) == Stored(NOW + 5)
    assert admit(dep(expiry=NOW + 30 * DAY_MS), Usage(), ALLOW_A, LIMITS, NOW) == Stored(
        NOW + 7 * DAY_MS
    )
    short = Limits(ttl_default_ms=10 * DAY_MS, ttl_max_ms=DAY_MS)
    assert until_ms(0, short, NOW) == NOW + DAY_MS


def test_refusals_in_order_policy_size_expiry_quota() -> None:
    big = LIMITS.max_envelope_bytes + 1
    assert admit(dep(C, size=big), Usage(), ALLOW_A, LIMITS, NOW) == Refused(Refusal.NOT_ALLOWED)
    assert admit(dep(size=big), Usage(), ALLOW_A, LIMITS, NOW).reason is Refusal.TOO_BIG  # type: ignore[union-attr]
    assert admit(dep(expiry=NOW), Usage(), ALLOW_A, LIMITS, NOW) == Refused(Refusal.EXPIRED)
    full = Usage(mailbox=Tally(10_000, 5))
    assert admit(dep(), full, ALLOW_A, LIMITS, NOW) == Refused(
        Refusal.FULL, Quota.MAILBOX_COUNT, 10_000, 10_000
    )


def test_each_quota_refuses_at_its_edge_and_admits_just_below() -> None:
    limits = Limits(mailbox_bytes=100, pair_bytes=50, sender_bytes=70, pair_count=3)
    assert admit(dep(), Usage(pair=Tally(3, 3)), ALLOW_A, limits, NOW) == Refused(
        Refusal.FULL, Quota.PAIR_COUNT, 3, 3
    )
    assert isinstance(admit(dep(), Usage(pair=Tally(2, 2)), ALLOW_A, limits, NOW), Stored)
    for usage, quota in (
        (Usage(mailbox=Tally(1, 91)), Quota.MAILBOX_BYTES),
        (Usage(pair=Tally(1, 41)), Quota.PAIR_BYTES),
        (Usage(sender=Tally(1, 61)), Quota.SENDER_BYTES),
    ):
        verdict = admit(dep(), usage, ALLOW_A, limits, NOW)
        assert isinstance(verdict, Refused) and verdict.quota is quota
        at_edge = Usage(
            *(Tally(t.count, t.bytes - 1) if t.bytes else t for t in vars(usage).values())
        )
        assert isinstance(admit(dep(), at_edge, ALLOW_A, limits, NOW), Stored)


def test_introductions_from_anyone_under_their_tiny_quota_data_and_receipts_only_by_policy() -> (
    None
):
    assert isinstance(admit(dep(C, cls=INTRO), Usage(), NO_POLICY, LIMITS, NOW), Stored)
    assert admit(dep(C, cls=RECEIPT), Usage(), NO_POLICY, LIMITS, NOW) == Refused(
        Refusal.NOT_ALLOWED
    )
    assert isinstance(admit(dep(A, cls=RECEIPT), Usage(), ALLOW_A, LIMITS, NOW), Stored)
    usage = Usage()
    for _ in range(LIMITS.intro_pair_count):
        usage = charge(usage, dep(C, cls=INTRO))
    verdict = admit(dep(C, cls=INTRO), usage, NO_POLICY, LIMITS, NOW)
    assert verdict == Refused(Refusal.FULL, Quota.INTRO_PAIR_COUNT, 4, 4)
    # data does not count against the introduction quota
    assert isinstance(
        admit(dep(), Usage(intro_pair=Tally(0, 0), pair=Tally(99, 0)), ALLOW_A, LIMITS, NOW), Stored
    )


def test_a_held_key_is_a_duplicate_whatever_the_deposit_says() -> None:
    again = dep(C, size=LIMITS.max_envelope_bytes * 2, expiry=1)
    assert admit(again, Usage(), NO_POLICY, LIMITS, NOW, held_until_ms=NOW - 1) == Duplicate(
        NOW - 1
    )


def test_the_sweep_gives_one_notice_per_envelope_whose_time_has_come() -> None:
    model = ModelMailbox()
    model.set_policy(B, ALLOW_A)
    for seq, expiry in ((1, NOW + 10), (2, NOW + 20), (3, 0)):
        assert isinstance(model.deposit(dep(seq=seq, expiry=expiry), b"x" * 10, NOW), Stored)
    assert expired(model.held.values(), NOW + 10) == [ExpiryNotice(A, B, 1, NOW + 10)]
    assert [n.seq for n in model.sweep(NOW + 20)] == [1, 2]
    assert model.sweep(NOW + 20) == []
    assert [n.seq for n in model.take_notices(A)] == [1, 2] and model.take_notices(A) == []


def test_malformed_headers_and_limits_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        Deposit(B, b"short", 1, DATA, 0, 1)
    with pytest.raises(UsageError):
        dep(size=-1)
    with pytest.raises(UsageError):
        Limits(ttl_max_ms=0)


# ---------------------------------------------------------------- SQLite


def test_sqlite_mailbox_round_trip_and_reopen(tmp_path: Path) -> None:
    box = SqliteMailbox(tmp_path / "relay.db")
    try:
        assert box.set_policy(B, ALLOW_A) and not box.set_policy(B, MailboxPolicy(1))
        assert box.deposit(dep(), b"0123456789", NOW) == Stored(NOW + 7 * DAY_MS)
        assert box.deposit(dep(), b"0123456789", NOW + 1) == Duplicate(NOW + 7 * DAY_MS)
        with pytest.raises(UsageError):
            box.deposit(dep(seq=9), b"short", NOW)
        mode = box.guard.conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert (mode, box.guard.conn.execute("PRAGMA synchronous").fetchone()[0]) == ("wal", 2)
    finally:
        box.close()
    box = SqliteMailbox(tmp_path / "relay.db")
    try:
        [envelope] = box.fetch(B, 0, 10, NOW)
        assert (envelope.position, envelope.blob, envelope.header) == (1, b"0123456789", dep())
        assert box.policy(B) == ALLOW_A
        assert box.usage(B, A) == Usage(Tally(1, 10), Tally(1, 10), Tally(1, 10))
        assert box.retract(C, B, [1]) == 0 and box.delete(A, [(A, 1)]) == 0  # not theirs
        assert box.deposit(dep(seq=2, expiry=NOW + 5), b"x" * 10, NOW) == Stored(NOW + 5)
        assert [e.header.seq for e in box.fetch(B, 1, 10, NOW + 4)] == [2]
        assert box.fetch(B, 1, 10, NOW + 5) == []  # T has come: never served again
        assert box.sweep(NOW + 5) == [ExpiryNotice(A, B, 2, NOW + 5)]
        assert box.delete(B, [(A, 1)]) == 1 and box.usage(B, A) == Usage()
    finally:
        box.close()


# ---------------------------------------------------------------- model vs SQLite


def _both_implement_the_interface(
    sql: SqliteMailbox, model: ModelMailbox
) -> tuple[MailboxStore, MailboxStore]:
    return sql, model  # checked by mypy


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
    """The same operations on the SQLite backend and the model, on virtual time."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.sql = SqliteMailbox(Path(self.dir.name) / "relay.db", SMALL)
        self.model = ModelMailbox(SMALL)
        self.now = NOW
        self.gone: set[tuple[bytes, int]] = set()  # (recipient, position) deleted/expired
        self.notified: set[ExpiryNotice] = set()
        self.versions = dict.fromkeys(KEYS, 0)

    def teardown(self) -> None:
        self.sql.close()
        self.dir.cleanup()

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
        assert verdict == self.model.deposit(header, blob, self.now)
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


MailboxMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
test_sqlite_mailbox_agrees_with_the_model = MailboxMachine.TestCase
