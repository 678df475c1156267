"""What a session needs to know about the pair it connects: the rules between
us, and what they let flow. :class:`PairLink` does it for a real home (calls
run in worker threads); sessions without one (tests of the bare protocol) treat
the pair as allowed to exchange everything."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from p2psync import pairing
from p2psync.core.rules import Permissions, Rule, Terms
from p2psync.home import OpenHome
from p2psync.net.storeio import ChangeFeed

T = TypeVar("T")

#: Everything, both ways: what a session without rules may exchange.
EVERYTHING = Permissions(send=(Terms(),), receive=(Terms(),))


class PairLink:
    """The rules between this agent and one peer, for one session."""

    def __init__(
        self,
        db: OpenHome,
        peer: bytes,
        *,
        live: bool,
        handshake_hash: bytes,
        peer_name: str | None = None,
        rules_feed: ChangeFeed | None = None,
        join: pairing.JoinTicket | None = None,
        on_rules_added: Callable[[], None] | None = None,
        on_reconciled: Callable[[int], None] | None = None,
    ) -> None:
        self.db = db
        self.peer = peer
        #: whether live-only (online) rules apply; the session turns it off when the
        #: peer says it syncs on demand (its RulesHeld), so on-demand rules count too
        self.live = live
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

    async def permissions(self, *, live: bool | None = None) -> Permissions:
        """What the rules in force let flow: for this session (default), or with
        ``live=False`` every rule in force, on-demand ones included."""
        live = self.live if live is None else live
        return await self._run(lambda: pairing.permissions(self.db, self.peer, live=live))

    async def receive(self, objects: list[bytes]) -> list[bytes]:
        """Keep the peer's rule objects; our answers to send back."""
        join = self.join if self.joined is None else None

        def work() -> tuple[list[bytes], Rule | None, bool]:
            before = self.db.store.rules_version()
            answers = pairing.receive(self.db, self.peer, objects, join, self.peer_name)
            joined = None
            if join is not None:
                joined = pairing.join_answered(self.db, join, objects, answers)
            return answers, joined, self.db.store.rules_version() != before

        answers, joined, added = await self._run(work)
        if joined is not None:
            self.joined = joined
        self._added(added)
        return answers

    @property
    def joining(self) -> bool:
        """We presented an invite code and the inviter has not answered it yet."""
        return self.join is not None and self.joined is None

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

    async def unpaired_reason(self) -> str:
        """Why a session with no rule in force ends, in words for both sides."""
        return await self._run(
            lambda: pairing.unpaired_reason(self.db, self.peer, live=self.live)
        )
