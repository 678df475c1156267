"""Review of eab9ec6 (console forms through read_body: 408, 413) and 568a40a (at
the connection limit the connection idle longest makes room; 503 only when every
one has a request under way). Each test fails on 568a40a for the reason its
docstring gives, unless it says it is a guard (a suspicion that proved wrong);
the last tests the fix."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

import pytest
import trio
from hypercorn.config import Config
from hypercorn.utils import wrap_app

from p2psync.http import connections
from p2psync.http.connections import MAX_CONNECTIONS, serve
from tests.agents import SpawnedAgent, serving
from tests.httpclient import Api, EventStream
from tests.served import address_of, hold, served

pytestmark = pytest.mark.process

#: What a client speaking HTTP/2 with prior knowledge sends first: the preface
#: and an empty SETTINGS frame. Hypercorn takes it on a plain-HTTP connection.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


async def tiny_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """200 ``ok`` to any request (as the console's public login page, or a 401)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def get(port: int) -> bytes:
    """One GET on a new connection: what comes back within 2 s."""
    client = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await client.send_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        got = b""
        with trio.move_on_after(2):
            while chunk := await client.receive_some():
                got += chunk
                if got.endswith(b"ok") or (b"503" in got and got.endswith(b"}")):
                    break
        return got
    finally:
        await client.aclose()


@pytest.fixture
def site(tmp_path: Any) -> Iterator[SpawnedAgent]:
    with serving(tmp_path, "room") as agent:
        yield agent




# --- 1. HTTP/2 with prior knowledge: a connection that is never idle -----------------


async def test_an_h2_preface_is_not_a_request_under_way() -> None:
    """Hypercorn speaks HTTP/2 on a plain connection that opens with the h2
    preface (``PRI * HTTP/2.0``): h11 parses that line as a request, which sends
    ``Updated(idle=False)``; then H2Protocol, with no stream, never sends
    ``Updated(idle=True)`` (it does only when a stream closes). So a connection
    that sent 24 bytes and nothing more counts as "a request under way" for
    ever: it is never chosen to make room, and (the keep-alive timer stopped
    with that same event) it outlives the keep-alive timeout too. Two of them
    (the limit here) shut every client out: 503."""
    held: list[trio.SocketStream] = []
    try:
        async with served(tiny_app, max_connections=2, keep_alive=0.5) as port:
            for _ in range(2):
                held.append(await trio.open_tcp_stream("127.0.0.1", port))
                await held[-1].send_all(H2_PREFACE)
            await trio.sleep(1.5)  # three keep-alive timeouts, and then some
            answer = await get(port)
    finally:
        for client in held:
            await client.aclose()
    assert answer.endswith(b"ok"), answer


def test_256_h2_prefaces_shut_a_real_agent_out(site: SpawnedAgent) -> None:
    """The same against an agent: any local program, with no key, opens 256
    connections, sends the HTTP/2 preface on each and nothing more, and the API
    and console answer 503 to everyone, for as long as it likes (no renewal:
    neither the eviction nor the 75 s keep-alive timer ends them). 568a40a was
    meant to end exactly this (silent connections shutting the API out)."""
    api = Api.of_agent(site)
    held = hold(address_of(site), H2_PREFACE, MAX_CONNECTIONS)
    try:
        time.sleep(0.5)
        answer = api.call("GET", "/status")
    finally:
        for s in held:
            s.close()
    assert answer.status == 200, answer


# --- 2. Public routes held "under way" without the key --------------------------------

LOGIN_HEAD = (
    b"POST /console/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 64\r\n\r\n"
)


def test_256_unkeyed_login_heads_shut_a_real_agent_out(site: SpawnedAgent) -> None:
    """``POST /console/login`` is public and reads its body (up to 30 s,
    FORM_SECONDS): a program with no key sends that head on 256 connections and
    no body. Each is a request under way, so none makes room and every client,
    key or not, is answered 503; at the 408 (30 s) the program opens them again
    (it races each freed slot against everyone else, and wins by trying in a
    loop). The lock-out 568a40a describes needs one more header line, not a key."""
    api = Api.of_agent(site)
    held = hold(address_of(site), LOGIN_HEAD, MAX_CONNECTIONS)
    try:
        time.sleep(0.5)
        answer = api.call("GET", "/status")
    finally:
        for s in held:
            s.close()
    assert answer.status == 200, answer


async def page_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A 4 KiB page to any request (as the console's public login page)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"4096")]})
    await send({"type": "http.response.body", "body": b"x" * 4096})


async def test_a_slow_reader_of_public_answers_stays_under_way_past_the_stall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nor is 30 s a bound on holding: a client with a small receive buffer
    pipelines some hundreds of requests for a public page (the login page is a
    few KiB; Hypercorn serves up to 1000 on a connection) and reads the answers a
    little at a time, more often than the stall. Its connection's send is always
    blocked mid-answer, so it is never idle and never stalls: here (stall 1 s)
    both connections are still held after 4 s, and a new client is answered 503.
    Against an agent, 8 KiB read every 29 s keeps each of 256 connections under
    way for hours, without the key."""
    monkeypatch.setattr(connections.Connection.__init__, "__defaults__", (1.0,))
    config = Config()
    config.keep_alive_timeout = 0.5
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    app = wrap_app(cast(Any, page_app), config.wsgi_max_body_size, None)
    held: list[trio.socket.SocketType] = []

    async def read_slowly(sock: trio.socket.SocketType) -> None:
        while True:
            await trio.sleep(0.2)
            await sock.recv(8192)

    answer = b""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, app, config, [listening], max_connections=2))
            for _ in range(2):
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await sock.connect(("127.0.0.1", port))
                held.append(sock)
                request = b"GET /console/login HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n" * 900
                with trio.fail_after(2):
                    view = memoryview(request)
                    while view:
                        view = view[await sock.send(view):]
                nursery.start_soon(read_slowly, sock)
            await trio.sleep(4)  # four stall periods, eight keep-alive timeouts
            answer = await get(port)
            nursery.cancel_scope.cancel()
    finally:
        for sock in held:
            sock.close()
        listening.close()
    assert answer.endswith(b"ok") or answer.startswith(b"HTTP/1.1 200"), answer[:200]


# --- Guards: what proved sound ---------------------------------------------------------


def test_guard_an_event_stream_outlives_300_silent_connections(site: SpawnedAgent) -> None:
    """A guard (passes): ``/events`` is a request under way from its head on,
    so 300 silent connections (each evicting the one idle longest) never choose
    it; it still delivers the next change."""
    api = Api.of_agent(site)
    events = EventStream(api)
    held: list[socket.socket] = []
    try:
        assert events.next()[0] == "hello"
        held = hold(address_of(site), b"", 300)
        time.sleep(0.5)
        api.ok("PUT", "/records/room/after", 1)
        _, change, _ = events.until(lambda k, d: k == "change")
        assert change["key"] == "after"
    finally:
        for s in held:
            s.close()
        events.close()


def test_guard_a_long_poll_outlives_300_silent_connections(site: SpawnedAgent) -> None:
    """A guard (passes): a long-poll ``/changes`` waiting is under way, too."""
    api = Api.of_agent(site)
    last = api.ok("GET", "/changes")["last"]
    got: dict[str, Any] = {}

    def poll() -> None:
        got["answer"] = api.call("GET", f"/changes?since={last}&timeout=20")

    poller = threading.Thread(target=poll)
    poller.start()
    held: list[socket.socket] = []
    try:
        time.sleep(0.5)
        held = hold(address_of(site), b"", 300)
        time.sleep(0.5)
        api.ok("PUT", "/records/room/polled", 1)
        poller.join(15)
    finally:
        for s in held:
            s.close()
    answer = got["answer"]
    assert answer.status == 200, answer
    assert [c["key"] for c in answer.body["changes"]] == ["polled"]


# --- With the fix: a request with the key is never the one to make room ------------------


def test_a_keyed_event_stream_outlives_300_unkeyed_login_heads(site: SpawnedAgent) -> None:
    """Unkeyed requests under way (login heads with no body) are closed to make
    room before any request that gave the key: the guard's mark (``TRUSTED``)
    reaches the connection through Starlette. A keyed ``/events`` stream opened
    first still delivers the next change after 300 of them, and a keyed request
    opened after them is answered."""
    api = Api.of_agent(site)
    events = EventStream(api)
    held: list[socket.socket] = []
    try:
        assert events.next()[0] == "hello"
        held = hold(address_of(site), LOGIN_HEAD, 300)
        time.sleep(0.5)
        assert api.call("GET", "/status").status == 200
        api.ok("PUT", "/records/room/keyed", 1)
        _, change, _ = events.until(lambda k, d: k == "change")
        assert change["key"] == "keyed"
    finally:
        for s in held:
            s.close()
        events.close()
