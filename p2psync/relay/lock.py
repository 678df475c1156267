"""One ``relay serve`` per relay home: ``HOME/serve.lock``, held (``flock``) while
it runs; the lock goes with the process."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from p2psync.errors import P2PSyncError
from p2psync.relay.home import SERVE_LOCK, STATE_FILE


@contextmanager
def serve_lock(home: Path) -> Iterator[None]:
    with (home / SERVE_LOCK).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = "?"
            with suppress(OSError, ValueError, KeyError):
                pid = str(json.loads((home / STATE_FILE).read_text())["pid"])
            raise P2PSyncError(
                f"a relay is already serving {home} (pid {pid}); stop it first"
            ) from None
        yield


def serving(home: Path) -> bool:
    """Whether a ``relay serve`` holds the home's lock now."""
    path = home / SERVE_LOCK
    if not path.exists():
        return False
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
