"""Ingesting entries from elsewhere: decode, authenticate, apply in causal order.

One call is one store transaction. Steps:

1. Decode each wire form strictly and check its clock against ours (no lock held).
2. Per author: refuse everything from a frozen author; authenticate the rest
   (:func:`p2psync.core.chain.authenticate`: hash links plus one signature per run).
3. Apply in input order through a work queue: an entry whose predecessor or a
   base is missing waits on that ID and is retried the moment it is applied,
   whether it came in this batch or was held from an earlier one.
4. What still waits at the end is *held* in the store (not applied, not lost)
   until its dependency arrives.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2psync.core import hlc as hlc_mod
from p2psync.core.chain import authenticate
from p2psync.core.entry import Entry, decode_wire
from p2psync.core.flow import Flow
from p2psync.core.identity import short_id
from p2psync.errors import (
    DecodeError,
    EntryError,
    FrozenAuthorError,
    FutureTimestampError,
    HeldLimitError,
    HostileEntry,
    SignatureError,
    WithheldError,
)
from p2psync.store.writer import Verdict, Writer

#: Limits on entries held waiting for predecessors: in all, per author, in bytes,
#: and for how long. An author (any key can author) cannot crowd out the others.
MAX_HELD = 200_000
MAX_HELD_PER_AUTHOR = 50_000
MAX_HELD_BYTES = 256 << 20
HELD_FOR_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry that was refused, and why."""

    index: int | None  # position in the input; None for an entry held earlier
    author: bytes | None
    seq: int | None
    entry_id: bytes | None
    error: EntryError

    def describe(self) -> str:
        if self.author is not None:
            where = f"entry {self.seq} of {short_id(self.author)}"
        elif self.index is not None:  # it did not decode: only its place says which
            where = f"entry #{self.index} of the batch"
        else:
            where = "entry"
        return f"{where}: {self.error}"


@dataclass
class IngestResult:
    """What one :meth:`Store.ingest` call did with each entry."""

    accepted: list[bytes] = field(default_factory=list)
    held: list[bytes] = field(default_factory=list)
    duplicates: int = 0
    #: entries held already of which this copy brought payloads ours lacked
    filled: list[bytes] = field(default_factory=list)
    #: entries held damaged here whose stored bytes a sound copy mended
    mended: list[bytes] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    signatures_checked: int = 0
    #: per author, ``(seq, entry ID)`` of the furthest input that decoded: what the
    #: sender holds (a sender holds whole chains, so the last one says it all)
    seen: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)


@dataclass(slots=True)
class Item:
    entry: Entry
    wire: bytes
    index: int | None
    #: a refusal that is not the sender's fault, decided once the entry is proven
    #: authentic (a forged entry must count as forged, whatever else is wrong)
    deferred: EntryError | None = None


def ingest(
    writer: Writer,
    items: list[Item],
    result: IngestResult,
    max_held: int = MAX_HELD,
) -> None:
    """Authenticate and apply ``items`` with ``writer`` (inside its transaction)."""
    writer.expire_held(HELD_FOR_MS)
    by_author: dict[bytes, list[Item]] = defaultdict(list)
    for item in items:
        by_author[item.entry.author].append(item)
    ready: list[Item] = []
    for author, group in by_author.items():
        frozen = writer.head(author).frozen
        checked = authenticate(item.entry for item in group)
        result.signatures_checked += checked.signatures_checked
        by_id = {item.entry.id: item for item in group}
        if len(by_id) < len(group):  # of two copies of one entry, keep a sound one
            for item in group:
                if item.deferred is None:
                    by_id[item.entry.id] = item
        authentic = [by_id[entry.id] for entry in checked.entries]
        for entry, error in checked.rejected:
            if isinstance(error, SignatureError) and writer.held_successor(entry):
                # its signature fails, but a held (authenticated) successor names
                # it by hash: the author vouched for it, as in a run
                authentic.append(by_id[entry.id])
            else:
                _refuse(result, by_id[entry.id], error)
        for item in authentic:  # refusals that are not the sender's fault, now
            if frozen:
                _refuse(result, item, FrozenAuthorError(f"author {short_id(author)} is frozen"))
            elif item.deferred is not None and not _fills(writer, item):
                _refuse(result, item, item.deferred)
            else:
                ready.append(item)
        result.duplicates += len(group) - len(by_id)
    if len(by_author) > 1:  # one author's entries are already in causal (seq) order
        ready.sort(key=_position)
    writer.prefetch(
        (op.collection, op.key) for item in ready for op in item.entry.ops if op is not None
    )
    _apply_all(writer, ready, result, max_held)


