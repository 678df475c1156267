"""What every request passes before any route sees it (a pure ASGI layer, so a
refused request reads no body and changes nothing):

* ``Host`` must name this machine in a way DNS rebinding cannot fake: an IP
  literal, ``localhost``, or a name the operator allowed (``--http-host``);
* the API key (``X-API-Key``, or ``Authorization: Bearer KEY``) or a console
  session (its cookie) is required, except for the console's login page;
* a declared ``Content-Length`` above the limit is refused at once (a chunked
  body is cut off by the route that reads it, :func:`p2psync.http.body.read_json`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from p2psync.http.connections import KEYED, SESSION, TRUSTED
from p2psync.http.errors import error_body
from p2psync.http.keys import matches

#: Bytes a request body may have (a transaction of up to 10,000 changes, 1 MiB
#: as an entry, is larger as JSON; base64 values grow by a third).
MAX_BODY = 8 << 20


def host_name(header: str) -> str | None:
    """The host of a ``Host`` header without its port (IPv6 without brackets),
    lower case; None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1 :] if end > 0 else ":x"
        host = header[1:end]
    elif header.count(":") == 1:
        host, port = header.split(":")
        rest = ":" + port
    else:
        host, rest = header, ""
    if not host or (rest and not rest[1:].isdigit()):
        return None
    return host


def host_allowed(header: str, allowed: frozenset[str]) -> bool:
    """An IP literal (a rebound DNS name is never one), ``localhost``, or a name
    the operator listed."""
    host = host_name(header)
    if host is None:
        return False
    if host == "localhost" or host in allowed:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Access:
    key: str
    allowed_hosts: frozenset[str] = frozenset()
    #: paths served without the key (the console's login page, its static files)
    public: Callable[[str, str], bool] = lambda _method, _path: False
    #: a console session in the request's cookies (and, for a form, its CSRF token)
    session: Callable[[Scope], bool] = lambda _scope: False


class Guard:
    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message, extra = refusal
        if status == 401 and scope["path"].startswith("/console/"):
            # a browser without a session (never had one, or it ended: a restart, 12
            # idle hours), whatever it sent: to the login page
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [(b"location", b"/console/login"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        body = error_body(status, message)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _refusal(
        self, scope: Scope, headers: dict[str, str]
    ) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        host = headers.get("host")
        if host is None or not host_allowed(host, self.access.allowed_hosts):
            return (
                421 if host else 400,
                f"this agent does not answer to the host {host!r}: use its IP address or "
                "localhost (or allow the name with --http-host)"
                if host
                else "the request has no Host header",
                [],
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "Content-Length is not a number", []
            if int(length) > MAX_BODY:
                return 413, f"the body is {int(length):,} bytes; at most {MAX_BODY:,}", []
        method, path = scope["method"], scope["path"]
        if self.access.public(method, path):
            return None
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is not None:
            if matches(given, self.access.key):
                scope[TRUSTED] = KEYED  # (its connection is the last to make room)
                return None
            return 401, "wrong API key (it is in HOME/http.key)", []
        if self.access.session(scope):
            scope[TRUSTED] = SESSION
            return None
        return (
            401,
            "an API key is required: send it in the X-API-Key header (it is in HOME/http.key)",
            [(b"www-authenticate", b'Bearer realm="p2psync"')],
        )
