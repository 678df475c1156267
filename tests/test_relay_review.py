"""From the hostile review of the relay's first pieces (envelope, receipt,
mailbox), each failing before its fix: seqs the store cannot hold, a repeated
expiry notice that stopped every sweep, fetch limits, the format's class caps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2psync.core.envelope import MAX_SEALED_BY_CLASS, EnvelopeClass
from p2psync.core.mailbox import (
    DAY_MS,
    NO_POLICY,
    Deposit,
    Limits,
    MailboxPolicy,
    Refusal,
    Refused,
    Stored,
    Usage,
    admit,
)
from p2psync.errors import P2PSyncError, UsageError
from p2psync.store.mailbox import SqliteMailbox

pytestmark = pytest.mark.pure

A, B = bytes([1]) * 32, bytes([2]) * 32
DATA, INTRO, RECEIPT = EnvelopeClass.DATA, EnvelopeClass.INTRODUCTION, EnvelopeClass.RECEIPT
NOW = 10 * DAY_MS


@pytest.fixture
def box(tmp_path: Path) -> Iterator[SqliteMailbox]:
    mailbox = SqliteMailbox(tmp_path / "mailbox.db")
    mailbox.set_policy(B, MailboxPolicy(1, frozenset({A})))
    yield mailbox
    mailbox.close()


# 1. seq is 1 to 2**64 - 1 in the envelope format, but SQLite (and PostgreSQL
#    BIGINT) hold signed 64-bit integers: a valid envelope cannot be deposited and
#    a foreign OverflowError escapes the store.
def test_a_seq_the_store_cannot_hold_is_refused_by_the_format_and_the_mailbox(
    box: SqliteMailbox,
) -> None:
    """Fixed by capping seqs at 2**63 - 1 in the format (what SQL holds)."""
    seq = 1 << 63
    with pytest.raises(UsageError):
        Deposit(B, A, seq, DATA, 0, 3)
    top = (1 << 63) - 1
    assert isinstance(box.deposit(Deposit(B, A, top, DATA, 0, 3), b"abc", NOW), Stored)


def test_retract_and_delete_with_a_huge_seq_raise_no_foreign_exception(
    box: SqliteMailbox,
) -> None:
    for call in (
        lambda: box.retract(A, B, [1 << 64]),
        lambda: box.delete(B, [(A, 1 << 64)]),
    ):
        with contextlib.suppress(P2PSyncError):
            assert call() == 0


# 2. Notices are keyed (sender, recipient, seq, until_ms). If the same key is
#    stored again with the same T after it was swept (the relay's clock stepped
#    back, or sweep ran with a clock ahead of deposit's), the next sweep hits the
#    primary key: the whole sweep transaction fails, and keeps failing for every
#    mailbox until that sender takes its notices (a hostile sender never does).
def test_sweep_survives_a_second_notice_for_the_same_key_and_t(box: SqliteMailbox) -> None:
    expiry = NOW + 1000
    assert box.deposit(Deposit(B, A, 1, DATA, expiry, 3), b"abc", NOW) == Stored(expiry)
    assert len(box.sweep(expiry)) == 1  # notice queued, not taken
    # clock stepped back by a second (NTP), the sender re-sends the same envelope
    assert box.deposit(Deposit(B, A, 1, DATA, expiry, 3), b"abc", expiry - 1000) == Stored(expiry)
    # an unrelated sender's envelope in another mailbox, also due
    assert isinstance(box.deposit(Deposit(A, B, 7, INTRO, expiry, 3), b"xyz", NOW), Stored)
    notices = box.sweep(expiry + 1)  # raises StoreError (UNIQUE constraint failed)
    assert len(notices) == 2


# 3. fetch's limit is not validated: SQLite reads LIMIT -1 as "no limit", so a
#    negative limit serves the whole mailbox (up to 1 GiB in one answer); the
#    reference model's mine[:limit] answers all but the last: the backends differ.
def test_fetch_with_a_negative_limit_does_not_serve_everything(box: SqliteMailbox) -> None:
    for seq in (1, 2, 3):
        box.deposit(Deposit(B, A, seq, DATA, 0, 3), b"abc", NOW)
    try:
        served = box.fetch(B, 0, -1, NOW)
    except P2PSyncError:
        return
    assert served == []


# 4. The mailbox caps every class at max_envelope_bytes (the data cap, 4 MiB), not
#    at the envelope format's per-class caps (receipt 1 MiB, introduction 16 KiB),
#    which docs/relay.md says "the relay can check on the header alone".
@pytest.mark.parametrize("cls", [RECEIPT, INTRO])
def test_a_deposit_over_its_class_cap_is_too_big(cls: EnvelopeClass) -> None:
    size = MAX_SEALED_BY_CLASS[cls] * 2
    limits = Limits(intro_pair_bytes=8 * 1024 * 1024, intro_mailbox_bytes=8 * 1024 * 1024)
    verdict = admit(
        Deposit(B, A, 1, cls, 0, size),
        Usage(),
        MailboxPolicy(1, frozenset({A})),
        limits,
        NOW,
    )
    assert verdict == Refused(Refusal.TOO_BIG, None, size, MAX_SEALED_BY_CLASS[cls])


def test_default_intro_quota_admits_an_introduction_the_format_forbids() -> None:
    size = 64 * 1024  # four times the introduction cap, within intro_pair_bytes
    verdict = admit(Deposit(B, A, 1, INTRO, 0, size), Usage(), NO_POLICY, Limits(), NOW)
    assert isinstance(verdict, Refused) and verdict.reason is Refusal.TOO_BIG
