"""``host:port`` text, as stored for peers and typed by users; why one could
not be listened on."""

from __future__ import annotations

import errno
import socket


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port); raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (a port is 0-65535; IPv6 as [::1]:PORT)")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cannot_listen(host: str, port: int, exc: OSError, option: str, *, who: str = "") -> str:
    """Why listening on ``host:port`` failed, and what to do, in one sentence:
    ``option`` chooses another address (``--listen HOST:PORT``), ``who`` names
    the listener when it is not the agent's sync port ("the HTTP API")."""
    address = format_address(host, port)
    subject = f"{who} cannot listen on {address}" if who else f"cannot listen on {address}"
    if exc.errno == errno.EADDRINUSE:
        if who:
            return f"{subject}: another program uses it; choose another port with {option}"
        return f"{address} is in use by another program; choose another port with {option}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{subject}: {host} is not an address of this machine; "
            f"give one of its addresses (or 0.0.0.0 for all) with {option}"
        )
    if exc.errno == errno.EACCES:
        return (
            f"{subject}: permission denied (ports below 1024 need root); "
            f"choose another port with {option}"
        )
    if isinstance(exc, socket.gaierror):
        return (
            f"{subject}: {host!r} is not a known host name; "
            f"give an address of this machine with {option}"
        )
    return f"{subject}: {exc.strerror or exc}; choose another address with {option}"
