"""The delivery ledger per peer in figures (DESIGN §7): what went through a relay or
as a file, and what became of it. ``p2psync.cli.delivery`` words it.

* queued — sealed here, not yet handed to a relay;
* at relay (envelopes, entries, bytes, until T) / handed over as file;
* acknowledged (when: only by the peer's signed receipt);
* expired (re-queued: their entries go again) / refused (why) / superseded (a
  direct sync delivered them).

Gaps are shown too: seqs of the peer's that never arrived (a relay dropped or
withholds them), and envelopes of ours the relay holds with no receipt for a
day ("receipts stopped")."""

from __future__ import annotations

from typing import Any

from p2psync.core.envelope import EnvelopeClass
from p2psync.home import OpenHome
from p2psync.mail.mailer import Mailer
from p2psync.store.ledger import IN_FLIGHT, State

#: Refusal reasons shown per peer (the newest).
MAX_REASONS = 3


def delivery(db: OpenHome, peer: bytes, now_ms: int) -> dict[str, Any] | None:
    """The ledger of ``peer`` in figures; None when nothing ever went by relay or file."""
    mailer = Mailer(db)
    data = [r for r in mailer.ledger(peer) if r.cls == EnvelopeClass.DATA.value]
    rows = [r for r in data if not r.asks]  # envelopes of entries (and rule objects)
    asking = sum(r.asks for r in data if r.asks and r.state in IN_FLIGHT)
    gaps = mailer.gaps(peer, now_ms)
    if not data and not gaps.received_up_to:
        return None
    by_state: dict[str, dict[str, Any]] = {}
    for state in State:
        chosen = [r for r in rows if r.state is state]
        until = [r.until_ms for r in chosen if r.until_ms is not None]
        by_state[state.value] = {
            "envelopes": len(chosen),
            "entries": sum(r.entries for r in chosen),
            "bytes": sum(r.size for r in chosen),
            "until_ms": max(until) if until else None,
            "places": sorted({r.place for r in chosen if r.place}),
        }
    acknowledged = [r.done_ms for r in rows if r.state is State.ACKNOWLEDGED and r.done_ms]
    refused = sorted(
        (r for r in rows if r.state is State.REFUSED and r.reason), key=lambda r: -r.seq
    )
    return {
        "states": by_state,
        "asking": asking,
        "last_acknowledged_ms": max(acknowledged) if acknowledged else None,
        "refusals": list(dict.fromkeys(r.reason for r in refused if r.reason))[:MAX_REASONS],
        "missing_from_peer": list(gaps.missing),
        "received_up_to": gaps.received_up_to,
        "unanswered": gaps.unanswered,
        "receipts_stopped": gaps.receipts_stopped,
    }
