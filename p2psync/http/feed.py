"""``/changes`` (the change feed as JSON, with long-poll) and ``/events`` (server-
sent events: record changes, and the site's events from :class:`~p2psync.http.
events.Hub`). Both are woken by the agent's own signal that the store gained
entries (``ChangeFeed``), not by polling the store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from p2psync.core.entry import check_collection
from p2psync.errors import HttpError, UsageError
from p2psync.http.body import number, seconds
from p2psync.http.events import Hub
from p2psync.http.site import Site
from p2psync.store.feed import PAGE, RecordChange
from p2psync.views.records import change_json
from p2psync.views.values import to_json

MAX_SINCE = (1 << 63) - 1
LONG_POLL = 60.0  # seconds a /changes request may wait at most
KEEPALIVE = 15.0  # seconds between comments on a quiet event stream
MAX_STREAMS = 64  # event streams open at once


def routes(site: Site, hub: Hub) -> list[Route]:
    db = site.db

    def collections(request: Request) -> list[str] | None:
        names = request.query_params.getlist("collection")
        return [check_collection(name) for name in names] or None

    async def read(
        since: int, names: list[str] | None, limit: int
    ) -> tuple[list[RecordChange], int]:
        """A page of changes after ``since``, and how far the caller may move on:
        past the last one listed, or (a page not full) past every change so far,
        those of collections it does not follow too."""
        return await trio.to_thread.run_sync(db.feed_page, since, names, limit)

    async def changes(request: Request) -> Response:
        since = number(request, "since", 0, 0, MAX_SINCE)
        limit = number(request, "limit", PAGE, 1, PAGE)
        wait = seconds(request, "timeout", 0.0, LONG_POLL)
        names = collections(request)
        version = site.feed.version
        found, last = await read(since, names, limit)
        if not found and wait > 0:
            with trio.move_on_after(wait):
                while not found:
                    version = await site.feed.wait_beyond(version)
                    found, last = await read(last, names, limit)
        return JSONResponse(
            {
                "changes": [_json(change) for change in found],
                "last": last,  # pass as ?since= next time
            }
        )

    async def events(request: Request) -> Response:
        names = collections(request)
        given = request.headers.get("last-event-id") or request.query_params.get("since")
        if given is not None:
            try:
                since = int(given)
            except ValueError:
                raise UsageError(f"since={given!r} is not a change number") from None
            if not 0 <= since <= MAX_SINCE:
                raise UsageError(f"since={since} is out of range")
            latest = await trio.to_thread.run_sync(db.last_change)
            if since > latest:
                raise UsageError(
                    f"since={since} is beyond the latest change here ({latest}): another "
                    "home's number, or a store restored from a backup"
                )
        else:
            since = await trio.to_thread.run_sync(db.last_change)
        keepalive = seconds(request, "keepalive", KEEPALIVE, 300)
        if keepalive < 1:
            raise UsageError("keepalive is 1 to 300 seconds")
        if hub.listeners >= MAX_STREAMS:
            raise HttpError(429, f"{MAX_STREAMS} event streams are open already; close one")
        return EventResponse(
            hub,
            _stream(site, hub, since, names, keepalive),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return [
        Route("/changes", changes, methods=["GET"]),
        Route("/events", events, methods=["GET"]),
    ]


class EventResponse(StreamingResponse):
    """An event stream, counted from the moment it is answered to the moment its
    connection ends (however it ends), so at most :data:`MAX_STREAMS` are open."""

    def __init__(self, hub: Hub, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hub = hub
        hub.listen()  # counted now: the next request sees it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.hub.leave()


def _json(change: RecordChange) -> dict[str, Any]:
    row = change_json(change)
    row["value"] = to_json(row["value"])
    return row


def _sse(kind: str, data: dict[str, Any], ident: int | None = None) -> bytes:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(
    site: Site, hub: Hub, since: int, names: list[str] | None, keepalive: float
) -> AsyncIterator[bytes]:
    """``hello`` first (the latest change number), then ``change`` events (their
    ``id`` is the change number: a reconnecting EventSource resumes after it) and
    the hub's events, with a comment after ``keepalive`` quiet seconds."""
    db = site.db
    seen = hub.seq
    latest = await trio.to_thread.run_sync(db.last_change)
    yield _sse("hello", {"device_id": db.device_id, "name": db.name, "last_change": latest})
    while True:
        version = site.feed.version
        found, last = await trio.to_thread.run_sync(db.feed_page, since, names, PAGE)
        for change in found:
            row = _json(change)
            yield _sse("change", row, change.change)
            if change.conflict:
                yield _sse("conflict", row, change.change)
        since = last
        for event in hub.after(seen):
            yield _sse(event.kind, event.data)
            seen = event.seq
        if len(found) == PAGE:
            continue
        if not await hub.wait(seen, version, keepalive):
            yield b": keepalive\n\n"
