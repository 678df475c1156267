"""The signed mailbox policy: which senders may deposit data in a recipient's mailbox.

The relay admits data (and receipts) only from senders on the recipient's
**mailbox policy** (DESIGN §7); the recipient's agent derives the list from its
rules in force whose route is ``relay`` or ``auto`` (:func:`senders_for`), signs
it, and hands it to the relay, which thus enforces the rules without ever seeing
a collection name. Full description in ``docs/relay.md`` ("Mailbox policy")::

    wire = CBOR [body, Ed25519(owner, "p2psync/v1/mailbox-policy" 00 || body)]
    body = CBOR {0: 1, 1: owner, 2: version, 3: [sender, ...], 4: ms}

``owner`` is the recipient, and the signer: the signature is checked under the
owner named in the body, so nobody else can make a policy for a mailbox.
``version`` is 1 to 2**63 - 1 and strictly increasing per owner (a relay keeps
the highest: :func:`~p2psync.core.mailbox.newer`); senders are distinct 32-byte
keys in ascending order, at most :data:`MAX_SENDERS`, never the owner. Every
refusal is a :class:`~p2psync.errors.PolicyError`; foreign exceptions never
leave this module. Pure: keys and times come from the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from p2psync.core import canonical
from p2psync.core.flow import Flow
from p2psync.core.identity import KEY_BYTES, SIGNATURE_BYTES, Identity, short_id, verify
from p2psync.core.mailbox import MailboxPolicy
from p2psync.core.rules import Rule, proposed_via_relay
from p2psync.errors import DecodeError, PolicyError, UsageError

POLICY_PREFIX = b"p2psync/v1/mailbox-policy\x00"
FORMAT = 1
#: Most senders one policy lists (as many as the authors a store holds).
MAX_SENDERS = 10_000
#: Largest wire form: MAX_SENDERS keys of 34 encoded bytes each, and room for the
#: rest (map, owner, numbers, signature: 126 bytes at most).
MAX_POLICY_BYTES = MAX_SENDERS * (KEY_BYTES + 2) + 256
_MAX_INT = (1 << 63) - 1  # versions and times fit signed 64-bit SQL integers


@dataclass(frozen=True, slots=True)
class SignedPolicy:
    """A verified mailbox policy, with its wire form (what a relay keeps and shows)."""

    owner: bytes
    version: int
    senders: tuple[bytes, ...]
    at_ms: int
    wire: bytes = field(repr=False)

    def to_mailbox_policy(self) -> MailboxPolicy:
        """The plain value the mailbox decides by (``core/mailbox.py``)."""
        return MailboxPolicy(self.version, frozenset(self.senders))


def sign_policy(identity: Identity, version: int, senders: Iterable[bytes], at_ms: int) -> bytes:
    """Sign ``identity``'s mailbox policy admitting ``senders`` (in any order;
    repeats count once). Arguments out of range are a :class:`UsageError`."""
    try:
        listed = sorted(set(senders))
    except TypeError as exc:
        raise UsageError("a mailbox policy's senders are 32-byte keys") from exc
    body = {0: FORMAT, 1: identity.public_key, 2: version, 3: listed, 4: at_ms}
    try:
        _fields(body)
    except PolicyError as exc:
        raise UsageError(f"cannot sign this mailbox policy: {exc}") from exc
    encoded = canonical.encode(body)
    return canonical.encode([encoded, identity.sign(POLICY_PREFIX + encoded)])


def decode_policy(wire: bytes, *, owner: bytes | None = None) -> SignedPolicy:
    """Strictly decode and verify a signed mailbox policy.

    ``owner``, when given, is whose policy is expected (for the relay: the key
    of the session that handed it over): a policy for another mailbox is refused.
    """
    if type(wire) is not bytes or len(wire) > MAX_POLICY_BYTES:
        raise PolicyError(f"a mailbox policy is at most {MAX_POLICY_BYTES} bytes")
    try:
        body_bytes, signature = canonical.decode_signed(
            wire, what="a mailbox policy", signature_bytes=SIGNATURE_BYTES
        )
        body = canonical.decode(body_bytes, what="mailbox policy body", max_depth=2)
    except DecodeError as exc:
        raise PolicyError(str(exc)) from exc
    signer, version, senders, at_ms = _fields(body)
    if owner is not None and signer != owner:
        raise PolicyError(f"the mailbox policy is {short_id(signer)}'s, not {short_id(owner)}'s")
    if not verify(signer, POLICY_PREFIX + body_bytes, signature):
        raise PolicyError(
            f"the mailbox policy's signature by its owner {short_id(signer)} does not verify"
        )
    return SignedPolicy(signer, version, senders, at_ms, wire)


def senders_for(me: bytes, rules_by_peer: Mapping[bytes, Sequence[Rule]]) -> frozenset[bytes]:
    """The peers that may deposit for ``me``: those with a rule in force whose route
    is ``relay`` or ``auto``, whichever way it lets entries flow (as
    :meth:`Flow.between <p2psync.core.flow.Flow.between>` has it for the relay). A
    peer ``me`` only sends to is listed too: its receipts for our data come this
    way. A peer we asked to pair (our proposal awaiting its answer, route relay or
    auto) is listed as well: its answer comes this way. Which way entries may flow
    is enforced by ``me`` when it opens and applies what arrives (the same flow
    policy as a direct session), not by the relay.
    ``rules_by_peer`` holds any rule objects about each pair; only those in force
    between ``me`` and that peer count."""
    return frozenset(
        peer
        for peer, rules in rules_by_peer.items()
        if peer != me
        and (
            Flow.between(me, peer, rules, live=False, via_relay=True).flows
            or proposed_via_relay(rules, me, peer)  # its answer to our request
        )
    )


def _fields(body: object) -> tuple[bytes, int, tuple[bytes, ...], int]:
    if (
        type(body) is not dict
        or not all(type(key) is int for key in body)
        or set(body) != set(range(5))
    ):
        raise PolicyError("a mailbox policy body is a map with the keys 0-4")
    if type(body[0]) is not int or body[0] != FORMAT:
        raise PolicyError(f"unknown mailbox policy format {body[0]!r}")
    owner, version, senders, at_ms = body[1], body[2], body[3], body[4]
    if type(owner) is not bytes or len(owner) != KEY_BYTES:
        raise PolicyError("a mailbox policy's owner is a 32-byte key")
    if type(version) is not int or not 1 <= version <= _MAX_INT:
        raise PolicyError("a mailbox policy's version is 1 to 2**63 - 1")
    if type(senders) is not list or len(senders) > MAX_SENDERS:
        raise PolicyError(f"a mailbox policy lists at most {MAX_SENDERS} senders")
    previous = b""
    for sender in senders:
        if type(sender) is not bytes or len(sender) != KEY_BYTES:
            raise PolicyError("a mailbox policy's senders are 32-byte keys")
        if sender <= previous:
            raise PolicyError("a mailbox policy's senders are ascending, without repeats")
        if sender == owner:
            raise PolicyError("a mailbox policy does not list its owner as a sender")
        previous = sender
    if type(at_ms) is not int or not 0 <= at_ms <= _MAX_INT:
        raise PolicyError("a mailbox policy's time is 0 to 2**63 - 1 ms")
    return owner, version, tuple(senders), at_ms
