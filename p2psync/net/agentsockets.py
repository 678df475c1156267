"""Local sockets of a running agent, in its home folder: where they are, and the
client half (what other processes on this machine send to the agent). The agent
serves them (``p2psync.agent.sockets``); the API and the CLI use this module, which
imports neither the agent nor trio.

``agent.sock`` (datagram): any process that commits to the store sends one
byte here so the agent pushes the new entries at once (``e``), or re-reads its
peers (``p``). Best effort: a lost datagram only delays things until the
agent's periodic check.

``control.sock`` (stream): one JSON request line, one JSON response line;
used by ``p2psync status`` and ``p2psync sync`` to talk to a running agent.

Unix socket paths are limited to ~107 bytes; for a deeper home the sockets
live in a private folder (``$XDG_RUNTIME_DIR``, else ``/tmp/p2psync-<uid>``,
which must be ours and closed to others) under a name derived from the home's
path. A client only talks to a socket owned by its own user.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

from p2psync.errors import AgentNotRunning, AgentSocketError

NOTIFY = "agent.sock"
CONTROL = "control.sock"
MAX_SOCKET_PATH = 100  # bytes of a socket's path in the home; longer: elsewhere
MAX_ANSWER = 4 << 20

CHANGED_ENTRIES = b"e"
CHANGED_PEERS = b"p"


def socket_path(home: Path, name: str) -> str:
    path = str(home.resolve() / name)
    if len(path.encode()) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.blake2b(str(home.resolve()).encode(), digest_size=8).hexdigest()
    return os.path.join(_private_dir(), f"p2psync-{digest}-{name}")


def _private_dir() -> str:
    """A folder only this user can write to, for sockets of deep homes."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _is_private(runtime):
        return runtime
    folder = os.path.join(tempfile.gettempdir(), f"p2psync-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    if not _is_private(folder):
        raise AgentSocketError(
            f"{folder} is not a private folder of this user; remove it, or use a shorter home"
        )
    return folder


def _is_private(folder: str) -> bool:
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    )


def _ours(path: str) -> bool:
    """The socket at ``path`` belongs to this user (or to root, when we are root)."""
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        return False
    return owner == os.getuid()


_sender: socket.socket | None = None


def notify(home: Path, what: bytes = CHANGED_ENTRIES) -> None:
    """Tell a running agent (if any) that the store changed. Never raises."""
    global _sender  # one datagram socket per process, made on first use  # noqa: PLW0603
    path = socket_path(home, NOTIFY)
    if not _ours(path):
        return
    with contextlib.suppress(OSError):
        if _sender is None:
            _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            _sender.setblocking(False)
        _sender.sendto(what, path)


def request(home: Path, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one control request to the running agent and return its answer."""
    path = socket_path(home, CONTROL)
    if not os.path.exists(path):
        raise AgentNotRunning(path)
    if not _ours(path):
        raise AgentSocketError(f"{path} belongs to another user: not talking to it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise AgentNotRunning(path) from exc
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_ANSWER:
                raise ValueError("the agent's answer is too long")
    answer = json.loads(data) if data else {}
    if not isinstance(answer, dict):
        raise ValueError("the agent's answer is not a JSON object")
    return answer
