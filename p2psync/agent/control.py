"""The control socket protocol: one JSON request line, one JSON answer line.

Requests:

``{"op": "status"}``
    → the agent's status (listen addresses, connections, per-peer lag).
``{"op": "sync", "peer": DEVICE_ID or null, "timeout": seconds}``
    → sync with the peer (or every paired one) now and wait until in sync or the
    timeout: ``{"ok": bool, "peers": [{"device_id", "name", "synced", "error"}]}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Protocol

import trio

from p2psync.agent.connections import Registry
from p2psync.agent.dialing import Dialing
from p2psync.agent.peers import Peers
from p2psync.core.identity import device_id, parse_device_id
from p2psync.errors import P2PSyncError
from p2psync.home import OpenHome
from p2psync.net.oneshot import sync_once
from p2psync.net.storeio import ChangeFeed
from p2psync.store.peers import PeerState

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024


class Controlled(Protocol):
    """What the control socket uses of the agent."""

    @property
    def db(self) -> OpenHome: ...  # on-demand syncs run from this home

    @property
    def feed(self) -> ChangeFeed: ...  # bumped when they bring entries

    @property
    def peers(self) -> Peers: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def dialing(self) -> Dialing: ...

    def on_demand_lock(self, peer: bytes) -> trio.Lock: ...

    def status(self) -> dict[str, Any]: ...


async def handle_control(agent: Controlled, stream: trio.abc.Stream) -> None:
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
        except Exception as exc:  # one bad request never takes the agent down
            log.exception("control request failed")
            answer = {"ok": False, "error": f"internal error in the agent: {exc!r}"}
        await stream.send_all(json.dumps(answer).encode() + b"\n")
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def _answer(agent: Controlled, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    op = request.get("op")
    if op == "status":
        return {"ok": True, **agent.status()}
    if op == "sync":
        timeout = request.get("timeout")
        timeout = 30.0 if timeout is None else float(timeout)
        if not 0 < timeout < 1e6:  # NaN included
            raise ValueError("the timeout is a number of seconds above 0")
        return await _sync(agent, request.get("peer"), timeout)
    raise ValueError(f"unknown request {op!r}")


async def _sync(agent: Controlled, peer: str | None, timeout: float) -> dict[str, Any]:
    """Sync now with one peer or every paired one, and wait until each is in sync or
    cannot be (not paired, refused, unreachable: the reason is reported). What online
    rules let flow comes over the live connection (dialled now); what on-demand rules
    let flow (all of a pair's rules, once one of them is online) comes over the live
    connection (dialled now); with a peer whose rules are all on demand, or that is
    not paired, an on-demand session runs now, as `p2psync sync` without an agent
    would."""
    standing = agent.peers.standing
    if peer:
        keys = [parse_device_id(peer)]
        if keys[0] not in agent.peers.known:
            raise ValueError(f"{peer} is not a known peer")
    else:
        # peers paired only by route-relay rules are not dialled: `p2psync sync`
        # takes them through the relay itself
        direct = standing.online | standing.on_demand
        keys = [
            key
            for key, known in agent.peers.known.items()
            if known.state is PeerState.KNOWN
            and (key in direct or (key in standing.asking and key not in standing.paired))
        ]
    live = [key for key in keys if key in standing.online]
    # a live connection carries every rule of a pair with an online rule in force
    on_demand = [key for key in keys if key not in standing.online]
    live_results: dict[bytes, tuple[bool, str | None]] = {}
    demand_results: dict[bytes, tuple[bool, str | None]] = {}

    async def run_on_demand() -> None:
        # one on-demand sync per peer at a time (the peer refuses a second beside it):
        # a second `p2psync sync` waits for the first's session, then runs its own
        locks = [agent.on_demand_lock(key) for key in sorted(on_demand)]
        async with contextlib.AsyncExitStack() as stack:
            for lock in locks:
                await stack.enter_async_context(lock)
            outcomes = await sync_once(
                agent.db,
                on_demand,
                None,
                timeout=timeout,
                feed=agent.feed,
                hints={key: agent.dialing.lan_addresses(key) for key in on_demand},
            )
        by_id = {outcome.peer: outcome for outcome in outcomes}
        for key in on_demand:
            outcome = by_id.get(device_id(key))
            if outcome is not None:
                demand_results[key] = (outcome.synced, outcome.error)

    async with trio.open_nursery() as nursery:
        if on_demand:
            nursery.start_soon(run_on_demand)
        await _wait_live(agent, live, timeout, live_results)
    answers = []
    for key in keys:
        parts = [r[key] for r in (live_results, demand_results) if key in r]
        for results, wanted in ((live_results, live), (demand_results, on_demand)):
            if key in wanted and key not in results:
                stored = await trio.to_thread.run_sync(agent.db.store.peer, key)
                error = (stored.last_error if stored else None) or "not in sync before the timeout"
                parts.append((False, error))
        errors = [error for ok, error in parts if not ok]
        known = agent.peers.known.get(key)
        answers.append(
            {
                "device_id": device_id(key),
                "name": known.name if known is not None else None,
                "synced": not errors,
                "error": errors[0] if errors else None,
            }
        )
    return {"ok": all(a["synced"] for a in answers), "peers": answers}


async def _wait_live(
    agent: Controlled,
    keys: list[bytes],
    timeout: float,
    results: dict[bytes, tuple[bool, str | None]],
) -> None:
    """Dial now and wait until each live connection is in sync, or ends without it
    (woken by every change the registry hears of)."""
    registry = agent.registry
    asked = trio.current_time()
    agent.dialing.now()
    with trio.move_on_after(timeout):
        while True:
            for key in keys:
                if key in results:
                    continue
                conn = registry.get(key)
                machine = conn.machine if conn is not None else None
                ended = registry.ended.get(key)
                if machine is not None and machine.synced:
                    results[key] = (True, None)
                elif machine is not None and machine.stuck_reason is not None:
                    # all that will flow has flowed; waiting longer changes nothing
                    results[key] = (False, f"cannot get in step: {machine.stuck_reason}")
                elif conn is None and ended is not None and ended.at > asked and not ended.in_sync:
                    results[key] = (False, ended.reason)
            if len(results) >= len(keys):
                return
            await registry.wait_change()
