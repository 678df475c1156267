"""The reference mailbox: :class:`~p2psync.core.mailbox.MailboxStore` in plain
dicts, usage counted from what is held (never charged and refunded), so the
SQLite backend's bookkeeping can be checked against it."""

from __future__ import annotations

from collections.abc import Iterable

from p2psync.core.envelope import EnvelopeClass
from p2psync.core.mailbox import (
    MAX_NOTICES,
    NO_POLICY,
    Deposit,
    Envelope,
    ExpiryNotice,
    Limits,
    MailboxPolicy,
    Stored,
    Summary,
    Tally,
    Usage,
    Verdict,
    admit,
    expired,
    live,
    newer,
)
from p2psync.errors import UsageError


def _tally(envelopes: Iterable[Envelope]) -> Tally:
    sizes = [e.header.size for e in envelopes]
    return Tally(len(sizes), sum(sizes))


class ModelMailbox:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.held: dict[tuple[bytes, bytes, int], Envelope] = {}
        self.positions: dict[bytes, int] = {}
        self.policies: dict[bytes, MailboxPolicy] = {}
        self.queued: list[ExpiryNotice] = []

    def usage(self, recipient: bytes, sender: bytes) -> Usage:
        box = [e for e in self.held.values() if e.header.recipient == recipient]
        pair = [e for e in box if e.header.sender == sender]
        intro = EnvelopeClass.INTRODUCTION
        return Usage(
            mailbox=_tally(box),
            pair=_tally(pair),
            sender=_tally(e for e in self.held.values() if e.header.sender == sender),
            intro_mailbox=_tally(e for e in box if e.header.cls is intro),
            intro_pair=_tally(e for e in pair if e.header.cls is intro),
        )

    def deposit(self, deposit: Deposit, blob: bytes, now_ms: int) -> Verdict:
        if len(blob) != deposit.size:
            raise UsageError(f"a deposit of {len(blob)} bytes claims {deposit.size}")
        held = self.held.get(deposit.key)
        verdict = admit(
            deposit,
            self.usage(deposit.recipient, deposit.sender),
            self.policy(deposit.recipient),
            self.limits,
            now_ms,
            held_until_ms=None if held is None else held.until_ms,
        )
        if isinstance(verdict, Stored):
            position = self.positions.get(deposit.recipient, 0) + 1
            self.positions[deposit.recipient] = position
            self.held[deposit.key] = Envelope(position, deposit, verdict.until_ms, blob)
            return Stored(verdict.until_ms, position)
        return verdict

    def fetch(
        self, recipient: bytes, after: int, limit: int, now_ms: int, max_bytes: int | None = None
    ) -> list[Envelope]:
        mine = sorted(
            (
                e
                for e in self.held.values()
                if e.header.recipient == recipient and e.position > after and live(e, now_ms)
            ),
            key=lambda e: e.position,
        )
        chosen: list[Envelope] = []
        for envelope in mine[:limit]:
            if (
                max_bytes is not None
                and chosen
                and (sum(e.header.size for e in chosen) + envelope.header.size > max_bytes)
            ):
                break
            chosen.append(envelope)
        return chosen

    def delete(self, recipient: bytes, keys: Iterable[tuple[bytes, int]]) -> int:
        return sum(self.held.pop((recipient, s, q), None) is not None for s, q in set(keys))

    def retract(self, sender: bytes, recipient: bytes, seqs: Iterable[int]) -> int:
        return sum(self.held.pop((recipient, sender, q), None) is not None for q in set(seqs))

    def sweep(self, now_ms: int) -> list[ExpiryNotice]:
        notices = expired(self.held.values(), now_ms)
        for notice in notices:
            del self.held[(notice.recipient, notice.sender, notice.seq)]
        self.queued += [n for n in notices if n not in self.queued]
        self.queued = [n for n in self.queued if n.until_ms > now_ms - self.limits.ttl_max_ms]
        for sender in {n.sender for n in self.queued}:
            mine = sorted(
                (n for n in self.queued if n.sender == sender),
                key=lambda n: (n.until_ms, n.recipient, n.seq),
            )
            for old in mine[: max(0, len(mine) - MAX_NOTICES)]:
                self.queued.remove(old)
        return notices

    def take_notices(self, sender: bytes, limit: int = 1000) -> list[ExpiryNotice]:
        mine = sorted(
            (n for n in self.queued if n.sender == sender),
            key=lambda n: (n.until_ms, n.recipient, n.seq),
        )[:limit]
        self.queued = [n for n in self.queued if n not in mine]
        return mine

    def policy(self, recipient: bytes) -> MailboxPolicy:
        return self.policies.get(recipient, NO_POLICY)

    def set_policy(self, recipient: bytes, policy: MailboxPolicy) -> bool:
        if not newer(self.policy(recipient), policy):
            return False
        self.policies[recipient] = policy
        return True

    def position(self, recipient: bytes) -> int:
        return self.positions.get(recipient, 0)

    def purge(self, recipient: bytes, now_ms: int) -> int:
        mine = [key for key in self.held if key[0] == recipient]
        for key in mine:
            del self.held[key]
            notice = ExpiryNotice(key[1], recipient, key[2], now_ms)
            if notice not in self.queued:
                self.queued.append(notice)
        self.policies.pop(recipient, None)
        return len(mine)

    def close(self) -> None:
        pass

    def summary(self, now_ms: int) -> Summary:
        del now_ms
        boxes: dict[bytes, Tally] = {}
        for e in self.held.values():
            boxes[e.header.recipient] = boxes.get(e.header.recipient, Tally()).plus(e.header.size)
        return Summary(
            mailboxes=len(boxes),
            envelopes=len(self.held),
            bytes=sum(e.header.size for e in self.held.values()),
            oldest_until_ms=min((e.until_ms for e in self.held.values()), default=None),
            notices=len(self.queued),
            fullest_count=max((t.count for t in boxes.values()), default=0),
            fullest_bytes=max((t.bytes for t in boxes.values()), default=0),
        )
