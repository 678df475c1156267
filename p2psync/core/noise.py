"""The Noise Protocol Framework (revision 34), sans-IO, for ``25519_ChaChaPoly_BLAKE2b``.

Implements the spec's CipherState, SymmetricState and HandshakeState (sections 5.1-5.3)
with X25519, ChaCha20-Poly1305 (IETF) and BLAKE2b from PyNaCl and :mod:`hashlib`, the
``psk`` modifier (section 9) and every fundamental, one-way and deferred pattern of
sections 7.2-7.6. The protocol name is ``Noise_<PATTERN>_25519_ChaChaPoly_BLAKE2b``, for
example ``Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b``.

No I/O and no randomness: the caller passes every key, including the 32-byte ephemeral
private key (fresh from a CSPRNG, never reused), and moves the bytes itself::

    alice = HandshakeState("XX", True, s=alice_static, e=KeyPair.from_private(rand32()))
    bob = HandshakeState("XX", False, s=bob_static, e=KeyPair.from_private(rand32()))
    bob.read_message(alice.write_message())
    ...                                        # until both are .finished
    to_bob, to_alice = alice.split()           # both sides: (c1, c2), as in the spec

Every error is a :class:`HandshakeError`, saying whose doing it was: the caller's
(:class:`~p2psync.errors.LocalHandshakeError`: bad arguments, a message out of turn,
exhausted nonces) or the peer's (:class:`~p2psync.errors.RemoteHandshakeError`: short,
long or malformed messages, low-order keys; a failed AEAD tag is its subclass
:class:`DecryptError`). A HandshakeState that raised while processing a message is
dead: every later call raises too.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from p2psync.errors import DecryptError, HandshakeError, LocalHandshakeError, RemoteHandshakeError

DHLEN = 32
HASHLEN = 64
KEYLEN = 32
TAGLEN = 16
MAX_MESSAGE = 65535
MAX_NONCE = 2**64 - 1  # reserved for rekey(), never used for a message
SUITE = "25519_ChaChaPoly_BLAKE2b"


# ---------------------------------------------------------------- primitives (section 4)


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair. Build it with :meth:`from_private` (the constructor checks
    lengths only, not that ``public`` belongs to ``private``)."""

    private: bytes = field(repr=False)
    public: bytes

    def __post_init__(self) -> None:
        _check_len(self.private, DHLEN, "private key")
        _check_len(self.public, DHLEN, "public key")

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        _check_len(private, DHLEN, "private key")  # before it reaches C
        return cls(private, nacl.bindings.crypto_scalarmult_base(private))


def _check_len(value: bytes, size: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise LocalHandshakeError(f"a {what} must be {size} bytes")


def dh(key_pair: KeyPair, public: bytes) -> bytes:
    """X25519; refuses a low-order ``public`` (all-zero shared secret)."""
    _check_len(public, DHLEN, "public key")
    try:
        shared = nacl.bindings.crypto_scalarmult(key_pair.private, public)
    except nacl.exceptions.CryptoError as exc:  # libsodium refuses an all-zero output
        raise RemoteHandshakeError("low-order public key") from exc
    if not any(shared):
        raise RemoteHandshakeError("low-order public key")
    return shared


def _check_size(size: int, error: type[HandshakeError]) -> None:
    if size > MAX_MESSAGE:
        raise error(f"a Noise message is at most {MAX_MESSAGE} bytes")


def _nonce(n: int) -> bytes:
    return bytes(4) + n.to_bytes(8, "little")


_DECRYPT = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data).digest()


def hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    """HKDF of section 4.3 with HMAC-BLAKE2b: ``outputs`` (2 or 3) 64-byte values."""
    temp_key = hmac.new(chaining_key, ikm, hashlib.blake2b).digest()
    result = [b""]
    for i in range(1, outputs + 1):
        result.append(hmac.new(temp_key, result[-1] + bytes([i]), hashlib.blake2b).digest())
    return result[1:]


# ------------------------------------------------------------ CipherState (section 5.1)


