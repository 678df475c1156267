"""The one place that decides what `peers`, `status` and the HTTP API say about each
peer (connected?, in step?, behind and ahead, last in sync, what is wrong), so they
never disagree.

While the agent runs, a connected peer's figures come from its live session;
otherwise from what the store kept of the last contact.
"""

from __future__ import annotations

from typing import Any

from p2psync import pairing
from p2psync.api import Database
from p2psync.clock import now_ms
from p2psync.core.identity import device_id
from p2psync.core.messages import lag
from p2psync.core.rules import Rule, RuleState, in_force, on_demand_only
from p2psync.mail.mailer import Mailer
from p2psync.pairing import last_ended
from p2psync.store.peers import Peer, PeerState
from p2psync.views.delivery import delivery


def relationship(me: bytes, peer: Peer, rules: list[Rule]) -> str:
    """paired / pending / rejected / revoked / removed / not paired, in words."""
    if peer.state is PeerState.REMOVED:
        return "removed"
    paired_by = in_force(rules)
    if paired_by:
        if on_demand_only(paired_by):
            return "paired (on demand: p2psync sync)"
        return "paired"
    if any(r.state is RuleState.PROPOSED and r.acceptor == me for r in rules):
        return "pending: awaiting your answer (p2psync pair pending)"
    if any(r.state is RuleState.PROPOSED and r.proposer == me for r in rules):
        return "pending: awaiting their answer"
    ended = last_ended(rules)
    if ended is not None and ended.state is RuleState.REJECTED:
        who = "you" if ended.acceptor == me else "them"
        return f"rejected by {who}: {ended.reason}"
    if ended is not None:
        return "not paired: the rules were revoked"
    return "not paired"


def peer_rows(db: Database, running: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per known peer, then the agents only discovered on the LAN."""
    me = db.identity.public_key
    live = {
        c["device_id"]: c
        for c in (running or {}).get("connections", [])
        if c.get("kind", "live") == "live"
    }
    lan = {d["device_id"]: d for d in (running or {}).get("discovered", [])}
    ours = {a: h.seq for a, h in db.store.heads().items()}
    incomplete = db.store.incomplete()
    link = (running or {}).get("relay") or {}
    carried = Mailer(db).peers() if link.get("relay_id") else frozenset()
    rows: list[dict[str, Any]] = []
    for peer in db.store.peers():
        text_id = device_id(peer.key)
        conn = live.get(text_id)
        state = relationship(me, peer, db.store.rules(peer.key))
        if conn is not None:
            behind, ahead = conn["behind"], conn["ahead"]
            in_sync: bool | None = conn["synced"] if state.startswith("paired") else None
            last_sync = conn.get("last_sync") or peer.last_sync
            problem = f"cannot get in step: {conn['stuck']}" if conn.get("stuck") else None
        else:
            known = db.store.peer_heads(peer.key)
            behind = ahead = None
            if known:
                allowed = pairing.permissions(db, peer.key, live=False)
                behind, ahead = lag(ours, known)
                behind, ahead = behind if allowed.receive else 0, ahead if allowed.send else 0
            in_sync, last_sync, problem = None, peer.last_sync, peer.last_error
        seen = lan.get(text_id)
        path = path_of(conn, link if peer.key in carried else None)
        allowed = pairing.permissions(db, peer.key, live=False)
        missing = {c: n for c, n in incomplete.items() if allowed.may_receive(c)}
        rows.append(
            {
                "name": peer.name,
                "device_id": text_id,
                "state": state,
                "addresses": list(peer.addresses),
                "lan_addresses": list(seen["addresses"]) if seen else [],
                "connected": conn is not None,
                "connected_from": conn["address"] if conn and conn["direction"] == "in" else None,
                **path,
                "in_sync": in_sync,
                "begun": bool(conn.get("begun", True)) if conn is not None else False,
                "problem": problem,
                "last_seen": now_ms()
                if conn is not None
                else max(peer.last_seen or 0, seen["last_seen"] if seen else 0) or None,
                "last_sync": last_sync,
                "last_error": peer.last_error,
                "behind": behind,
                "ahead": ahead,
                # ops in collections this peer may send us that reached us without
                # their payload by another path: they will not come from it either
                "incomplete": missing,
                "delivery": delivery(db, peer.key, now_ms()),
            }
        )
    listed = {row["device_id"] for row in rows}
    for found in lan.values():
        if found["device_id"] not in listed:
            rows.append(
                {
                    "name": found["name"],
                    "device_id": found["device_id"],
                    "state": "discovered (not paired)",
                    "addresses": found["addresses"],  # as advertised (unproven)
                    "lan_addresses": found["addresses"],
                    "connected": False,
                    "connected_from": None,
                    **path_of(None, None),
                    "in_sync": None,
                    "begun": False,
                    "problem": None,
                    "last_seen": found["last_seen"],
                    "last_sync": None,
                    "last_error": None,
                    "behind": None,
                    "ahead": None,
                    "incomplete": {},
                    "delivery": None,
                }
            )
    return rows


def path_of(conn: dict[str, Any] | None, link: dict[str, Any] | None) -> dict[str, Any]:
    """The path in use with a peer, and since when: ``direct``, ``relay`` (live,
    spliced through the relay ``path_relay``), ``mailbox`` (no live connection; the
    running agent's relay link carries what the rules let it), or None."""
    if conn is not None:
        relay = conn.get("relay")
        return {
            "path": "relay" if relay else "direct",
            "path_relay": relay,
            "path_since": conn.get("since"),
        }
    if link:
        return {"path": "mailbox", "path_relay": link["relay_id"], "path_since": link["since_ms"]}
    return {"path": None, "path_relay": None, "path_since": None}
