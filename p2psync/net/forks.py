"""Fork proofs at the start of a session: where the peer names an entry at a
seq at which we hold another, we send ours, so the peer holds the proof of the
fork too; and if the peer holds more of our own log than we do (a restored
backup), local writes stop until we have it back."""

from __future__ import annotations

import logging

from p2psync.core.identity import short_id
from p2psync.core.messages import Head
from p2psync.core.session import SyncSession
from p2psync.net.storeio import Signal, TrioStore

log = logging.getLogger("p2psync.net.sync")


async def exchange_fork_proofs(
    store: TrioStore,
    machine: SyncSession,
    peer: bytes,
    peer_heads: dict[bytes, Head],
    outbox_ready: Signal,
) -> None:
    """Compare the peer's heads (its Have) with our entries at the same seqs."""
    who = short_id(peer)
    if machine.flow.receiving:  # only a peer that may send to us can prove it
        behind = await store.note_peer_heads(peer, peer_heads)
        if behind is not None:
            log.warning(
                "%s holds this site's own log up to %d, more than this store: "
                "local writes wait until it is back",
                who,
                behind,
            )
    for author, seq, theirs in machine.fork_suspects(peer_heads):
        stored = await store.entry_at(author, seq)
        if stored is not None and stored.id != theirs and machine.send_fork_proof(stored.wire):
            log.warning(
                "%s holds a different entry %d of %s: sending ours as proof",
                who,
                seq,
                short_id(author),
            )
            outbox_ready.set()
