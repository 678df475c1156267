"""Frames: the length-prefixed, sealed records a connection carries.

A frame is a 4-byte big-endian length followed by that many bytes. During the
handshake a frame holds one Noise handshake message (at most
:data:`MAX_HANDSHAKE_FRAME` bytes); afterwards it holds one sealed message:
ChaCha20-Poly1305 (IETF) under the direction's key from the Noise split, with
the nonce ``0x00000000 || counter`` (64-bit little-endian, starting at 0, one
per frame) and the 4-byte length header as associated data. A frame whose tag
fails — tampered, replayed, reordered, or cut — is an error and ends the
connection. An announced length above the cap is refused before anything is
buffered.

Sans-IO: :class:`FrameReader` takes bytes and yields frame bodies;
:class:`Sealer` / :class:`Opener` turn messages into frames and back.
"""

from __future__ import annotations

import struct

import nacl.bindings
import nacl.exceptions

from p2psync.errors import FrameError, LocalProtocolError

HEADER = struct.Struct(">I")
TAG_BYTES = 16
MAX_HANDSHAKE_FRAME = 4096
#: Largest sealed frame: one message of at most 2 MiB plus its tag.
MAX_FRAME = (2 << 20) + TAG_BYTES
_MAX_NONCE = (1 << 64) - 1


class FrameReader:
    """Reassembles frames from a byte stream."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._need: int | None = None

    def set_limit(self, max_frame: int) -> None:
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_frame(self) -> tuple[bytes, bytes] | None:
        """``(header, body)`` of the next complete frame, or None if more bytes are needed."""
        if self._need is None:
            if len(self._buffer) < HEADER.size:
                return None
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame:
                raise FrameError(
                    f"frame of {length} bytes announced; the limit is {self.max_frame}"
                )
            self._need = length
        end = HEADER.size + self._need
        if len(self._buffer) < end:
            return None
        header = bytes(self._buffer[: HEADER.size])
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        self._need = None
        return header, body

    def take_rest(self) -> bytes:
        """The bytes received beyond the last whole frame (they belong to whatever
        the stream carries next); the reader is empty afterwards."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._need = None
        return rest

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)


def frame(body: bytes) -> bytes:
    """A plain (handshake) frame."""
    return HEADER.pack(len(body)) + body


def _nonce(counter: int) -> bytes:
    if counter >= _MAX_NONCE:
        raise FrameError("nonce space exhausted; reconnect")
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


class Sealer:
    """Seals messages into frames for one direction."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a frame key is 32 bytes")
        self._key = key
        self._counter = 0

    def seal(self, message: bytes) -> bytes:
        if self._counter >= _MAX_NONCE:  # our limit, not the peer's doing
            raise LocalProtocolError("nonce space exhausted; reconnect")
        header = HEADER.pack(len(message) + TAG_BYTES)
        sealed: bytes = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            message, header, _nonce(self._counter), self._key
        )
        self._counter += 1
        return header + sealed


class Opener:
    """Opens frames from the other direction, in order."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a frame key is 32 bytes")
        self._key = key
        self._counter = 0

    def open(self, header: bytes, body: bytes) -> bytes:
        if len(body) < TAG_BYTES:
            raise FrameError("frame shorter than its authentication tag")
        try:
            message: bytes = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                body, header, _nonce(self._counter), self._key
            )
        except nacl.exceptions.CryptoError as exc:
            raise FrameError(
                "frame failed authentication (tampered, replayed or out of order)"
            ) from exc
        self._counter += 1
        return message