class CipherState:
    """A key and a nonce counter. Without a key, encrypt and decrypt return their input."""

    def __init__(self, key: bytes | None = None, nonce: int = 0) -> None:
        if key is not None:
            _check_len(key, KEYLEN, "cipher key")
        if not 0 <= nonce <= MAX_NONCE:
            raise LocalHandshakeError("nonce out of range")
        self._key = key
        self._n = nonce

    @property
    def has_key(self) -> bool:
        return self._key is not None

    @property
    def key(self) -> bytes | None:
        """The raw 32-byte key, for a transport that seals its own frames. Use it in one
        place only: this CipherState or that transport, never both (nonce reuse)."""
        return self._key

    @property
    def nonce(self) -> int:
        """The nonce the next encrypt or decrypt will use."""
        return self._n

    def _apply(
        self, seal: Callable[[bytes, bytes, bytes, bytes], bytes], ad: bytes, data: bytes
    ) -> bytes:
        """Run ``seal`` (encrypt or decrypt) under the next nonce; advance it on success."""
        assert self._key is not None
        if self._n >= MAX_NONCE:
            raise LocalHandshakeError("nonce exhausted: this cipher can send or receive no more")
        result = seal(data, ad, _nonce(self._n), self._key)
        self._n += 1
        return result

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._key is None:
            return plaintext
        _check_size(len(plaintext) + TAGLEN, LocalHandshakeError)
        return self._apply(nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt, ad, plaintext)

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt and authenticate; on failure raise :class:`DecryptError`, nonce unchanged."""
        if self._key is None:
            return ciphertext
        _check_size(len(ciphertext), RemoteHandshakeError)
        if len(ciphertext) < TAGLEN:
            raise DecryptError("ciphertext shorter than its tag")
        try:
            return self._apply(_DECRYPT, ad, bytes(ciphertext))
        except nacl.exceptions.CryptoError as exc:
            raise DecryptError("authentication tag does not verify") from exc

    def rekey(self) -> None:
        """REKEY of section 4.2: the first 32 bytes of ENCRYPT(k, 2^64-1, b"", zeros)."""
        if self._key is None:
            raise LocalHandshakeError("rekey without a key")
        self._key = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            bytes(KEYLEN), b"", _nonce(MAX_NONCE), self._key
        )[:KEYLEN]


# --------------------------------------------------------- SymmetricState (section 5.2)


class SymmetricState:
    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = _hash(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher = CipherState(temp_k[:KEYLEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        return CipherState(temp_k1[:KEYLEN]), CipherState(temp_k2[:KEYLEN])


# ------------------------------------------------------- handshake patterns (section 7)

# Spec notation, lines separated by ";". Lines before "..." are pre-messages.
PATTERNS: dict[str, str] = {
    "N": "<- s; ...; -> e, es",
    "K": "-> s; <- s; ...; -> e, es, ss",
    "X": "<- s; ...; -> e, es, s, ss",
    "NN": "-> e; <- e, ee",
    "NK": "<- s; ...; -> e, es; <- e, ee",
    "NX": "-> e; <- e, ee, s, es",
    "KN": "-> s; ...; -> e; <- e, ee, se",
    "KK": "-> s; <- s; ...; -> e, es, ss; <- e, ee, se",
    "KX": "-> s; ...; -> e; <- e, ee, se, s, es",
    "XN": "-> e; <- e, ee; -> s, se",
    "XK": "<- s; ...; -> e, es; <- e, ee; -> s, se",
    "XX": "-> e; <- e, ee, s, es; -> s, se",
    "IN": "-> e, s; <- e, ee, se",
    "IK": "<- s; ...; -> e, es, s, ss; <- e, ee, se",
    "IX": "-> e, s; <- e, ee, se, s, es",
    "NK1": "<- s; ...; -> e; <- e, ee, es",
    "NX1": "-> e; <- e, ee, s; -> es",
    "X1N": "-> e; <- e, ee; -> s; <- se",
    "X1K": "<- s; ...; -> e, es; <- e, ee; -> s; <- se",
    "XK1": "<- s; ...; -> e; <- e, ee, es; -> s, se",
    "X1K1": "<- s; ...; -> e; <- e, ee, es; -> s; <- se",
    "X1X": "-> e; <- e, ee, s, es; -> s; <- se",
    "XX1": "-> e; <- e, ee, s; -> es, s, se",
    "X1X1": "-> e; <- e, ee, s; -> es, s; <- se",
    "K1N": "-> s; ...; -> e; <- e, ee; -> se",
    "K1K": "-> s; <- s; ...; -> e, es; <- e, ee; -> se",
    "KK1": "-> s; <- s; ...; -> e; <- e, ee, se, es",
    "K1K1": "-> s; <- s; ...; -> e; <- e, ee, es; -> se",
    "K1X": "-> s; ...; -> e; <- e, ee, s, es; -> se",
    "KX1": "-> s; ...; -> e; <- e, ee, se, s; -> es",
    "K1X1": "-> s; ...; -> e; <- e, ee, s; -> se, es",
    "I1N": "-> e, s; <- e, ee; -> se",
    "I1K": "<- s; ...; -> e, es, s; <- e, ee; -> se",
    "IK1": "<- s; ...; -> e, s; <- e, ee, se, es",
    "I1K1": "<- s; ...; -> e, s; <- e, ee, es; -> se",
    "I1X": "-> e, s; <- e, ee, s, es; -> se",
    "IX1": "-> e, s; <- e, ee, se, s; -> es",
    "I1X1": "-> e, s; <- e, ee, s; -> se, es",
}

_NAME = re.compile(r"(?P<base>[A-Z][A-Z0-9]*)(?P<mods>psk\d+(?:\+psk\d+)*)?")
_DH_TOKENS = ("ee", "es", "se", "ss")

# A message: (sent by the initiator?, its tokens)
Message = tuple[bool, tuple[str, ...]]


def parse_pattern(name: str) -> tuple[list[Message], list[Message]]:
    """Return ``(pre_messages, messages)`` for a pattern name such as ``"XXpsk3"``."""
    match = _NAME.fullmatch(name)
    if match is None or match["base"] not in PATTERNS:
        raise LocalHandshakeError(f"unknown handshake pattern {name!r}")
    pre: list[Message] = []
    messages: list[Message] = []
    target = messages
    for line in (part.strip() for part in PATTERNS[match["base"]].split(";")):
        if line == "...":
            pre, messages = messages, []
            target = messages
            continue
        arrow, _, rest = line.partition(" ")
        target.append((arrow == "->", tuple(t.strip() for t in rest.split(","))))
    positions = [int(p) for p in re.findall(r"psk(\d+)", match["mods"] or "")]
    if len(set(positions)) != len(positions) or any(p > len(messages) for p in positions):
        raise LocalHandshakeError(f"invalid psk modifiers in {name!r}")
    for p in positions:
        sender, tokens = messages[max(p - 1, 0)]
        messages[max(p - 1, 0)] = (sender, ("psk", *tokens) if p == 0 else (*tokens, "psk"))
    return pre, messages


# ------------------------------------------------------- HandshakeState (section 5.3)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise RemoteHandshakeError("handshake message too short")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def rest(self) -> bytes:
        return self.data[self.pos :]


class HandshakeState:
    """One side of a Noise handshake.

    ``pattern`` is e.g. ``"XX"`` or ``"XXpsk3"``. ``s`` is the local static key pair,
    ``e`` the local ephemeral key pair (required whenever this side sends ``e``; the
    caller generates it). ``rs`` / ``re`` are the peer's public keys and may be given
    only when the pattern's pre-messages carry them; ``psks`` holds one 32-byte key per
    ``psk`` token, in order.
    """

    def __init__(
        self,
        pattern: str,
        initiator: bool,
        *,
        prologue: bytes = b"",
        s: KeyPair | None = None,
        e: KeyPair | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        pre, self._messages = parse_pattern(pattern)
        self._initiator = initiator
        self._local: dict[str, KeyPair | None] = {"e": e, "s": s}
        self._remote: dict[str, bytes | None] = {"e": re, "s": rs}
        self._psks = list(psks)
        self._has_psk = "psk" in pattern
        self._index = 0
        self._failed = False
        self._split_done = False
        self._check_keys(pre)
        self._sym = SymmetricState(f"Noise_{pattern}_{SUITE}".encode("ascii"))
        self._sym.mix_hash(prologue)
        for sender, tokens in sorted(pre, key=lambda msg: not msg[0]):  # initiator first
            for token in tokens:
                pair = self._local[token] if sender == initiator else None
                public = pair.public if pair else self._remote[token]
                assert public is not None
                (self._mix_e if token == "e" else self._sym.mix_hash)(public)

    def _check_keys(self, pre: list[Message]) -> None:
        mine = {t for sender, ts in pre + self._messages if sender == self._initiator for t in ts}
        theirs_pre = {t for sender, ts in pre if sender != self._initiator for t in ts}
        for name, pair in self._local.items():
            if name in mine and pair is None:
                raise LocalHandshakeError(f"pattern needs a local {name!r} key pair")
        for name, public in self._remote.items():
            if (name in theirs_pre) != (public is not None):
                raise LocalHandshakeError(
                    f"remote {name!r} key given iff the pre-messages carry it"
                )
            if public is not None:
                _check_len(public, DHLEN, "remote public key")
        needed = sum(tokens.count("psk") for _, tokens in self._messages)
        if len(self._psks) != needed:
            raise LocalHandshakeError(f"pattern needs {needed} psks, got {len(self._psks)}")
        for psk in self._psks:
            _check_len(psk, KEYLEN, "psk")

    @property
    def finished(self) -> bool:
        return self._index == len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        """The running hash ``h``; after the handshake, the channel binding value."""
        return self._sym.h

    @property
    def remote_static(self) -> bytes | None:
        return self._remote["s"]

    @property
    def remote_ephemeral(self) -> bytes | None:
        return self._remote["e"]

    def _turn(self, sending: bool) -> tuple[str, ...]:
        if self._failed:
            raise LocalHandshakeError("handshake failed earlier; start a new one")
        if self.finished:
            raise LocalHandshakeError("handshake already finished")
        initiator_sends, tokens = self._messages[self._index]
        if (initiator_sends == self._initiator) != sending:
            raise LocalHandshakeError("not our turn to " + ("write" if sending else "read"))
        return tokens

    def write_message(self, payload: bytes = b"") -> bytes:
        """Return the next handshake message, carrying ``payload``."""
        tokens = self._turn(sending=True)
        _check_size(len(payload), LocalHandshakeError)
        try:
            out = b"".join(_WRITE[token](self, token) for token in tokens)
            out += self._sym.encrypt_and_hash(payload)
            _check_size(len(out), LocalHandshakeError)
        except HandshakeError:
            self._failed = True
            raise
        self._index += 1
        return out

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message; return its payload."""
        tokens = self._turn(sending=False)
        try:
            _check_size(len(message), RemoteHandshakeError)
            reader = _Reader(bytes(message))
            for token in tokens:
                _READ[token](self, token, reader)
            payload = self._sym.decrypt_and_hash(reader.rest())
        except HandshakeError:
            self._failed = True
            raise
        self._index += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """Return the spec's ``(c1, c2)`` on BOTH sides: c1 encrypts initiator -> responder,
        c2 responder -> initiator. So the initiator gets ``(send, receive)`` and the
        responder ``(receive, send)``. Once only; in one-way patterns only c1 is used."""
        if not self.finished or self._failed or self._split_done:
            raise LocalHandshakeError("split() only once, after a successful handshake")
        self._split_done = True
        return self._sym.split()

    # Token processing. "ee", "es", "se", "ss": first letter the initiator's key.
    def _write_e(self, _token: str) -> bytes:
        pair = self._local["e"]
        assert pair is not None
        self._mix_e(pair.public)
        return pair.public

    def _write_s(self, _token: str) -> bytes:
        pair = self._local["s"]
        assert pair is not None
        return self._sym.encrypt_and_hash(pair.public)

    def _read_e(self, _token: str, reader: _Reader) -> None:
        public = self._remote["e"] = reader.take(DHLEN)
        self._mix_e(public)

    def _read_s(self, _token: str, reader: _Reader) -> None:
        size = DHLEN + TAGLEN if self._sym.cipher.has_key else DHLEN
        self._remote["s"] = self._sym.decrypt_and_hash(reader.take(size))

    def _mix_e(self, public: bytes) -> None:
        self._sym.mix_hash(public)
        if self._has_psk:
            self._sym.mix_key(public)

    def _mix_dh(self, token: str) -> bytes:
        mine, theirs = (token[0], token[1]) if self._initiator else (token[1], token[0])
        pair, public = self._local[mine], self._remote[theirs]
        if pair is None or public is None:
            raise LocalHandshakeError(f"token {token!r} needs a key this side does not have")
        self._sym.mix_key(dh(pair, public))
        return b""

    def _mix_psk(self, _token: str) -> bytes:
        self._sym.mix_key_and_hash(self._psks.pop(0))
        return b""


_WRITE: dict[str, Callable[[HandshakeState, str], bytes]] = {
    "e": HandshakeState._write_e,
    "s": HandshakeState._write_s,
    "psk": HandshakeState._mix_psk,
    **dict.fromkeys(_DH_TOKENS, HandshakeState._mix_dh),
}
_READ: dict[str, Callable[[HandshakeState, str, _Reader], object]] = {
    "e": HandshakeState._read_e,
    "s": HandshakeState._read_s,
    **{t: (lambda hs, tok, _r: _WRITE[tok](hs, tok)) for t in ("psk", *_DH_TOKENS)},
}
