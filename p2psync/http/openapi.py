"""The OpenAPI 3.1 document served at ``/openapi.json``: every path of the API
with what it takes and gives (``docs/http-api.md`` has the examples). A test
holds it to the routes the app serves."""

from __future__ import annotations

from typing import Any

from p2psync import __version__

_JSON = {"application/json": {"schema": {"type": "object"}}}
_ERROR = {
    "description": 'a JSON error: {"error": "one sentence", "status": CODE}',
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
            }
        }
    },
}


def _op(
    summary: str,
    *,
    params: tuple[str, ...] | list[str] = (),
    body: bool = False,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": _JSON},
            "400": _ERROR,
            "401": _ERROR,
            "404": _ERROR,
            "409": _ERROR,
        },
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in params
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "description": what,
         "schema": {"type": "string"}}
        for name, what in (query or {}).items()
    ]
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = {"required": True, "content": _JSON}
    return operation


PATHS: dict[str, dict[str, Any]] = {
    "/status": {"get": _op("This site, the running agent, the store, and every paired peer")},
    "/records": {"get": _op("Collections with their number of live records")},
    "/records/{collection}": {
        "get": _op(
            "Live records of a collection in key order, a page at a time",
            params=["collection"],
            query={"prefix": "only keys starting with this", "after": "the `next` of the "
                   "previous page", "limit": "records per page, 1-1000 (default 100)"},
        )
    },
    "/records/{collection}/{key}": {
        "get": _op("One record: its value, who wrote it, whether it is in conflict",
                   params=["collection", "key"]),
        "put": _op("Write the record: the body is its JSON value (one entry)",
                   params=["collection", "key"], body=True),
        "delete": _op("Delete the record (one entry)", params=["collection", "key"]),
    },
    "/transactions": {
        "post": _op('Write many records as one entry, atomically: {"changes": [...]}', body=True)
    },
    "/changes": {
        "get": _op(
            "Record changes after a change number, each record once at its latest state",
            query={"since": "the `last` of the previous answer (default 0)",
                   "collection": "only this collection (repeatable)",
                   "limit": "changes per answer, 1-1000", "timeout": "seconds to wait for a "
                   "change when there is none yet (long-poll, up to 60)"},
        )
    },
    "/events": {
        "get": {
            **_op(
                "Server-sent events: hello, change, conflict, peer, request, ledger, error",
                query={"since": "start after this change number (or the Last-Event-ID "
                       "header); default: from now", "collection": "only changes of "
                       "this collection (repeatable)", "keepalive": "seconds of quiet before a "
                       "comment is sent (1-300, default 15)"},
            ),
            "responses": {"200": {"description": "an event stream",
                                  "content": {"text/event-stream": {}}}, "401": _ERROR},
        }
    },
    "/peers": {"get": _op("Every known peer: paired?, connected, path, in step, ledger")},
    "/peers/{device_id}": {"get": _op("One peer", params=["device_id"])},
    "/requests": {"get": _op("Pairing requests and proposals waiting for an answer")},
    "/requests/{rule}/accept": {
        "post": _op("Accept a request, optionally narrowed (body: collections, direction, "
                    "mode, route, in this site's view; may be empty)", params=["rule"])
    },
    "/requests/{rule}/reject": {
        "post": _op('Reject a request: {"reason": "..."} (the requester sees it)',
                    params=["rule"], body=True)
    },
    "/rules": {
        "get": _op("Every rule with a peer, in this site's view"),
        "post": _op('Propose a rule to a known peer: {"peer", "collections", "direction", '
                    '"mode", "route"}', body=True),
    },
    "/rules/{rule}/revoke": {"post": _op("Revoke a rule", params=["rule"])},
    "/conflicts": {"get": _op("Records in conflict, with every version")},
    "/conflicts/resolve": {
        "post": _op('End a conflict: {"collection", "key", and "entry" (the version to '
                    'keep) or "value"}', body=True)
    },
    "/ledger": {"get": _op("The delivery ledger per peer (relay and files)")},
    "/openapi.json": {"get": _op("This document")},
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "p2psync agent",
            "version": __version__,
            "description": "The local HTTP API of a p2psync agent (docs/http-api.md). "
            "Every request needs the site's API key (HOME/http.key) in X-API-Key.",
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        },
        "security": [{"apiKey": []}],
        "paths": PATHS,
    }
