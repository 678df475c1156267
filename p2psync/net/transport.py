"""Secure streams: the Noise handshake and sealed frames over a trio stream.

:func:`secure` runs the handshake of :mod:`p2psync.core.handshake` over any
``trio.abc.Stream`` (a TCP socket, or a memory stream in tests) and returns a
:class:`SecureStream` that sends and receives whole messages. All waiting is
bounded: the handshake must finish within ``handshake_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import trio

from p2psync.core.frames import MAX_FRAME, MAX_HANDSHAKE_FRAME, FrameReader, Opener, Sealer, frame
from p2psync.core.handshake import PROLOGUE, Handshake
from p2psync.core.identity import Identity, short_id
from p2psync.errors import ConnectionLost, FrameError, HandshakeError

log = logging.getLogger(__name__)

RECEIVE_CHUNK = 1 << 16
HANDSHAKE_TIMEOUT = 10.0


class SecureStream:
    """Whole, authenticated, encrypted messages over a byte stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        reader: FrameReader,
        *,
        peer: bytes,
        peer_name: str,
        send_key: bytes,
        receive_key: bytes,
        bytes_in: int,
        bytes_out: int,
        handshake_hash: bytes = b"",
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.stream = stream
        self.handshake_hash = handshake_hash
        self.peer = peer
        self.peer_name = peer_name
        self._reader = reader
        self._reader.set_limit(max_frame)
        self._sealer = Sealer(send_key)
        self._opener = Opener(receive_key)
        self._send_lock = trio.Lock()
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out

    def set_max_frame(self, max_frame: int) -> None:
        """The largest frame accepted from now on (a relay allows only a small one
        until it has admitted the peer)."""
        self._reader.set_limit(max_frame)

    async def send(self, message: bytes) -> None:
        async with self._send_lock:
            data = self._sealer.seal(message)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionLost(f"connection to {short_id(self.peer)} broke: {exc}") from exc
            self.bytes_out += len(data)

    async def receive(self) -> bytes:
        """The next message; raises ConnectionLost at end of stream, FrameError on bad frames."""
        header_body = await _next_frame(self.stream, self._reader, self)
        return self._opener.open(*header_body)

    def detach(self) -> tuple[trio.abc.Stream, bytes]:
        """Stop using the sealed frames: the byte stream underneath, and the bytes
        already read from it past the last frame (a relay splice carries another
        stream from there on). This object must not be used afterwards."""
        return self.stream, self._reader.take_rest()

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await self.stream.aclose()


class _Counter:
    bytes_in = 0


async def _next_frame(
    stream: trio.abc.Stream, reader: FrameReader, counter: _Counter | SecureStream
) -> tuple[bytes, bytes]:
    while True:
        framed = reader.next_frame()
        if framed is not None:
            return framed
        try:
            data = await stream.receive_some(RECEIVE_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"connection broke: {exc}") from exc
        if not data:
            if reader.pending:
                raise ConnectionLost("connection closed in the middle of a frame")
            raise ConnectionLost("connection closed by the peer")
        counter.bytes_in += len(data)
        reader.feed(data)


async def secure(
    stream: trio.abc.Stream,
    identity: Identity,
    *,
    initiator: bool,
    name: str,
    expect: bytes | None = None,
    trust: Callable[[bytes], bool] | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
    prologue: bytes = PROLOGUE,
    max_frame: int = MAX_FRAME,
    first_timeout: float | None = None,
    on_first: Callable[[], None] | None = None,
) -> SecureStream:
    """Run the handshake on ``stream``; raise HandshakeError, FrameError or ConnectionLost.
    ``prologue`` and ``max_frame``: a relay session's (``core/relaywire.py``) differ.
    ``first_timeout``: the peer's first message must come within it (a responder's
    guard: message 1 is 32 bytes); ``on_first`` is called when it has come."""
    handshake = Handshake(
        identity,
        initiator=initiator,
        ephemeral=os.urandom(32),
        name=name,
        expect=expect,
        trust=trust,
        prologue=prologue,
    )
    reader = FrameReader(MAX_HANDSHAKE_FRAME)
    counter = _Counter()
    sent = 0
    with trio.move_on_after(timeout) as scope:
        first = handshake.start()
        if first is not None:
            sent += await _send_plain(stream, first)
        first_seen = False
        while not handshake.done:
            if first_seen or first_timeout is None:
                header, body = await _next_frame(stream, reader, counter)
            else:
                with trio.move_on_after(first_timeout) as waiting:
                    header, body = await _next_frame(stream, reader, counter)
                if waiting.cancelled_caught:
                    raise HandshakeError(
                        f"the first handshake message did not come within {first_timeout:g} s"
                    )
            if not first_seen:
                first_seen = True
                if on_first is not None:
                    on_first()
            del header
            reply = handshake.receive(body)
            if reply is not None:
                sent += await _send_plain(stream, reply)
    if scope.cancelled_caught:
        raise HandshakeError(f"handshake did not finish within {timeout:g} s")
    outcome = handshake.outcome
    assert outcome is not None
    return SecureStream(
        stream,
        reader,
        peer=outcome.peer,
        peer_name=outcome.peer_name,
        send_key=outcome.send_key,
        receive_key=outcome.receive_key,
        bytes_in=counter.bytes_in,
        bytes_out=sent,
        handshake_hash=outcome.handshake_hash,
        max_frame=max_frame,
    )


async def _send_plain(stream: trio.abc.Stream, message: bytes) -> int:
    data = frame(message)
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise ConnectionLost(f"connection broke during the handshake: {exc}") from exc
    return len(data)


class Prefixed(trio.abc.Stream):
    """``inner``, with ``first`` read before anything from it (bytes a detached
    :class:`SecureStream` had read ahead)."""

    def __init__(self, inner: trio.abc.Stream, first: bytes) -> None:
        self.inner = inner
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            cut = len(self._first) if max_bytes is None else max_bytes
            data, self._first = self._first[:cut], self._first[cut:]
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


__all__ = ["ConnectionLost", "FrameError", "Prefixed", "SecureStream", "secure"]