def _fills(writer: Writer, item: Item) -> bool:
    """An entry refused for lacking a payload that we hold already: applying it
    loses nothing, so whatever payloads it brings that ours lacks are merged
    (asked for by ``Want``, it may come from a peer that lacks some too)."""
    return isinstance(item.deferred, WithheldError) and writer.has_entry(item.entry.id)


def _position(item: Item) -> tuple[int, int]:
    return (item.index if item.index is not None else -1, item.entry.seq)


def _apply_all(writer: Writer, ready: list[Item], result: IngestResult, max_held: int) -> None:
    queue = deque(ready)
    waiting: dict[bytes, list[Item]] = defaultdict(list)
    while queue:
        item = queue.popleft()
        attempt = writer.try_apply(item.entry, item.wire)
        if attempt.outcome is Verdict.APPLIED:
            result.accepted.append(item.entry.id)
            queue.extend(waiting.pop(item.entry.id, ()))
            if writer.has_held:
                writer.drop_held(item.entry.id)
                queue.extend(_released(writer, item.entry.id, result))
        elif attempt.outcome is Verdict.WAIT:
            assert attempt.dep is not None
            waiting[attempt.dep].append(item)
        elif attempt.outcome is Verdict.FILLED:
            result.filled.append(item.entry.id)
            writer.drop_held(item.entry.id)
        elif attempt.outcome is Verdict.DUPLICATE:
            result.duplicates += 1
            writer.drop_held(item.entry.id)
        else:
            assert attempt.error is not None
            _refuse(result, item, attempt.error)
            writer.drop_held(item.entry.id)
    if not waiting:
        return
    quota = writer.held_quota(max_held, MAX_HELD_PER_AUTHOR, MAX_HELD_BYTES)
    for dep, items in waiting.items():
        for item in items:
            refusal = quota.take(item.entry.author, len(item.wire))
            if refusal is not None:
                _refuse(result, item, HeldLimitError(refusal))
                continue
            writer.hold(item.entry, dep, item.wire)
            result.held.append(item.entry.id)


def _released(writer: Writer, dep: bytes, result: IngestResult) -> list[Item]:
    released: list[Item] = []
    for wire in writer.take_held(dep):
        try:
            entry = decode_wire(wire)
        except EntryError as exc:  # damaged while held: drop it, say so
            result.rejected.append(Rejected(None, None, None, None, exc))
            continue
        released.append(Item(entry, wire, None))
    return released


def _refuse(result: IngestResult, item: Item, error: EntryError) -> None:
    entry = item.entry
    result.rejected.append(Rejected(item.index, entry.author, entry.seq, entry.id, error))


def decode_batch(
    wires: Sequence[bytes],
    now_ms: int,
    max_skew_ms: int,
    result: IngestResult,
    flow: Flow | None = None,
) -> list[Item]:
    """Decode wire forms; refuse malformed ones and those the peer's ``flow`` says
    it may not send here (default: everything may come, nothing may be missing).
    Refusals that are not the sender's fault (a clock far ahead, a payload withheld
    that may come here) are decided by :func:`ingest` once the entry is proven
    authentic: a forged entry must count as forged, whatever else is wrong."""
    flow = flow or Flow()
    items: list[Item] = []
    limit = hlc_mod.from_wall(now_ms + max_skew_ms + 1) - 1  # greatest allowed timestamp
    for index, wire in enumerate(wires):
        try:
            if type(wire) is not bytes:
                raise DecodeError("an entry must be given as bytes")
            entry = decode_wire(wire)
        except EntryError as exc:
            result.rejected.append(Rejected(index, None, None, None, exc))
            continue
        deferred: EntryError | None = None
        if entry.hlc > limit:
            ahead_s = (hlc_mod.wall_ms(entry.hlc) - now_ms) / 1000
            deferred = FutureTimestampError(
                f"its clock is {ahead_s:.0f} s ahead of the receiving site's (at most "
                f"{max_skew_ms // 1000} s allowed there, by its `p2psync settings "
                "--max-clock-ahead`); check the sending site's clock"
            )
        refusal = flow.judge(entry)
        if refusal is not None:
            if isinstance(refusal, HostileEntry):
                rejected = Rejected(index, entry.author, entry.seq, entry.id, refusal)
                result.rejected.append(rejected)
                continue
            deferred = deferred or refusal
        items.append(Item(entry, wire, index, deferred))
        furthest = result.seen.get(entry.author)
        if furthest is None or entry.seq > furthest[0]:
            result.seen[entry.author] = (entry.seq, entry.id)
    return items
