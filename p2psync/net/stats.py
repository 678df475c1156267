"""What one sync session did and how it ended, as the agent and ``p2psync
sync`` report it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from p2psync.clock import now_ms
from p2psync.core.events import SessionClosed, StuckOnRefused, SyncedWithPeer
from p2psync.core.messages import Head

log = logging.getLogger("p2psync.net.sync")


@dataclass
class SessionStats:
    sent: int = 0  # entries sent
    received: int = 0  # entries received and accepted
    filled: int = 0  # entries held already, of which payloads we lacked arrived
    sent_again: int = 0  # entries the peer asked for again (its Want)
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

    def note(self, event: SyncedWithPeer | StuckOnRefused | SessionClosed, who: str) -> None:
        """Count in an event of the session with ``who``, and log it."""
        if isinstance(event, SyncedWithPeer):
            self.synced = True
            self.in_sync_ms, self.stuck = now_ms(), None
            log.debug("in sync with %s", who)
        elif isinstance(event, StuckOnRefused):
            log.warning("cannot get in step with %s: %s", who, event.reason)
            self.stuck = event.reason
        else:
            self.reason, self.error = event.reason, event.error
            self.by_peer, self.done = event.by_peer, event.done
            if event.error:
                log.warning("closing connection with %s: %s", who, event.reason)
            else:
                log.info("connection with %s closed: %s", who, event.reason)
