"""The delivery ledger per peer, as `peers` and `status` show it (DESIGN §7):
what went through a relay or as a file, and what became of it.

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

from p2psync.cli import output
from p2psync.store.ledger import State


def describe_delivery(figures: dict[str, Any]) -> list[str]:
    """The ledger in a few lines for `peers`."""
    states = figures["states"]
    parts = []
    queued = states[State.QUEUED.value]
    if queued["envelopes"]:
        parts.append(f"{_what(queued)} queued here")
    for key, how in ((State.AT_RELAY.value, "at relay"), (State.HANDED_OVER.value, "as file")):
        held = states[key]
        if held["envelopes"]:
            where = ", ".join(p[:7] for p in held["places"]) if key == State.AT_RELAY.value else ""
            until = f" until {output.short_time(held['until_ms'])}" if held["until_ms"] else ""
            parts.append(f"{_what(held)} {how}{' ' + where if where else ''}{until}")
    done = states[State.ACKNOWLEDGED.value]
    if done["envelopes"]:
        when = figures["last_acknowledged_ms"]
        parts.append(
            f"{_what(done)} acknowledged" + (f" (last {output.short_time(when)})" if when else "")
        )
    for key, what in (
        (State.EXPIRED.value, "expired (sent again)"),
        (State.SUPERSEDED.value, "superseded by a direct sync"),
        (State.REFUSED.value, "refused"),
    ):
        if states[key]["envelopes"]:
            parts.append(f"{output.plural(states[key]['envelopes'], 'envelope')} {what}")
    if figures["asking"]:
        parts.append(
            f"asked it for the payloads of {output.count(figures['asking'], 'entry', 'entries')}"
        )
    lines = [f"by relay/file: {'; '.join(parts)}"] if parts else []
    for reason in figures["refusals"]:
        lines.append(f"refused: {output.safe(reason)}")
    if figures["missing_from_peer"]:
        missing = figures["missing_from_peer"]
        shown = ", ".join(str(s) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        lines.append(f"GAP: its envelopes {shown} never arrived (dropped or withheld on the way)")
    if figures["receipts_stopped"]:
        lines.append(
            f"receipts stopped: {figures['unanswered']} envelopes out with no receipt for a day"
        )
    return lines


def _what(figures: dict[str, Any]) -> str:
    """Entries, or (none: rule objects only) envelopes."""
    if figures["entries"]:
        return output.count(figures["entries"], "entry", "entries")
    return output.plural(figures["envelopes"], "envelope")
