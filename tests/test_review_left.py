"""Review of a1e4b9b (a body that stops arriving is answered 408; /conflicts/resolve
takes an entry ID in capitals) as a hostile local client and a newcomer: each
test fails on the code as reviewed, for the reason its docstring gives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
import trio
import trio.testing
from starlette.applications import Starlette

from p2psync.errors import P2PSyncError
from p2psync.http.connections import STALL_SECONDS
from p2psync.http.console import Console, Sessions, public
from p2psync.http.errors import p2psync_error
from p2psync.http.guard import Access, Guard

KEY = "k" * 43


def _console_app(sessions: Sessions) -> Guard:
    """The console's routes behind the guard, as the agent serves them
    (``server.py``: ``Access(key, public=public, session=sessions.allows)``);
    none of the routes used here reads the site."""
    console = Console(cast(Any, None), sessions)
    app = Starlette(routes=console.routes(), exception_handlers={P2PSyncError: p2psync_error})
    return Guard(app, Access(key=KEY, public=public, session=sessions.allows))


def _trickle(
    first: bytes, then: bytes | None, every: float
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive`` of a client that sends ``first`` and then either
    nothing ever again (``then`` None) or ``then`` every ``every`` seconds."""
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls > 1:
            if then is None:
                await trio.sleep_forever()
            await trio.sleep(every)
            return {"type": "http.request", "body": then, "more_body": True}
        return {"type": "http.request", "body": first, "more_body": True}

    return receive


async def _status_of(
    app: Guard, path: str, receive: Callable[[], Awaitable[dict[str, Any]]],
    headers: list[tuple[bytes, bytes]], within: float,
) -> int:
    """The status the app answers a POST with, or TooSlowError after ``within``."""
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {
        "type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
        "query_string": b"", "http_version": "1.1", "scheme": "http",
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 7718),
        "headers": [(b"host", b"127.0.0.1:7718"),
                    (b"content-type", b"application/x-www-form-urlencoded"), *headers],
    }
    with trio.fail_after(within):
        await app(scope, cast(Any, receive), send)
    return statuses[0]


@pytest.mark.trio_memory
async def test_console_login_body_that_stops_arriving_is_answered_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The 408 is only in ``read_json``: the console's login form
    (``Console.login``) reads its body with its own ``async for chunk in
    request.stream()`` and no stall limit, and ``POST /console/login`` is public
    (no API key, no session). Any local program that sends the headers and part
    of a form holds its connection and task for ever: 256 of them and every
    client of the API and console is answered 503. docs/http-api.md's 408 row
    ("nothing of a request's body arrived for 30 s") does not hold for it.
    (Virtual time: the autojump clock makes the 30 s wait instant.)"""
    app = _console_app(Sessions(KEY))
    receive = _trickle(b"key=", None, 0)
    status = await _status_of(
        app, "/console/login", receive, [(b"content-length", b"100")],
        within=STALL_SECONDS * 4,
    )
    assert status == 408


@pytest.mark.trio_memory
async def test_console_form_body_that_stops_arriving_is_answered_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same for every form of a logged-in console (``Console._form``, here
    through ``POST /console/logout``): a browser tab or script that sends part of
    a form and hangs holds its connection for ever, where a JSON body is
    answered 408 after 30 s."""
    sessions = Sessions(KEY)
    token, _session = sessions.open()
    app = _console_app(sessions)
    receive = _trickle(b"csrf=", None, 0)
    status = await _status_of(
        app, "/console/logout", receive,
        [(b"content-length", b"100"), (b"cookie", f"{sessions.cookie}={token}".encode())],
        within=STALL_SECONDS * 4,
    )
    assert status == 408


@pytest.mark.trio_memory
async def test_console_login_that_trickles_is_cut_off_within_a_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Even with the per-chunk stall of ``read_json``, an unauthenticated client
    may send the 64 KiB login form a byte every 29 s (three weeks a
    connection; 256 of them shut the API out for everyone, with no key). The
    login form is small and public: it needs an overall deadline (here: the
    whole form within a few minutes), not only one per chunk."""
    app = _console_app(Sessions(KEY))
    receive = _trickle(b"k", b"k", STALL_SECONDS - 1)
    status = await _status_of(
        app, "/console/login", receive, [(b"content-length", b"65536")],
        within=STALL_SECONDS * 10,
    )
    assert status == 408


# The fourth finding (the 408 did not say ``connection: close``) is tested in
# tests/test_http_left.py, with the 408 over a real socket, length and chunked.
