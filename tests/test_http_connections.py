"""The HTTP service's connections (``p2psync/http/connections.py``): a send to a
client that stopped reading gives up, one to a slow reader that keeps reading
does not, and stopping the service ends a send under way — over real loopback
sockets with small buffers."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from p2psync.http.connections import KEYED, TRUSTED, Connection
from tests.served import served

pytestmark = pytest.mark.process


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[trio.SocketStream, trio.socket.SocketType]]:
    """A server-side stream and the client's raw socket, both with small buffers."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await client.connect(listener.getsockname())
    accepted, _ = await listener.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listener.close()
    stream = trio.SocketStream(accepted)
    try:
        yield stream, client
    finally:
        await stream.aclose()
        client.close()


async def test_a_send_to_a_client_that_stopped_reading_gives_up() -> None:
    async with pair() as (stream, _client):
        connection = Connection(stream, stall=0.3)
        began = trio.current_time()
        with pytest.raises(trio.BrokenResourceError, match="stopped reading"):
            with trio.fail_after(5):
                # shielded, as Hypercorn sends: the stall still ends it
                with trio.CancelScope(shield=True):
                    await connection.send_all(b"x" * 4_000_000)
        assert trio.current_time() - began < 2


async def test_a_slow_reader_that_keeps_reading_gets_everything() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    got = bytearray()
    async with pair() as (stream, client):

        async def read() -> None:
            while len(got) < len(data):
                got.extend(await client.recv(8192))
                await trio.sleep(0.005)  # 128 reads or more: over 0.6 s

        connection = Connection(stream, stall=0.3)
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await connection.send_all(data)
        took = trio.current_time() - began
    assert bytes(got) == data
    assert took > 0.3, f"{took:.2f} s: too fast to show that the stall is per slice"


async def test_stopping_ends_a_send_under_way_and_refuses_the_next() -> None:
    async with pair() as (stream, _client):
        connection = Connection(stream, stall=60)

        async def stop_soon() -> None:
            await trio.sleep(0.2)
            connection.stop()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_soon)
            with (
                trio.fail_after(5),
                pytest.raises(trio.BrokenResourceError),
                trio.CancelScope(shield=True),
            ):
                await connection.send_all(b"x" * 4_000_000)
        with pytest.raises(trio.BrokenResourceError, match="stopping"):
            await connection.send_all(b"more")


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The smallest ASGI app: 200 ``ok`` to any request but ``/hold`` and
    ``/wait``, under way until cancelled (``/hold`` trusted, as with the key)."""
    if scope["type"] != "http":
        return
    if scope["path"] in ("/hold", "/wait"):  # a request under way until cancelled
        if scope["path"] == "/hold":
            scope[TRUSTED] = KEYED  # as the guard marks one that gave the key
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"held", "more_body": True})
        await trio.sleep_forever()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def ask(port: int, path: str = "/") -> bytes:
    """One GET on a new connection: what comes back before the server closes it
    or 1 s passes (the connection then stays open, kept by the caller)."""
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
    got = b""
    with trio.move_on_after(1):
        while chunk := await client.receive_some():
            got += chunk
            if got.endswith((b"ok", b"held\r\n")):
                break
    ASKED.append(client)
    return got


ASKED: list[trio.SocketStream] = []


async def test_connections_beyond_the_limit_are_answered_503_and_closed() -> None:
    """A local program opening connections without end would take the file
    descriptors the agent needs for its peers and store: beyond the limit (every
    connection with a request under way: an idle one would make room), a
    connection is told 503 and closed; one freed lets the next in."""
    try:
        async with served(hello_app, max_connections=2) as port:
            assert (await ask(port, "/hold")).startswith(b"HTTP/1.1 200")
            assert (await ask(port, "/hold")).startswith(b"HTTP/1.1 200")  # both under way
            refused = await ask(port)
            assert refused.startswith(b"HTTP/1.1 503"), refused
            assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"] == (
                "the agent serves 2 HTTP connections already; try again later"
            )
            await ASKED[0].aclose()
            with trio.fail_after(5):
                while not (await ask(port)).endswith(b"ok"):
                    await trio.sleep(0.05)
    finally:
        for client in ASKED:
            await client.aclose()
        ASKED.clear()


async def test_at_the_limit_an_idle_or_untrusted_connection_makes_room() -> None:
    """At the connection limit a new client was answered 503, however many of
    the open connections were idle: any local program, with no key, could open
    256 and send nothing (or trickle a header), and renew them every 75 s (the
    keep-alive timeout), shutting the API and console out for everyone. Now the
    least trusted connection is closed to make room (among equals, the one idle
    or busy longest: here, with no key, silent ones, a kept-alive one, one busy
    with a page read slowly); only when every connection has keyed requests
    under way is a new one answered 503 (tests/test_review_trust.py has the
    order between key, session and neither)."""
    silent: list[trio.SocketStream] = []

    async def closed(client: trio.SocketStream) -> bool:
        with trio.fail_after(2):
            while await client.receive_some():
                pass  # (the rest of what was under way)
        return True

    try:
        async with served(hello_app, max_connections=2) as port:
            for _ in range(2):  # two that trickle a header (or say nothing)
                silent.append(await trio.open_tcp_stream("127.0.0.1", port))
                await silent[-1].send_all(b"GET / HT")
                await trio.sleep(0.05)
            assert (await ask(port)).endswith(b"ok")  # the oldest silent one made room
            assert await closed(silent[0])
            # the other silent one makes room for a request under way with no key,
            # then the kept-alive one (idle longer than that one is busy) for a keyed
            assert (await ask(port, "/wait")).startswith(b"HTTP/1.1 200")
            assert await closed(silent[1])
            assert (await ask(port, "/hold")).startswith(b"HTTP/1.1 200")
            assert await closed(ASKED[0])
            # the one with no key makes room for another keyed one
            assert (await ask(port, "/hold")).startswith(b"HTTP/1.1 200")
            assert await closed(ASKED[1])
            refused = await ask(port)  # two keyed under way: refused
            assert refused.startswith(b"HTTP/1.1 503"), refused
    finally:
        for client in [*silent, *ASKED]:
            await client.aclose()
        ASKED.clear()
