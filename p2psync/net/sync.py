"""Running a sync session over a secure stream: the trio pump around
:class:`p2psync.core.session.SyncSession`, which owns the protocol.

The pump moves bytes, time and store results; small tasks share one machine
(trio runs one at a time, so every machine call is atomic):

* **reader** — frames in, messages decoded and fed to the machine;
* **writer** — the only task that writes to the stream: the machine's outbox, in order;
* **ingester** — received batches into the store (one transaction each);
* **sender** — what the peer lacks, read in causal order, while the window allows;
* **timer** — the machine's deadlines (keepalive, idle timeout, pairing);
* **watcher** — local commits (by anyone) update our heads, so new entries go out live;
* with a :class:`~p2psync.net.link.PairLink`, the **rules pump** (and its watcher of
  local rule changes); once the peer's heads are known, a **fork check**.

A peer that sends an invalid entry, breaks the protocol or goes silent is
disconnected with the reason; what it sent before that stays committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import trio

from p2psync.clock import now_ms
from p2psync.core import messages
from p2psync.core.events import (
    BatchReceived,
    Event,
    PeerHeadsReceived,
    Refusal,
    SessionClosed,
    StuckOnRefused,
    SyncedWithPeer,
)
from p2psync.core.identity import short_id
from p2psync.core.messages import Bye, Head
from p2psync.core.session import SessionConfig, SyncSession
from p2psync.errors import ConnectionLost, RemoteProtocolError, StoreError
from p2psync.net.forks import exchange_fork_proofs
from p2psync.net.link import PairLink, RulesPump
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, Signal, TrioStore
from p2psync.net.transport import SecureStream

log = logging.getLogger(__name__)

BATCH_ENTRIES = 2000
BATCH_BYTES = 1 << 20


class _Run:
    def __init__(
        self,
        secure: SecureStream,
        store: TrioStore,
        feed: ChangeFeed,
        machine: SyncSession,
        nursery: trio.Nursery,
        on_progress: Callable[[SessionStats], None] | None = None,
        on_synced: Callable[[SessionStats], None] | None = None,
        on_stuck: Callable[[SessionStats], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.secure, self.store, self.feed, self.machine = secure, store, feed, machine
        self.on_change = on_change
        self.standing = (False, False)  # in sync, stuck: as last told to on_change
        self.nursery = nursery
        self.on_progress, self.on_synced, self.on_stuck = on_progress, on_synced, on_stuck
        self.rules: RulesPump | None = None
        self.stats = SessionStats()
        self.outbox_ready = Signal()
        self.sender_wake = Signal()
        self.batches_in, self.batches_out = trio.open_memory_channel[BatchReceived](
            machine.config.window + 1
        )
        self.who = short_id(secure.peer)
        self.local_stale = False

    def handle(self, events: list[Event]) -> None:
        """Act on the machine's events, then wake the writer and the sender."""
        for event in events:
            if isinstance(event, BatchReceived):
                self.batches_in.send_nowait(event)  # the machine enforces the window
            elif isinstance(event, PeerHeadsReceived):
                self.peer_heads(event)
            elif isinstance(event, SyncedWithPeer | StuckOnRefused | SessionClosed):
                self.stats.note(event, self.who)
                if isinstance(event, SyncedWithPeer) and self.on_synced is not None:
                    self.on_synced(self.stats)
                if isinstance(event, StuckOnRefused) and self.on_stuck is not None:
                    self.on_stuck(self.stats)
            else:  # rule messages, and the machine's verdicts on them
                assert self.rules is not None  # the machine refuses them without a link
                self.rules.queue(event)
        self.outbox_ready.set()
        self.sender_wake.set()
        if self.on_change is not None:  # in sync or stuck, whether it said so or not
            synced = self.machine.synced  # stuck only when not (both need quiet)
            standing = (synced, not synced and self.machine.stuck_reason is not None)
            if standing != self.standing:
                self.standing = standing
                self.on_change()

    def peer_heads(self, event: PeerHeadsReceived) -> None:
        if self.rules is not None:  # it settled: it holds what its RulesHeld got
            self.rules.link.reconciled(self.rules.answered_version)
        self.stats.peer_heads = event.heads
        self.stats.to_receive = sum(
            max(0, head.seq - self.machine.local.get(a, Head(0, b"")).seq)
            for a, head in event.heads.items()
        )
        self.nursery.start_soon(
            exchange_fork_proofs,
            *(self.store, self.machine, self.secure.peer, event.heads, self.outbox_ready),
        )

    def lost(self, reason: str, error: bool) -> None:
        """The connection itself failed: nothing more can be sent; stop everything."""
        if not self.stats.reason:
            self.stats.reason, self.stats.error = reason, error
        log.log(
            logging.WARNING if error else logging.INFO,
            "connection with %s ended: %s",
            self.who,
            reason,
        )
        self.nursery.cancel_scope.cancel()

    def progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.stats)

    # ------------------------------------------------------------ tasks

    async def writer(self) -> None:
        """The only task that writes. A peer that stops reading stalls it: after the
        idle timeout (one second for a farewell) the connection is dropped."""
        patience = self.machine.config.idle_timeout
        try:
            while True:
                await self.outbox_ready.wait()
                # until the outbox is empty: a Bye queued while we were sending is
                # in it even when the machine has closed meanwhile
                while outbox := self.machine.take_outbox(trio.current_time()):
                    for message in outbox:
                        with trio.move_on_after(1 if isinstance(message, Bye) else patience):
                            await self.secure.send(messages.encode(message))
                            continue
                        self.lost(f"the peer stopped reading for {patience:g} s", error=True)
                        return
                if self.machine.closed:
                    break
        except ConnectionLost as exc:
            self.lost(str(exc), error=False)
            return
        self.nursery.cancel_scope.cancel()

    async def reader(self) -> None:
        try:
            while not self.machine.closed:
                data = await self.secure.receive()
                message = messages.decode(data)
                self.handle(self.machine.receive(message, trio.current_time()))
                if self.machine.synced:  # heard from the peer, and still in step
                    self.stats.in_sync_ms = now_ms()
        except ConnectionLost as exc:
            self.lost(str(exc), error=False)
        except RemoteProtocolError as exc:  # a bad frame or message: say why, then close
            self.handle(self.machine.fail(str(exc)))

    async def ingester(self) -> None:
        async for event in self.batches_out:
            if self.machine.closed:  # a batch queued behind one that ended the session
                return
            try:
                result, heads = await self.store.ingest(
                    event.wires, self.machine.flow, self.secure.peer
                )
            except StoreError as exc:
                log.error("cannot store entries from %s: %s", self.who, exc)
                self.handle(self.machine.close(f"receiver cannot store entries: {exc}"))
                return
            if self.machine.closed:
                return
            self.stats.received += len(result.accepted)
            self.stats.filled += len(result.filled)
            self.stats.held += len(result.held)
            self.stats.refused += len(result.rejected)
            if result.mended:
                log.warning(
                    "%d entries damaged in this store mended from copies %s sent",
                    len(result.mended), self.who,
                )
            if result.accepted or result.filled:
                self.feed.bump()  # other sessions forward these to their peers
            refusals = [Refusal(r.author, r.error, r.describe()) for r in result.rejected]
            positions = [(author, seq, eid) for author, (seq, eid) in result.seen.items()]
            self.handle(self.machine.ingested(event.batch, positions, heads, refusals))
            if self.machine.closed:  # the peer sent an entry that proves it hostile
                return
            if refusals:  # not the sender's fault: logged
                more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
                log.warning(
                    "entry from %s not applied: %s%s", self.who, refusals[0].description, more
                )
            self.progress()

    async def sender(self) -> None:
        while not self.machine.closed:
            stale = self.local_stale
            if not self.machine.flow.sending:  # no rule lets us send to this peer
                await self.sender_wake.wait()
                continue
            if self.machine.can_send() and (asked := self.machine.to_resend()):
                await self.resend(asked)
                continue
            if self.machine.can_send() and (stale or self.machine.wants()):
                # one trip to the store: our heads now, and what the peer lacks of them
                self.local_stale = False
                heads, batch, held_back = await self.store.pending(
                    self.machine.flow, dict(self.machine.peer), BATCH_ENTRIES, BATCH_BYTES
                )
                self.machine.local_changed(heads, held_back)
                if batch and not self.machine.can_send():
                    continue
                # the peer may have gained some meanwhile: the machine leaves those out
                sent = self.machine.send_entries(batch) if batch else 0
                if sent:
                    self.stats.sent += sent
                    self.outbox_ready.set()
                    self.progress()
                else:
                    self.handle(self.machine.poll_synced())
                continue
            if stale and self.machine.idle:
                self.local_stale = False
                self.machine.local_changed(*await self.store.local())
                self.handle(self.machine.poll_synced())
                continue
            await self.sender_wake.wait()

    async def resend(self, asked: list[bytes]) -> None:
        """Send again what the peer asked for (its Want), a batch at a time; the
        entries not held here are skipped (the machine then says Resent)."""
        wires, taken = await self.store.entries_by_id(asked[:BATCH_ENTRIES], BATCH_BYTES)
        if self.machine.closed or not self.machine.can_send():
            return
        if self.machine.to_resend()[:taken] != asked[:taken]:
            return  # (cannot happen: only this task sends; checked all the same)
        self.machine.resend(asked[:taken], wires)
        self.stats.sent_again += len(wires)
        self.outbox_ready.set()
        self.progress()

    async def timer(self) -> None:
        while not self.machine.closed:
            await trio.sleep_until(self.machine.next_deadline())
            self.handle(self.machine.timer(trio.current_time()))

    async def watcher(self) -> None:
        version = self.feed.version
        while not self.machine.closed:
            version = await self.feed.wait_beyond(version)
            self.local_stale = True  # the sender reads heads and new entries in one go
            self.sender_wake.set()


