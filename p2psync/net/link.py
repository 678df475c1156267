"""What a session needs to know about the pair it connects: the rules between
us, and what they let flow. :class:`PairLink` does it for a real home (calls
run in worker threads); sessions without one (tests of the bare protocol) treat
the pair as allowed to exchange everything."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from p2psync import pairing
from p2psync.api import Database
from p2psync.core.rules import Permissions, Terms
from p2psync.net.storeio import ChangeFeed

T = TypeVar("T")

#: Everything, both ways: what a session without rules may exchange.
EVERYTHING = Permissions(send=(Terms(),), receive=(Terms(),))


class PairLink:
    """The rules between this agent and one peer, for one session."""

    def __init__(
        self,
        db: Database,
        peer: bytes,
        *,
        live: bool,
        handshake_hash: bytes,
        peer_name: str | None = None,
        rules_feed: ChangeFeed | None = None,
    ) -> None:
        self.db = db
        self.peer = peer
        self.live = live
        self.handshake_hash = handshake_hash
        self.peer_name = peer_name
        self.rules_feed = rules_feed  # bumped when rules change locally (CLI, API)
        self.join = pairing.pending_join(db, peer)  # (invite, secret, terms) when joining

    async def _run(self, work: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(work)

    async def objects(self) -> list[bytes]:
        return await self._run(lambda: self.db.store.rule_objects(self.peer))

    async def permissions(self) -> Permissions:
        return await self._run(lambda: pairing.permissions(self.db, self.peer, live=self.live))

    async def receive(self, objects: list[bytes]) -> list[bytes]:
        joining = self.join[2] if self.join is not None else None
        answers = await self._run(
            lambda: pairing.receive(self.db, self.peer, objects, joining, self.peer_name)
        )
        if joining is not None and answers:
            self.join = None
            await self._run(lambda: pairing.forget_join(self.db, self.peer))
        return answers

    def join_proof(self) -> tuple[bytes, bytes] | None:
        if self.join is None:
            return None
        invite, secret, _ = self.join
        return invite, pairing.join_proof(secret, self.handshake_hash)

    async def answer_join(self, invite: bytes, proof: bytes) -> bytes:
        return await self._run(
            lambda: pairing.answer_join(self.db, self.peer, invite, proof, self.handshake_hash)
        )
