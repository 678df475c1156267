"""Dialling a peer: the first of its addresses that connects and completes the
handshake, as the agent's dialers and one-shot syncs (``p2psync sync``, ``pair
join``) both do it."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable

import trio

from p2psync.core.frames import MAX_FRAME
from p2psync.core.handshake import PROLOGUE
from p2psync.core.identity import Identity, short_id
from p2psync.errors import (
    ConnectionLost,
    FrameError,
    HandshakeError,
    LocalProtocolError,
    P2PSyncError,
)
from p2psync.net.address import parse_address
from p2psync.net.transport import SecureStream, secure

log = logging.getLogger(__name__)

Failed = Callable[[str, Exception], Awaitable[None]]  # address, why


def no_timeout(address: str) -> float:
    return math.inf


async def dial(
    identity: Identity,
    name: str,
    key: bytes | None,
    addresses: Iterable[str],
    *,
    timeout: Callable[[str], float] = no_timeout,
    on_failed: Failed | None = None,
    prologue: bytes = PROLOGUE,
    max_frame: int = MAX_FRAME,
) -> tuple[SecureStream | None, str]:
    """Try each address in turn, expecting ``key``'s identity (any, when None):
    ``(stream, address)`` for the first that connects within ``timeout(address)``
    seconds and completes the handshake, else ``(None, why the last one failed)``.
    ``on_failed`` hears of each address that was dialled and failed (not of one that
    is not ``host:port``). ``prologue`` and ``max_frame``: a relay session's differ
    (``core/relaywire.py``)."""
    error = "no address to dial"
    for address in addresses:
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            error = f"cannot reach {address}: {exc}"
            continue
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(timeout(address)):
                stream = await trio.open_tcp_stream(host, port)
            secured = await secure(
                stream,
                identity,
                initiator=True,
                name=name,
                expect=key,
                prologue=prologue,
                max_frame=max_frame,
            )
        except LocalProtocolError:
            raise  # a bug here, not the far end's doing
        except Exception as exc:  # whatever the far end does, only this attempt fails
            expected = isinstance(exc, P2PSyncError | OSError | trio.TooSlowError)
            log.log(
                logging.DEBUG if expected else logging.WARNING,
                "dialling %s at %s failed: %r",
                _who(key),
                address,
                exc,
                exc_info=not expected,  # unexpected: the traceback helps find the bug
            )
            if stream is not None:
                await stream.aclose()
            error = _failure(address, exc)
            if on_failed is not None:
                await on_failed(address, exc)
            continue
        return secured, address
    return None, error


def _failure(address: str, exc: Exception) -> str:
    if isinstance(exc, HandshakeError | FrameError | ConnectionLost):
        return f"handshake with {address} failed: {exc}"
    if isinstance(exc, trio.TooSlowError):
        return f"cannot reach {address}: no answer in time"
    return f"cannot reach {address}: {exc}"


def _who(key: bytes | None) -> str:
    return short_id(key) if key is not None else "a peer"
