"""The site's state and the operator's decisions: ``/status``, ``/peers``,
``/requests`` (accept, narrowed, or reject with a reason), ``/rules`` (propose,
revoke), ``/conflicts`` (resolve by choosing a version or writing a value) and
``/ledger``. Nothing here can do more than the CLI can at this site: the same
``pairing`` functions, the same rows (``p2psync.views``)."""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p2psync import pairing
from p2psync.api import Database
from p2psync.clock import now_ms
from p2psync.core.entry import OpKind, check_collection, check_key
from p2psync.core.identity import device_id, parse_device_id
from p2psync.core.rules import Direction, Mode, Rule, RuleState
from p2psync.core.rules import Route as RuleRoute
from p2psync.errors import NotFoundError, StateError, UsageError
from p2psync.http.body import read_json
from p2psync.http.site import Site
from p2psync.store.local import Change
from p2psync.views.delivery import delivery
from p2psync.views.peers import peer_rows
from p2psync.views.records import version_row
from p2psync.views.rules import RuleOptions, accept_in_view, pending, rule_row, waiting_for_us
from p2psync.views.status import site_status
from p2psync.views.values import from_json, to_json

_RULE_ID = re.compile(r"[0-9a-f]{12,64}")
MAX_REASON = 500  # characters of a rejection's reason


