"""Who a relay admits: an allow-list of device IDs and admission tokens.

``HOME/admission.json`` (mode 0600) holds both::

    {"allowed": {"<key hex>": {"since": ms, "how": "allow" | "token <id hex>"}},
     "denied": ["<key hex>", ...],
     "tokens": {"<id hex>": {"secret": hex, "uses": n, "used": n,
                             "expires": ms | null, "created": ms, "revoked": bool}}}

A token is handed to an agent's operator as text (``rt1-...``, see
:func:`p2psync.core.relaywire.token_text`). The agent proves it holds the secret
with a MAC over the session's handshake hash (:func:`~p2psync.core.relaywire.token_proof`),
so an overheard proof admits no one else. The first admission by token puts the
agent's key on the allow-list and uses one of the token's uses; later sessions
need no token. ``deny`` takes a key off the list and keeps it off (a token will
not bring it back); a running node ends the device's open sessions when it sees
the file change. Every change is a read-modify-write under an exclusive
``flock`` of the file's lock, so ``relay allow`` and a running ``relay serve``
never lose each other's changes.
"""

from __future__ import annotations

import fcntl
import hmac
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2psync.core import relaywire as wire
from p2psync.errors import HomeError, NotFoundError
from p2psync.relay.home import ADMISSION_FILE, ADMISSION_LOCK, _read_json, _write_json, log_action


@dataclass(frozen=True)
class Token:
    ident: bytes
    uses: int
    used: int
    expires_ms: int | None
    created_ms: int
    revoked: bool

    def usable(self, now_ms: int) -> bool:
        return (
            not self.revoked
            and self.used < self.uses
            and (self.expires_ms is None or now_ms < self.expires_ms)
        )


class Admission:
    """The admission file of one relay home."""

    #: a running node notices changes by the file's inode, size and time
    watch_by_file = True

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / ADMISSION_FILE

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The file's content under an exclusive lock; written back on success."""
        with (self.home / ADMISSION_LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            before = repr(data)
            yield data
            if repr(data) != before:
                _write_json(self.path, data)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"allowed": {}, "denied": [], "tokens": {}}
        data = _read_json(self.path)
        for key, kind in (("allowed", dict), ("denied", list), ("tokens", dict)):
            if not isinstance(data.setdefault(key, kind()), kind):
                raise HomeError(f"{self.path}: {key} is not a JSON {kind.__name__}")
        return data

    # ------------------------------------------------------------ operator

    def allow(self, key: bytes, now_ms: int) -> bool:
        """Put ``key`` on the allow-list (and off the deny-list); whether it was new."""
        with self._locked() as data:
            new = key.hex() not in data["allowed"]
            data["allowed"].setdefault(key.hex(), {"since": now_ms, "how": "allow"})
            data["denied"] = [k for k in data["denied"] if k != key.hex()]
        log_action(self.home, f"allow {key.hex()}")
        return new

    def deny(self, key: bytes) -> bool:
        """Take ``key`` off the allow-list and keep it off; whether it was allowed."""
        with self._locked() as data:
            was = data["allowed"].pop(key.hex(), None) is not None
            if key.hex() not in data["denied"]:
                data["denied"].append(key.hex())
        log_action(self.home, f"deny {key.hex()}")
        return was

    def create_token(self, uses: int, expires_ms: int | None, now_ms: int) -> str:
        ident, secret = os.urandom(wire.TOKEN_ID_BYTES), os.urandom(wire.TOKEN_SECRET_BYTES)
        with self._locked() as data:
            data["tokens"][ident.hex()] = {
                "secret": secret.hex(),
                "uses": uses,
                "used": 0,
                "expires": expires_ms,
                "created": now_ms,
                "revoked": False,
            }
        log_action(self.home, f"token create {ident.hex()} uses={uses} expires={expires_ms}")
        return wire.token_text(ident, secret)

    def revoke_token(self, ident: str) -> str:
        """Revoke the token whose id is (or starts with) ``ident``; its full id."""
        with self._locked() as data:
            found = [k for k in data["tokens"] if k.startswith(ident)] if ident else []
            if len(found) != 1:
                what = "no" if not found else "more than one"
                raise NotFoundError(
                    f"{ident!r} names {what} token on this relay (see `relay token list`)"
                )
            data["tokens"][found[0]]["revoked"] = True
        log_action(self.home, f"token revoke {found[0]}")
        return str(found[0])

    def tokens(self) -> list[Token]:
        with self._locked() as data:
            return [_token(ident, row) for ident, row in sorted(data["tokens"].items())]

    def allowed(self) -> dict[bytes, dict[str, Any]]:
        with self._locked() as data:
            return {bytes.fromhex(k): dict(v) for k, v in data["allowed"].items()}

    # ------------------------------------------------------------ sessions

    def admit(
        self, key: bytes, token: tuple[bytes, bytes] | None, handshake_hash: bytes, now_ms: int
    ) -> str | None:
        """None when the session of ``key`` (with ``Hello.token``) is admitted (a valid
        token puts the key on the allow-list and uses one of its uses), else why not:
        for the relay's log only (the agent is told the same words whatever the reason)."""
        with self._locked() as data:
            if key.hex() in data["denied"]:
                return "denied"
            if key.hex() in data["allowed"]:
                return None
            if token is None:
                return "not on the allow-list, no token"
            ident, proof = token
            row = data["tokens"].get(ident.hex())
            if row is None:
                return f"unknown token {ident.hex()}"
            try:
                known = _token(ident.hex(), row)
                if known.revoked:
                    return f"token {ident.hex()} revoked"
                if known.used >= known.uses:
                    return f"token {ident.hex()} used up"
                if not known.usable(now_ms):
                    return f"token {ident.hex()} expired"
                expected = wire.token_proof(bytes.fromhex(row["secret"]), handshake_hash)
                if not hmac.compare_digest(expected, proof):
                    return f"wrong proof for token {ident.hex()}"
                row["used"] = int(row["used"]) + 1
            except (KeyError, TypeError, ValueError) as exc:  # edited by hand
                raise HomeError(f"{self.path}: token {ident.hex()} is malformed ({exc!r})") from exc
            data["allowed"][key.hex()] = {"since": now_ms, "how": f"token {ident.hex()}"}
        log_action(self.home, f"admitted {key.hex()} by token {ident.hex()}")
        return None


def _token(ident_hex: str, row: dict[str, Any]) -> Token:
    return Token(
        bytes.fromhex(ident_hex),
        int(row["uses"]),
        int(row["used"]),
        row.get("expires"),
        int(row["created"]),
        bool(row.get("revoked")),
    )
