"""p2psync's handshake: Noise ``XX`` with identity binding (sans-IO).

``Noise_XX_25519_ChaChaPoly_BLAKE2b`` with prologue ``b"p2psync/1"``. Each side's
Noise static key is the X25519 form of its Ed25519 identity key. The handshake
payload each side sends (encrypted: message 2 for the responder, message 3 for
the initiator) is canonical CBOR::

    {0: protocol version (1), 1: Ed25519 public key (32 bytes),
     2: Ed25519 signature of b"p2psync/v1/noise-static\\x00" || X25519 static key,
     3: display name (text, at most 64 characters)}

A receiver checks that the X25519 form of the claimed Ed25519 key *is* the
static key the handshake authenticated, and that the signature verifies: the
peer holds both private keys, so its device ID is proven. Message 1 is the
initiator's ephemeral key only: no identity or name travels in the clear.

The initiator names the peer it expects; if message 2 proves another identity
the handshake stops before the initiator reveals its own (message 3). The
responder learns the initiator's identity from message 3 and decides whether
it trusts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions

from p2psync.core import canonical
from p2psync.core.identity import KEY_BYTES, Identity, short_id, verify
from p2psync.core.noise import HandshakeState, KeyPair
from p2psync.errors import DecodeError, IdentityMismatch, LocalHandshakeError, RemoteHandshakeError

PROLOGUE = b"p2psync/1"
PROTOCOL_VERSION = 1
BINDING_PREFIX = b"p2psync/v1/noise-static\x00"
MAX_NAME_CHARS = 64


def shown_name(name: str) -> str:
    """``name`` as the handshake may carry it: at most 64 characters, each printable
    (an unprintable one, as an older home may hold, becomes a space rather than
    making every peer refuse the handshake)."""
    return "".join(c if c.isprintable() else " " for c in name[:MAX_NAME_CHARS])


def x25519_public(ed25519_key: bytes) -> bytes:
    """The X25519 form of an Ed25519 public key."""
    try:
        converted: bytes = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(ed25519_key)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError) as exc:
        raise RemoteHandshakeError("peer's identity key is not a valid Ed25519 key") from exc
    return converted


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished handshake established."""

    peer: bytes  # the peer's Ed25519 identity key
    peer_name: str
    send_key: bytes
    receive_key: bytes
    handshake_hash: bytes


class Handshake:
    """One side of the handshake. Feed it the peer's messages; send what it returns."""

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        ephemeral: bytes,
        name: str,
        expect: bytes | None = None,
        trust: Callable[[bytes], bool] | None = None,
        prologue: bytes = PROLOGUE,
    ) -> None:
        """``ephemeral`` is 32 random bytes (the caller's randomness); ``prologue``
        names the protocol (relay sessions use their own, ``core/relaywire.py``).

        An initiator passes ``expect`` (the peer it dialled); a responder passes
        ``trust`` to accept or refuse the initiator's identity.
        """
        self.identity = identity
        self.initiator = initiator
        self.expect = expect
        self.trust = trust
        static = KeyPair.from_private(identity.x25519_private)
        self._payload = canonical.encode(
            {
                0: PROTOCOL_VERSION,
                1: identity.public_key,
                2: identity.sign(BINDING_PREFIX + static.public),
                3: shown_name(name),
            }
        )
        self._state = HandshakeState(
            "XX",
            initiator,
            prologue=prologue,
            s=static,
            e=KeyPair.from_private(ephemeral),
        )
        self._peer: tuple[bytes, str] | None = None
        self._received = 0
        self.outcome: Outcome | None = None

    def start(self) -> bytes | None:
        """The first message (initiator), or None (responder waits)."""
        return self._state.write_message() if self.initiator else None

    def receive(self, message: bytes) -> bytes | None:
        """Process the peer's message; return our reply, or None if there is none."""
        if self.done:
            raise LocalHandshakeError("handshake message after the handshake finished")
        payload = self._state.read_message(message)
        self._received += 1
        if self.initiator:  # message 2: the responder's identity
            self._peer = self._check_payload(payload)
            if self.expect is not None and self._peer[0] != self.expect:
                raise IdentityMismatch(
                    f"expected {short_id(self.expect)} but the peer is {short_id(self._peer[0])}"
                )
            reply = self._state.write_message(self._payload)  # message 3
            self._finish()
            return reply
        if self._received == 1:  # message 1: the initiator's ephemeral key only
            if payload:
                raise RemoteHandshakeError("the first handshake message must carry no payload")
            return self._state.write_message(self._payload)  # message 2
        # message 3: the initiator's identity
        self._peer = self._check_payload(payload)
        if self.trust is not None and not self.trust(self._peer[0]):
            raise IdentityMismatch(f"{short_id(self._peer[0])} is not a trusted peer")
        self._finish()
        return None

    def _check_payload(self, payload: bytes) -> tuple[bytes, str]:
        remote_static = self._state.remote_static
        if remote_static is None:
            raise RemoteHandshakeError("handshake ended without the peer's static key")
        try:
            fields = canonical.decode(payload, what="handshake payload", max_depth=1)
        except DecodeError as exc:
            raise RemoteHandshakeError(f"bad handshake payload: {exc}") from exc
        if (
            type(fields) is not dict
            or not all(type(key) is int for key in fields)
            or set(fields) != {0, 1, 2, 3}
        ):
            raise RemoteHandshakeError("handshake payload must have the keys 0-3")
        version, key, signature, name = fields[0], fields[1], fields[2], fields[3]
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise RemoteHandshakeError(
                f"peer speaks protocol version {version!r}; this agent speaks "
                f"{PROTOCOL_VERSION}: upgrade the older one"
            )
        if type(key) is not bytes or len(key) != KEY_BYTES or type(signature) is not bytes:
            raise RemoteHandshakeError("handshake payload has a malformed identity")
        if type(name) is not str or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise RemoteHandshakeError("handshake payload has a malformed name")
        if x25519_public(key) != remote_static:
            raise RemoteHandshakeError("peer's identity key does not match its handshake key")
        if not verify(key, BINDING_PREFIX + remote_static, signature):
            raise RemoteHandshakeError("peer's identity signature does not verify")
        return key, name

    def _finish(self) -> None:
        assert self._peer is not None
        first, second = self._state.split()  # initiator->responder, responder->initiator
        send, receive = (first, second) if self.initiator else (second, first)
        if send.key is None or receive.key is None:
            raise LocalHandshakeError("handshake finished without transport keys")
        self.outcome = Outcome(
            peer=self._peer[0],
            peer_name=self._peer[1],
            send_key=send.key,
            receive_key=receive.key,
            handshake_hash=self._state.handshake_hash,
        )

    @property
    def done(self) -> bool:
        return self.outcome is not None
