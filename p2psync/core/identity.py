"""Agent identity: an Ed25519 key pair and its human text form, the device ID.

Inside the program an identity is its 32-byte Ed25519 public key. Humans see
the **device ID**: the public key plus two check bytes
(``BLAKE2b-16(key, person=b"p2psync-devid")``) in RFC 4648 base32 without
padding (55 characters), then one Luhn mod 32 check character over those 55,
cut into eight groups of seven joined by dashes::

    5OLKRPY-KSEGNVC-BY5L4NR-FHPPHFT-NIWV7UJ-5RWX7L3-QMWI7U6-BKJVUQA

Parsing is forgiving about case, dashes and spaces, and reads the digits
``0``, ``1`` and ``8`` as the letters ``O``, ``I`` and ``B`` they are usually
mistaken for; it is strict about everything else. The Luhn character catches
every single mistyped character and most swaps of neighbours; the check bytes
catch other damage (1 in 65,536 slips through). A mistyped ID is refused,
never taken for another peer. The **short ID** is the first seven
characters, for display only.

No randomness here: a new key's seed is passed in by the caller.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from p2psync.errors import InvalidDeviceID

KEY_BYTES = 32
SIGNATURE_BYTES = 64
_CHECK_BYTES = 2
_B32_CHARS = 55  # base32 of 34 bytes, unpadded
_TEXT_CHARS = _B32_CHARS + 1  # plus the Luhn character
_GROUP = 7
_CONFUSABLE = str.maketrans({"0": "O", "1": "I", "8": "B"})
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_ALPHABET = frozenset(_B32)


def _check(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=_CHECK_BYTES, person=b"p2psync-devid").digest()


def _luhn32(text: str) -> str:
    """Luhn mod 32 check character of base32 ``text``."""
    total = 0
    factor = 2
    for char in reversed(text):
        addend = factor * _B32.index(char)
        total += addend // 32 + addend % 32
        factor = 3 - factor
    return _B32[-total % 32]


def device_id(key: bytes) -> str:
    """Return the text form of a 32-byte public key."""
    if len(key) != KEY_BYTES:
        raise ValueError("a public key is 32 bytes")
    text = base64.b32encode(key + _check(key)).decode("ascii").rstrip("=")
    text += _luhn32(text)
    return "-".join(text[i : i + _GROUP] for i in range(0, len(text), _GROUP))


def short_id(key: bytes) -> str:
    """Return the display-only short form (first seven characters of the device ID)."""
    return device_id(key).replace("-", "")[:7]


def parse_device_id(text: str) -> bytes:
    """Return the public key a device ID names; raise :class:`InvalidDeviceID`."""
    cleaned = "".join(text.split()).replace("-", "").upper().translate(_CONFUSABLE)
    if not text.isascii() or len(cleaned) != _TEXT_CHARS or not set(cleaned) <= _ALPHABET:
        raise InvalidDeviceID(
            f"invalid device ID {text!r}: expected {_TEXT_CHARS} letters and digits 2-7"
        )
    body, luhn = cleaned[:_B32_CHARS], cleaned[_B32_CHARS:]
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    key, check = raw[:KEY_BYTES], raw[KEY_BYTES:]
    if (
        luhn != _luhn32(body)
        or base64.b32encode(raw).decode("ascii").rstrip("=") != body
        or check != _check(key)
    ):
        raise InvalidDeviceID(f"invalid device ID {text!r}: check characters do not match")
    return key


def verify(key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``key``'s Ed25519 signature of ``message``."""
    if len(signature) != SIGNATURE_BYTES or len(key) != KEY_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + message, key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A signing identity, built from a 32-byte seed."""

    seed: bytes = field(repr=False)
    public_key: bytes = field(init=False)
    _secret: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.seed) != KEY_BYTES:
            raise ValueError("an Ed25519 seed is 32 bytes")
        public, secret = nacl.bindings.crypto_sign_seed_keypair(self.seed)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "_secret", secret)

    @property
    def device_id(self) -> str:
        return device_id(self.public_key)

    @property
    def short_id(self) -> str:
        return short_id(self.public_key)

    @property
    def x25519_private(self) -> bytes:
        """The X25519 form of the secret key (the Noise static key)."""
        converted: bytes = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(self._secret)
        return converted

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``message``."""
        signed: bytes = nacl.bindings.crypto_sign(message, self._secret)
        return signed[:SIGNATURE_BYTES]
