"""The agent's side of its local sockets (where they are, and what clients send:
``p2psync.net.agentsockets``): it binds them in its home folder, serves them until
cancelled, and removes them when it stops.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from p2psync.net.agentsockets import CONTROL, NOTIFY, socket_path


async def serve_notifications(
    home: Path,
    on_notice: Callable[[bytes], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Receive the datagrams of ``agent.sock``; ``on_notice`` gets each one's bytes."""
    path = socket_path(home, NOTIFY)
    _unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)  # in a 0700 folder too: its user's alone
        task_status.started()
        while True:
            await on_notice(await sock.recv(64))
    finally:
        sock.close()
        _unlink(path)


async def serve_control(
    home: Path,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``control.sock``; ``handler`` serves each one."""
    path = socket_path(home, CONTROL)
    _unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)  # in a 0700 folder too: its user's alone
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(handler, [listener])
    finally:
        sock.close()
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
