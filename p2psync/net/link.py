"""The rules side of a session: :class:`PairLink` reads and stores the rule
objects of the pair it connects (calls run in worker threads), and
:class:`RulesPump` carries the session machine's rule events to it, one at a
time, in order. Sessions without a link (tests of the bare protocol) exchange
everything."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from p2psync import pairing
from p2psync.core.events import (
    Event,
    JoinRequested,
    NothingToSync,
    RulesHeldReceived,
    RulesInForce,
    RulesReceived,
)
from p2psync.core.flow import Flow
from p2psync.core.identity import short_id
from p2psync.core.rules import Rule
from p2psync.core.session import SyncSession
from p2psync.errors import LocalProtocolError, P2PSyncError, StoreError
from p2psync.home import OpenHome
from p2psync.net.storeio import ChangeFeed, TrioStore

T = TypeVar("T")
#: Lines about a session are logged under the session's logger, whichever module
#: writes them (operators filter on it).
log = logging.getLogger("p2psync.net.sync")


class PairLink:
    """The rules between this agent and one peer, for one session."""

    def __init__(
        self,
        db: OpenHome,
        peer: bytes,
        *,
        handshake_hash: bytes,
        peer_name: str | None = None,
        rules_feed: ChangeFeed | None = None,
        join: pairing.JoinTicket | None = None,
        on_rules_added: Callable[[], None] | None = None,
        on_reconciled: Callable[[int], None] | None = None,
        via_relay: bool = False,
    ) -> None:
        self.db = db
        self.peer = peer
        #: the session runs spliced through a relay: the relay's rules (route relay
        #: or auto) apply, not the direct connection's
        self.via_relay = via_relay
        self.handshake_hash = handshake_hash
        self.peer_name = peer_name
        self.rules_feed = rules_feed  # bumped when rules change locally (CLI, API)
        #: the invite code we present to this peer, if joining (never stored)
        self.join = join if join is not None and join.inviter == peer else None
        #: the rule in force that the join gave (set once the inviter has answered)
        self.joined: Rule | None = None
        self.on_rules_added = on_rules_added
        self.on_reconciled = on_reconciled
        self.read_version = 0  # the rules version of the objects last read
        self.rules_added = False  # this session stored new rule objects

    async def _run(self, work: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(work)

    async def objects(self) -> list[bytes]:
        """Every rule object about the pair (what RulesHeld digests, Rules carries)."""
        objects, version = await self._run(
            lambda: self.db.store.rule_objects_versioned(self.peer)
        )
        self.read_version = version
        return objects

    def reconciled(self, version: int) -> None:
        """The peer holds every rule object of ours about the pair as of ``version``."""
        if self.on_reconciled is not None:
            self.on_reconciled(version)

    async def flow(self, *, live: bool) -> Flow:
        """What flows between us in a live session, or one on demand."""
        me = self.db.identity.public_key
        return await self._run(
            lambda: Flow.between(
                me, self.peer, self.db.store.rules(self.peer), live=live, via_relay=self.via_relay
            )
        )

    async def receive(self, objects: list[bytes]) -> list[bytes]:
        """Keep the peer's rule objects; our answers to send back."""
        join = self.join if self.joined is None else None

        def work() -> tuple[list[bytes], Rule | None, bool]:
            before = self.db.store.rules_version()
            answers = pairing.receive(
                self.db, self.peer, objects, [join] if join else [], self.peer_name
            )
            joined = None
            if join is not None:
                joined = pairing.join_answered(self.db, join, objects, answers)
            return answers, joined, self.db.store.rules_version() != before

        answers, joined, added = await self._run(work)
        if joined is not None:
            self.joined = joined
        self._added(added)
        return answers

    def join_proof(self) -> tuple[bytes, bytes] | None:
        if self.join is None:
            return None
        return self.join.invite, self.join.proof(self.handshake_hash)

    async def answer_join(self, invite: bytes, proof: bytes) -> bytes:
        def work() -> tuple[bytes, bool]:
            before = self.db.store.rules_version()
            proposal = pairing.answer_join(
                self.db, self.peer, invite, proof, self.handshake_hash
            )
            return proposal, self.db.store.rules_version() != before

        proposal, added = await self._run(work)
        self._added(added)
        return proposal

    def _added(self, added: bool) -> None:
        if added:
            self.rules_added = True
            if self.on_rules_added is not None:
                self.on_rules_added()

    async def unpaired_reason(self, *, live: bool) -> str:
        """Why a session with no rule in force ends, in words for both sides."""
        return await self._run(lambda: pairing.unpaired_reason(self.db, self.peer, live=live))


class _LocalRulesChanged:
    """Rules changed here (accepted, revoked...): tell the peer, re-check ours."""


