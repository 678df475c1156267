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


#: How long a one-time console link works.
LINK_TTL_MS = 10 * 60 * 1000


def console_link_token(key: str, now_ms: int, nonce: str | None = None) -> str:
    """A one-time login token for the web console (``p2psync console`` prints a link
    with it): ``EXPIRY.NONCE.MAC``, the MAC made with the API key, so whoever can
    read the key file can make one and nobody else can; the agent takes each once."""
    expires = now_ms + LINK_TTL_MS
    nonce = nonce or secrets.token_hex(16)
    return f"{expires}.{nonce}.{_link_mac(key, expires, nonce)}"


def check_link_token(key: str, token: str, now_ms: int) -> tuple[str, int] | None:
    """``(nonce, expiry)`` of a sound, unexpired token (whether it was used is the
    caller's to remember); None otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or len(parts[0]) > 15:
        return None
    expires, nonce, mac = int(parts[0]), parts[1], parts[2]
    if not now_ms <= expires <= now_ms + LINK_TTL_MS:
        return None
    wanted = _link_mac(key, expires, nonce).encode()
    if not hmac.compare_digest(mac.encode("ascii", "replace"), wanted):
        return None
    return nonce, expires


def _link_mac(key: str, expires: int, nonce: str) -> str:
    message = f"p2psync console link|{expires}|{nonce}".encode("utf-8", "replace")
    return hmac.new(key.encode(), message, "sha256").hexdigest()
