"""The site's HTTP API key: ``HOME/http.key``, made on first use, readable by the
home's user alone (Syncthing's convention: sent in the ``X-API-Key`` header)."""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from p2psync.errors import HomeError

KEY_FILE = "http.key"
MIN_KEY = 24  # characters: a key shorter than this was not made here


def api_key(home: Path) -> str:
    """The key, made (43 random URL-safe characters, mode 0600) when missing."""
    path = home / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    key = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key


def new_key(home: Path) -> str:
    """Replace the key (every client must be given the new one)."""
    path = home / KEY_FILE
    tmp = home / (KEY_FILE + ".tmp")
    key = secrets.token_urlsafe(32)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    os.replace(tmp, path)
    return key


def _read(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise HomeError(
            f"{path} may be read by other users of this machine; make it the home's "
            f"user's alone (chmod 600 {path}) or delete it for a new key"
        )
    key = path.read_text(encoding="utf-8", errors="replace").strip()
    if len(key) < MIN_KEY or not key.isascii() or not key.isprintable():
        raise HomeError(f"{path} does not hold an API key; delete it for a new key")
    return key


def matches(given: str | None, key: str) -> bool:
    """``given`` is the key (compared in constant time)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), key.encode())
