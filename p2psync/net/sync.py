"""Running a sync session over a secure stream (the trio shell around
:class:`p2psync.core.session.SyncSession`).

Six small tasks share one machine; trio runs one at a time, so every machine
call is atomic:

* **reader** — frames in, messages decoded and fed to the machine;
* **ingester** — received batches into the store (one transaction each), then ``Ack``;
* **sender** — what the peer lacks, read in causal order, sent while the window allows;
* **writer** — the only task that writes to the stream: the machine's outbox, in order;
* **timer** — keepalive pings and the idle timeout;
* **watcher** — local commits (by anyone) update our heads, so new entries go out live.

A peer that sends an invalid entry, breaks the protocol or goes silent is
disconnected with the reason; what it sent before that stays committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from p2psync.clock import now_ms
from p2psync.core import messages
from p2psync.core.frames import FrameError
from p2psync.core.identity import short_id
from p2psync.core.messages import Bye, Head
from p2psync.core.rules import Permissions, RuleError
from p2psync.core.session import (
    BatchReceived,
    Event,
    JoinRequested,
    PeerHeadsReceived,
    Phase,
    RulesHeldReceived,
    RulesReceived,
    SessionClosed,
    SessionConfig,
    StuckOnRefused,
    SyncedWithPeer,
    SyncSession,
)
from p2psync.errors import (
    ChainError,
    DecodeError,
    ForkError,
    P2PSyncError,
    RuleViolationError,
    SignatureError,
    StoreError,
)
from p2psync.net.filter import withhold
from p2psync.net.link import EVERYTHING, PairLink
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.transport import ConnectionLost, SecureStream

log = logging.getLogger(__name__)

#: Entries that prove the sender is broken or hostile: the connection is closed.
HOSTILE = (DecodeError, SignatureError, ChainError, ForkError, RuleViolationError)
MAX_RULES_HELD = 4  # RulesHeld messages a session may carry before rules must settle
BATCH_ENTRIES = 2000
BATCH_BYTES = 1 << 20


@dataclass
class SessionStats:
    sent: int = 0  # entries sent
    received: int = 0  # entries received and accepted
    held: int = 0
    refused: int = 0
    synced: bool = False
    reason: str = ""
    error: bool = False
    by_peer: bool = False  # the peer ended the session (its Bye gave the reason)
    done: bool = False  # an on-demand session we ended because it was in sync
    peer_heads: dict[bytes, Head] = field(default_factory=dict)  # its Have; at the end, all
    to_receive: int = 0  # entries the peer announced that we lacked when it said Have
    bytes_sent: int = 0  # on the wire, handshake included
    bytes_received: int = 0
    in_sync_ms: int | None = None  # wall time this session was last known in sync
    stuck: str | None = None  # why it cannot get in step, while that holds


class _Signal:
    """A resettable wake-up for one waiting task."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class _Run:
    def __init__(
        self,
        secure: SecureStream,
        store: TrioStore,
        feed: ChangeFeed,
        machine: SyncSession,
        live: bool,
        on_progress: Callable[[SessionStats], None] | None,
        on_synced: Callable[[SessionStats], None] | None = None,
        link: PairLink | None = None,
        on_open: Callable[[bool], str | None] | None = None,
        on_stuck: Callable[[SessionStats], None] | None = None,
    ) -> None:
        self.on_synced = on_synced
        self.on_open = on_open
        self.on_stuck = on_stuck
        self.link = link
        self.permissions: Permissions = EVERYTHING
        self.later_permissions: Permissions | None = None
        self.answered_version = 0  # rules version of what we answered its RulesHeld with
        self.held_digest = b""  # the digest our own RulesHeld carried
        self.secure = secure
        self.store = store
        self.feed = feed
        self.machine = machine
        self.live = live
        self.on_progress = on_progress
        self.stats = SessionStats()
        self.outbox_ready = _Signal()
        self.sender_wake = _Signal()
        self.batches_in, self.batches_out = trio.open_memory_channel[BatchReceived](
            machine.config.window + 1
        )
        self.nursery: trio.Nursery | None = None
        self.who = short_id(secure.peer)
        self.local_stale = False
        self._visible_memo: dict[str, bool] = {}
        self.settled = False  # both sides hold the same rule objects
        self.held_messages = 0
        self.rule_events_in, self.rule_events_out = trio.open_memory_channel[Event](8)

    # ------------------------------------------------------------ plumbing

    def handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, PeerHeadsReceived):
                if self.link is not None:  # it settled: it holds what its RulesHeld got
                    self.link.reconciled(self.answered_version)
                self.stats.peer_heads = event.heads
                self.stats.to_receive = sum(
                    max(0, head.seq - self.machine.local.get(a, Head(0, b"")).seq)
                    for a, head in event.heads.items()
                )
                assert self.nursery is not None
                self.nursery.start_soon(self.send_fork_proofs, event.heads)
            elif isinstance(event, BatchReceived):
                if not self.permissions.receive:
                    self.handle(self.machine.fail("entries sent, but no rule lets you send any"))
                    return
                self.batches_in.send_nowait(event)  # the machine enforces the window
            elif isinstance(event, RulesReceived | RulesHeldReceived | JoinRequested):
                if self.link is None:
                    self.handle(self.machine.fail("no pairing on this connection"))
                    return
                self.pairing_event(event)
            elif isinstance(event, SyncedWithPeer):
                self.stats.synced = True
                self.stats.in_sync_ms, self.stats.stuck = now_ms(), None
                log.debug("in sync with %s", self.who)
                if self.on_synced is not None:
                    self.on_synced(self.stats)
                self.end_if_done()
            elif isinstance(event, StuckOnRefused):
                log.warning("cannot get in step with %s: %s", self.who, event.reason)
                self.stats.stuck = event.reason
                if self.on_stuck is not None:
                    self.on_stuck(self.stats)
                if not self.live or (self.link is not None and not self.link.live):
                    # an on-demand sync (ours or the peer's) says why now rather than
                    # at its timeout; the peer learns the reason from our Bye
                    self.handle(self.machine.close(f"cannot get in step: {event.reason}"))
            elif isinstance(event, SessionClosed):
                self.stats.reason = event.reason
                self.stats.error = event.error
                self.stats.by_peer = event.by_peer
                if event.error:
                    log.warning("closing connection with %s: %s", self.who, event.reason)
                else:
                    log.info("connection with %s closed: %s", self.who, event.reason)
        self.outbox_ready.set()
        self.sender_wake.set()

    def end_if_done(self) -> None:
        """An on-demand session ends once in sync, and once an invite code it
        presented has been answered (a refusal ends it from the inviter's side)."""
        joining = self.link is not None and self.link.joining
        if not self.live and self.machine.synced and not joining and not self.machine.closed:
            self.stats.done = True
            self.handle(self.machine.close("synced"))

    def lost(self, reason: str, error: bool) -> None:
        """The connection itself failed: nothing more can be sent; stop everything."""
        if not self.stats.reason:
            self.stats.reason = reason
            self.stats.error = error
        log.log(
            logging.WARNING if error else logging.INFO,
            "connection with %s ended: %s",
            self.who,
            reason,
        )
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    def progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.stats)

    # ------------------------------------------------------------ pairing

    async def start(self) -> None:
        """Our first messages: the digest of the pair's rule objects (and a join, if
        joining). Have follows once both sides hold the same rule objects and a rule
        is in force."""
        if self.link is None:
            self.handle(self.machine.begin(await self.store.heads()))
            return
        self.held_digest = messages.rules_digest(await self.link.objects())
        self.machine.send_rules_held(self.held_digest, on_demand=not self.live)
        join = self.link.join_proof()
        if join is not None:
            self.machine.send_join(*join)
        self.outbox_ready.set()

    def pairing_event(self, event: Event) -> None:
        """Rule messages are handled one at a time, in order, by ``pairing_worker``;
        a peer that floods them is cut off."""
        try:
            self.rule_events_in.send_nowait(event)
        except trio.WouldBlock:
            self.handle(self.machine.fail("too many rule messages at once"))

    async def pairing_worker(self) -> None:
        assert self.link is not None
        async for event in self.rule_events_out:
            try:
                if isinstance(event, RulesHeldReceived):
                    await self.rules_held(event.digest, event.on_demand)
                elif isinstance(event, RulesReceived):
                    await self.rules_received(event.objects)
                elif isinstance(event, JoinRequested):
                    await self.join_requested(event.invite, event.proof)
            except P2PSyncError as exc:
                self.handle(self.machine.fail(str(exc)))
                return

    async def rules_held(self, digest: bytes, on_demand: bool) -> None:
        """The peer says which rule objects it holds; send ours if they differ."""
        assert self.link is not None
        self.held_messages += 1
        if self.held_messages > MAX_RULES_HELD:
            raise RuleError("the rule objects of this pair do not settle")
        if on_demand and self.live:
            self.link.live = False  # the peer syncs on demand: on-demand rules count too
        ours = await self.link.objects()
        self.answered_version = self.link.read_version  # what its RulesHeld gets from us
        if messages.rules_digest(ours) == digest:
            self.settled = True
            self.link.reconciled(self.answered_version)  # it holds what we hold
            if self.held_digest != digest:
                # our own RulesHeld named objects we held then, not now: the peer
                # compares it with what it holds, finds a difference, and settles
                # only on our Rules
                self.machine.send_rules(ours)
                self.outbox_ready.set()
        else:
            self.machine.send_rules(ours)
            self.outbox_ready.set()
        await self.refresh_permissions()

    async def rules_received(self, objects: list[bytes]) -> None:
        assert self.link is not None
        answers = await self.link.receive(objects)
        self.settled = True  # we hold the union of both sides' objects now
        if answers:
            self.machine.send_rules(answers)
            self.outbox_ready.set()
        await self.refresh_permissions()
        self.end_if_done()  # an invite answered with a rule that was already in force

    async def join_requested(self, invite: bytes, proof: bytes) -> None:
        assert self.link is not None
        proposal = await self.link.answer_join(invite, proof)
        log.info("%s joined with an invite code", self.who)
        self.machine.send_rules([proposal])
        self.outbox_ready.set()

    async def refresh_permissions(self) -> None:
        assert self.link is not None
        if not self.settled:
            return
        permissions = await self.link.permissions()
        if not self.machine.begun:
            self.permissions = permissions
            if self.link.live:  # what on-demand rules would let come: never drop it
                self.later_permissions = await self.link.permissions(live=False)
            self.machine.set_flow(
                sending=bool(permissions.send), receiving=bool(permissions.receive)
            )
            if permissions.paired:
                refusal = self.on_open(self.link.live) if self.on_open is not None else None
                if refusal is not None:
                    self.handle(self.machine.close(refusal))
                    return
                if self.link.rules_added:  # the pair's rules changed in this session
                    log.info("paired with %s", self.who)
                else:
                    log.debug("rules in force with %s", self.who)
                self.handle(self.machine.begin(await self.store.heads()))
            elif not self.link.joining and (
                not self.live or (await self.link.permissions(live=False)).paired
            ):
                # rules exchanged, none in force for this session: nothing more can
                # happen here, on demand, or live with a pair whose rules are all on
                # demand (a live agent otherwise waits the pairing deadline: its user
                # may answer a request meanwhile)
                self.handle(self.machine.close(await self.link.unpaired_reason()))
        elif permissions != self.permissions:
            # a rule changed in the middle of a session: start afresh under the new ones
            self.handle(self.machine.close("the rules between us changed"))

    async def rules_watcher(self, feed: ChangeFeed) -> None:
        """Rules changed here (accepted, revoked...): tell the peer if they concern
        it, and re-check ours."""
        assert self.link is not None
        version = feed.version
        sent = messages.rules_digest(await self.link.objects())
        while not self.machine.closed:
            version = await feed.wait_beyond(version)
            ours = await self.link.objects()
            if messages.rules_digest(ours) != sent:
                sent = messages.rules_digest(ours)
                self.machine.send_rules(ours)
                self.outbox_ready.set()
                await self.refresh_permissions()

    async def pairing_deadline(self, seconds: float) -> None:
        """A pair with no rule in force has nothing to do once rules are exchanged."""
        assert self.link is not None
        await trio.sleep(seconds)
        if not self.machine.begun:
            reason = await self.link.unpaired_reason()
            if not self.machine.begun:
                self.handle(self.machine.close(reason))

    def visible(self) -> Callable[[str], bool] | None:
        """What we may receive, as the store's ingest wants it: None for everything,
        else a (memoised) test per collection."""
        if self.link is None or any(t.collections == ("*",) for t in self.permissions.receive):
            return None
        permissions, memo = self.permissions, self._visible_memo
        memo.clear()

        def visible(collection: str) -> bool:
            allowed = memo.get(collection)
            if allowed is None:
                allowed = memo[collection] = permissions.may_receive(collection)
            return allowed

        return visible

    def later(self) -> Callable[[str], bool] | None:
        """What we may receive only by a rule not in force for this session (an
        on-demand rule, in a live session): entries missing such a payload wait."""
        extra = self.later_permissions
        if extra is None or extra.receive == self.permissions.receive:
            return None
        return extra.may_receive

    def strip(self, wires: list[bytes]) -> list[bytes]:
        """Withhold the payloads of collections the peer may not receive."""
        if any(t.collections == ("*",) for t in self.permissions.send):
            return wires
        return [withhold(wire, self.permissions.may_send) for wire in wires]

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
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    async def reader(self) -> None:
        try:
            while not self.machine.closed:
                data = await self.secure.receive()
                try:
                    message = messages.decode(data)
                except messages.ProtocolError as exc:
                    self.handle(self.machine.fail(str(exc)))
                    return
                self.handle(self.machine.receive(message, trio.current_time()))
                if self.machine.synced:  # heard from the peer, and still in step
                    self.stats.in_sync_ms = now_ms()
        except ConnectionLost as exc:
            self.lost(str(exc), error=False)
        except FrameError as exc:
            self.handle(self.machine.fail(str(exc)))  # try to say why, then close

    async def ingester(self) -> None:
        async for event in self.batches_out:
            visible = self.visible()
            try:
                result, heads = await self.store.ingest(event.wires, visible, self.later())
            except StoreError as exc:
                log.error("cannot store entries from %s: %s", self.who, exc)
                self.handle(self.machine.close(f"receiver cannot store entries: {exc}"))
                return
            if self.machine.closed:
                return
            self.stats.received += len(result.accepted)
            self.stats.held += len(result.held)
            self.stats.refused += len(result.rejected)
            self.machine.ingested(
                event.batch, [(author, seq, eid) for author, (seq, eid) in result.seen.items()]
            )
            if result.accepted:
                self.feed.bump()  # other sessions forward these to their peers
            self.machine.local_changed(heads)
            hostile = [r for r in result.rejected if isinstance(r.error, HOSTILE)]
            if hostile:
                self.handle(self.machine.fail(f"invalid entry: {hostile[0].describe()}"))
                return
            refused = result.rejected  # not the sender's fault: logged, the session goes on
            if refused:
                more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
                log.warning(
                    "entry from %s not applied: %s%s", self.who, refused[0].describe(), more
                )
            for rejected in refused:
                if rejected.author is not None:
                    self.machine.note_refused(rejected.author, rejected.describe())
            self.handle(self.machine.poll_synced())
            self.progress()

    async def sender(self) -> None:
        while not self.machine.closed:
            stale = self.local_stale
            if not self.permissions.send:  # no rule lets us send to this peer
                await self.sender_wake.wait()
                continue
            if self.machine.can_send() and (stale or self.machine.wants()):
                # one trip to the store: our heads now, and what the peer lacks of them
                self.local_stale = False
                heads, batch = await self.store.pending(
                    self.machine.peer_positions(), BATCH_ENTRIES, BATCH_BYTES
                )
                self.machine.local_changed(heads)
                now_wanted = self.machine.wants()  # the peer may have gained some meanwhile
                batch = [
                    o for o in batch if o.author in now_wanted and o.seq > now_wanted[o.author]
                ]
                if batch and self.machine.can_send():
                    last = {o.author: (o.seq, o.id) for o in batch}  # seqs rise per author
                    self.machine.send_batch(
                        self.strip([o.wire for o in batch]),
                        [(author, seq, eid) for author, (seq, eid) in last.items()],
                    )
                    self.stats.sent += len(batch)
                    self.outbox_ready.set()
                    self.progress()
                    continue
                if not batch:
                    self.handle(self.machine.poll_synced())
                continue
            if stale and self.machine.phase is Phase.OPEN and not self.machine.unacked:
                self.local_stale = False
                self.machine.local_changed(await self.store.heads())
                self.handle(self.machine.poll_synced())
                continue
            await self.sender_wake.wait()

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

    async def send_fork_proofs(self, peer_heads: dict[bytes, Head]) -> None:
        """Where the peer's head differs from our entry at the same seq, send ours:
        the peer then holds proof of the fork too. And if the peer holds more of our
        own log than we do, stop local writes until we have it back."""
        behind = None
        if self.permissions.receive:  # only a peer that may send to us can prove it
            behind = await self.store.note_peer_heads(self.secure.peer, peer_heads)
        if behind is not None:
            log.warning(
                "%s holds this site's own log up to %d, more than this store: "
                "local writes wait until it is back",
                self.who,
                behind,
            )
        for author, theirs in peer_heads.items():
            ours = self.machine.local.get(author)
            if ours is None or theirs.seq > ours.seq or theirs.seq == 0 or theirs.frozen:
                continue
            stored = await self.store.entry_at(author, theirs.seq)
            if (
                stored is not None
                and stored.id != theirs.head
                and self.machine.can_send()
                and self.permissions.send
            ):
                log.warning(
                    "%s holds a different entry %d of %s: sending ours as proof",
                    self.who,
                    theirs.seq,
                    short_id(author),
                )
                self.machine.send_batch(self.strip([stored.wire]), [])
                self.outbox_ready.set()


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
    pairing_timeout: float = 5.0,
    on_open: Callable[[bool], str | None] | None = None,
    on_stuck: Callable[[SessionStats], None] | None = None,
) -> SessionStats:
    """Sync with the peer at the other end of ``secure`` until the session ends.

    ``live``: stay connected and push new entries as they are committed;
    otherwise end as soon as both sides hold the same entries. ``on_open(live)`` is
    asked, once a rule is in force, whether the session may go on (a reason ends it).
    """
    machine = SyncSession(trio.current_time(), config)
    run = _Run(
        secure, store, feed, machine, live, on_progress, on_synced, link, on_open, on_stuck
    )
    if on_start is not None:
        on_start(machine, run.stats)
    try:
        async with trio.open_nursery() as nursery:
            run.nursery = nursery
            nursery.start_soon(run.writer)
            await run.start()  # before reading: whatever the peer says finds us started
            for task in (run.reader, run.ingester, run.sender, run.timer, run.watcher):
                nursery.start_soon(task)
            if link is not None:
                nursery.start_soon(run.pairing_worker)
                nursery.start_soon(run.pairing_deadline, pairing_timeout)
                if link.rules_feed is not None:
                    nursery.start_soon(run.rules_watcher, link.rules_feed)
    finally:
        run.stats.bytes_sent, run.stats.bytes_received = secure.bytes_out, secure.bytes_in
        await secure.aclose()
    if machine.peer:  # what the peer held at the end: its Have, and all since
        run.stats.peer_heads = dict(machine.peer)
    if not run.stats.reason:
        run.stats.reason = machine.close_reason or "closed"
    run.stats.synced = run.stats.synced or machine.synced
    return run.stats
