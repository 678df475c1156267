"""The relay's mailbox: the pure decisions (core/mailbox.py), and the SQLite
backend (store/mailbox.py) driven side by side with the reference model
(tests/mailbox_model.py) by a hypothesis state machine on virtual time.

kill -9 during deposits, fetch+delete and sweeps: tests/test_mailbox_crash.py."""

from __future__ import annotations

import pytest

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
