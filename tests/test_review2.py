"""Review of 1f59b57..9264fb9 (our own serving loop over Hypercorn's TCPServer,
``p2psync/http/connections.py``; the hardened ``p2psync service unit``) as a
hostile party and a newcomer: each test fails on the code as reviewed, for the
reason its docstring gives."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from hypercorn.config import Config
from hypercorn.utils import wrap_app
from starlette.responses import StreamingResponse

from p2psync import home as home_mod
from p2psync.cli import service
from p2psync.cli.main import cli
from p2psync.http import connections
from p2psync.http.connections import Connection

STALL = 0.3  # seconds: the stall limit the tests give connections (30 s in the agent)


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


async def connect(port: int) -> trio.socket.SocketType:
    """A client socket with a small receive buffer, so a few KiB unread stall it."""
    client = trio.socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await client.connect(("127.0.0.1", port))
    return client


async def read_until_eof(client: trio.socket.SocketType, within: float) -> bytes | None:
    """All the client gets until the server closes (None: still open ``within`` s on)."""
    got = b""
    with trio.move_on_after(within):
        while data := await client.recv(65536):
            got += data
        return got
    return None


@pytest.mark.process
async def test_a_client_that_stopped_reading_has_its_connection_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/http-api.md: "A client that takes nothing of what it is sent for 30 s
    ... has its connection closed". It does not: when the stalled send gives up,
    Hypercorn's ``protocol_send`` only tells the protocol ``Closed()`` (the app's
    stream ends and the event-stream slot is freed), but nothing closes the socket;
    ``TCPServer._read_data`` waits on it with no read timeout and no keep-alive
    timer is running (the connection is not idle). So a stopped consumer (or a
    hostile local program, once per connection) keeps a socket, its kernel
    buffers and a task in the agent for ever: the agent's file descriptors leak
    one by one."""
    monkeypatch.setattr(connections, "Connection", partial(Connection, stall=STALL))
    ended = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"data: " + b"x" * 10_000 + b"\n\n"
                await trio.sleep(0)
        finally:
            ended.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await StreamingResponse(endless(), media_type="text/event-stream")(
                scope, receive, send
            )

    config = Config()
    sock = listening()
    got: bytes | None = b""
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(connections.serve, wrap_app(app, config.wsgi_max_body_size, None),
                    config, [sock])
        )
        client = await connect(sock.getsockname()[1])
        try:
            await client.send(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            with trio.move_on_after(5):
                await ended.wait()  # the stall was seen: the stream is over
            await trio.sleep(1)  # (more than 3 stall periods)
            got = await read_until_eof(client, within=3)
        finally:
            client.close()
            nursery.cancel_scope.cancel()
    sock.close()
    assert ended.is_set(), "the stalled stream did not end"
    assert got is not None, "the connection is still open 4 s after the stalled send"


@pytest.mark.process
async def test_a_slow_reader_that_keeps_reading_is_not_cut_off() -> None:
    """docs/http-api.md: "a slow client that keeps reading is not cut off", and the
    connection ends only when the client "takes nothing ... for 30 s". But the
    stall deadline is per 64 KiB slice (``Connection.send_all``), not since the
    last byte taken: a client that never pauses more than 20 ms, taking 1 KiB at a
    time (some 50 KB/s; with 30 s: any client below ~2.2 KB/s on a large
    response, such as a slow mobile link or a throttled proxy), is cut off
    after one stall period with "the client stopped reading"."""
    data = bytes(range(256)) * 768  # 192 KiB
    got = bytearray()
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await connect(listener.getsockname()[1])
    accepted, _ = await listener.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listener.close()
    stream = trio.SocketStream(accepted)
    longest = 0.0

    async def read() -> None:
        nonlocal longest
        last = trio.current_time()
        while len(got) < len(data):
            chunk = await client.recv(1024)
            if not chunk:
                return
            got.extend(chunk)
            longest = max(longest, trio.current_time() - last)
            last = trio.current_time()
            await trio.sleep(0.02)

    cut: trio.BrokenResourceError | None = None
    try:
        connection = Connection(stream, stall=0.5)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                try:
                    await connection.send_all(data)
                except trio.BrokenResourceError as exc:
                    cut = exc
                    nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
        client.close()
    assert cut is None, (
        f"cut off ({cut}) after {len(got)} bytes, though the client never paused "
        f"more than {longest:.3f} s"
    )
    assert bytes(got) == data


@pytest.mark.process
async def test_a_request_under_way_when_the_service_stops_gets_its_grace() -> None:
    """``connections.serve``: "then idle connections close at once, requests under
    way have ``grace`` seconds" (and the commit: the service stops "after its 1 s
    grace"). They do not: ``serve`` is stopped by cancelling it, and the
    connections' nursery is inside the cancelled scope, so a request under way is
    cancelled at once and its client gets the connection closed with no answer.
    For a ``POST /transactions`` in flight at SIGTERM the write (in a thread)
    still commits, but the client is told nothing and may well send it again."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await trio.sleep(0.3)  # work under way, well within the 1 s grace
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config()
    sock = listening()
    client = trio.socket.socket()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(connections.serve, wrap_app(app, config.wsgi_max_body_size, None),
                        config, [sock], grace=1.0)
            )
            await client.connect(sock.getsockname())
            await client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()  # the service stops (the agent's SIGTERM)
        got = await read_until_eof(client, within=3)
        assert got is not None and got.startswith(b"HTTP/1.1 200"), got
    finally:
        client.close()
        sock.close()


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A folder with a short path (a home's sockets must fit in 100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="rv2-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.pure
def test_protect_home_keeps_a_home_under_a_symlinked_home_readable(
    short_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Fedora Silverblue/Kinoite, CoreOS and other ostree systems ``/home`` is a
    symlink to ``/var/home``. ``service._protect_home`` compares the *resolved*
    needed paths (``/var/home/alice/...``) with the unresolved ``/home``, finds
    none under it and writes ``ProtectHome=yes``; systemd follows the symlink and
    hides ``/var/home``, so ``ReadWritePaths=`` the home (nested in a hidden
    folder) and the program in it cannot be set up: the service does not start.
    Modelled here with a fake root whose ``home`` is a symlink to ``var/home``
    (``_USERS_FILES`` pointed at it, as ``/home`` is in the module)."""
    (short_root / "var" / "home" / "alice").mkdir(parents=True)
    (short_root / "home").symlink_to("var/home")
    home = short_root / "home" / "alice" / "h"  # as the operator names it
    home_mod.init(home, "a")
    monkeypatch.setattr(service, "_USERS_FILES", (short_root / "home",))
    result = CliRunner().invoke(
        cli,
        ["--home", str(home), "service", "unit", "--executable", "/bin/true",
         "--user", "root"],
    )
    assert result.exit_code == 0, result.stderr
    found = dict(
        line.split("=", 1) for line in result.stdout.splitlines() if "=" in line
    )
    assert found["ReadWritePaths"].strip('"') == str(home.resolve())
    assert found["ProtectHome"] == "read-only", (
        f"ProtectHome={found['ProtectHome']} hides {home.resolve()} (under the "
        "symlinked home folder)"
    )


@pytest.mark.pure
def test_user_root_runs_a_home_whose_uid_has_no_name(short_root: Path) -> None:
    """README (Running as a service): the unit runs as the home's owner "or
    ``--user NAME``, which must own the home, or be root", and ``_user`` lets
    ``--user root`` run a home owned by anyone named. A home owned by a uid with
    no user (a volume from a container or another machine) is refused even with
    ``--user root``, and the refusal's advice is "pass --user NAME", which the
    operator just did: the sentence sends them round in a circle."""
    if os.geteuid() != 0:
        pytest.skip("giving a home to another uid needs root")
    home = short_root / "a"
    home_mod.init(home, "a")
    os.chown(home, 54321, 54321)  # no user, no group of that number here
    result = CliRunner().invoke(
        cli,
        ["--home", str(home), "service", "unit", "--executable", "/bin/true",
         "--user", "root"],
    )
    assert result.exit_code == 0, result.stderr
    assert "User=root" in result.stdout.splitlines()
