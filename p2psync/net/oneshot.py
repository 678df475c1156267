"""On-demand sync without an agent: dial, sync until both sides hold the same
entries, disconnect (what ``p2psync sync`` does when no agent runs)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from p2psync.clock import now_ms
from p2psync.core.identity import device_id
from p2psync.core.rules import Rule
from p2psync.home import OpenHome
from p2psync.net.address import format_address
from p2psync.net.dial import dial
from p2psync.net.link import PairLink
from p2psync.net.peernote import after_session
from p2psync.net.stats import SessionStats
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import run_session
from p2psync.net.transport import SecureStream
from p2psync.pairing import RELAY_ONLY, JoinTicket, joined_rule
from p2psync.store.peers import Peer, PeerState

log = logging.getLogger(__name__)

Progress = Callable[[bytes, int, int, int], None]  # peer, received, expected, sent


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    peer: str  # device ID, or the address dialled when the peer is not known
    synced: bool
    error: str | None
    received: int
    sent: int
    bytes_sent: int = 0  # on the wire, handshake included
    bytes_received: int = 0
    name: str | None = None  # the peer's name, when known


async def sync_once(
    db: OpenHome,
    keys: list[bytes] | None,
    target: tuple[str, int] | None,
    *,
    timeout: float,
    progress: Progress | None = None,
    feed: ChangeFeed | None = None,
    hints: Mapping[bytes, Sequence[str]] | None = None,
) -> list[SyncOutcome]:
    """Sync with the given peers (default: every peer with an address and a rule in
    force, or a proposal of ours awaiting its answer); one outcome per peer named
    (or per address). ``feed``: bumped when entries arrive (a running agent passes
    its own, so its live sessions forward them at once); ``hints``: addresses to try
    first, per peer (a running agent's LAN adverts)."""
    trusted = {p.key: p for p in db.store.peers() if p.state is PeerState.KNOWN}
    store, feed = TrioStore(db.store), feed or ChangeFeed()
    if target is not None:
        jobs: list[tuple[bytes | None, list[str]]] = [
            (keys[0] if keys else None, [format_address(*target)])
        ]
    else:
        if keys is None:  # the peers we have business with: rules in force, or asked for
            direct = set(db.store.peers_in_force_modes(direct=True))  # not route-relay only
            ours = direct | db.store.peers_asked(db.identity.public_key)
            keys = [k for k, p in trusted.items() if p.addresses and k in ours]
        jobs = []
        for wanted in keys:
            known = trusted.get(wanted)
            stored = list(known.addresses) if known is not None else []
            jobs.append((wanted, list(dict.fromkeys([*(hints or {}).get(wanted, ()), *stored]))))
    outcomes: dict[int, SyncOutcome] = {}
    for index, (key, _) in enumerate(jobs):
        if key is not None and key not in trusted and target is None:
            outcomes[index] = SyncOutcome(
                device_id(key), False, "not a known peer here (removed?)", 0, 0
            )
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for index, (key, addresses) in enumerate(jobs):
                if index in outcomes:
                    continue
                nursery.start_soon(
                    _one, db, store, feed, key, addresses, trusted, outcomes, index, progress
                )
    for index, (key, addresses) in enumerate(jobs):
        if index not in outcomes:
            known = trusted.get(key) if key is not None else None
            outcomes[index] = SyncOutcome(
                device_id(key) if key is not None else ", ".join(addresses),
                False,
                f"not in sync after {timeout:g} s",
                0,
                0,
                name=known.name if known is not None else None,
            )
    return [outcomes[index] for index in range(len(jobs))]


async def _one(
    db: OpenHome,
    store: TrioStore,
    feed: ChangeFeed,
    key: bytes | None,
    addresses: list[str],
    trusted: Mapping[bytes, Peer],
    outcomes: dict[int, SyncOutcome],
    index: int,
    progress: Progress | None,
) -> None:
    secured, error = await dial(db.identity, db.name, key, addresses)
    if secured is None:
        known = trusted.get(key) if key is not None else None
        label = device_id(key) if key is not None else ", ".join(addresses)
        outcomes[index] = SyncOutcome(
            label, False, error, 0, 0, name=known.name if known is not None else None
        )
        return
    peer = secured.peer

    def report(stats: SessionStats) -> None:
        if progress is not None:
            progress(peer, stats.received, stats.to_receive, stats.sent)

    stats, _ = await _session(db, store, feed, secured, report)
    await _record(db, peer, trusted, stats)
    known = trusted.get(peer)
    outcomes[index] = _outcome(peer, stats, known.name if known else secured.peer_name)


async def _session(
    db: OpenHome,
    store: TrioStore,
    feed: ChangeFeed,
    secured: SecureStream,
    report: Callable[[SessionStats], None] | None = None,
    join: JoinTicket | None = None,
) -> tuple[SessionStats, PairLink]:
    link = PairLink(
        db,
        secured.peer,
        handshake_hash=secured.handshake_hash,
        peer_name=secured.peer_name,
        join=join,
    )
    stats = await run_session(secured, store, feed, live=False, on_progress=report, link=link)
    return stats, link


async def _record(
    db: OpenHome,
    peer: bytes,
    trusted: Mapping[bytes, Peer],
    stats: SessionStats,
) -> None:
    if peer not in trusted:
        return
    note = after_session(stats, in_step=stats.synced, heads=stats.peer_heads, now_ms=now_ms())
    await trio.to_thread.run_sync(note.write, db.store, peer)


def _outcome(peer: bytes, stats: SessionStats, name: str | None) -> SyncOutcome:
    return SyncOutcome(
        device_id(peer),
        stats.synced,
        None if stats.synced else stats.reason,
        stats.received,
        stats.sent,
        stats.bytes_sent,
        stats.bytes_received,
        name=name,
    )


@dataclass(frozen=True, slots=True)
class JoinOutcome:
    """What ``pair join`` achieved: the rule in force the code pairs for (None when
    the inviter refused the code or never answered), whether that rule was already
    in force, and the sync that followed."""

    rule: Rule | None
    already: bool
    error: str | None
    sync: SyncOutcome | None
    refused: bool = False  # the inviter refused the code (its reason is ``error``)
    reached: bool = False  # a connection with the inviter was made

    @property
    def confirmed(self) -> bool:
        """The inviter holds our acceptance: a session that began with the rule in
        force on both sides ended in sync (or the rule was in force before)."""
        return self.rule is not None and (
            self.already
            or (self.sync is not None and self.sync.synced)
            # the rules settled (both hold them) and go only through a relay
            or (self.sync is not None and self.sync.error == RELAY_ONLY)
        )


async def join_once(
    db: OpenHome, ticket: JoinTicket, addresses: list[str], *, timeout: float
) -> JoinOutcome:
    """Present an invite code to the inviter, accept the rule it proposes for it, and
    sync until the inviter holds that acceptance (its ``Have`` in a session that
    began with the rule in force here proves it). Nothing is stored if the inviter
    refuses the code. A code for terms already in force is still presented (the
    inviter says whether it is good) but makes no second rule: ``already``."""
    before = await trio.to_thread.run_sync(lambda: joined_rule(db, ticket))
    store, feed = TrioStore(db.store), ChangeFeed()
    rule: Rule | None = None
    refused = reached = False
    error = f"no answer from the inviter within {timeout:g} s"
    last: SyncOutcome | None = None
    with trio.move_on_after(timeout):
        for _attempt in range(3):
            secured, failure = await dial(db.identity, db.name, ticket.inviter, addresses)
            if secured is None:
                error = failure
                break
            reached = True
            stats, link = await _session(
                db, store, feed, secured, join=ticket if rule is None else None
            )
            if rule is None and link.joined is None:
                error, refused = stats.reason, stats.by_peer
                break
            rule = rule or link.joined
            last = _outcome(secured.peer, stats, secured.peer_name)
            if stats.done:  # in sync after the rule was in force on both sides
                break
            last = None  # a session that ended otherwise proves nothing
            error = stats.reason
    if rule is None:
        return JoinOutcome(None, False, error, None, refused=refused, reached=reached)
    if last is None or not last.synced:
        last = SyncOutcome(device_id(ticket.inviter), False, error, 0, 0)
    return JoinOutcome(rule, before is not None and before.id == rule.id, None, last)

