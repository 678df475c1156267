"""Serving HTTP connections with Hypercorn's trio protocol, on the agent's terms.

Hypercorn's ``worker_serve`` shields every send from cancellation, so a client
that stops reading (a frozen browser tab, a stopped consumer of ``/events``)
holds its connection's task for ever once the socket buffers are full: the
service could not stop, and the client would keep one of the event streams.
Here each connection is a :class:`Connection` whose sends end, and whose
connection is closed, when the client has taken nothing for
:data:`STALL_SECONDS`, or when the service stops and its grace period is over.
When the service stops, idle connections close at once and a request under way
has a grace period to be answered (connections are shielded from the agent's
cancellation until then). A connection the client closed ends at once, and at
most :data:`MAX_CONNECTIONS` are served. At the limit a connection is closed to
make room for a new one, the least trusted first and, among equals, the one
idle or busy longest. A connection's trust is that of its requests under way (the
guard marks in :data:`TRUSTED` a request that gave the key, :data:`KEYED`, or a
console session, :data:`SESSION`; the least of them counts), or, while none is
(kept alive between requests, still sending a request's head, or speaking a
protocol it never makes a request in), the most its past requests had. So
connections of programs without the key go before any other, whatever they
send or however slowly they read; a session's (it can only read) go before
the key's; a keyed client's kept-alive connection goes only when everything
else has the key too. Only when every connection has keyed requests under way
is a new one answered 503. The rest is ``worker_serve``'s (without
lifespan events, which the app does not use): Hypercorn's ``TCPServer`` speaks
HTTP on each connection.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import Any, cast

import trio
from hypercorn import typing as asgi
from hypercorn.config import Config
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState

#: A send to a client that takes nothing for this long ends its connection (and
#: a request body of which nothing comes for this long is answered 408: body.py).
STALL_SECONDS = 30.0
#: Connections served at once (beyond, one is closed to make room, or the new one
#: is answered 503), so that no local program can take the file descriptors the
#: agent needs to sync.
MAX_CONNECTIONS = 256
#: In a request's scope, how far it is trusted (set by the guard): it gave a
#: console session (SESSION) or the API key (KEYED); unmarked, neither.
TRUSTED = "p2psync.trusted"
SESSION = 1
KEYED = 2
#: In the state Hypercorn copies into each request's scope: its connection.
_CONNECTION = "p2psync.connection"

Scope = dict[str, Any]  # an ASGI request's


class Connection(trio.abc.HalfCloseableStream):
    """A client's connection (as Hypercorn's ``TCPServer`` uses it), whose sends
    give up when the client stalls or the service stops."""

    def __init__(self, stream: trio.SocketStream, stall: float = STALL_SECONDS) -> None:
        self.stream = stream
        self.socket = stream.socket  # (TCPServer reads the addresses from it)
        self.stall = stall
        self._sending: trio.CancelScope | None = None
        self._stopped = False
        self.gone = trio.Event()  # the client closed its end (or reset it), or it stalled
        self.scope = trio.CancelScope()  # what serves it (serve's handle)
        self.under_way: list[Scope] = []  # its requests in the app
        self.since = trio.current_time()  # when it last became idle, or busy
        self._had = 0  # the most trust its past requests had

    def begin(self, scope: Scope) -> None:
        if not self.under_way:
            self.since = trio.current_time()
        self.under_way.append(scope)

    def end(self, scope: Scope) -> None:
        # by identity: two requests under way may have equal scopes
        self.under_way = [s for s in self.under_way if s is not scope]
        self._had = max(self._had, _trust(scope))
        if not self.under_way:
            self.since = trio.current_time()

    @property
    def trust(self) -> int:
        """The least trust of its requests under way; with none, the most its
        past requests had."""
        if self.under_way:
            return min(_trust(s) for s in self.under_way)
        return self._had

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` whole, as long as the client takes some of it at least
        every ``stall`` seconds; else (or once stopped) the connection is ended."""
        view = memoryview(data)
        sock = self.stream.socket
        while view:
            if self._stopped:
                self.gone.set()
                raise trio.BrokenResourceError("the HTTP service is stopping")
            # A scope of its own: its deadline and stop() reach the send even
            # inside the shield Hypercorn puts around it. Each send returns when
            # the client has taken some: the deadline counts from the last taken.
            with trio.CancelScope(deadline=trio.current_time() + self.stall) as scope:
                self._sending = scope
                try:
                    sent = await sock.send(view)
                except OSError as exc:
                    self.gone.set()
                    raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc
                finally:
                    self._sending = None
            if scope.cancelled_caught:
                self.gone.set()  # ends the connection (see serve)
                why = "the HTTP service is stopping" if self._stopped else None
                raise trio.BrokenResourceError(why or "the client stopped reading")
            view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self.gone.set()
            raise
        if not data:
            self.gone.set()
        return data

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def stop(self) -> None:
        """End the connection: a send under way, the next ones, what serves it."""
        self._stopped = True
        self.gone.set()
        if self._sending is not None:
            self._sending.cancel()
        self.scope.cancel()


