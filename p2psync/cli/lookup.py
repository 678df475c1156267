"""Finding a peer or rule from what a user typed; asking the running agent."""

from __future__ import annotations

import re
from typing import Any

from p2psync.agent import sockets
from p2psync.api import Database
from p2psync.cli.context import State
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.core.rules import Rule, RuleState
from p2psync.errors import InvalidDeviceID, UsageError
from p2psync.net.address import parse_address
from p2psync.store.peers import Peer, PeerState


def resolve_peer(db: Database, text: str) -> Peer:
    """A known peer by device ID, its first characters (4 or more), or name."""
    peers = db.store.peers()
    try:
        key = parse_device_id(text)
    except InvalidDeviceID:
        cleaned = text.replace("-", "").upper()
        matches = [
            p
            for p in peers
            if p.name == text
            or (len(cleaned) >= 4 and device_id(p.key).replace("-", "").startswith(cleaned))
        ]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise UsageError(
                f"{text!r} matches {len(matches)} peers; give the full device ID"
            ) from None
        raise UsageError(f"no peer called {text!r}; see `p2psync peers`") from None
    for peer in peers:
        if peer.key == key:
            return peer
    raise UsageError(f"{short_id(key)} is not a known peer; see `p2psync peers`")


def resolve_rule(db: Database, text: str) -> Rule:
    if not re.fullmatch(r"[0-9a-fA-F]{4,64}", text):
        raise UsageError(f"{text!r} is not a rule ID (hex, at least 4 characters)")
    matches = [r for r in db.store.rules() if r.id.hex().startswith(text.lower())]
    if len(matches) != 1:
        raise UsageError(f"{len(matches) or 'no'} rules match {text!r}; see `p2psync rule list`")
    return matches[0]


def notify(state: State) -> None:
    sockets.notify(state.home, sockets.CHANGED_PEERS)


def relationship(me: bytes, peer: Peer, rules: list[Rule]) -> str:
    """paired / pending / rejected / removed, in words."""
    if peer.state is PeerState.REMOVED:
        return "removed"
    live = [r for r in rules if r.state is RuleState.ACCEPTED]
    if live:
        return "paired"
    if any(r.state is RuleState.PROPOSED and r.acceptor == me for r in rules):
        return "pending: awaiting your answer (p2psync pair pending)"
    if any(r.state is RuleState.PROPOSED and r.proposer == me for r in rules):
        return "pending: awaiting their answer"
    rejected = [r for r in rules if r.state is RuleState.REJECTED]
    if rejected:
        who = "you" if rejected[-1].acceptor == me else "them"
        return f"rejected by {who}: {rejected[-1].reason}"
    return "not paired"


def agent_status(state: State) -> dict[str, Any] | None:
    try:
        return sockets.request(state.home, {"op": "status"}, timeout=2)
    except (sockets.AgentNotRunning, OSError, ValueError):
        return None


def listen_hints(state: State) -> list[str]:
    """The running agent's listen addresses, usable by others (0.0.0.0 expanded)."""
    status = agent_status(state)
    if status is None:
        return []
    hints: list[str] = []
    for address in status.get("listen", []):
        host, port = parse_address(address)
        if host in ("0.0.0.0", "::"):
            hints.extend(f"{ip}:{port}" for ip in status.get("interfaces", []))
        else:
            hints.append(address)
    return hints
