"""One exchange with a relay: what ``p2psync sync`` does through the relay, and
what a running agent does on connecting and whenever something arrives.

In order, on one admitted relay session (``net/relayclient.py``):

1. hand the relay our signed mailbox policy (a newer version only when the
   senders changed; "not newer" from the relay is fine);
2. fetch everything waiting for us, open and apply each envelope (``Mailer.incoming``:
   data through the normal ingest path, receipts into the ledger), and delete
   from the relay only what our own store has committed;
3. take the relay's expiry notices (advice) and expire by our own clock;
4. deposit, for each peer asked, what it lacks and may get through the relay,
   and the receipts due to it; record "at relay R until T" or "refused".

Nothing here trusts the relay: what it serves is opened and checked by the
mailer, and only a signed receipt counts as delivered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial

import trio

from p2psync.clock import now_ms
from p2psync.core import relaywire as wire
from p2psync.core.envelope import EnvelopeClass, read_header
from p2psync.core.identity import device_id, short_id
from p2psync.errors import P2PSyncError, RemoteProtocolError, StoreError
from p2psync.home import OpenHome
from p2psync.mail.mailer import BATCH, Incoming, Mailer
from p2psync.net.relayclient import RelayClient, open_relay
from p2psync.store import relays as relays_mod
from p2psync.store.relays import Relay

log = logging.getLogger(__name__)

#: The largest envelope an agent makes for the relay (a bucket; smaller than the
#: relay's cap keeps one slow deposit from holding a session for long).
MAX_SEALED = 1 << 20
#: The most envelopes one exchange fetches (a relay's default mailbox holds 10,000):
#: a relay serving without end cannot hold the exchange; the rest waits for the next.
MAX_COLLECT = 20_000
#: The longest one visit to a relay for invite codes may take (seconds).
SIDE_VISIT_S = 30
#: The longest a relay's "stored until" is believed (the relay's default TTL
#: maximum): a hostile relay cannot keep our entries from going again for longer.
MAX_HOLD_MS = 7 * 24 * 3600 * 1000


@dataclass
class PeerReport:
    """What one exchange did for one peer."""

    deposited: int = 0  # envelopes stored at the relay
    introduced: int = 0  # of which introductions (our pairing request or answer)
    requests: int = 0  # introductions received (pairing requests, answers to ours)
    entries_out: int = 0
    #: envelopes asking for payloads again, and the entries they name
    asking: int = 0
    asked: int = 0
    bytes_out: int = 0
    until_ms: int = 0  # the latest "stored until" among them
    refused: list[str] = field(default_factory=list)  # why the relay refused some
    received: int = 0  # data envelopes applied
    entries_in: int = 0
    filled: int = 0  # entries held without payloads whose payloads arrived
    wanted: int = 0  # entries it asked us to send again (answered at the next deposit)
    acknowledged: int = 0  # our envelopes acknowledged by a signed receipt
    problems: list[str] = field(default_factory=list)


@dataclass
class ExchangeReport:
    relay: bytes
    address: str = ""
    peers: dict[bytes, PeerReport] = field(default_factory=dict)
    fetched: int = 0
    deleted: int = 0
    expired: int = 0

    def of(self, peer: bytes) -> PeerReport:
        return self.peers.setdefault(peer, PeerReport())


async def exchange(
    db: OpenHome, relay: Relay, peers: Iterable[bytes] | None = None
) -> ExchangeReport:
    """Connect to ``relay`` and run one exchange (module docstring) for ``peers``
    (default: every peer the mailer would send to). Raises RelayUnavailable when
    the relay cannot be reached or does not admit us."""
    async with open_relay(db.identity, db.name, relay) as client:
        if relay.token is not None:
            await trio.to_thread.run_sync(relays_mod.admitted, db.store, relay.key)
        return await exchange_on(client, Mailer(db), peers)


async def visit_side_relays(
    db: OpenHome,
    mailer: Mailer,
    current: bytes | None,
    relays: list[Relay],
    *,
    within: float = math.inf,
) -> list[ExchangeReport]:
    """One exchange with each relay an open invite code names (``Mailer.side_relays``)
    other than ``current`` (the relay just used), for the peers due there: a join
    waits for its answer at the relay its code named, whatever relay we use, and
    joins of our codes are collected at the relay they name. Each visit takes at
    most :data:`SIDE_VISIT_S`, all of them at most ``within`` seconds. A relay not in
    our list, unreachable or too slow is skipped (logged); our own store failing
    raises."""
    visits = await trio.to_thread.run_sync(mailer.side_relays, now_ms())
    listed = {relay.key for relay in relays}
    for key in visits:
        if key not in listed:
            log.info("relay %s, named by an open invite code, is not in our list of relays",
                     short_id(key))
    reports = []
    with trio.move_on_after(within):
        for relay in relays:
            if relay.key == current or relay.key not in visits:
                continue
            try:
                with trio.fail_after(SIDE_VISIT_S):
                    reports.append(await exchange(db, relay, sorted(visits[relay.key])))
            except StoreError:
                raise
            except trio.TooSlowError:
                log.info("relay %s: a visit for invite codes took over %d s",
                         short_id(relay.key), SIDE_VISIT_S)
            except P2PSyncError as exc:
                log.info("relay %s: a visit for invite codes failed: %s", short_id(relay.key), exc)
    return reports


async def exchange_on(
    client: RelayClient, mailer: Mailer, peers: Iterable[bytes] | None = None
) -> ExchangeReport:
    """One exchange on an open relay session."""
    report = ExchangeReport(client.relay, client.address)
    await hand_policy(client, mailer)
    await collect(client, mailer, report)
    await expire(client, mailer, report)
    carried = await trio.to_thread.run_sync(mailer.targets, client.relay)
    targets = list(peers) if peers is not None else list(carried)
    # a pairing request or join collected just now is answered (or refused) in this
    # exchange, and its sender may now deposit its answer (our policy lists the peers
    # we asked)
    if any(row.requests for row in report.peers.values()):
        await hand_policy(client, mailer)
    refusing = await trio.to_thread.run_sync(mailer.refusing)
    targets += [
        key for key in report.peers
        if (report.peers[key].requests or key in refusing) and key in carried
        and key not in targets
    ]
    for peer in targets:
        await deliver(client, mailer, peer, report)
    return report


async def hand_policy(client: RelayClient, mailer: Mailer) -> None:
    signed = await trio.to_thread.run_sync(mailer.policy, now_ms())
    if signed is None:
        return
    answer = await client.set_policy(signed)
    if isinstance(answer, wire.Refused) and answer.code is not wire.RefusalCode.NOT_NEWER:
        log.warning(
            "relay %s refused our mailbox policy: %s", short_id(client.relay), answer.detail
        )


async def collect(client: RelayClient, mailer: Mailer, report: ExchangeReport) -> int:
    """Fetch, apply and delete everything the relay holds for us; the last position."""
    last = 0
    done: list[tuple[bytes, int]] = []
    async with aclosing(client.fetch_all()) as served:
        async for held in served:
            if report.fetched >= MAX_COLLECT:
                log.warning(
                    "relay %s served more than %d envelopes in one exchange; the rest waits",
                    short_id(client.relay),
                    MAX_COLLECT,
                )
                break
            last = held.position
            report.fetched += 1
            try:
                header = wire_header(held.envelope)
            except RemoteProtocolError as exc:  # garbage the relay served: not ours to keep
                log.warning("relay %s served a malformed envelope: %s", short_id(client.relay), exc)
                continue
            try:
                outcome = await trio.to_thread.run_sync(mailer.incoming, held.envelope, now_ms())
            except StoreError:
                raise  # our own store failed: keep the envelope at the relay, try again later
            except RemoteProtocolError as exc:
                log.warning(
                    "refused an envelope from %s via relay %s: %s",
                    short_id(header[0]),
                    short_id(client.relay),
                    exc,
                )
                report.of(header[0]).problems.append(str(exc))
            else:
                _count(report, outcome)
            done.append(header)
            if len(done) >= wire.MAX_NAMES:
                report.deleted += await client.delete(done)
                done = []
    if done:
        report.deleted += await client.delete(done)
    return last


def wire_header(envelope: bytes) -> tuple[bytes, int]:
    """(sender, seq) from an envelope's outer header: the relay's key for it."""
    header = read_header(envelope)  # an EnvelopeError is a RemoteProtocolError
    return header.sender, header.seq


def _count(report: ExchangeReport, outcome: Incoming) -> None:
    peer = report.of(outcome.sender)
    if outcome.duplicate:
        return
    if outcome.reason is not None:
        peer.problems.append(outcome.reason)
    if outcome.cls is EnvelopeClass.DATA:
        peer.wanted += outcome.wanted
        if not outcome.wanted:  # (a bundle that asks carries nothing else)
            peer.received += 1
        peer.entries_in += outcome.applied
        peer.filled += outcome.filled
    elif outcome.cls is EnvelopeClass.RECEIPT:
        peer.acknowledged += outcome.acknowledged
    elif outcome.cls is EnvelopeClass.INTRODUCTION and outcome.reason is None:
        peer.requests += 1


async def expire(client: RelayClient, mailer: Mailer, report: ExchangeReport) -> None:
    for notice in await client.take_notices():
        await trio.to_thread.run_sync(
            mailer.notice, notice.recipient, notice.seq, notice.until_ms, now_ms()
        )
    report.expired += await trio.to_thread.run_sync(mailer.expire, now_ms())


async def deliver(client: RelayClient, mailer: Mailer, peer: bytes, report: ExchangeReport) -> None:
    """Deposit what ``peer`` lacks (and receipts due to it) until nothing is left
    or the relay refuses."""
    row = report.of(peer)
    max_sealed = min(MAX_SEALED, client.welcome.max_sealed)
    where = device_id(client.relay)
    size = 1  # a first small batch: a relay that refuses costs one envelope, not all
    while True:
        batch = await trio.to_thread.run_sync(
            partial(mailer.outgoing, peer, now_ms(), max_sealed=max_sealed, max_envelopes=size)
        )
        size = BATCH
        if not batch:
            return
        answers = await client.deposit_all([out.wire for out in batch])
        refused = False
        for out, answer in zip(batch, answers, strict=True):
            if isinstance(answer, wire.Stored | wire.Duplicate):
                hold = min(client.welcome.ttl_max_ms, MAX_HOLD_MS)
                until_ms = min(answer.until_ms, now_ms() + hold)
                await trio.to_thread.run_sync(
                    partial(
                        mailer.deposited,
                        peer,
                        out.seq,
                        where=where,
                        until_ms=until_ms,
                        now_ms=now_ms(),
                    )
                )
                row.deposited += 1
                row.introduced += out.cls is EnvelopeClass.INTRODUCTION
                row.entries_out += out.entries
                row.asking += out.asks > 0
                row.asked += out.asks
                row.bytes_out += len(out.wire)
                row.until_ms = max(row.until_ms, until_ms)
            else:
                refused = True
                reason = _refusal(answer)
                row.refused.append(reason)
                await trio.to_thread.run_sync(mailer.refused, peer, out.seq, reason, now_ms())
        if refused:
            return  # the relay is full or will not take them: keep the rest here


def _refusal(answer: wire.Refused) -> str:
    if answer.code is wire.RefusalCode.NOT_ALLOWED:
        return (
            "the relay holds no mailbox of this peer that lets us leave anything: it must "
            "connect to this relay once (`p2psync relay add` there, then its agent running "
            "or `p2psync sync`) since its rules with us were agreed; kept here until then"
        )
    return f"relay refused: {answer.code.name.lower().replace('_', ' ')} ({answer.detail})"
