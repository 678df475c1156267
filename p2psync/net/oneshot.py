"""On-demand sync without an agent: dial, sync until both sides hold the same
entries, disconnect (what ``p2psync sync`` does when no agent runs)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from p2psync.api import Database
from p2psync.core.frames import FrameError
from p2psync.core.identity import device_id
from p2psync.core.noise import HandshakeError
from p2psync.home import now_ms
from p2psync.net.address import format_address, parse_address
from p2psync.net.link import PairLink
from p2psync.net.storeio import ChangeFeed, TrioStore
from p2psync.net.sync import SessionStats, run_session
from p2psync.net.transport import ConnectionLost, SecureStream, secure
from p2psync.store.peers import Peer, PeerState

log = logging.getLogger(__name__)

Progress = Callable[[bytes, int, int, int], None]  # peer, received, expected, sent


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    peer: str  # device ID
    synced: bool
    error: str | None
    received: int
    sent: int
    bytes_sent: int = 0  # on the wire, handshake included
    bytes_received: int = 0


async def sync_once(
    db: Database,
    keys: list[bytes] | None,
    target: tuple[str, int] | None,
    *,
    timeout: float,
    progress: Progress | None = None,
) -> list[SyncOutcome]:
    """Sync with the given peers (default: every trusted peer with an address)."""
    trusted = {p.key: p for p in db.store.peers() if p.state is PeerState.KNOWN}
    store, feed = TrioStore(db.store), ChangeFeed()
    if target is not None:
        jobs: list[tuple[bytes | None, list[str]]] = [
            (keys[0] if keys else None, [format_address(*target)])
        ]
    else:
        chosen = keys if keys is not None else [k for k, p in trusted.items() if p.addresses]
        jobs = [(key, list(trusted[key].addresses)) for key in chosen if key in trusted]
    outcomes: list[SyncOutcome] = []
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for key, addresses in jobs:
                nursery.start_soon(
                    _one, db, store, feed, key, addresses, trusted, outcomes, progress
                )
    done = {o.peer for o in outcomes}
    for key, _ in jobs:
        if key is None or device_id(key) not in done:
            name = device_id(key) if key else format_address(*target) if target else "?"
            outcomes.append(SyncOutcome(name, False, f"not in sync after {timeout:g} s", 0, 0))
    return outcomes


async def _one(
    db: Database,
    store: TrioStore,
    feed: ChangeFeed,
    key: bytes | None,
    addresses: list[str],
    trusted: Mapping[bytes, Peer],
    outcomes: list[SyncOutcome],
    progress: Progress | None,
) -> None:
    secured, error = await _connect(db, key, addresses, trusted)
    if secured is None:
        if key is not None:
            outcomes.append(SyncOutcome(device_id(key), False, error, 0, 0))
        return
    peer = secured.peer

    def report(stats: SessionStats) -> None:
        if progress is not None:
            progress(peer, stats.received, stats.to_receive, stats.sent)

    link = PairLink(
        db, peer, live=False, handshake_hash=secured.handshake_hash, peer_name=secured.peer_name
    )
    stats = await run_session(secured, store, feed, live=False, on_progress=report, link=link)
    if peer in trusted:
        synced = stats.synced
        await trio.to_thread.run_sync(
            lambda: db.store.record_peer(
                peer,
                seen=now_ms(),
                synced=now_ms() if synced else None,
                error=None if synced else stats.reason,
                clear_error=synced,
            )
        )
    outcomes.append(
        SyncOutcome(
            device_id(peer),
            stats.synced,
            None if stats.synced else stats.reason,
            stats.received,
            stats.sent,
            stats.bytes_sent,
            stats.bytes_received,
        )
    )


async def _connect(
    db: Database, key: bytes | None, addresses: list[str], trusted: Mapping[bytes, Peer]
) -> tuple[SecureStream | None, str]:
    """The first address that connects and completes the handshake."""
    error = "no address to dial"
    for address in addresses:
        try:
            host, port = parse_address(address)
            stream = await trio.open_tcp_stream(host, port)
        except (OSError, ValueError) as exc:
            error = f"cannot reach {address}: {exc}"
            continue
        try:
            secured = await secure(
                stream, db.identity, initiator=True, name=db.home.name, expect=key
            )
        except (HandshakeError, FrameError, ConnectionLost) as exc:
            await stream.aclose()
            error = f"handshake with {address} failed: {exc}"
            continue
        return secured, ""
    return None, error
