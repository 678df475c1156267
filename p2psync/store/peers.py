"""The peers table: which agents this one knows (what flows between them is up to
the rules, :mod:`p2psync.store.rules`), where to reach them, how they are doing."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

#: Addresses kept per peer, most recently useful first.
MAX_ADDRESSES = 8


class PeerState(Enum):
    KNOWN = "known"  # what flows is decided by the rules between us
    REMOVED = "removed"  # `pair remove`: its rules revoked, not dialled


@dataclass(frozen=True, slots=True)
class Peer:
    key: bytes
    name: str | None
    state: PeerState
    addresses: tuple[str, ...]
    added: int
    last_seen: int | None
    last_sync: int | None
    last_error: str | None


_COLUMNS = "key, name, state, addresses, added, last_seen, last_sync, last_error"


def _peer(row: tuple[Any, ...]) -> Peer:
    key, name, state, addresses, added, last_seen, last_sync, last_error = row
    return Peer(
        key,
        name,
        PeerState(state),
        tuple(json.loads(addresses)),
        added,
        last_seen,
        last_sync,
        last_error,
    )


def add(
    conn: sqlite3.Connection, key: bytes, name: str | None, addresses: Sequence[str], now_ms: int
) -> Peer:
    """Know ``key`` (a removed peer becomes known again); an existing peer keeps its
    addresses and gains the new ones."""
    existing = get(conn, key)
    known = list(existing.addresses) if existing else []
    merged = [*dict.fromkeys(addresses), *(a for a in known if a not in addresses)]
    merged = merged[:MAX_ADDRESSES]
    if existing is None:
        conn.execute(
            "INSERT INTO peers (key, name, state, addresses, added) VALUES (?, ?, ?, ?, ?)",
            (key, name, PeerState.KNOWN.value, json.dumps(merged), now_ms),
        )
    else:
        conn.execute(
            "UPDATE peers SET name = coalesce(?, name), state = ?, addresses = ? WHERE key = ?",
            (name, PeerState.KNOWN.value, json.dumps(merged), key),
        )
    peer = get(conn, key)
    assert peer is not None
    return peer


def forget_address(conn: sqlite3.Connection, key: bytes, address: str) -> None:
    peer = get(conn, key)
    if peer is not None and address in peer.addresses:
        kept = [a for a in peer.addresses if a != address]
        conn.execute("UPDATE peers SET addresses = ? WHERE key = ?", (json.dumps(kept), key))


def set_state(conn: sqlite3.Connection, key: bytes, state: PeerState) -> None:
    conn.execute("UPDATE peers SET state = ? WHERE key = ?", (state.value, key))


def get(conn: sqlite3.Connection, key: bytes) -> Peer | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM peers WHERE key = ?", (key,)).fetchone()
    return None if row is None else _peer(row)


def all_peers(conn: sqlite3.Connection) -> list[Peer]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM peers ORDER BY name, key").fetchall()
    return [_peer(row) for row in rows]


def record(
    conn: sqlite3.Connection,
    key: bytes,
    *,
    seen: int | None = None,
    synced: int | None = None,
    error: str | None = None,
    clear_error: bool = False,
    address: str | None = None,
) -> None:
    """Note what happened with a peer (only the given fields change)."""
    if seen is not None:
        conn.execute("UPDATE peers SET last_seen = ? WHERE key = ?", (seen, key))
    if synced is not None:
        conn.execute("UPDATE peers SET last_sync = ? WHERE key = ?", (synced, key))
    if error is not None or clear_error:
        conn.execute("UPDATE peers SET last_error = ? WHERE key = ?", (error, key))
    if address is not None:  # it answered as this peer: try it first from now on
        peer = get(conn, key)
        if peer is not None and peer.addresses[:1] != (address,):
            kept = [address, *(a for a in peer.addresses if a != address)][:MAX_ADDRESSES]
            conn.execute(
                "UPDATE peers SET addresses = ? WHERE key = ?", (json.dumps(kept), key)
            )


def set_heads(conn: sqlite3.Connection, key: bytes, heads: Mapping[bytes, int]) -> None:
    conn.execute("DELETE FROM peer_heads WHERE peer = ?", (key,))
    conn.executemany(
        "INSERT INTO peer_heads (peer, author, seq) VALUES (?, ?, ?)",
        [(key, author, seq) for author, seq in heads.items()],
    )


def heads_of(conn: sqlite3.Connection, key: bytes) -> dict[bytes, int]:
    rows = conn.execute("SELECT author, seq FROM peer_heads WHERE peer = ?", (key,)).fetchall()
    return dict(rows)
