"""The control socket protocol: one JSON request line, one JSON answer line.

Requests:

``{"op": "status"}``
    → the agent's status (listen addresses, connections, per-peer lag).
``{"op": "sync", "peer": DEVICE_ID or null, "timeout": seconds}``
    → dial the peer(s) now and wait until in sync or the timeout:
    ``{"ok": bool, "peers": [{"device_id", "synced", "error"}]}``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import trio

from p2psync.core.identity import device_id, parse_device_id
from p2psync.errors import P2PSyncError
from p2psync.store.peers import PeerState

if TYPE_CHECKING:
    from p2psync.agent.agent import Agent

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024


async def handle_control(agent: Agent, stream: trio.abc.Stream) -> None:
    try:
        with trio.move_on_after(5):
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        try:
            request = json.loads(data)
            answer = await _answer(agent, request)
        except (ValueError, P2PSyncError) as exc:
            answer = {"ok": False, "error": str(exc)}
        await stream.send_all(json.dumps(answer).encode() + b"\n")
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def _answer(agent: Agent, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    op = request.get("op")
    if op == "status":
        return {"ok": True, **agent.status()}
    if op == "sync":
        return await _sync(agent, request.get("peer"), float(request.get("timeout") or 30))
    raise ValueError(f"unknown request {op!r}")


async def _sync(agent: Agent, peer: str | None, timeout: float) -> dict[str, Any]:
    """Dial now and wait until each peer is in sync, or its connection ends
    without it (not paired, refused, unreachable: the reason is reported)."""
    if peer:
        keys = [parse_device_id(peer)]
        if keys[0] not in agent.peers:
            raise ValueError(f"{peer} is not a known peer")
    else:
        keys = [
            key
            for key, known in agent.peers.items()
            if known.state is PeerState.KNOWN and (known.addresses or agent.registry.get(key))
        ]
    asked = trio.current_time()
    agent.dial_now()
    results: dict[bytes, dict[str, Any]] = {}
    with trio.move_on_after(timeout):
        while len(results) < len(keys):
            for key in keys:
                if key in results:
                    continue
                conn = agent.registry.get(key)
                machine = conn.machine if conn is not None else None
                ended = agent.ended.get(key)
                if machine is not None and machine.synced:
                    results[key] = {"device_id": device_id(key), "synced": True, "error": None}
                elif machine is not None and machine.stuck_reason is not None:
                    # all that will flow has flowed; waiting longer changes nothing
                    error = f"cannot get in step: {machine.stuck_reason}"
                    results[key] = {"device_id": device_id(key), "synced": False, "error": error}
                elif conn is None and ended is not None and ended[0] > asked and not ended[2]:
                    results[key] = {"device_id": device_id(key), "synced": False, "error": ended[1]}
            await trio.sleep(0.02)
    for key, answer in results.items():
        known = agent.peers.get(key)
        answer["name"] = known.name if known is not None else None
    for key in keys:
        if key not in results:
            stored = await trio.to_thread.run_sync(agent.db.store.peer, key)
            error = (stored.last_error if stored else None) or "not in sync before the timeout"
            known = agent.peers.get(key)
            results[key] = {
                "device_id": device_id(key),
                "name": known.name if known is not None else None,
                "synced": False,
                "error": error,
            }
    return {"ok": all(r["synced"] for r in results.values()), "peers": list(results.values())}
