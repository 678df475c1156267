"""Tests of the HTTP serving loop: a small ASGI app served by
:func:`p2psync.http.connections.serve` on a free loopback port, and connections
held open against it or against an agent."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.utils import wrap_app

from p2psync.http.connections import MAX_CONNECTIONS, serve
from tests.agents import SpawnedAgent
from tests.httpclient import Api


@asynccontextmanager
async def served(
    app: Any, *, max_connections: int = MAX_CONNECTIONS, keep_alive: float = 75.0
) -> AsyncIterator[int]:
    """``app`` (a plain ASGI app) served on a free loopback port, which is
    yielded; the service is stopped, and its socket closed, at the end."""
    config = Config()
    config.keep_alive_timeout = keep_alive
    listening = socket.create_server(("127.0.0.1", 0))
    wrapped = wrap_app(cast(Any, app), config.wsgi_max_body_size, None)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve, wrapped, config, [listening], max_connections=max_connections)
            )
            yield listening.getsockname()[1]
            nursery.cancel_scope.cancel()
    finally:
        listening.close()


def address_of(agent: SpawnedAgent) -> tuple[str, int]:
    """Where ``agent`` serves its HTTP API."""
    api = Api.of_agent(agent)
    return api.host, api.port


def hold(address: tuple[str, int], first: bytes, count: int) -> list[socket.socket]:
    """``count`` connections to ``address`` that each send ``first`` and then
    nothing (closed by the caller)."""
    held = []
    for _ in range(count):
        connection = socket.create_connection(address, timeout=5)
        connection.sendall(first)
        held.append(connection)
    return held
