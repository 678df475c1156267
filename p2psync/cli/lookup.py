"""Finding a peer or rule from what a user typed; asking the running agent."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

from p2psync.api import Database
from p2psync.cli.context import State
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.core.rules import Rule
from p2psync.errors import (
    AgentNotRunning,
    InvalidDeviceID,
    NotFoundError,
    UsageError,
)
from p2psync.net import agentsockets as sockets
from p2psync.net.address import parse_address
from p2psync.store.peers import Peer
from p2psync.store.rules import Invite


class _Identified(Protocol):
    @property
    def id(self) -> bytes: ...


T = TypeVar("T", bound=_Identified)

_DEVICE_ID_CHARS = 56  # without dashes


@dataclass(frozen=True, slots=True)
class Discovered:
    """An agent the running agent found on the LAN (its advert, unproven)."""

    key: bytes
    name: str | None
    addresses: tuple[str, ...]


@overload
def resolve_peer(db: Database, text: str) -> Peer: ...


@overload
def resolve_peer(
    db: Database, text: str, discover: Callable[[], Sequence[Discovered]]
) -> Peer | Discovered: ...


def resolve_peer(
    db: Database, text: str, discover: Callable[[], Sequence[Discovered]] | None = None
) -> Peer | Discovered:
    """A known peer by device ID, its first characters (4 or more), or name.

    With ``discover``, when no known peer matches, an agent it returns (those the
    running agent found on the LAN) is found the same way. Known peers come first,
    so an advert cannot take a known peer's name.
    """
    peers = db.store.peers()
    key = _full_device_id(text)
    if key is None:
        matches = _matching(text, {p.key: p.name for p in peers})
        if len(matches) == 1:
            return next(p for p in peers if p.key == matches[0])
        if matches:
            raise NotFoundError(f"{text!r} matches {len(matches)} peers; give the full device ID")
        found = [d for d in discover() if d.key not in {p.key for p in peers}] if discover else []
        matches = _matching(text, {d.key: d.name for d in found})
        if len(matches) == 1:
            return next(d for d in found if d.key == matches[0])
        if matches:
            raise NotFoundError(
                f"{text!r} matches {len(matches)} agents on the LAN; give the full device ID"
            )
        raise NotFoundError(f"no peer called {text!r}; see `p2psync peers`")
    for peer in peers:
        if peer.key == key:
            return peer
    for agent in discover() if discover else ():
        if agent.key == key:
            return agent
    raise NotFoundError(f"{short_id(key)} is not a known peer; see `p2psync peers`")


def discovered_agents(state: State) -> list[Discovered]:
    """The agents the running agent has found on the LAN (none when it is not running)."""
    status = agent_status(state)
    found = []
    for row in (status or {}).get("discovered", []):
        try:
            key = parse_device_id(row["device_id"])
            name = row.get("name")
            addresses = tuple(str(a) for a in row.get("addresses", []))
        except (InvalidDeviceID, KeyError, TypeError, AttributeError):
            continue
        found.append(Discovered(key, name if isinstance(name, str) else None, addresses))
    return found


def resolve_author(db: Database, text: str) -> bytes:
    """An author as peers are named: device ID, its first characters (4 or more), or
    name; among this site, its peers and every author whose entries it holds."""
    key = _full_device_id(text)
    if key is not None:
        return key
    names: dict[bytes, str | None] = {a.author: None for a in db.authors()}
    names.update({p.key: p.name for p in db.store.peers()})
    names[db.identity.public_key] = db.home.name
    matches = _matching(text, names)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise NotFoundError(
            f"{text!r} matches {len(matches)} authors; give more of the device ID"
        )
    raise NotFoundError(f"no author called {text!r}; see `p2psync log` or `p2psync peers`")


def _full_device_id(text: str) -> bytes | None:
    """The key ``text`` names if it is a whole device ID; None if it is not shaped
    like one (a name or the first characters); a mistyped one is refused."""
    try:
        return parse_device_id(text)
    except InvalidDeviceID:
        if len(re.sub(r"[\s-]", "", text)) >= _DEVICE_ID_CHARS:
            raise
        return None


def _matching(text: str, names: dict[bytes, str | None]) -> list[bytes]:
    """Keys whose name is ``text`` or whose device ID starts with it (4+ characters);
    an exact name wins over prefixes."""
    named = [key for key, name in names.items() if name == text]
    if named:
        return named
    cleaned = text.replace("-", "").upper()
    if len(cleaned) < 4:
        return []
    return [key for key in names if device_id(key).replace("-", "").startswith(cleaned)]


def resolve_rule(db: Database, text: str) -> Rule:
    """A rule by its ID or the ID's first characters (4 or more)."""
    return _by_id(text, db.store.rules(), "rule", 64, "p2psync rule list")


def resolve_invite(db: Database, text: str) -> Invite:
    """An invite this agent made, by its ID or the ID's first characters (4 or more)."""
    return _by_id(text, db.store.invites(), "invite", 16, "p2psync pair invites")


def _by_id(text: str, items: Sequence[T], what: str, digits: int, listing: str) -> T:
    if not re.fullmatch(rf"[0-9a-fA-F]{{4,{digits}}}", text):
        raise UsageError(f"{text!r} is not {an(what)} ID (hex, 4-{digits} characters)")
    matches = [i for i in items if i.id.hex().startswith(text.lower())]
    if len(matches) != 1:
        raise NotFoundError(
            f"{len(matches) or 'no'} {what}s match {text!r}; see `{listing}`"
        )
    return matches[0]


def an(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def notify(state: State) -> None:
    sockets.notify(state.home, sockets.CHANGED_PEERS)


def agent_status(state: State) -> dict[str, Any] | None:
    try:
        return sockets.request(state.home, {"op": "status"}, timeout=2)
    except (AgentNotRunning, OSError, ValueError):
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