async def _check_sent(store: TrioStore, sent: list[bytes], who: str) -> None:
    """The peer ended the session with entries we sent unacknowledged: a peer
    that found one invalid ends it so (and would at every session). Damage found
    in them is mended from our records where they hold it, else marked (not
    served; a peer's copy mends it), and said in the log."""
    with trio.CancelScope(shield=True):  # (it may run as the session is cancelled)
        try:
            found = await store.check_sent(sent)
        except StoreError as exc:  # a store problem here must not hide the session's end
            log.warning("could not re-check the entries sent to %s: %s", who, exc)
            return
    for damage in found:
        log.warning(
            "%s; found after %s ended the session with it unacknowledged: %s",
            damage.what,
            who,
            damage.outcome,
        )


async def run_session(
    secure: SecureStream,
    store: TrioStore,
    feed: ChangeFeed,
    *,
    live: bool,
    config: SessionConfig | None = None,
    on_progress: Callable[[SessionStats], None] | None = None,
    on_start: Callable[[SyncSession, SessionStats], None] | None = None,
    on_synced: Callable[[SessionStats], None] | None = None,
    link: PairLink | None = None,
    pairing_timeout: float | None = None,
    on_open: Callable[[bool], str | None] | None = None,
    on_stuck: Callable[[SessionStats], None] | None = None,
    on_change: Callable[[], None] | None = None,
) -> SessionStats:
    """Sync with the peer at the other end of ``secure`` until the session ends.

    ``live``: stay connected and push new entries as they are committed;
    otherwise end as soon as both sides hold the same entries. ``on_open(live)`` is
    asked, once a rule is in force, whether the session may go on (a reason ends it).
    ``on_change()`` hears whenever the session comes in sync or stuck, or leaves it.
    """
    config = config or SessionConfig()
    if pairing_timeout is not None:
        config = replace(config, pairing_timeout=pairing_timeout)
    machine = SyncSession(trio.current_time(), config, on_demand=not live)
    run: _Run | None = None
    try:
        async with trio.open_nursery() as nursery:
            run = _Run(
                secure, store, feed, machine, nursery, on_progress, on_synced, on_stuck, on_change
            )
            if on_start is not None:
                on_start(machine, run.stats)
            nursery.start_soon(run.writer)
            # before reading: whatever the peer says finds us started
            if link is None:
                run.handle(machine.begin(*await store.opening(machine.flow, secure.peer)))
            else:
                run.rules = RulesPump(link, machine, store, run.handle, on_open)
                await run.rules.start()
                nursery.start_soon(run.rules.run)
                if link.rules_feed is not None:
                    nursery.start_soon(run.rules.watch, link.rules_feed)
            for task in (run.reader, run.ingester, run.sender, run.timer, run.watcher):
                nursery.start_soon(task)
    finally:
        if run is not None:
            run.stats.bytes_sent, run.stats.bytes_received = secure.bytes_out, secure.bytes_in
        await secure.aclose()
    assert run is not None
    if machine.closed_by_peer and not machine.synced and (unacked := machine.unacked_ids()):
        await _check_sent(store, unacked, run.who)
    if machine.peer:  # what the peer held at the end: its Have, and all since
        run.stats.peer_heads = dict(machine.peer)
    if not run.stats.reason:
        run.stats.reason = machine.close_reason or "closed"
    run.stats.synced = run.stats.synced or machine.synced
    return run.stats
