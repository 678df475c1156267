"""The store as trio sees it: blocking calls run in worker threads, and a feed
that says when the store changed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import trio

from p2psync.clock import now_ms
from p2psync.core.flow import Flow
from p2psync.core.messages import Head
from p2psync.store.ingest import IngestResult
from p2psync.store.logs import Outgoing
from p2psync.store.missing import Missing
from p2psync.store.store import SentDamage, Store

#: Entries held but not sendable (marked damaged): per author, ``(first damaged
#: seq, seq held)``.
HeldBack = dict[bytes, tuple[int, int]]
#: Our heads, the ops held without payload to ask for, and what is held back.
Opening = tuple[dict[bytes, Head], list[Missing], HeldBack]


class ChangeFeed:
    """A counter bumped whenever the store gains entries; tasks wait for bumps."""

    def __init__(self) -> None:
        self.version = 0
        self._event = trio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_beyond(self, version: int) -> int:
        """Wait until the version is greater than ``version``; return the new one."""
        while self.version <= version:
            await self._event.wait()
        return self.version


class TrioStore:
    """Async access to a :class:`Store`; calls run in threads so trio never blocks."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # one writer at a time is enforced by SQLite; limiting threads keeps ingest
        # batches from piling up behind each other's locks
        self._writes = trio.CapacityLimiter(1)

    async def heads(self) -> dict[bytes, Head]:
        return await trio.to_thread.run_sync(self.store.heads)

    async def ingest(
        self, wires: Sequence[bytes], flow: Flow | None = None, peer: bytes | None = None
    ) -> tuple[IngestResult, dict[bytes, Head]]:
        """Ingest a batch from ``peer``, whose ``flow`` says what it may send here;
        also return our heads after it (one trip to the thread)."""

        def work() -> tuple[IngestResult, dict[bytes, Head]]:
            result = self.store.ingest(wires, now_ms(), flow=flow, peer=peer)
            return result, self.store.heads()

        return await trio.to_thread.run_sync(work, limiter=self._writes)

    async def pending(
        self, flow: Flow, peer: Mapping[bytes, Head], max_entries: int, max_bytes: int
    ) -> tuple[dict[bytes, Head], list[Outgoing], HeldBack]:
        """Our heads, what a peer holding ``peer`` lacks and may get (by ``flow``),
        in causal order, and what we hold but cannot send (marked damaged)."""

        def work() -> tuple[dict[bytes, Head], list[Outgoing], HeldBack]:
            heads, held_back = self.store.local_state()
            after = flow.lacks(heads, peer)
            batch = self.store.entries_after(after, max_entries, max_bytes) if after else []
            return heads, batch, held_back

        return await trio.to_thread.run_sync(work)

    async def local(self) -> tuple[dict[bytes, Head], HeldBack]:
        """Our heads, and what we hold but cannot send (marked damaged)."""
        return await trio.to_thread.run_sync(self.store.local_state)

    async def opening(self, flow: Flow, peer: bytes | None = None) -> Opening:
        """Our heads, the ops we hold without a payload ``flow`` lets ``peer`` send
        us (to ask it for them), and the entries we hold but cannot send (marked
        damaged): what :meth:`SyncSession.begin` takes."""

        def work() -> Opening:
            heads, held_back = self.store.local_state()
            if not flow.receiving:
                return heads, [], held_back
            return heads, self.store.payloads_missing(flow.may_receive, peer, now_ms()), held_back

        return await trio.to_thread.run_sync(work)

    async def check_sent(self, sent: Sequence[bytes]) -> list[SentDamage]:
        return await trio.to_thread.run_sync(self.store.check_sent, list(sent), now_ms())

    async def entries_by_id(self, ids: Sequence[bytes], max_bytes: int) -> tuple[list[bytes], int]:
        return await trio.to_thread.run_sync(self.store.entries_by_id, ids, max_bytes)

    async def note_peer_heads(self, peer: bytes, heads: Mapping[bytes, Head]) -> int | None:
        return await trio.to_thread.run_sync(self.store.note_peer_heads, peer, dict(heads))

    async def entry_at(self, author: bytes, seq: int) -> Outgoing | None:
        return await trio.to_thread.run_sync(self.store.entry_at, author, seq)


class Signal:
    """A resettable wake-up for one waiting task."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()
