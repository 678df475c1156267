"""Serving HTTP connections with Hypercorn's trio protocol, on the agent's terms.

Hypercorn's ``worker_serve`` shields every send from cancellation, so a client
that stops reading (a frozen browser tab, a stopped consumer of ``/events``)
holds its connection's task for ever once the socket buffers are full: the
service could not stop, and the client would keep one of the event streams.
Here each connection is a :class:`Connection` whose sends end, and whose
connection is closed, when the client has taken nothing for
:data:`STALL_SECONDS`, or when the service stops and its grace period is over.
The rest is ``worker_serve``'s (without lifespan events, which the app does not
use): Hypercorn's ``TCPServer`` speaks HTTP on each connection.
"""

from __future__ import annotations

import socket
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState

#: A send to a client that takes nothing for this long ends its connection.
STALL_SECONDS = 30.0
#: Sent at most this much at a time, so a slow client that keeps reading is not
#: taken for one that stopped.
_SLICE = 64 * 1024


class Connection(trio.abc.HalfCloseableStream):
    """A client's connection (as Hypercorn's ``TCPServer`` uses it), whose sends
    give up when the client stalls or the service stops."""

    def __init__(self, stream: trio.SocketStream, stall: float = STALL_SECONDS) -> None:
        self.stream = stream
        self.socket = stream.socket  # (TCPServer reads the addresses from it)
        self.stall = stall
        self._sending: trio.CancelScope | None = None
        self._stopped = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), _SLICE):
            if self._stopped:
                raise trio.BrokenResourceError("the HTTP service is stopping")
            # A scope of its own: its deadline and stop() reach the send even
            # inside the shield Hypercorn puts around it.
            with trio.CancelScope(deadline=trio.current_time() + self.stall) as scope:
                self._sending = scope
                try:
                    await self.stream.send_all(view[start : start + _SLICE])
                finally:
                    self._sending = None
            if scope.cancelled_caught:
                raise trio.BrokenResourceError("the client stopped reading")

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def stop(self) -> None:
        """End a send under way and refuse the next ones."""
        self._stopped = True
        if self._sending is not None:
            self._sending.cancel()


async def serve(
    app: AppWrapper,
    config: Config,
    sockets: list[socket.socket],
    *,
    grace: float = 1.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP on the listening ``sockets`` until cancelled; then idle
    connections close at once, requests under way have ``grace`` seconds, and
    every connection left is ended."""
    context = WorkerContext(None)
    state: dict[str, Any] = {}
    open_: set[Connection] = set()
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]

    async def handle(stream: trio.SocketStream) -> None:
        connection = Connection(stream)
        open_.add(connection)
        try:
            # TCPServer is typed for worker_serve's streams; ours has their methods.
            server = TCPServer(
                app, config, context, ConnectionState(state.copy()), connection  # type: ignore[arg-type]
            )
            await server
        finally:
            open_.discard(connection)

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
                with trio.move_on_after(grace):
                    while open_:
                        await trio.sleep(0.02)
                for connection in list(open_):
                    connection.stop()
            connections.cancel_scope.cancel()