class RulesPump:
    """Runs the session machine's rule events against the link, one at a time and
    in order: what the peer's rule messages ask, the machine's verdicts (a rule in
    force, or nothing to sync), and local rule changes."""

    def __init__(
        self,
        link: PairLink,
        machine: SyncSession,
        store: TrioStore,
        handle: Callable[[list[Event]], None],
        on_open: Callable[[bool], str | None] | None = None,
    ) -> None:
        self.link, self.machine, self.store, self.handle = link, machine, store, handle
        self.on_open = on_open
        #: the rules version of the objects we answered the peer's RulesHeld with:
        #: once it says Have, it holds them (and no later ones it was not shown)
        self.answered_version = 0
        self._in, self._out = trio.open_memory_channel[Event | _LocalRulesChanged](math.inf)

    def queue(self, event: Event) -> None:
        """Take a rule event (the machine bounds how many a peer may cause)."""
        self._in.send_nowait(event)

    async def start(self) -> None:
        """Our first messages: the digest of the pair's rule objects, and a join."""
        self.machine.start_pairing(
            await self.link.objects(), trio.current_time(), self.link.join_proof()
        )
        self.handle([])

    async def run(self) -> None:
        handlers: dict[type, Callable[[object], Awaitable[None]]] = {
            RulesHeldReceived: self._rules_held,  # type: ignore[dict-item]
            RulesReceived: self._rules_received,  # type: ignore[dict-item]
            JoinRequested: self._join_requested,  # type: ignore[dict-item]
            NothingToSync: self._nothing_to_sync,  # type: ignore[dict-item]
            _LocalRulesChanged: self._local_rules_changed,  # type: ignore[dict-item]
        }
        async for event in self._out:
            try:
                await handlers[type(event)](event)
            except StoreError as exc:  # ours, not the peer's: say so, and close
                log.error("cannot store rule objects from %s: %s", short_id(self.link.peer), exc)
                self.handle(self.machine.close(f"receiver cannot store rule objects: {exc}"))
                return
            except LocalProtocolError:
                raise  # a bug here: never blamed on the peer
            except P2PSyncError as exc:  # what the peer sent: a bad object or code
                self.handle(self.machine.fail(str(exc)))
                return

    async def watch(self, feed: ChangeFeed) -> None:
        """Local rule changes, one pump item per bump."""
        version = feed.version
        while not self.machine.closed:
            version = await feed.wait_beyond(version)
            self._in.send_nowait(_LocalRulesChanged())

    async def _rules_held(self, event: RulesHeldReceived) -> None:
        ours = await self.link.objects()
        self.answered_version = self.link.read_version  # what its RulesHeld gets from us
        if self.machine.rules_held_answered(event.digest, ours):
            self.link.reconciled(self.answered_version)  # it holds what we hold
        self.handle([])
        await self._refresh()

    async def _rules_received(self, event: RulesReceived) -> None:
        answers = await self.link.receive(event.objects)
        self.machine.rules_stored(answers, join_answered=self.link.joined is not None)
        self.handle([])
        await self._refresh()
        self.handle(self.machine.end_if_done())  # an invite answered with a rule in force

    async def _join_requested(self, event: JoinRequested) -> None:
        proposal = await self.link.answer_join(event.invite, event.proof)
        log.info("%s joined with an invite code", short_id(self.link.peer))
        self.machine.join_answered(proposal)
        self.handle([])

    async def _local_rules_changed(self, _: _LocalRulesChanged) -> None:
        if self.machine.local_rules_changed(await self.link.objects()):
            self.handle([])
            await self._refresh()

    async def _refresh(self) -> None:
        if not self.machine.settled:
            return
        flow = await self.link.flow(live=self.machine.live)
        for event in self.machine.rules_in_force(flow):
            if isinstance(event, RulesInForce):
                await self._open()
            elif isinstance(event, NothingToSync):
                await self._nothing_to_sync(event)
            else:
                self.handle([event])

    async def _open(self) -> None:
        refusal = self.on_open(self.machine.live) if self.on_open is not None else None
        if refusal is not None:
            self.handle(self.machine.close(refusal))
            return
        if self.link.rules_added:  # the pair's rules changed in this session
            log.info("paired with %s", short_id(self.link.peer))
        else:
            log.debug("rules in force with %s", short_id(self.link.peer))
        opening = await self.store.opening(self.machine.flow, self.link.peer)
        self.handle(self.machine.begin(*opening))

    async def _nothing_to_sync(self, _: NothingToSync) -> None:
        if not self.machine.begun:
            reason = await self.link.unpaired_reason(live=self.machine.live)
            if not self.machine.begun:
                self.handle(self.machine.close(reason))
