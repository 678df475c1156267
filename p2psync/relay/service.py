"""What a relay answers each request of an admitted session (no I/O but the mailbox).

:meth:`Service.handle` takes the session's authenticated key (never a field the
agent chose), one request and the time, and returns the one answer the protocol
gives it (``docs/relay.md``, "Relay sessions"), plus, for a stored deposit, the
recipient whose sessions are told something arrived. The relay checks only what
it may see: an envelope's outer header (shape, size bucket, sender = the
session's key), and a mailbox policy's signature by the session's key. A store
failure is :class:`~p2psync.errors.StoreError`: a deposit is then refused
"busy" (nothing stored), anything else ends the session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from p2psync.core import relaywire as wire
from p2psync.core.envelope import OuterHeader, join_wire, split_wire
from p2psync.core.mailbox import (
    MAX_FETCH,
    Deposit,
    Duplicate,
    Limits,
    MailboxStore,
    Refusal,
    Refused,
    Stored,
)
from p2psync.core.policy import decode_policy
from p2psync.errors import EnvelopeError, PolicyError, StoreError

log = logging.getLogger("p2psync.relay")

#: What an agent is told when storing failed (nothing stored): no details.
STORAGE_FAILED = "the relay's storage failed; deposit again later"

#: Room in one Envelopes answer for what is not an envelope (type, rid, flags,
#: and per envelope its position, T and framing).
_ANSWER_SLACK = 64
_PER_ENVELOPE = 32

_CODES = {
    Refusal.NOT_ALLOWED: wire.RefusalCode.NOT_ALLOWED,
    Refusal.TOO_BIG: wire.RefusalCode.TOO_BIG,
    Refusal.EXPIRED: wire.RefusalCode.EXPIRED,
    Refusal.FULL: wire.RefusalCode.FULL,
}


@dataclass(frozen=True)
class Outcome:
    answer: wire.Answer
    #: A deposit was stored for this recipient at this position.
    arrived: tuple[bytes, int] | None = None


class Service:
    def __init__(self, mailbox: MailboxStore, limits: Limits) -> None:
        self.mailbox = mailbox
        self.limits = limits

    def handle(self, key: bytes, request: wire.Request, now_ms: int) -> Outcome:
        match request:
            case wire.Policy():
                return Outcome(self._policy(key, request))
            case wire.Deposit():
                return self._deposit(key, request, now_ms)
            case wire.Fetch():
                return Outcome(self._fetch(key, request, now_ms))
            case wire.Delete():
                return Outcome(wire.Done(request.rid, self.mailbox.delete(key, request.keys)))
            case wire.Retract():
                count = self.mailbox.retract(key, request.recipient, request.seqs)
                return Outcome(wire.Done(request.rid, count))
            case wire.TakeNotices():
                notices = self.mailbox.take_notices(key, wire.MAX_NAMES)
                return Outcome(
                    wire.Notices(
                        request.rid,
                        tuple(wire.Notice(n.recipient, n.seq, n.until_ms) for n in notices),
                    )
                )
        raise TypeError(f"not a request: {request!r}")  # pragma: no cover - Request is closed

    def _policy(self, key: bytes, request: wire.Policy) -> wire.Answer:
        try:
            signed = decode_policy(request.signed, owner=key)
        except PolicyError as exc:
            return wire.Refused(request.rid, wire.RefusalCode.MALFORMED, str(exc))
        if not self.mailbox.set_policy(key, signed.to_mailbox_policy()):
            current = self.mailbox.policy(key).version
            return wire.Refused(
                request.rid,
                wire.RefusalCode.NOT_NEWER,
                f"version {signed.version} is not above {current}, the one in force",
            )
        return wire.Done(request.rid, 1)

    def _deposit(self, key: bytes, request: wire.Deposit, now_ms: int) -> Outcome:
        rid = request.rid
        try:
            header, sealed = split_wire(request.envelope)
        except EnvelopeError as exc:
            return Outcome(wire.Refused(rid, wire.RefusalCode.MALFORMED, str(exc)))
        if header.sender != key:
            return Outcome(
                wire.Refused(
                    rid,
                    wire.RefusalCode.MALFORMED,
                    "the envelope's sender is not the device of this session",
                )
            )
        deposit = Deposit(
            header.recipient, key, header.seq, header.cls, header.expiry_ms, len(sealed)
        )
        try:
            verdict = self.mailbox.deposit(deposit, sealed, now_ms)
        except StoreError as exc:  # the details (hosts, paths, names) are for the log only
            log.error("a deposit failed: %s", exc)
            return Outcome(wire.Refused(rid, wire.RefusalCode.BUSY, STORAGE_FAILED))
        if isinstance(verdict, Stored):
            return Outcome(wire.Stored(rid, verdict.until_ms), (header.recipient, verdict.position))
        if isinstance(verdict, Duplicate):
            return Outcome(wire.Duplicate(rid, verdict.until_ms))
        return Outcome(wire.Refused(rid, _CODES[verdict.reason], _detail(verdict)))

    def _fetch(self, key: bytes, request: wire.Fetch, now_ms: int) -> wire.Envelopes:
        limit = min(request.limit, MAX_FETCH)
        budget = wire.MAX_MESSAGE_BYTES - _ANSWER_SLACK
        # what the answer can carry, not `limit` envelopes of up to 4 MiB each
        held = self.mailbox.fetch(key, request.after, limit, now_ms, max_bytes=budget)
        served: list[wire.Held] = []
        for envelope in held:
            h = envelope.header
            data = join_wire(
                OuterHeader(h.sender, h.recipient, h.seq, h.cls, h.expiry_ms, h.size),
                envelope.blob,
            )
            budget -= len(data) + _PER_ENVELOPE
            if budget < 0 and served:
                return wire.Envelopes(request.rid, tuple(served), True)
            served.append(wire.Held(envelope.position, envelope.until_ms, data))
        more = bool(held) and bool(self.mailbox.fetch(key, held[-1].position, 1, now_ms))
        return wire.Envelopes(request.rid, tuple(served), more)


def _detail(verdict: Refused) -> str:
    if verdict.reason is Refusal.FULL and verdict.quota is not None:
        return f"{verdict.quota.value} quota: {verdict.used:,} used of {verdict.limit:,}"
    if verdict.reason is Refusal.TOO_BIG:
        return f"{verdict.used:,} bytes is above the relay's {verdict.limit:,}"
    if verdict.reason is Refusal.NOT_ALLOWED:
        return "the recipient's mailbox policy does not list this sender"
    return "its expiry has passed"
