"""Serving the HTTP API in the agent's nursery (Hypercorn's HTTP on each connection,
served by :mod:`p2psync.http.connections`)."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.utils import repr_socket_addr, wrap_app

from p2psync.errors import P2PSyncError
from p2psync.http.app import build
from p2psync.http.connections import serve
from p2psync.http.console import Console, Sessions, public
from p2psync.http.events import Hub
from p2psync.http.guard import Access
from p2psync.http.keys import api_key
from p2psync.http.site import Site
from p2psync.net.address import cannot_listen, format_address

log = logging.getLogger(__name__)

DEFAULT_HTTP = "127.0.0.1:7718"


@dataclass(frozen=True)
class HttpService:
    """``p2psync run --http HOST:PORT`` (``allowed_hosts``: names beside IP
    literals and ``localhost`` the ``Host`` header may give)."""

    host: str
    port: int
    allowed_hosts: frozenset[str] = frozenset()

    async def serve(
        self, site: Site, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the URLs once listening."""
        key = await trio.to_thread.run_sync(api_key, site.db.path)
        hub = Hub(site)
        sessions = Sessions(key, site=site.db.device_id)
        access = Access(
            key=key, allowed_hosts=self.allowed_hosts, public=public, session=sessions.allows
        )
        app = build(site, hub, access, Console(site, sessions))
        config = Config()
        config.bind = [format_address(self.host, self.port)]
        config.accesslog = None
        errors = logging.getLogger("p2psync.http.hypercorn")
        errors.setLevel(logging.WARNING)  # (its "Running on": the agent says it)
        config.errorlog = errors
        config.graceful_timeout = 1.0
        config.keep_alive_timeout = 75.0
        config.h11_max_incomplete_size = 64 * 1024  # request line and headers
        config.include_server_header = False
        try:
            sockets = config.create_sockets()
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
        except OSError as exc:
            raise P2PSyncError(
                cannot_listen(
                    self.host,
                    self.port,
                    exc,
                    "--http HOST:PORT (or turn the HTTP API off with --no-http)",
                    who="the HTTP API",
                )
            ) from exc
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await nursery.start(
                partial(
                    serve,
                    # Starlette is an ASGI app; hypercorn's types name its own scopes
                    wrap_app(cast(Any, app), config.wsgi_max_body_size, None),
                    config,
                    sockets.insecure_sockets,
                    grace=config.graceful_timeout,
                )
            )
            urls = [
                f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
                for sock in sockets.insecure_sockets
            ]
            log.info("HTTP API on %s (API key in %s)", ", ".join(urls), site.db.path / "http.key")
            if not _loopback(self.host):
                log.warning(
                    "the HTTP API on %s is plain HTTP: its key and console sessions cross "
                    "the network unencrypted; serve it on 127.0.0.1 (the default) or behind "
                    "a TLS proxy",
                    format_address(self.host, self.port),
                )
            task_status.started(urls)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
