"""One agent per home: ``HOME/agent.lock``, held (``flock``) while the agent runs.

The lock goes with the process: a crashed or killed agent leaves the file, never
the lock. Imports nothing heavy, so the CLI takes it before starting trio.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from p2psync.errors import P2PSyncError
from p2psync.home import AGENT_FILE

LOCK_FILE = "agent.lock"


@contextmanager
def agent_lock(home: Path) -> Iterator[None]:
    """Hold the home's agent lock, or fail naming the agent that holds it."""
    path = home / LOCK_FILE
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = "?"
            with suppress(OSError, ValueError, KeyError):
                pid = str(json.loads((home / AGENT_FILE).read_text())["pid"])
            raise P2PSyncError(
                f"an agent is already running for {home} (pid {pid}); stop it first"
            ) from None
        yield
    finally:
        handle.close()
