"""What the HTTP API's reviews noticed and left: a test for each, failing on the
code before its fix for the reason its docstring gives (or, where the suspicion
proved wrong, kept as a guard and saying so)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, cast

import pytest
import trio
from hypercorn.config import Config
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import p2psync
from p2psync.errors import HttpError, P2PSyncError
from p2psync.http.body import read_json
from p2psync.http.connections import serve
from p2psync.http.errors import p2psync_error
from tests.agents import SpawnedAgent, serving
from tests.httpclient import Api
from tests.served import served


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedAgent]:
    with serving(tmp_path_factory.mktemp("left"), "hq") as agent:
        yield agent


@pytest.fixture
def api(site: SpawnedAgent) -> Api:
    return Api.of_agent(site)


@pytest.mark.process
def test_resolve_takes_an_entry_id_in_capitals_or_with_a_line_end(
    site: SpawnedAgent, api: Api, make_db: Callable[[str], p2psync.Database]
) -> None:
    """An entry ID is hex, which has no case: ``"entry": "AB12..."`` (as a
    spreadsheet or another program may have upper-cased it) was answered 404
    "is not one of the versions" although it names one; so was one pasted with
    its line end (rule IDs are stripped)."""
    api.ok("PUT", "/records/stock/CAPS", {"qty": 1})
    other = make_db("branch")
    other.put("stock", "CAPS", {"qty": 2})
    with site.db() as db:
        db.ingest(list(other.export()))
    [conflict] = [c for c in api.ok("GET", "/conflicts")["conflicts"] if c["key"] == "CAPS"]
    chosen = next(v for v in [conflict["winner"], *conflict["losers"]] if v["value"] == {"qty": 2})
    done = api.call(
        "POST",
        "/conflicts/resolve",
        {"collection": "stock", "key": "CAPS", "entry": chosen["entry"].upper() + "\n"},
    )
    assert done.status == 200, done
    assert api.ok("GET", "/records/stock/CAPS")["value"] == {"qty": 2}


async def _ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.process
async def test_the_listening_socket_is_closed_when_serving_ends() -> None:
    """When the service stops, the port it listened on is let go. Suspected in
    review (the sockets are made by Hypercorn's config, outside serve) but not
    so: ``trio.serve_listeners`` closes them when cancelled. A guard: were it to
    stay bound, connections to it would queue unanswered and an agent started
    again in the same process could not listen there."""
    config = Config()
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    app = wrap_app(cast(Any, _ok_app), config.wsgi_max_body_size, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, app, config, [listening]))
        nursery.cancel_scope.cancel()
    assert listening.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.trio_memory
async def test_a_body_that_stops_arriving_is_answered_408() -> None:
    """A client that sends part of a body and then nothing (a program that hung
    mid-request) held its connection, and its task, for ever: the body is read
    with the same stall limit as a response is sent with, and the request is then
    answered 408 with a sentence."""
    sent: list[bool] = []

    async def receive() -> dict[str, Any]:
        if sent:
            await trio.sleep_forever()
        sent.append(True)
        return {"type": "http.request", "body": b'{"changes": [', "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/transactions", "headers": [],
             "query_string": b""}
    request = Request(scope, receive)
    began = trio.current_time()
    with trio.fail_after(5), pytest.raises(HttpError) as refused:
        await read_json(request, stall=0.2)
    assert refused.value.status == 408
    assert "nothing of the body for 0.2 s" in str(refused.value)
    assert trio.current_time() - began < 2


@pytest.mark.process
@pytest.mark.parametrize(
    "sent",
    [
        b"content-length: 100\r\n\r\n{\"a\": ",
        b"transfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n",
    ],
    ids=["length", "chunked"],
)
async def test_a_stalled_body_is_answered_408_and_the_connection_closed(sent: bytes) -> None:
    """The same over a real socket through Hypercorn: the client hears 408 with
    the JSON sentence, and the connection is then closed (it is not kept waiting
    for the rest of a body that will not come), which the answer says
    (``connection: close``, as RFC 9110 section 15.5.9 asks of a 408: a
    keep-alive client pool would otherwise send its next request on it;
    tests/test_review_left.py's finding)."""

    async def take(request: Request) -> Response:
        return JSONResponse({"got": await read_json(request, stall=0.3)})

    app = Starlette(
        routes=[Route("/take", take, methods=["POST"])],
        exception_handlers={P2PSyncError: p2psync_error},
    )
    async with served(app) as port:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(b"POST /take HTTP/1.1\r\nhost: 127.0.0.1\r\n" + sent)
        got = b""
        with trio.fail_after(5):
            while chunk := await client.receive_some():
                got += chunk
        await client.aclose()
    head, body = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408"), got
    assert b"\r\nconnection: close" in head.lower(), got
    assert json.loads(body) == {
        "error": "nothing of the body for 0.3 s: send it whole, promptly", "status": 408
    }
