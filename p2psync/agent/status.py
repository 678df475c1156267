"""What ``p2psync status`` shows about a running agent."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from p2psync.agent.connections import Registry
from p2psync.clock import now_ms
from p2psync.core.identity import Identity, device_id
from p2psync.core.messages import lag
from p2psync.net.adverts import AdvertTable
from p2psync.store.peers import Peer


def agent_status(
    *,
    identity: Identity,
    name: str,
    listen: Sequence[str],
    started_ms: int,
    interfaces: Sequence[str],
    registry: Registry,
    peers: Mapping[bytes, Peer],
    adverts: AdvertTable,
) -> dict[str, Any]:
    """Identity, listen addresses, live connections with their lag, and the agents
    discovered on the LAN."""
    connections = []
    for conn in registry.all():
        machine, stats = conn.machine, conn.stats
        behind = ahead = 0
        synced = bool(machine is not None and machine.synced)
        if machine is not None:
            behind, ahead = lag(
                {a: h.seq for a, h in machine.local.items()},
                {a: h.seq for a, h in machine.peer.items()},
            )
            # only what may flow counts: a one-way rule is in step however far the
            # side that only sends has written ahead of us
            behind = behind if machine.flow.receiving else 0
            ahead = ahead if machine.flow.sending else 0
        peer = peers.get(conn.peer)
        connections.append(
            {
                "peer": peer.name if peer is not None else None,
                "device_id": device_id(conn.peer),
                "direction": "out" if conn.outbound else "in",
                "on_demand": conn.on_demand,
                # live: the one connection the pair syncs over; on demand: a side sync
                # (`p2psync sync`, `pair join`); pending: its session has not opened
                "kind": "live"
                if registry.get(conn.peer) is conn
                else "on demand"
                if conn.on_demand
                else "pending",
                "address": conn.address,
                # the path: "direct", or "relay" (spliced through the relay named)
                "path": "direct" if conn.via is None else "relay",
                "relay": device_id(conn.via) if conn.via is not None else None,
                "since": conn.since_ms,
                "synced": synced,
                "begun": bool(machine is not None and machine.begun),  # past the rules
                "stuck": machine.stuck_reason if machine is not None else None,
                "last_sync": now_ms() if synced else stats.in_sync_ms if stats else None,
                "entries_sent": stats.sent if stats else 0,
                "entries_received": stats.received if stats else 0,
                "behind": behind,
                "ahead": ahead,
            }
        )
    discovered = [
        {
            "device_id": device_id(found.key),
            "name": found.name,
            "addresses": list(found.addresses),
            "first_seen": found.first_seen,
            "last_seen": found.last_seen,
        }
        for found in adverts.agents.values()
    ]
    return {
        "pid": os.getpid(),
        "device_id": identity.device_id,
        "name": name,
        "listen": list(listen),
        "interfaces": list(interfaces),
        "started": started_ms,
        "connections": connections,
        "discovered": discovered,
    }
