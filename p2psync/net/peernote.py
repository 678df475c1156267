"""What a connection tells the peers table about the peer (:class:`PeerNote`), and
what a session that ended leaves there (:func:`after_session`): one rule for the
agent's connections and for one-shot syncs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from p2psync.core.messages import Head
from p2psync.net.stats import SessionStats
from p2psync.store.store import Store


@dataclass(frozen=True, slots=True)
class PeerNote:
    """Fields of the peer's row to update (None: left as they are)."""

    seen: int | None = None  # ms: heard from it
    synced: int | None = None  # ms: last known in step with it
    error: str | None = None  # what went wrong, in words for `peers`
    clear_error: bool = False  # whatever went wrong before is over
    address: str | None = None  # an address where a handshake proved its key
    heads: Mapping[bytes, int] | None = None  # what it held, per author (seq)

    def write(self, store: Store, peer: bytes) -> None:
        """Blocking: call in a worker thread."""
        store.record_peer(
            peer,
            seen=self.seen,
            synced=self.synced,
            error=self.error,
            clear_error=self.clear_error,
            address=self.address,
            heads=self.heads,
        )


def after_session(
    stats: SessionStats,
    *,
    in_step: bool,
    heads: Mapping[bytes, Head],
    now_ms: int,
    side: bool = False,
) -> PeerNote:
    """What the peers table keeps of a session that ended.

    ``in_step``: the two sides held the same entries as it ended; ``heads``: what
    the peer held by then. ``side``: another connection with the peer is open and
    speaks for it (then this one sets no error and no heads). Last in sync is now
    if the session ended in step and without an error, else when it was last
    known to be; the error is why it ended, unless all was well."""
    if in_step or side:
        error = None
    elif stats.stuck:
        error = f"cannot get in step: {stats.stuck}"
    else:
        error = stats.reason
    return PeerNote(
        seen=now_ms,
        synced=now_ms if in_step and not stats.error else stats.in_sync_ms,
        heads=None if side else {author: head.seq for author, head in heads.items()} or None,
        error=error,
        clear_error=in_step and not side,
    )