class _Tracked:
    """The app, telling each request's :class:`Connection` when it is under way."""

    def __init__(self, app: AppWrapper) -> None:
        self.app = app

    async def __call__(
        self,
        scope: asgi.Scope,
        receive: asgi.ASGIReceiveCallable,
        send: asgi.ASGISendCallable,
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        request = cast(Scope, scope)
        connection: Connection | None = request.get("state", {}).get(_CONNECTION)
        if connection is None:  # (a lifespan event)
            await self.app(scope, receive, send, sync_spawn, call_soon)
            return
        connection.begin(request)
        try:
            await self.app(scope, receive, send, sync_spawn, call_soon)
        finally:
            connection.end(request)


async def serve(
    app: AppWrapper,
    config: Config,
    sockets: list[socket.socket],
    *,
    grace: float = 1.0,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP on the listening ``sockets`` (at most ``max_connections`` at
    once) until cancelled; then idle
    connections close at once, requests under way have ``grace`` seconds, and
    every connection left is ended."""
    context = WorkerContext(None)
    state: dict[str, Any] = {}
    open_: set[Connection] = set()
    busy = _busy(max_connections)
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    tracked = _Tracked(app)

    async def handle(stream: trio.SocketStream) -> None:
        if len(open_) >= max_connections and not _make_room(open_):
            # the answer, then what the client sent read (briefly): closing with
            # it unread would reset the connection before the answer is read
            with trio.move_on_after(0.25), suppress(trio.BrokenResourceError):
                await stream.send_all(busy)
                await stream.send_eof()
                while await stream.receive_some(MAX_RECV):
                    pass
            await trio.aclose_forcefully(stream)
            return
        connection = Connection(stream)
        open_.add(connection)
        try:
            # Shielded: when the service stops, a request under way has the grace
            # to be answered; then stop() ends the connection (serve's finally).
            with trio.CancelScope(shield=True) as connection.scope:
                await converse(connection)
        finally:
            stream.socket.close()  # (TCPServer's own close may have been cancelled)
            open_.discard(connection)

    async def converse(connection: Connection) -> None:
        async with trio.open_nursery() as nursery:

            async def speak() -> None:
                # TCPServer is typed for worker_serve's streams; ours has their methods.
                await TCPServer(
                    tracked,
                    config,
                    context,
                    ConnectionState({**state, _CONNECTION: connection}),
                    connection,  # type: ignore[arg-type]
                )
                nursery.cancel_scope.cancel()

            nursery.start_soon(speak)
            await connection.gone.wait()
            # Hypercorn takes a client's end as the end of what it asked, but
            # keeps the connection (a socket, a task) until its keep-alive
            # timer runs out, up to 75 s later: end it now.
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as connections:
        try:
            async with trio.open_nursery() as listening:
                await listening.start(
                    partial(trio.serve_listeners, handle, listeners, handler_nursery=connections)
                )
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await context.terminated.set()  # idle keep-alive connections close
                for connection in [c for c in open_ if not c.under_way]:
                    connection.stop()  # (and those in no state Hypercorn counts as idle)
                with trio.move_on_after(grace):
                    while open_:
                        await trio.sleep(0.02)
                for connection in list(open_):
                    connection.stop()
            connections.cancel_scope.cancel()


def _trust(scope: Scope) -> int:
    level = scope.get(TRUSTED, 0)
    return level if isinstance(level, int) else 0


def _make_room(open_: set[Connection]) -> bool:
    """End the least trusted connection (among equals, the one idle or busy
    longest); False when every one has keyed requests under way."""
    candidates = [c for c in open_ if not (c.under_way and c.trust >= KEYED)]
    if not candidates:
        return False
    victim = min(candidates, key=lambda c: (c.trust, c.since))
    victim.stop()
    open_.discard(victim)  # (its handler, cancelled, closes its socket)
    return True


def _busy(limit: int) -> bytes:
    """The answer to a connection beyond ``limit``."""
    body = json.dumps(
        {"error": f"the agent serves {limit} HTTP connections already; try again later",
         "status": 503}
    ).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