def routes(site: Site) -> list[Route]:
    db = site.db

    async def in_thread(function: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args)

    async def status(_request: Request) -> Response:
        running = site.status()
        return JSONResponse(to_json(await in_thread(site_status, db, running)))

    async def peers(_request: Request) -> Response:
        running = site.status()
        return JSONResponse({"peers": to_json(await in_thread(peer_rows, db, running))})

    async def peer(request: Request) -> Response:
        wanted = _device(request.path_params["device_id"])
        running = site.status()
        rows = await in_thread(peer_rows, db, running)
        for row in rows:
            if row["device_id"] == device_id(wanted):
                return JSONResponse(to_json(row))
        raise NotFoundError(f"no peer {device_id(wanted)} known here")

    async def requests(_request: Request) -> Response:
        rows, joins, strangers = await in_thread(partial(pending, db, expire=False))
        return JSONResponse({"requests": rows, "joins": joins, "strangers_waiting": strangers})

    async def accept(request: Request) -> Response:
        body = await _optional_body(request)
        options = _options(body)

        def work() -> dict[str, Any]:
            rule = waiting(db, find_rule(db, request.path_params["rule"]))
            mine = accept_in_view(db, rule, options)
            peer = rule.proposer
            db.store.add_peer(peer, None, [], now_ms())
            return {"accepted": rule.id.hex(), "terms": mine.describe()}

        answer = await in_thread(work)
        site.peers_changed()
        return JSONResponse(answer)

    async def reject(request: Request) -> Response:
        body = await read_json(request)
        reason = body.get("reason") if isinstance(body, dict) else None
        if not isinstance(reason, str) or not reason.strip():
            raise UsageError('say why: {"reason": "..."} (the requester sees it)')
        if len(reason) > MAX_REASON:
            raise UsageError(f"the reason is {len(reason)} characters; at most {MAX_REASON}")

        def work() -> dict[str, Any]:
            rule = waiting(db, find_rule(db, request.path_params["rule"]))
            pairing.reject(db, rule, reason.strip())
            return {"rejected": rule.id.hex(), "reason": reason.strip()}

        answer = await in_thread(work)
        site.peers_changed()
        return JSONResponse(answer)

    async def rules(_request: Request) -> Response:
        def read() -> list[dict[str, Any]]:
            me = db.identity.public_key
            names = {p.key: p.name for p in db.store.peers()}
            return [rule_row(me, r, names) for r in db.store.rules()]

        return JSONResponse({"rules": await in_thread(read)})

    async def propose(request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("peer"), str):
            raise UsageError('name the peer: {"peer": DEVICE_ID, "collections": [...], ...}')
        key = _device(body["peer"])
        terms = _options(body).terms()

        def work() -> dict[str, Any]:
            if db.store.peer(key) is None:
                raise NotFoundError(
                    f"no peer {device_id(key)} known here: pair with it first (`p2psync pair add`)"
                )
            result = pairing.propose(db, key, terms)
            names = {p.key: p.name for p in db.store.peers()}
            return {"new": result.new, "rule": rule_row(db.identity.public_key, result.rule, names)}

        answer = await in_thread(work)
        site.peers_changed()
        return JSONResponse(answer, status_code=201 if answer["new"] else 200)

    async def revoke(request: Request) -> Response:
        def work() -> dict[str, Any]:
            rule = find_rule(db, request.path_params["rule"])
            if rule.state is RuleState.REVOKED:
                raise StateError(f"rule {rule.id.hex()[:12]} is already revoked")
            pairing.revoke(db, rule)
            return {"revoked": rule.id.hex()}

        answer = await in_thread(work)
        site.peers_changed()
        return JSONResponse(answer)

    async def conflicts(_request: Request) -> Response:
        found = await in_thread(db.conflicts)
        return JSONResponse(
            {
                "conflicts": [
                    {
                        "collection": c.collection,
                        "key": c.key,
                        "winner": to_json(version_row(c.winner)),
                        "losers": [to_json(version_row(v)) for v in c.losers],
                    }
                    for c in found
                ]
            }
        )

    async def resolve(request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise UsageError('send {"collection", "key", and "entry" (a version) or "value"}')
        collection = check_collection(body.get("collection"))
        key = check_key(body.get("key"))
        if ("entry" in body) == ("value" in body):
            raise UsageError('give either "entry" (the version to keep) or "value" (a new one)')
        chosen = body.get("entry")
        if "entry" in body and not isinstance(chosen, str):
            raise UsageError('"entry" is the hex id of the version to keep (GET /conflicts)')
        value = None if chosen is not None else from_json(body["value"])

        def work() -> dict[str, Any]:
            conflict = next(
                (c for c in db.conflicts() if c.collection == collection and c.key == key), None
            )
            if conflict is None:
                raise StateError(
                    f"{collection}/{key} is not in conflict: to change it, PUT /records/..."
                )
            change = Change(OpKind.PUT, collection, key, value, resolve=True)
            if chosen is not None:
                versions = [conflict.winner, *conflict.losers]
                wanted = chosen.strip().lower()  # hex has no case; a pasted line end
                picked = next((v for v in versions if v.entry.hex() == wanted), None)
                if picked is None:
                    raise NotFoundError(
                        f"entry {str(chosen)[:64]!r} is not one of the versions of "
                        f"{collection}/{key} in conflict (GET /conflicts lists them)"
                    )
                kind = OpKind.DELETE if picked.deleted else OpKind.PUT
                change = Change(kind, collection, key, picked.value, resolve=True)
            entry = db.write([[change]])[0]
            return {"resolved": f"{collection}/{key}", "entry": entry.hex()}

        return JSONResponse(await in_thread(work))

    async def ledger(_request: Request) -> Response:
        def read() -> list[dict[str, Any]]:
            rows = []
            for known in db.store.peers():
                figures = delivery(db, known.key, now_ms())
                if figures is not None:
                    rows.append(
                        {"device_id": device_id(known.key), "name": known.name, "delivery": figures}
                    )
            return rows

        return JSONResponse({"ledger": await in_thread(read)})

    return [
        Route("/status", status, methods=["GET"]),
        Route("/peers", peers, methods=["GET"]),
        Route("/peers/{device_id}", peer, methods=["GET"]),
        Route("/requests", requests, methods=["GET"]),
        Route("/requests/{rule}/accept", accept, methods=["POST"]),
        Route("/requests/{rule}/reject", reject, methods=["POST"]),
        Route("/rules", rules, methods=["GET"]),
        Route("/rules", propose, methods=["POST"]),
        Route("/rules/{rule}/revoke", revoke, methods=["POST"]),
        Route("/conflicts", conflicts, methods=["GET"]),
        Route("/conflicts/resolve", resolve, methods=["POST"]),
        Route("/ledger", ledger, methods=["GET"]),
    ]


def _device(text: str) -> bytes:
    return parse_device_id(text)


def find_rule(db: Database, text: str) -> Rule:
    text = text.strip().lower()
    if not _RULE_ID.fullmatch(text):
        raise UsageError(f"{text[:80]!r} is not a rule ID (12 to 64 hex digits)")
    found = [r for r in db.store.rules() if r.id.hex().startswith(text)]
    if not found:
        raise NotFoundError(f"no rule {text} here (GET /rules lists them)")
    if len(found) > 1:
        raise UsageError(f"{text} names {len(found)} rules; give more of the ID")
    return found[0]


def waiting(db: Database, rule: Rule) -> Rule:
    return waiting_for_us(db, rule, "GET /requests")


async def _optional_body(request: Request) -> Any:
    if request.headers.get("content-length") in (None, "0") and "chunked" not in (
        request.headers.get("transfer-encoding", "")
    ):
        return {}
    return await read_json(request)


def _options(body: Any) -> RuleOptions:
    """Rule terms in this site's view (``collections``, ``direction``, ``mode``,
    ``route``); what is not given is as proposed (accepting) or the default."""
    if not isinstance(body, dict):
        raise UsageError("send a JSON object")
    collections = body.get("collections", [])
    if not isinstance(collections, list) or not all(isinstance(c, str) for c in collections):
        raise UsageError('"collections" is a list of collection names (globs)')
    choices = {"direction": Direction, "mode": Mode, "route": RuleRoute}
    given: dict[str, str | None] = {}
    for name, kind in choices.items():
        value = body.get(name)
        allowed = [member.value for member in kind]
        if value is not None and value not in allowed:
            raise UsageError(
                f'"{name}" is one of {", ".join(allowed)}, not {repr(value)[:80]}'
            )
        given[name] = value
    return RuleOptions(tuple(collections), given["direction"], given["mode"], given["route"])
