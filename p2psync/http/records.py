"""``/records`` and ``/transactions``: read, write, delete and list records, and
write many as one entry (atomic everywhere, like ``put --from --atomic``)."""

from __future__ import annotations

from itertools import islice
from typing import Any

import trio
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p2psync.core.entry import MAX_OPS, OpKind, check_collection, check_key
from p2psync.errors import NotFoundError, UsageError
from p2psync.http.body import number, read_json, record_target, segments
from p2psync.http.site import Site
from p2psync.store.store import Change
from p2psync.views.records import version_row
from p2psync.views.values import from_json, to_json

MAX_PAGE = 1000


class _Anything(PathConvertor):
    """A path's rest, line breaks too (Starlette's ``path`` stops at one): a name
    holding one is then refused as a bad name, not as an unknown path."""

    regex = r"[\s\S]*"


register_url_convertor("p2psync_rest", _Anything())


def routes(site: Site) -> list[Route]:
    db = site.db

    async def collections(_request: Request) -> Response:
        rows = await trio.to_thread.run_sync(db.collections)
        return JSONResponse({"collections": [{"collection": c, "records": n} for c, n in rows]})

    async def listing(request: Request) -> Response:
        parts = segments(request, "/records")
        if len(parts) != 1:
            raise UsageError("list a collection with /records/COLLECTION")
        collection = check_collection(parts[0])
        prefix = request.query_params.get("prefix", "")
        after = request.query_params.get("after")
        limit = number(request, "limit", 100, 1, MAX_PAGE)

        def read() -> tuple[list[tuple[str, Any]], bool]:
            page = list(islice(db.scan(collection, prefix, after), limit + 1))
            known = bool(page) or db.store.has_collection(collection)
            return page, known

        page, known = await trio.to_thread.run_sync(read)
        if not known:
            raise NotFoundError(f"no collection named {collection!r} here")
        more = len(page) > limit
        page = page[:limit]
        return JSONResponse(
            {
                "records": [{"key": k, "value": to_json(v)} for k, v in page],
                # pass as ?after= for the next page; null: this was the last
                "next": page[-1][0] if more else None,
            }
        )

    async def record(request: Request) -> Response:
        if len(segments(request, "/records")) == 1 and request.method == "GET":
            return await listing(request)
        collection, key = record_target(request)
        if request.method == "GET":
            found = await trio.to_thread.run_sync(db.version, collection, key)
            if found is None or found[0].deleted:
                why = "was deleted" if found is not None else "does not exist here"
                raise NotFoundError(f"record {collection}/{key} {why}")
            version, conflict = found
            row = version_row(version)
            return JSONResponse(
                {
                    "collection": collection,
                    "key": key,
                    **row,
                    "value": to_json(row["value"]),
                    "conflict": conflict,
                }
            )
        if request.method == "PUT":
            value = from_json(await read_json(request))
            entry = await trio.to_thread.run_sync(db.put, collection, key, value)
            return JSONResponse({"entry": entry.hex()})
        deleted = await trio.to_thread.run_sync(db.delete, collection, key)
        if not deleted:
            raise NotFoundError(f"record {collection}/{key} does not exist here")
        return JSONResponse({"deleted": True})

    async def transaction(request: Request) -> Response:
        changes = parse_changes(await read_json(request))
        written = await trio.to_thread.run_sync(db.write, [changes])
        return JSONResponse(
            {"entry": written[0].hex() if written else None, "changes": len(changes)}
        )

    return [
        Route("/records", collections, methods=["GET"]),
        Route("/records/{rest:p2psync_rest}", record, methods=["GET", "PUT", "DELETE"]),
        Route("/transactions", transaction, methods=["POST"]),
    ]


def parse_changes(document: Any) -> list[Change]:
    """``{"changes": [{"collection", "key", "value"} | {"collection", "key",
    "delete": true}, ...]}``: every change checked before any is written."""
    if not isinstance(document, dict) or not isinstance(document.get("changes"), list):
        raise UsageError('send {"changes": [{"collection": C, "key": K, "value": V}, ...]}')
    items = document["changes"]
    if not items:
        raise UsageError("the transaction has no changes")
    if len(items) > MAX_OPS:
        raise UsageError(f"a transaction may hold at most {MAX_OPS:,} changes")
    changes: list[Change] = []
    for number_, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise UsageError(f"change {number_} is not a JSON object")
        unknown = set(item) - {"collection", "key", "value", "delete"}
        if unknown:
            raise UsageError(f"change {number_} has unknown fields: {', '.join(sorted(unknown))}")
        collection = check_collection(item.get("collection"))
        key = check_key(item.get("key"))
        delete = item.get("delete", False)
        if delete is True:
            if "value" in item:
                raise UsageError(f"change {number_} both deletes and gives a value")
            changes.append(Change(OpKind.DELETE, collection, key))
        elif delete is False and "value" in item:
            changes.append(Change(OpKind.PUT, collection, key, from_json(item["value"])))
        else:
            raise UsageError(f'change {number_} needs a "value" or "delete": true')
    return changes
