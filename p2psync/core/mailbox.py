"""The relay's blind mailbox, pure: what a deposit is answered, what expires, and
the narrow interface (:class:`MailboxStore`) every storage backend implements.

The relay sees only an envelope's outer header (:class:`Deposit`) and an opaque
sealed blob. The decisions are functions of plain values with the time passed in
(``now_ms``), so the SQLite backend (``store/mailbox.py``), a later PostgreSQL
backend and the reference model in the tests all answer alike. ``docs/relay.md``
("Mailbox") is the spec; in short:

* :func:`admit` answers a deposit: :class:`Stored` until T, :class:`Duplicate`
  (the key recipient/sender/seq is already held: its original T), or
  :class:`Refused` with a :class:`Refusal` (and for a full quota which
  :class:`Quota`, how much is used and the limit). Refusals are values, never
  exceptions; the relay refuses when full and never evicts.
* :func:`until_ms` is the expiry rule: ``min(asked, now + max TTL)``, or
  ``now + default TTL`` when the sender asks for none (0); clamped, not refused.
* :func:`expired` is the sweep: every held envelope whose T has come
  (``T <= now``) goes, each with one :class:`ExpiryNotice` for its sender.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from p2psync.core.envelope import MAX_SEALED_BY_CLASS, MAX_SEALED_BYTES, EnvelopeClass
from p2psync.errors import UsageError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DAY_MS = 24 * 3600 * 1000

#: Keys are Ed25519 public keys (device IDs as bytes).
KEY_SIZE = 32

#: Numbers (seqs, times, sizes, cursors) are at most what SQL's signed 64-bit integers hold.
MAX_INT = (1 << 63) - 1
#: Envelopes one fetch returns at most.
MAX_FETCH = 1000
#: Expiry notices kept per sender (the newest): advice a sender may never take.
MAX_NOTICES = 1000


class Refusal(enum.Enum):
    """Why a deposit was refused (nothing was stored or charged)."""

    NOT_ALLOWED = "not-allowed"  # data/receipt from a sender not on the policy
    TOO_BIG = "too-big"  # larger than Limits.max_envelope_bytes
    EXPIRED = "expired"  # the asked expiry is not after now
    FULL = "full"  # a quota would be exceeded (Refused.quota says which)


class Quota(enum.Enum):
    """The quotas, in the order :func:`admit` checks them."""

    INTRO_PAIR_COUNT = "introduction-pair-count"
    INTRO_PAIR_BYTES = "introduction-pair-bytes"
    INTRO_MAILBOX_COUNT = "introduction-mailbox-count"
    INTRO_MAILBOX_BYTES = "introduction-mailbox-bytes"
    MAILBOX_COUNT = "mailbox-count"
    MAILBOX_BYTES = "mailbox-bytes"
    PAIR_COUNT = "pair-count"
    PAIR_BYTES = "pair-bytes"
    SENDER_BYTES = "sender-bytes"


@dataclass(frozen=True)
class Deposit:
    """An envelope's outer header as the relay sees it, and its blob's size.

    ``sender`` is the authenticated key of the depositing session, never a field
    the client chose. ``expiry_ms`` 0 means "no expiry asked" (the default TTL).
    """

    recipient: bytes
    sender: bytes
    seq: int
    cls: EnvelopeClass
    expiry_ms: int
    size: int

    def __post_init__(self) -> None:
        if len(self.recipient) != KEY_SIZE or len(self.sender) != KEY_SIZE:
            raise UsageError(f"mailbox keys are {KEY_SIZE} bytes")
        checks = (("seq", self.seq, 1), ("expiry", self.expiry_ms, 0), ("size", self.size, 0))
        for name, value, low in checks:
            if type(value) is not int or not low <= value <= MAX_INT:
                raise UsageError(f"a deposit's {name} is {low} to 2**63 - 1")

    @property
    def key(self) -> tuple[bytes, bytes, int]:
        """The idempotence key: (recipient, sender, seq)."""
        return (self.recipient, self.sender, self.seq)


@dataclass(frozen=True)
class Limits:
    """Quotas and TTLs of one relay (bytes are envelope sizes as deposited)."""

    mailbox_count: int = 10_000
    mailbox_bytes: int = 1 * GiB
    #: one sender's share of a mailbox: a sender cannot take every place from the others
    pair_count: int = 2_500
    pair_bytes: int = 256 * MiB
    sender_bytes: int = 2 * GiB
    #: Introductions (pairing requests, invite joins) come from anyone admitted:
    #: a tiny quota per mailbox, and per sender into one mailbox.
    intro_mailbox_count: int = 64
    intro_mailbox_bytes: int = 1 * MiB
    intro_pair_count: int = 4
    intro_pair_bytes: int = 64 * KiB
    #: One envelope's ceiling (the envelope format aims at about 1 MiB).
    max_envelope_bytes: int = MAX_SEALED_BYTES  # the envelope format's cap (data)
    ttl_default_ms: int = 7 * DAY_MS
    ttl_max_ms: int = 7 * DAY_MS

    def __post_init__(self) -> None:
        if min(vars(self).values()) <= 0:
            raise UsageError("mailbox limits and TTLs are positive")


@dataclass(frozen=True)
class MailboxPolicy:
    """The recipient's mailbox policy: which senders may deposit data and receipts.

    A plain value here; on the wire it is signed by the recipient
    (:mod:`p2psync.core.policy`), and a relay keeps the policy with the highest
    version.
    The policy of a mailbox nobody set is :data:`NO_POLICY`: data from no one.
    """

    version: int
    senders: frozenset[bytes] = field(default_factory=frozenset)

    def allows(self, deposit: Deposit) -> bool:
        if deposit.cls is EnvelopeClass.INTRODUCTION:
            return True
        return deposit.sender in self.senders


NO_POLICY = MailboxPolicy(0)


@dataclass(frozen=True)
class Tally:
    """Envelopes and their bytes."""

    count: int = 0
    bytes: int = 0

    def plus(self, size: int) -> Tally:
        return Tally(self.count + 1, self.bytes + size)


ZERO = Tally()


@dataclass(frozen=True)
class Usage:
    """What is held that one deposit (recipient, sender) would be charged against.
    Every class counts in ``mailbox``, ``pair`` and ``sender``; introductions
    count in the two ``intro_`` tallies as well."""

    mailbox: Tally = ZERO  # everything in the recipient's mailbox
    pair: Tally = ZERO  # from this sender in this mailbox
    sender: Tally = ZERO  # from this sender in every mailbox
    intro_mailbox: Tally = ZERO  # introductions in the mailbox
    intro_pair: Tally = ZERO  # introductions from this sender in the mailbox


@dataclass(frozen=True)
class Stored:
    """Stored (durably, when a backend returns it) and held until ``until_ms``;
    a backend also says at which ``position`` of the mailbox (not compared: the
    pure decision has none)."""

    until_ms: int
    position: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Duplicate:
    """The key is already held: nothing changed; the original ``until_ms``."""

    until_ms: int


@dataclass(frozen=True)
class Refused:
    """Nothing stored or charged. For :attr:`Refusal.FULL`, which quota, how much
    of it is used and its limit (count or bytes, as the quota's name says)."""

    reason: Refusal
    quota: Quota | None = None
    used: int = 0
    limit: int = 0


Verdict = Stored | Duplicate | Refused


def until_ms(expiry_ms: int, limits: Limits, now_ms: int) -> int:
    """When a deposit made at ``now_ms`` expires: the asked expiry clamped to
    ``now + ttl_max``, or ``now + ttl_default`` (also clamped) when none asked."""
    latest = now_ms + limits.ttl_max_ms
    if expiry_ms == 0:
        return min(now_ms + limits.ttl_default_ms, latest)
    return min(expiry_ms, latest)


def _full(deposit: Deposit, usage: Usage, limits: Limits) -> Refused | None:
    """The first quota the deposit would exceed: (quota, used, adds, limit)."""
    size, u, lim = deposit.size, usage, limits
    checks: list[tuple[Quota, int, int, int]] = []
    if deposit.cls is EnvelopeClass.INTRODUCTION:
        checks += [
            (Quota.INTRO_PAIR_COUNT, u.intro_pair.count, 1, lim.intro_pair_count),
            (Quota.INTRO_PAIR_BYTES, u.intro_pair.bytes, size, lim.intro_pair_bytes),
            (Quota.INTRO_MAILBOX_COUNT, u.intro_mailbox.count, 1, lim.intro_mailbox_count),
            (Quota.INTRO_MAILBOX_BYTES, u.intro_mailbox.bytes, size, lim.intro_mailbox_bytes),
        ]
    checks += [
        (Quota.MAILBOX_COUNT, usage.mailbox.count, 1, limits.mailbox_count),
        (Quota.MAILBOX_BYTES, usage.mailbox.bytes, size, limits.mailbox_bytes),
        (Quota.PAIR_COUNT, usage.pair.count, 1, limits.pair_count),
        (Quota.PAIR_BYTES, usage.pair.bytes, size, limits.pair_bytes),
        (Quota.SENDER_BYTES, usage.sender.bytes, size, limits.sender_bytes),
    ]
    for quota, used, adds, limit in checks:
        if used + adds > limit:
            return Refused(Refusal.FULL, quota, used, limit)
    return None


def admit(
    deposit: Deposit,
    usage: Usage,
    policy: MailboxPolicy,
    limits: Limits,
    now_ms: int,
    *,
    held_until_ms: int | None = None,
) -> Verdict:
    """The answer to ``deposit`` at ``now_ms``. ``held_until_ms`` is the T of the
    envelope already held under the same key, if any (then: :class:`Duplicate`,
    whatever else the deposit says, even when that T has passed but no sweep has
    run yet). Checked in this order: duplicate, policy, size, expiry, quotas."""
    if held_until_ms is not None:
        return Duplicate(held_until_ms)
    if not policy.allows(deposit):
        return Refused(Refusal.NOT_ALLOWED)
    cap = min(limits.max_envelope_bytes, MAX_SEALED_BY_CLASS[deposit.cls])
    if deposit.size > cap:  # the relay's limit, and the envelope format's for the class
        return Refused(Refusal.TOO_BIG, None, deposit.size, cap)
    if deposit.expiry_ms != 0 and deposit.expiry_ms <= now_ms:
        return Refused(Refusal.EXPIRED)
    full = _full(deposit, usage, limits)
    if full is not None:
        return full
    return Stored(until_ms(deposit.expiry_ms, limits, now_ms))


def charge(usage: Usage, deposit: Deposit) -> Usage:
    """``usage`` after ``deposit`` is stored (:func:`admit` said :class:`Stored`)."""
    intro = deposit.cls is EnvelopeClass.INTRODUCTION
    size = deposit.size
    return Usage(
        mailbox=usage.mailbox.plus(size),
        pair=usage.pair.plus(size),
        sender=usage.sender.plus(size),
        intro_mailbox=usage.intro_mailbox.plus(size) if intro else usage.intro_mailbox,
        intro_pair=usage.intro_pair.plus(size) if intro else usage.intro_pair,
    )


def newer(current: MailboxPolicy, offered: MailboxPolicy) -> bool:
    """Whether ``offered`` replaces ``current``: only a higher version does."""
    return offered.version > current.version


@dataclass(frozen=True)
class Envelope:
    """A held envelope as fetch serves it. ``position`` is its place in its
    mailbox: increasing in deposit order, never reused (the fetch cursor)."""

    position: int
    header: Deposit
    until_ms: int
    blob: bytes


@dataclass(frozen=True)
class ExpiryNotice:
    """Told to ``sender``: its envelope ``seq`` to ``recipient`` expired unfetched
    (or fetched but never deleted) at ``until_ms``."""

    sender: bytes
    recipient: bytes
    seq: int
    until_ms: int


def expired(held: Iterable[Envelope], now_ms: int) -> list[ExpiryNotice]:
    """The sweep: one notice for each held envelope whose T has come, in
    (recipient, position) order."""
    gone = sorted(
        (e for e in held if e.until_ms <= now_ms),
        key=lambda e: (e.header.recipient, e.position),
    )
    return [
        ExpiryNotice(e.header.sender, e.header.recipient, e.header.seq, e.until_ms) for e in gone
    ]


def live(envelope: Envelope, now_ms: int) -> bool:
    """Whether fetch may serve it: only before its T."""
    return now_ms < envelope.until_ms


@dataclass(frozen=True)
class Summary:
    """What a relay holds, for ``relay status``."""

    mailboxes: int = 0  # mailboxes holding at least one envelope
    envelopes: int = 0
    bytes: int = 0
    oldest_until_ms: int | None = None  # the earliest T among them
    notices: int = 0  # expiry notices waiting for their senders
    fullest_count: int = 0  # the most envelopes one mailbox holds
    fullest_bytes: int = 0  # the most bytes one mailbox holds


class MailboxStore(Protocol):
    """A mailbox backend. Every method is one transaction; the decisions are the
    functions above. The caller (the relay) names the authenticated key: a
    recipient reaches only its own mailbox, a sender only its own envelopes."""

    def deposit(self, deposit: Deposit, blob: bytes, now_ms: int) -> Verdict:
        """Store ``blob`` under ``deposit`` if :func:`admit` says so; a
        :class:`Stored` answer is durable when it returns."""
        ...

    def fetch(
        self, recipient: bytes, after: int, limit: int, now_ms: int, max_bytes: int | None = None
    ) -> list[Envelope]:
        """The recipient's live envelopes with position > ``after``, in position
        order, at most ``limit``, and (when ``max_bytes`` is given) no more than
        fit in ``max_bytes`` of sealed size, though always the first one."""
        ...

    def delete(self, recipient: bytes, keys: Iterable[tuple[bytes, int]]) -> int:
        """Drop the recipient's envelopes named (sender, seq), after the recipient
        committed them; how many were held."""
        ...

    def retract(self, sender: bytes, recipient: bytes, seqs: Iterable[int]) -> int:
        """Drop the sender's own envelopes to ``recipient``; how many were held."""
        ...

    def sweep(self, now_ms: int) -> list[ExpiryNotice]:
        """Drop every envelope expired at ``now_ms`` and queue its notice, in one
        transaction; the notices queued. Notices nobody took within the maximum
        TTL go, and a sender keeps at most :data:`MAX_NOTICES` (the newest)."""
        ...

    def take_notices(self, sender: bytes, limit: int = MAX_FETCH) -> list[ExpiryNotice]:
        """Remove and return the oldest ``limit`` notices queued for ``sender``,
        oldest first (by T, then recipient and seq)."""
        ...

    def usage(self, recipient: bytes, sender: bytes) -> Usage:
        """What a deposit from ``sender`` to ``recipient`` would be charged against."""
        ...

    def policy(self, recipient: bytes) -> MailboxPolicy:
        """The recipient's policy in force (:data:`NO_POLICY` when none)."""
        ...

    def set_policy(self, recipient: bytes, policy: MailboxPolicy) -> bool:
        """Put ``policy`` in force if it is :func:`newer`; whether it was."""
        ...

    def position(self, recipient: bytes) -> int:
        """The last position handed out in the recipient's mailbox (0: none)."""
        ...

    def purge(self, recipient: bytes, now_ms: int) -> int:
        """An operator drops the recipient's mailbox: every envelope goes, each
        with an expiry notice (``until_ms`` = ``now_ms``) for its sender, in one
        transaction; the policy goes too. How many envelopes went."""
        ...

    def summary(self, now_ms: int) -> Summary:
        """What is held (:class:`Summary`)."""
        ...

    def close(self) -> None:
        """Let go of the storage (file or connections)."""
        ...
